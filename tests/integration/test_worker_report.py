"""The real worker reports on the bus: under twist, retained payloads, its goodbye, the connectivity check.

Each test builds its own gateway (:class:`tests.support.worker_gateway.Gateway`):
a namespace, wireguard-go serving ``wg-x``, ``vx-x`` on top, a mosquitto, and the
worker as a subprocess in the daemon's mount and network namespace. Everything is
checked in the kernel and on the bus; waits are polls with deadlines. Needs root.
"""

from __future__ import annotations

import ipaddress
import json
import signal

from tests.support.worker_gateway import DOMAIN, KEY_A, TOPIC, BusClient, WorkerTestCase
from wgkex.lab.netns import add_address
from wgkex.lab.proc import wait_until


class ReportTests(WorkerTestCase):
    def test_runs_under_twist(self) -> None:
        """``twist wgkex-worker`` works like twistd: online, keys land, SIGTERM says goodbye and exits 0."""
        gw = self.gateway(start=False)
        gw.start_worker(runner="twist")
        gw.wait_online()
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, f"the key installed\n{gw.log_tail()}")
        self.assertEqual(gw.stop_worker(signal.SIGTERM), 0)
        wait_until(lambda: gw.bus.last(f"wireguard-worker/{gw.name}/status") == b"0", 5, "status 0")
        with open(gw.log) as f:
            self.assertNotIn("Traceback", f.read())

    def test_retained_payloads(self) -> None:
        """Retained status 1, data (Port, PublicKey, LinkAddress from the interface) and peer count."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, "key installed")
        # A fresh subscriber gets the retained messages.
        bus = BusClient(gw.mqtt.port)
        self.addCleanup(bus.close)
        bus.subscribe(f"wireguard-worker/{gw.name}/#")
        bus.subscribe(f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers")
        data_topic = f"wireguard-worker/{gw.name}/{DOMAIN}/data"
        metric_topic = f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers"
        wait_until(lambda: bus.last(data_topic) and bus.last(metric_topic)
                   and bus.last(f"wireguard-worker/{gw.name}/status"), 5, "retained messages")
        self.assertEqual(bus.last(f"wireguard-worker/{gw.name}/status"), b"1")
        data = json.loads(bus.last(data_topic) or b"")
        self.assertEqual(set(data), {"ExternalAddress", "Port", "PublicKey", "LinkAddress"})
        self.assertEqual(data["ExternalAddress"], "gw.example.net")
        self.assertEqual(data["Port"], gw.wg.listen_port())
        self.assertEqual(data["Port"], 51820)
        self.assertEqual(data["PublicKey"], gw.wg.public_key())
        self.assertEqual(data["PublicKey"], gw.public_key)
        self.assertIn(f"{ipaddress.IPv6Address(data['LinkAddress'])}/64", gw.ns.addresses("wg-x"))
        self.assertEqual(ipaddress.IPv6Address(data["LinkAddress"]), ipaddress.IPv6Address(gw.link_address))
        # Nobody shook hands: zero connected peers.
        self.assertEqual(bus.last(metric_topic), b"0")

    def test_sigterm_publishes_goodbye(self) -> None:
        """SIGTERM: metric -1 and status 0 (published by the worker, in that order), exit status 0."""
        gw = self.gateway()
        metric_topic = f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers"
        status_topic = f"wireguard-worker/{gw.name}/status"
        gw.bus.subscribe(metric_topic)
        wait_until(lambda: gw.bus.last(metric_topic) == b"0", 5, "a first count")
        self.assertEqual(gw.stop_worker(signal.SIGTERM), 0)
        wait_until(lambda: gw.bus.last(status_topic) == b"0" and gw.bus.last(metric_topic) == b"-1", 5,
                   "goodbye messages")
        with open(gw.log) as f:
            log = f.read()
        self.assertIn("MQTT disconnected", log)
        self.assertNotIn("Traceback", log)
        # Retained for whoever comes next.
        bus = BusClient(gw.mqtt.port)
        self.addCleanup(bus.close)
        bus.subscribe(status_topic)
        bus.subscribe(metric_topic)
        wait_until(lambda: bus.last(status_topic) == b"0" and bus.last(metric_topic) == b"-1", 5,
                   "retained goodbye")

    def test_connectivity_check(self) -> None:
        """Inside the namespace, GET http://[LinkAddress%wg-x]/ answers 200."""
        gw = self.gateway()
        self.check_answers(gw, gw.link_address)

    def test_new_link_address_rebinds_and_republishes(self) -> None:
        """A new link-local address on wg-x: the check moves there and the data says so, without restart."""
        gw = self.gateway()
        self.check_answers(gw, gw.link_address)
        data_topic = f"wireguard-worker/{gw.name}/{DOMAIN}/data"
        gw.bus.subscribe(data_topic)
        new = "fe80::1234"
        gw.ns.ip("address", "del", f"{gw.link_address}/64", "dev", "wg-x")
        add_address(gw.ns, "wg-x", f"{new}/64")
        wait_until(lambda: json.loads(gw.bus.last(data_topic) or b"{}").get("LinkAddress") == new, 10,
                   f"data with the new LinkAddress\n{gw.log_tail()}")
        self.check_answers(gw, new)
