"""The worker's status site (/metrics, /healthz) in memory, on the whole worker tree."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.reactors import ThreadedMemoryReactor
from tests.support.worker_fakes import KEY_A, FakeKernel, backends_for, make_config
from tests.support.worker_tree import FakePort, SyncPoolService
from wgkex.worker.http import status_site
from wgkex.worker.service import build_worker


class StatusSiteTests(SynchronousTestCase):
    """/metrics and /healthz in memory."""

    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.kernel.add_domain("ost")
        self.backends, _, _ = backends_for(self.kernel)
        self.bus = FakeBus(connected=True)
        self.root = build_worker(make_config(), self.reactor, bus=self.bus, pool=SyncPoolService(self.backends, []),
                                 support=(), ifindex=self.kernel.ifindex, listen=lambda *a: FakePort("x", 1, 1))
        worker = self.root.getServiceNamed("worker")
        # StubTreq attaches its request methods at run time: typed as Any.
        self.treq: Any = StubTreq(status_site(worker.metrics, worker.health).resource)

    def test_metrics(self) -> None:
        """/metrics serves the Prometheus text with the worker's counters."""
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.bus.deliver("wireguard/ffmuc_welt/all", b"junk")
        response = self.successResultOf(self.treq.get("http://worker/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        body = self.successResultOf(response.text())
        self.assertIn('wgkex_worker_keys_applied_total{domain="ffmuc_welt"} 1.0', body)
        self.assertIn('wgkex_worker_keys_invalid_total{reason="key"} 1.0', body)
        self.assertIn("wgkex_worker_apply_seconds_bucket", body)
        self.assertIn("wgkex_worker_batch_size_bucket", body)
        self.assertIn("wgkex_worker_sweep_seconds_bucket", body)

    def test_healthz(self) -> None:
        """/healthz answers 200 with a JSON body."""
        response = self.successResultOf(self.treq.get("http://worker/healthz"))
        self.assertEqual(response.code, 200)
        body = json.loads(self.successResultOf(response.text()))
        self.assertEqual(body, {"status": "ok", "mqtt_connected": True, "pending_keys": 0})

    def test_unknown_path(self) -> None:
        """Other paths are 404."""
        response = self.successResultOf(self.treq.get("http://worker/nope"))
        self.assertEqual(response.code, 404)
