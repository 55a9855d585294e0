"""Several MQTT servers (``mqtt.servers``): the configuration, and failing over between them.

The failover tests drive the real service the way ``tests/unit/test_mqtt_*.py``
does (a ``MemoryReactorClock``, a synchronous connect pool, MQTT spoken by hand
on unix sockets), with two such servers.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.mqtt_fakes import CONNECT, FakeServer, MqttTestCase, connack, puback
from wgkex.config import ConfigError, MqttConfig, parse_config
from wgkex.mqtt import describe_server
from wgkex.mqtt.servers import ServerList


def parse_mqtt(mqtt: Any) -> MqttConfig:
    data = {"domains": ["ffmuc_welt"], "domain_prefixes": ["ffmuc_"], "mqtt": mqtt}
    return parse_config(data, "wgkex.yaml", hostname=lambda: "testhost").mqtt


class ServersConfigTests(SynchronousTestCase):
    def test_servers_in_order_with_default_port(self) -> None:
        """mqtt.servers lists {host, port}; a missing port is broker_port's (8883 with TLS)."""
        mqtt = parse_mqtt({"servers": [{"host": "mq1.example.net", "port": 1884}, {"host": "2001:db8::2"}], "tls": True})
        self.assertEqual(mqtt.server_list(), (("mq1.example.net", 1884), ("2001:db8::2", 8883)))

    def test_old_files_keep_their_one_server(self) -> None:
        """Without mqtt.servers the one server is broker_url / broker_port, as in the original."""
        mqtt = parse_mqtt({"broker_url": "mq.example.net", "broker_port": 1885})
        self.assertEqual(mqtt.server_list(), (("mq.example.net", 1885),))

    def test_bad_servers_are_one_line_naming_the_entry(self) -> None:
        """Each kind of bad entry stops with one line naming file, key and problem."""
        cases = [
            ([], "wgkex.yaml: mqtt.servers: must be a non-empty list"),
            ("mq1:1883", "wgkex.yaml: mqtt.servers: must be a non-empty list"),
            (["mq1:1883"], "wgkex.yaml: mqtt.servers[0]: must be a mapping like {host: "),
            ([{"host": "a"}, {"port": 1883}], "wgkex.yaml: mqtt.servers[1].host: must be the server's host name"),
            ([{"host": 1883}], "wgkex.yaml: mqtt.servers[0].host: must be"),
            ([{"host": "a", "port": 70000}], "wgkex.yaml: mqtt.servers[0].port: must be an integer in 1..65535"),
            ([{"host": "a", "prot": 1}], "wgkex.yaml: mqtt.servers[0]: unknown key 'prot'"),
        ]
        for servers, expected in cases:
            with self.assertRaises(ConfigError) as ctx:
                parse_mqtt({"servers": servers})
            self.assertIn(expected, str(ctx.exception))
            self.assertNotIn("\n", str(ctx.exception))

    def test_server_list_goes_round(self) -> None:
        """advance moves to the next server and back to the first after the last."""
        servers = ServerList(MqttConfig(servers=(("a", 1), ("b", 2))))
        seen = []
        for _ in range(3):
            seen.append((servers.current, servers.name))
            servers.advance()
        self.assertEqual(seen, [(("a", 1), "a:1"), (("b", 2), "b:2"), (("a", 1), "a:1")])
        self.assertEqual(describe_server(MqttConfig(servers=(("::1", 1883),))), "[::1]:1883")


class FailoverTests(MqttTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.second = FakeServer(self)
        self.second.listen()

    def test_first_server_down_connects_to_the_second(self) -> None:
        """With the first server not answering, the client connects to the next one after the backoff."""
        self.server.stop_listening()
        service = self.make(servers=((self.server.path, 1883), (self.second.path, 1883)))
        service.startService()
        self.assertFalse(service.connected)
        self.assertIn(f"connection to unix socket {self.server.path} failed", self.texts()[0])
        self.reactor.advance(0.5)
        self.handshake(self.second.accept())
        self.assertTrue(service.connected)
        self.assertEqual(service.server, f"unix socket {self.second.path}")

    def test_lost_server_moves_to_the_next_and_round(self) -> None:
        """When the connected server goes away the client moves on to the next, round the list."""
        service = self.make(servers=((self.server.path, 1883), (self.second.path, 1883)))
        service.startService()
        first = self.handshake()
        published = service.publish("wireguard/ffmuc_welt/all", b"key", qos=1)
        first.close()
        self.server.stop_listening()
        self.read_only()
        self.assertFalse(service.connected)
        self.assertIn(f"connection to unix socket {self.server.path} lost", self.texts()[-1])
        self.reactor.advance(0.5)
        conn = self.second.accept()
        self.pump()
        packets = conn.packets()
        self.assertEqual([p.kind for p in packets][:1], [CONNECT])
        conn.send(connack())
        self.pump()
        self.assertTrue(service.connected)
        # What was queued for the lost server goes to the new one.
        resent = conn.packets()
        self.assertEqual([p.publish()[1] for p in resent], [b"key"])
        conn.send(puback(resent[0].publish()[4]))
        self.pump()
        self.assertIsNone(self.successResultOf(published))
        # The second goes away too: back to the first, which listens again.
        self.server.listen()
        conn.close()
        self.second.stop_listening()
        self.read_only()
        self.reactor.advance(0.5)
        self.handshake(self.server.accept())
        self.assertTrue(service.connected)
        self.assertEqual(service.reconnects, 2)
