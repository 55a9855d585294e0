"""End to end: the real broker, workers, mosquitto and wireguard-go, with Gluon-like routers.

Each test builds its own lab (:class:`wgkex.lab.lab.Lab` with a random id, so
tests run in parallel with each other and with ``make demo``) and removes it
afterwards. Waits are polls with deadlines. Needs root (namespaces).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from tests.support.skips import need_root_lab
from wgkex.lab.lab import Lab
from wgkex.lab.netns import namespaces
from wgkex.lab.proc import wait_until
from wgkex.lab.router import Router

KEEPALIVE = 3


class LabTestCase(SynchronousTestCase):
    skip = need_root_lab()

    def start_lab(self, gateways: dict[str, int] | None = None) -> Lab:
        lab = Lab.for_test(gateways=gateways or {"gw1": 1}, keepalive=KEEPALIVE)
        self.addCleanup(self.assert_down, lab)
        lab.up()
        return lab

    def assert_down(self, lab: Lab) -> None:
        procs = lab.ledger.procs()
        self.assertEqual(lab.down(), [])
        self.assertEqual(namespaces(f"wgkex-{lab.id}-"), [])
        self.assertEqual([p.name for p in procs if p.is_ours()], [])
        self.assertFalse(os.path.exists(lab.directory))

    def assert_tunnel_works(self, lab: Lab, router: Router) -> None:
        """Handshake on both ends, Gluon's HTTP check 200, pings over WireGuard and VXLAN."""
        reg = router.registration
        assert reg is not None
        gw = lab.gateway_for(reg)
        self.assertEqual(router.http_check(timeout=10).get("status"), 200)
        self.assertTrue(router.ping_wireguard(count=2).ok, f"{router.name}: no ping reply over WireGuard")
        self.assertTrue(router.ping_vxlan(count=2).ok, f"{router.name}: no ping reply over VXLAN")
        self.assertIsNotNone(router.handshake_age(), "the router saw no handshake")
        self.assertIsNotNone(gw.wg.handshake_age(router.public_key), "the gateway saw no handshake")


class RouterFlowTests(LabTestCase):
    def test_router_flow(self) -> None:
        """A router registering like Gluon gets a tunnel that carries HTTP, WireGuard and VXLAN traffic."""
        lab = self.start_lab()
        router = lab.add_router()
        reg = lab.connect_router(router)
        gw = lab.gateways["gw1"]
        self.assertEqual(reg.public_key, gw.public_key)
        self.assertEqual((reg.address, reg.port), ("2001:db8::1", 51820))
        self.assertEqual(reg.link_address, gw.link_address)
        self.assertTrue(gw.has_router(router.public_key))
        self.assert_tunnel_works(lab, router)
        peer = gw.peers()[router.public_key]
        self.assertGreater(peer.rx_bytes, 0)
        self.assertGreater(peer.tx_bytes, 0)

    def test_down_removes_everything(self) -> None:
        """down stops every process the lab started and removes its namespaces and state directory."""
        lab = Lab.for_test(keepalive=KEEPALIVE)
        try:
            lab.up()
            lab.connect_router(lab.add_router())
            procs = lab.ledger.procs()
            # mosquitto, broker, the gateway's wireguard-go and worker, the router's wireguard-go
            self.assertEqual(len(procs), 5)
            names = namespaces(f"wgkex-{lab.id}-")
            self.assertEqual(len(names), 3)
        finally:
            problems = lab.down()
        self.assertEqual(problems, [])
        self.assertEqual(namespaces(f"wgkex-{lab.id}-"), [])
        self.assertEqual([p.name for p in procs if p.is_ours()], [])
        self.assertFalse(os.path.exists(lab.directory))

    def test_restarted_mosquitto(self) -> None:
        """After a mosquitto restart broker and worker reconnect and a new router gets a working tunnel."""
        lab = self.start_lab()
        first = lab.add_router()
        lab.connect_router(first)
        worker_logins = lab.mqtt_logins("gw1")
        self.assertGreaterEqual(worker_logins, 1)
        lab.restart_mosquitto()
        lab.wait_broker_ready(timeout=15)
        wait_until(lambda: lab.mqtt_logins("gw1") > worker_logins, 15, "the worker to log in again")
        lab.wait_eligible(["gw1"], timeout=15)
        later = lab.add_router()
        lab.connect_router(later, timeout=15)
        self.assert_tunnel_works(lab, later)
        self.assertGreaterEqual(lab.broker_status()["mqtt"]["reconnects"], 1)


class TwoGatewayTests(LabTestCase):
    def test_spread_by_weight(self) -> None:
        """Six routers are spread 4:2 over gateways weighted 2:1, and each reaches its gateway."""
        lab = self.start_lab({"gw1": 2, "gw2": 1})
        routers = [lab.add_router() for _ in range(6)]
        chosen: Counter[str] = Counter()
        for router in routers:
            reg = lab.connect_router(router)
            chosen[lab.gateway_for(reg).name] += 1
        self.assertEqual(chosen, Counter({"gw1": 4, "gw2": 2}))
        for router in routers:
            self.assertTrue(router.ping_vxlan(count=1).ok, f"{router.name}: no reply over VXLAN")

    def test_killed_worker(self) -> None:
        """A worker killed with SIGKILL stops being chosen within the keepalive window; routers go elsewhere."""
        lab = self.start_lab({"gw1": 2, "gw2": 1})
        first = lab.add_router()
        self.assertEqual(lab.gateway_for(lab.connect_router(first)).name, "gw1")
        start = time.monotonic()
        lab.gateways["gw1"].stop_worker(signal.SIGKILL)
        lab.wait_eligible(["gw1"], timeout=1.5 * KEEPALIVE + 2, eligible=False)
        elapsed = time.monotonic() - start
        self.assertLess(elapsed, 1.5 * KEEPALIVE + 2)
        later = lab.add_router()
        reg = lab.connect_router(later)
        self.assertEqual(lab.gateway_for(reg).name, "gw2")
        self.assert_tunnel_works(lab, later)

    def test_frozen_worker(self) -> None:
        """A worker that stops answering (SIGSTOP, no FIN) is dropped by its last will after 1.5 keepalives."""
        lab = self.start_lab({"gw1": 2, "gw2": 1})
        worker = lab.gateways["gw1"].worker
        assert worker is not None
        start = time.monotonic()
        worker.send(signal.SIGSTOP)
        self.addCleanup(worker.send, signal.SIGCONT)  # runs before the lab's teardown
        # Generous deadline: the server's check and the broker's page cache add seconds on a loaded CI machine.
        lab.wait_eligible(["gw1"], timeout=1.5 * KEEPALIVE + 10, eligible=False)
        elapsed = time.monotonic() - start
        # The server drops a client 1.5 keepalives after its last packet, and the frozen
        # worker's last ping may have gone out up to one keepalive before SIGSTOP: so at
        # least half a keepalive passes. Less would mean a closed socket, not the keepalive.
        self.assertGreater(elapsed, 0.5 * KEEPALIVE)
        reg = lab.connect_router(lab.add_router())
        self.assertEqual(lab.gateway_for(reg).name, "gw2")
