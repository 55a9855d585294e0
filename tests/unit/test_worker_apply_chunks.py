"""apply_domain works chunk by chunk, with failures isolated to their chunk.

The next chunk's peers are added while this chunk's rtnetlink work runs (a
:class:`~tests.support.worker_fakes.LazyExecutor` shows the order).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import FakeKernel, FakeRtnl, FakeWireGuard, LazyExecutor, key
from wgkex.worker.apply import CHUNK, apply_domain
from wgkex.worker.domains import Interfaces
from wgkex.worker.pool import Backends, WireGuardThread


class PipelineTests(SynchronousTestCase):
    """apply_domain works chunk by chunk, adding the next chunk's peers during this chunk's rtnetlink work."""

    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.log: list[tuple[str, str]] = []
        self.executor = LazyExecutor(self.log)
        log = self.log

        class LoggingRtnl(FakeRtnl):
            def replace_routes(self, iface: str, addresses: Sequence[str]) -> dict[str, str]:
                log.append(("routes", str(len(addresses))))
                return super().replace_routes(iface, addresses)

        self.wg = FakeWireGuard(self.kernel)
        self.rtnl = LoggingRtnl(self.kernel)
        self.wireguard = WireGuardThread(self.executor, lambda: self.wg)
        self.backends = Backends(wireguard=self.wireguard, rtnl=self.rtnl)
        self.ifaces = Interfaces("wg-welt", "vx-welt")
        self.log.clear()

    def test_next_peers_started_before_routes(self) -> None:
        """Chunk n+1's peers are handed to the WireGuard thread before chunk n's routes are installed."""
        keys = [key(n) for n in range(10)]
        result = apply_domain(self.backends, self.ifaces, keys, chunk=4)
        self.assertEqual(
            self.log,
            [
                ("submit", "add"), ("run", "add"),  # chunk 1 peers: nothing else to do meanwhile
                ("submit", "add"), ("routes", "4"),  # chunk 2 peers started, then chunk 1 routes
                ("run", "add"), ("submit", "add"), ("routes", "4"),
                ("run", "add"), ("routes", "2"),
            ],
        )
        self.assertEqual(result.applied, keys)
        self.assertEqual([c for c in self.wg.calls if c[0] == "add_peers"], [("add_peers", "wg-welt", n) for n in (4, 4, 2)])
        self.assertTrue(all(self.kernel.has("welt", k) for k in keys))

    def test_bad_key_isolated_to_its_chunk(self) -> None:
        """A key sinking its add_peers call fails alone; its chunk is bisected, the other chunks are untouched."""
        keys = [key(n) for n in range(12)]
        self.wg.refuse.add(keys[6])
        result = apply_domain(self.backends, self.ifaces, keys, chunk=4)
        self.assertEqual(set(result.failed), {keys[6]})
        self.assertEqual(result.failed[keys[6]].reason, "wireguard")
        self.assertEqual(result.applied, [k for k in keys if k != keys[6]])
        self.assertTrue(self.kernel.nothing_on("welt", keys[6]))
        sizes = [c[2] for c in self.wg.calls if c[0] == "add_peers"]
        self.assertEqual(sizes[0], 4)
        self.assertEqual(sizes[-1], 4)  # the third chunk in one call, as ever

    def test_started_peers_finish_before_a_failed_job_returns(self) -> None:
        """Even when rtnetlink work blows up, the peers already handed over are added before the job ends."""

        class Boom(BaseException):
            pass

        def explode(iface: str, addresses: Sequence[str]) -> dict[str, str]:
            raise Boom()

        self.rtnl.replace_routes = explode  # type: ignore[method-assign]
        keys = [key(n) for n in range(8)]
        with self.assertRaises(Boom):
            apply_domain(self.backends, self.ifaces, keys, chunk=4)
        self.assertEqual(self.executor.queue, [])
        self.assertEqual(set(self.kernel.peers["wg-welt"]), set(keys))

    def test_default_chunk(self) -> None:
        """A batch larger than CHUNK costs one add_peers, one replace_routes and one append_fdb per CHUNK keys."""
        keys = [key(n) for n in range(CHUNK + 1)]
        result = apply_domain(self.backends, self.ifaces, keys)
        self.assertEqual(len(result.applied), CHUNK + 1)
        self.assertEqual([c[2] for c in self.wg.calls if c[0] == "add_peers"], [CHUNK, 1])
        self.assertEqual([c[2] for c in self.rtnl.calls if c[0] == "append_fdb"], [CHUNK, 1])
