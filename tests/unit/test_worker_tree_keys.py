"""Keys through the whole worker tree: interfaces that come and go, failing keys, the sweep, a burst."""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.reactors import ThreadedMemoryReactor
from tests.support.worker_fakes import GATEWAY_KEY, KEY_A, KEY_B, FakeKernel, backends_for, key, make_config
from tests.support.worker_tree import DATA_WELT, FakePort, ManualPoolService, WorkerTreeCase
from wgkex.keys import lladdr
from wgkex.worker.apply import CHUNK
from wgkex.worker.retry import MAX_RETRIES
from wgkex.worker.service import WATCH_INTERVAL, build_worker


class WorkerTreeKeysTests(WorkerTreeCase):
    """build_worker + WorkerRoot with a fake bus, kernel and pool: what becomes of the keys."""

    def test_interface_recreated_reapplies_known_keys(self) -> None:
        """wireguard-go restarted (wg-* and vx-* recreated, everything on them gone): keys come back."""
        self.start()
        self.bus.connect()
        for k in (KEY_A, KEY_B):
            self.bus.deliver("wireguard/ffmuc_welt/all", k.encode())
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.reactor.advance(WATCH_INTERVAL)
        self.kernel.add_domain("welt", port=51999, address="fe80::1")
        self.bus.published.clear()
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("welt", KEY_B))
        self.assertEqual(json.loads(self.bus.last(DATA_WELT) or b"")["Port"], 51999)

    def test_recreated_interface_gives_peers_time_to_shake_hands(self) -> None:
        """Peers re-installed after wireguard-go restarted are not swept before they could shake hands again."""
        self.start()  # cleanup_interval 1 h, peer_timeout 3 h
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        # The router stays connected: a fresh handshake every half hour.
        for _ in range(7):
            self.reactor.advance(1800)
            self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        self.reactor.advance(1800 - 60)
        self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        # wireguard-go restarts a minute before the 4 h sweep: the peer is back, not yet handshaked.
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.kernel.add_domain("welt", address="fe80::1")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.reactor.advance(60 - WATCH_INTERVAL)  # the sweep at 4 h
        self.assertTrue(self.kernel.has("welt", KEY_A))
        # A router that really went away is still swept, peer_timeout after the restart.
        self.reactor.advance(3 * 3600 + 60)
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))

    def test_recreated_between_checks(self) -> None:
        """An interface recreated between two checks (new index, same name) is noticed too."""
        self.start()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.kernel.add_domain("welt")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_keys_for_missing_interface_land_when_it_appears(self) -> None:
        """Keys received while the interface is missing are installed once it appears, without restart."""
        self.kernel.delete("wg-ost")
        self.kernel.delete("vx-ost")
        with capturedLogs() as events:
            self.start()
            self.bus.deliver("wireguard/ffmuc_ost/all", KEY_A.encode())
        self.assertTrue(any(e["log_level"] == LogLevel.warn and e.get("domain") == "ffmuc_ost" for e in events))
        self.assertFalse(self.kernel.has("ost", KEY_A))
        self.kernel.add_domain("ost")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("ost", KEY_A))

    def test_failed_keys_retried_with_metrics_tick(self) -> None:
        """A key that failed for another reason is retried with the next metrics tick."""
        self.start()
        self.rtnl.refuse_routes.add("fe80::2a6:8fff:fe21:5465")
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertFalse(self.kernel.has("welt", KEY_A))
        self.rtnl.refuse_routes.clear()
        self.reactor.advance(60)
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_gateway_own_key_refused(self) -> None:
        """The gateway's own public key from the bus never reaches the kernel and counts as invalid."""
        self.start()
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", GATEWAY_KEY.encode())
        self.assertFalse(self.kernel.has("welt", GATEWAY_KEY))
        self.assertNotIn(lladdr(GATEWAY_KEY), self.kernel.routes.get("wg-welt", set()))
        invalid = self.root.getServiceNamed("worker").metrics.registry.get_sample_value("wgkex_worker_keys_invalid_total", {"reason": "key"})
        self.assertEqual(invalid, 1)

    def test_failing_key_given_up_after_retries(self) -> None:
        """A key that keeps failing is retried MAX_RETRIES times, then left until its router registers again."""
        self.start()
        self.bus.connect()
        self.rtnl.refuse_routes.add(lladdr(KEY_A))
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        for _ in range(MAX_RETRIES + 2):
            self.reactor.advance(60)
        failed = self.root.getServiceNamed("worker").metrics.registry.get_sample_value(
            "wgkex_worker_keys_failed_total", {"domain": "ffmuc_welt", "reason": "route"}
        )
        self.assertEqual(failed, 1 + MAX_RETRIES)
        self.rtnl.refuse_routes.clear()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_sweep_timer(self) -> None:
        """Every cleanup_interval the stale peers go."""
        self.start(make_config(cleanup_interval=100, peer_timeout=50))
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        self.reactor.advance(99)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.reactor.advance(1)
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))


class ManyKeysTests(SynchronousTestCase):
    """A burst through the whole tree."""

    def test_burst_coalesced(self) -> None:
        """2,000 keys delivered while a batch is in flight cost one more batch, not 2,000 (one add_peers per chunk)."""
        kernel = FakeKernel()
        kernel.add_domain("welt")
        kernel.add_domain("ost")
        backends, wg, _ = backends_for(kernel)
        bus = FakeBus()
        events: list[tuple[Any, ...]] = []
        pool = ManualPoolService(backends, events)
        root = build_worker(make_config(worker_listen="off"), ThreadedMemoryReactor(), bus=bus, pool=pool,
                            support=(), ifindex=kernel.ifindex, listen=lambda *a: FakePort("x", 1, 1))
        root.startService()
        pool.release()
        for n in range(2000):
            bus.deliver("wireguard/ffmuc_welt/all", key(n).encode())
        self.assertEqual(pool.jobs(), ["apply_batch"])
        pool.release()
        self.assertEqual(len([c for c in wg.calls if c[0] == "add_peers"]), 1 + -(-1999 // CHUNK))
        self.assertTrue(all(kernel.has("welt", key(n)) for n in range(2000)))
        d = root.stopService()
        pool.release()
        self.successResultOf(d)
