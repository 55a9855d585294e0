"""The worker's fakes (:mod:`tests.support.worker_fakes`) behave like the real boundary.

The worker's tests rest on these fakes, so their own behaviour is pinned here.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import KEY_A, KEY_B, LL_A, LL_B, FakeKernel, LazyExecutor, backends_for, key
from wgkex.worker.backend import InterfaceMissing, PeersFailed


class FakesTests(SynchronousTestCase):
    """The fakes behave like the real boundary where the worker relies on it."""

    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)

    def test_add_peers_idempotent(self) -> None:
        """Adding the same peer twice leaves one peer, like WireGuard."""
        self.wg.add_peers("wg-welt", [(KEY_A, LL_A + "/128")])
        self.wg.add_peers("wg-welt", [(KEY_A, LL_A + "/128")])
        self.assertEqual(len(self.wg.peers("wg-welt")), 1)

    def test_missing_interface(self) -> None:
        """Operations on a missing interface raise InterfaceMissing."""
        self.assertRaises(InterfaceMissing, self.wg.add_peers, "wg-nope", [(KEY_A, LL_A + "/128")])
        self.assertRaises(InterfaceMissing, self.rtnl.replace_routes, "wg-nope", [LL_A])

    def test_delete_takes_everything(self) -> None:
        """Deleting wg-* drops its peers, routes and the FDB entries via it, as the kernel does."""
        self.wg.add_peers("wg-welt", [(KEY_A, LL_A + "/128")])
        self.rtnl.replace_routes("wg-welt", [LL_A])
        self.rtnl.append_fdb("vx-welt", "wg-welt", [LL_A])
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.kernel.delete("wg-welt")
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))

    def test_partial_refusal(self) -> None:
        """PeersFailed names the refused keys and the others are applied."""
        self.wg.refuse_partially.add(KEY_B)
        with self.assertRaises(PeersFailed) as caught:
            self.wg.add_peers("wg-welt", [(KEY_A, LL_A + "/128"), (KEY_B, LL_B + "/128")])
        self.assertEqual(set(caught.exception.failed), {KEY_B})
        self.assertEqual([p.public_key for p in self.wg.peers("wg-welt")], [KEY_A])

    def test_lazy_executor_runs_on_demand_in_order(self) -> None:
        """LazyExecutor runs nothing at submit; asking for a result runs the work queued up to it."""
        executor = LazyExecutor()
        first = executor.submit(lambda: 1)
        second = executor.submit(lambda: 2)
        self.assertFalse(first.done())
        self.assertEqual(second.result(), 2)
        self.assertTrue(first.done())
        self.assertEqual([what for what, _ in executor.log], ["submit", "submit", "run", "run"])

    def test_generated_keys_valid(self) -> None:
        """key(n) gives distinct valid keys."""
        from wgkex.keys import is_valid_public_key

        keys = {key(n) for n in range(100)}
        self.assertEqual(len(keys), 100)
        self.assertTrue(all(is_valid_public_key(k) for k in keys))
