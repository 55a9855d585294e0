"""The twistd plugin builds the worker tree from the configuration without opening anything."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker import tap


class MakeServiceTests(SynchronousTestCase):
    """makeService from a real config file."""

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
        self.assertEqual(names, ["logging", "sigterm", "netlink-pool", "worker", "status-http", "mqtt"])
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
