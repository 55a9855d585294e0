"""The twistd plugin builds the worker tree from the configuration without opening anything."""

from __future__ import annotations

import os
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.support.reactors import ThreadedMemoryReactor
from wgkex.worker import tap
from wgkex.worker.pool import GcPause


class MakeServiceTests(SynchronousTestCase):
    """makeService from a real config file."""

    def setUp(self) -> None:
        # makeService tunes the process (see test_switch_interval): give trial its own setting back.
        self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())

    def options(self, extra: str = "") -> tap.Options:
        fd, path = tempfile.mkstemp(suffix=".yaml")
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "w") as f:
            f.write(
                "domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\nworker_name: gw7\n"
                "externalName: gw7.example.net\n" + extra
            )
        options = tap.Options()
        options.parseOptions(["--config", path])
        return options

    def test_tree(self) -> None:
        """logging, pool, worker, status HTTP and MQTT, in start order; nothing running."""
        from wgkex.mqtt import MqttService

        root = tap.makeService(self.options())
        names = [s.name for s in root]  # type: ignore[attr-defined]
        self.assertEqual(names, ["logging", "sigterm", "netlink-pool", "worker", "status-http", "mqtt", "goodbye"])
        timers = [s.name for s in root.getServiceNamed("worker")]  # type: ignore[attr-defined]
        self.assertEqual(timers, ["interface-watch", "metrics", "sweep"])
        self.assertFalse(root.running)
        mqtt = root.getServiceNamed("mqtt")  # type: ignore[attr-defined]
        self.assertIsInstance(mqtt, MqttService)

    def test_persistent_session_and_will(self) -> None:
        """MQTT: client id = worker name, clean session off, last will status 0 retained QoS 1."""
        mqtt = tap.makeService(self.options()).getServiceNamed("mqtt")  # type: ignore[attr-defined]
        self.assertEqual(mqtt.client_id, "gw7")
        self.assertFalse(mqtt.clean_session)
        self.assertEqual(
            (mqtt.will.topic, mqtt.will.payload, mqtt.will.qos, mqtt.will.retain),
            ("wireguard-worker/gw7/status", b"0", 1, True),
        )

    def test_configured_client_id(self) -> None:
        """mqtt.client_id overrides the worker name as client id."""
        mqtt = tap.makeService(self.options("mqtt: {client_id: fixed-id}\n")).getServiceNamed("mqtt")  # type: ignore[attr-defined]
        self.assertEqual(mqtt.client_id, "fixed-id")

    def test_no_status_listener(self) -> None:
        """worker_listen: off leaves the status listener out."""
        root = tap.makeService(self.options("worker_listen: off\n"))
        self.assertNotIn("status-http", [s.name for s in root])  # type: ignore[attr-defined]

    def test_switch_interval(self) -> None:
        """Building the worker sets Python's thread switch interval to 1 ms (the tap's process tuning)."""
        sys.setswitchinterval(0.005)
        tap.makeService(self.options())
        self.assertAlmostEqual(sys.getswitchinterval(), tap.SWITCH_INTERVAL)

    def test_collector_pause_handed_to_the_pool(self) -> None:
        """The tap makes the process's collector pause and hands it to the netlink pool (no module-global one)."""
        first = tap.makeService(self.options()).getServiceNamed("netlink-pool")  # type: ignore[attr-defined]
        second = tap.makeService(self.options()).getServiceNamed("netlink-pool")  # type: ignore[attr-defined]
        self.assertIsInstance(first.gc_pause, GcPause)
        self.assertIsNot(first.gc_pause, second.gc_pause)

    def test_given_reactor_used(self) -> None:
        """makeService(options, reactor) builds on that reactor, not the global one."""
        reactor = ThreadedMemoryReactor()
        status = tap.makeService(self.options(), reactor).getServiceNamed("status-http")  # type: ignore[attr-defined]
        status.startService()
        self.addCleanup(status.stopService)
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers], [(9101, "127.0.0.1")])
