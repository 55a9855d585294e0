"""MqttService connects and reconnects: the backoff's delays, refused connects, resubscribing, the CONNECT packet.

The subject is the real service driving a real paho client. Only the edges are
stand-ins (:mod:`tests.support.mqtt_fakes`): time and the reactor's
file-descriptor bookkeeping are a ``MemoryReactorClock``, the connect thread pool
runs its work synchronously, and the MQTT server is the test speaking MQTT 3.1.1
by hand on the far end of a unix socket, so no network and no sleeps are involved.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.mqtt_fakes import SUBSCRIBE, MqttTestCase, connack
from wgkex.config import MqttConfig
from wgkex.mqtt import Backoff, MqttService, Will, describe_server


class BackoffTests(SynchronousTestCase):
    def test_grows_and_caps(self) -> None:
        """Delays start at the initial value, double, and stay at the cap."""
        backoff = Backoff(0.5, 30.0)
        self.assertEqual([backoff.next() for _ in range(9)], [0.5, 1, 2, 4, 8, 16, 30, 30, 30])

    def test_reset(self) -> None:
        """After reset the next delay is the initial one again."""
        backoff = Backoff(1.0, 10.0)
        for _ in range(5):
            backoff.next()
        backoff.reset()
        self.assertEqual(backoff.next(), 1.0)

    def test_cap_below_initial(self) -> None:
        """A cap smaller than the initial delay wins from the first attempt on."""
        self.assertEqual(Backoff(0.5, 0.2).next(), 0.2)

    def test_jitter_only_shortens(self) -> None:
        """Jitter takes at most its fraction off a delay and never lengthens it."""
        self.assertEqual(Backoff(4.0, 30.0, jitter=0.25, rand=lambda: 0.0).next(), 4.0)
        self.assertEqual(Backoff(4.0, 30.0, jitter=0.25, rand=lambda: 0.999999).next(), 4.0 * (1 - 0.25 * 0.999999))


class ReconnectTests(MqttTestCase):
    def test_failed_connects_back_off_growing_and_capped(self) -> None:
        """With no server, attempts follow 0.5, 1, 2, 4, 8, 8 s (cap 8) and each is logged."""
        self.server.stop_listening()
        service = self.make(reconnect_max_delay=8.0)
        service.startService()
        self.assertEqual(self.pool.calls, 1)
        for expected_calls, delay in enumerate([0.5, 1, 2, 4, 8, 8], start=2):
            self.reactor.advance(delay - 0.01)
            self.assertEqual(self.pool.calls, expected_calls - 1)
            self.reactor.advance(0.01)
            self.assertEqual(self.pool.calls, expected_calls)
        self.assertEqual(self.delays(), [0.5, 1, 2, 4, 8, 8, 8])
        self.assertFalse(service.connected)
        self.assertIn(f"MQTT connection to unix socket {self.server.path} failed (FileNotFoundError", self.texts()[0])
        self.assertIn("reconnecting in 0.5 s", self.texts()[0])

    def test_backoff_resets_after_successful_connect(self) -> None:
        """After a CONNACK, the next loss waits the initial delay again, not the grown one."""
        self.server.stop_listening()
        service = self.make()
        service.startService()
        self.reactor.advance(0.5)
        self.reactor.advance(1)
        self.server.listen()
        self.reactor.advance(2)
        conn = self.handshake()
        self.assertTrue(service.connected)
        conn.close()
        self.pump()
        self.assertFalse(service.connected)
        self.assertEqual(self.delays(), [0.5, 1, 2, 0.5])
        self.assertIn(f"MQTT connection to unix socket {self.server.path} lost (", self.texts()[-1])
        self.assertIn("); reconnecting in 0.5 s", self.texts()[-1])

    def test_refused_connack_is_retried_and_logged(self) -> None:
        """A CONNACK refusal (not authorised) is logged with its reason and retried with backoff."""
        service = self.make(username="u", password="wrong")
        service.startService()
        conn = self.server.accept()
        self.pump()
        conn.packets()
        conn.send(connack(rc=5))
        self.pump()
        self.assertFalse(service.connected)
        self.assertEqual(self.delays(), [0.5])
        self.assertIn("refused by the server: Not authorized", self.texts()[-1])
        self.reactor.advance(0.5)
        self.assertEqual(self.pool.calls, 2)

    def test_resubscribes_on_every_connect(self) -> None:
        """Every connect sends one SUBSCRIBE with all filters, before the connect callbacks run."""
        service = self.make()
        seen: list[str] = []
        service.subscribe("wireguard/ffmuc_welt/+", 1, lambda t, p, r: None)
        service.subscribe("wireguard-worker/+/status", 0, lambda t, p, r: None)
        service.add_connect_callback(lambda: seen.append("connect"))
        service.add_disconnect_callback(lambda: seen.append("disconnect"))
        service.startService()
        expected = [("wireguard/ffmuc_welt/+", 1), ("wireguard-worker/+/status", 0)]
        for round_ in range(3):
            conn = self.handshake()
            packets = conn.packets()
            self.assertEqual([p.kind for p in packets], [SUBSCRIBE])
            self.assertEqual(packets[0].subscribe()[1], expected)
            self.assertEqual(service.reconnects, round_)
            conn.close()
            self.pump()
            self.reactor.advance(0.5)
        self.assertEqual(seen, ["connect", "disconnect"] * 3)

    def test_subscribe_while_connected_is_sent_at_once(self) -> None:
        """A subscription made while connected goes out immediately and is kept for reconnects."""
        service = self.make()
        conn = self.start_connected(service)
        service.subscribe("a/#", 1, lambda t, p, r: None)
        self.pump()
        packets = conn.packets()
        self.assertEqual([(p.kind, p.subscribe()[1]) for p in packets], [(SUBSCRIBE, [("a/#", 1)])])

    def test_connect_packet(self) -> None:
        """CONNECT carries the client id, clean session off, credentials, keepalive and the last will."""
        service = self.make(
            client_id="worker-1", clean_session=False, username="user", password="secret",
            will=Will("wireguard-worker/worker-1/status", b"0"),
        )
        self.start_connected(service)
        self.assertEqual(
            self.last_connect,
            {
                "protocol": b"MQTT", "level": 4, "keepalive": 60, "client_id": "worker-1", "clean_session": False,
                "will": ("wireguard-worker/worker-1/status", b"0", 1, True), "username": "user", "password": "secret",
            },
        )

    def test_persistent_session_needs_client_id(self) -> None:
        """Clean session off without a client id is refused with a message naming the setting."""
        with self.assertRaises(ValueError) as ctx:
            MqttService(self.reactor, MqttConfig(), clean_session=False)
        self.assertIn("mqtt.client_id", str(ctx.exception))

    def test_describe_server(self) -> None:
        """Log lines name the server the way the configuration does."""
        self.assertEqual(describe_server(MqttConfig(broker_url="10.0.0.1", broker_port=1883)), "10.0.0.1:1883")
        self.assertEqual(describe_server(MqttConfig(broker_url="::1", broker_port=8883, tls=True)), "[::1]:8883 (TLS)")
        self.assertEqual(
            describe_server(MqttConfig(broker_url="mq", broker_port=443, transport="websockets", tls=True)),
            "wss://mq:443/mqtt",
        )
        self.assertEqual(describe_server(MqttConfig(broker_url="/run/m.sock", transport="unix")), "unix socket /run/m.sock")
