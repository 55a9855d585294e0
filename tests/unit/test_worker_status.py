"""The worker's /api/v1/status on worker_listen: per domain what it holds, read from the running tree."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.reactors import ThreadedMemoryReactor
from tests.support.worker_fakes import KEY_A, KEY_B, FakeKernel, backends_for, key, make_config
from tests.support.worker_tree import START, FakePort, SyncPoolService
from wgkex.keys import lladdr
from wgkex.worker.http import status_site
from wgkex.worker.service import build_worker
from wgkex.worker.status import backend_of


class WorkerStatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.reactor.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt", address="fe80::1")  # ffmuc_ost has no interfaces
        backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.bus = FakeBus()
        config = make_config(cleanup_interval=600, peer_timeout=300, metrics_interval=60)
        self.root = build_worker(config, self.reactor, bus=self.bus, pool=SyncPoolService(backends, []),
                                 support=(), ifindex=self.kernel.ifindex, listen=lambda *a: FakePort("x", 1, 1))
        self.root.startService()
        self.addCleanup(lambda: self.root.running and self.root.stopService())
        self.bus.connect()
        worker = self.root.getServiceNamed("worker")
        self.treq: Any = StubTreq(status_site(worker.metrics, worker.health, worker.status).resource)

    def status(self) -> dict[str, Any]:
        response = self.successResultOf(self.treq.get("http://worker/api/v1/status"))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        result: dict[str, Any] = json.loads(self.successResultOf(response.text()))
        return result

    def test_fresh_worker(self) -> None:
        """Before any key: interfaces as found, backend, zero counts, no batch and no sweep yet."""
        status = self.status()
        self.assertEqual((status["worker"], status["mqtt"], status["pending"]), ("gw1", {"connected": True}, 0))
        welt, ost = status["domains"]["ffmuc_welt"], status["domains"]["ffmuc_ost"]
        self.assertEqual(welt["interface"]["wireguard"], "wg-welt")
        self.assertEqual(welt["interface"]["vxlan"], "vx-welt")
        self.assertTrue(welt["interface"]["present"])
        self.assertEqual(welt["interface"]["link_address"], "fe80::1")
        self.assertFalse(ost["interface"]["present"])
        self.assertIn(welt["backend"], ("uapi", "kernel"))
        self.assertEqual(welt["keys"], {"applied": 0, "failed": {}, "pending": 0, "waiting_for_retry": 0})
        self.assertIsNone(welt["last_batch"])
        self.assertIsNone(welt["last_sweep"])

    def test_keys_batches_and_failures(self) -> None:
        """Applied and failed keys per domain and reason, the last batch, the peer counts after a report."""
        self.rtnl.refuse_routes.add(lladdr(KEY_B))
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_B.encode())
        self.bus.deliver("wireguard/ffmuc_ost/all", key(7).encode())
        self.reactor.advance(60)  # a metrics tick: peer counts, and a retry of the failed keys
        status = self.status()
        welt, ost = status["domains"]["ffmuc_welt"], status["domains"]["ffmuc_ost"]
        self.assertEqual(welt["keys"]["applied"], 1)
        self.assertEqual(welt["keys"]["failed"], {"route": 2})
        self.assertEqual(welt["keys"]["waiting_for_retry"], 1)
        self.assertEqual(ost["keys"]["failed"], {"interface_missing": 2})
        self.assertEqual(welt["last_batch"]["keys"], 1)  # the retry of KEY_B
        self.assertEqual(welt["last_batch"]["failed"], 1)
        self.assertEqual(welt["last_batch"]["at"], START + 60)
        self.assertGreaterEqual(welt["last_batch"]["seconds"], 0)
        self.assertEqual((welt["peers"], welt["connected_peers"]), (2, 0))
        self.assertEqual(ost["connected_peers"], -1)

    def test_last_sweep_names_what_it_removed(self) -> None:
        """After a sweep: when it ran, the peers it looked at and the keys it removed."""
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_B.encode())
        self.reactor.advance(500)
        self.wg.handshake("wg-welt", KEY_B, self.reactor.seconds())
        self.reactor.advance(100)
        sweep = self.status()["domains"]["ffmuc_welt"]["last_sweep"]
        self.assertEqual((sweep["at"], sweep["peers"], sweep["removed"]), (START + 600, 2, 1))
        self.assertEqual(sweep["removed_keys"], [KEY_A])
        self.assertIsNone(sweep["error"])

    def test_backend_follows_auto_rule(self) -> None:
        """auto reports uapi when the interface's socket exists, else kernel; a fixed mode is reported as set."""
        config = make_config(uapi_socket_dir="/run/wg")
        self.assertEqual(backend_of(config, "wg-welt", lambda p: p == "/run/wg/wg-welt.sock"), "uapi")
        self.assertEqual(backend_of(config, "wg-welt", lambda p: False), "kernel")
        self.assertEqual(backend_of(make_config(wireguard_backend="uapi"), "wg-welt", lambda p: False), "uapi")
