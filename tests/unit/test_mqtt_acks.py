"""Received messages are acknowledged once their subscribers are done with them, in arrival order.

The pure queue (:class:`wgkex.mqtt.acks.Acknowledgements`) first, then the
real service with a real paho client against the hand-written MQTT server of
:mod:`tests.support.mqtt_fakes`: what a subscriber's Deferred means for the
PUBACKs on the wire, across a lost connection too.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from tests.support.mqtt_fakes import PUBACK, PUBLISH, MqttTestCase, Packet, ServerConnection, publish_packet
from wgkex.bus import Redeliver
from wgkex.mqtt.acks import Acknowledgements

TOPIC = "wireguard/ffmuc_welt/all"


class AcknowledgementsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sent: list[tuple[int, int]] = []
        self.acks = Acknowledgements(lambda mid, qos: self.sent.append((mid, qos)))

    def test_sent_in_arrival_order(self) -> None:
        """A message settled early waits for the ones that arrived before it; then all go in order."""
        first, second, third = (self.acks.received(mid, 1) for mid in (1, 2, 3))
        self.acks.settle(third)
        self.acks.settle(second)
        self.assertEqual(self.sent, [])
        self.acks.settle(first)
        self.assertEqual(self.sent, [(1, 1), (2, 1), (3, 1)])
        self.assertEqual(self.acks.waiting, 0)

    def test_unacknowledged_leaves_the_queue_silently(self) -> None:
        """A message settled without acknowledgement is skipped and does not hold up the next."""
        first, second = self.acks.received(1, 1), self.acks.received(2, 1)
        self.acks.settle(first, acknowledge=False)
        self.acks.settle(second)
        self.assertEqual(self.sent, [(2, 1)])

    def test_forget_drops_the_connection_receipts(self) -> None:
        """After the connection is gone its receipts are dropped and settling them sends nothing."""
        old = self.acks.received(1, 1)
        self.assertEqual(self.acks.forget(), 1)
        new = self.acks.received(1, 1)  # the same message id on the next connection
        self.acks.settle(old)
        self.assertEqual(self.sent, [])
        self.acks.settle(new)
        self.assertEqual(self.sent, [(1, 1)])

    def test_qos0_needs_nothing(self) -> None:
        """QoS 0 messages are never acknowledged and hold up nothing; QoS 2 ones are, with their QoS."""
        self.acks.received(0, 0)
        two = self.acks.received(5, 2)
        self.assertEqual(self.acks.waiting, 1)
        self.acks.settle(two)
        self.acks.settle(two)  # twice is once
        self.assertEqual(self.sent, [(5, 2)])


def pubacks(packets: list[Packet]) -> list[int]:
    return [int.from_bytes(p.body, "big") for p in packets if p.kind == PUBACK]


class ServiceAcknowledgementTests(MqttTestCase):
    """The service with paho's manual acknowledgements: the PUBACKs a subscriber's Deferreds allow."""

    def connected_with(self, handler: object) -> ServerConnection:
        service = self.make(client_id="gw1", clean_session=False)
        service.subscribe("wireguard/+/all", 1, handler)  # type: ignore[arg-type]
        conn = self.start_connected(service)
        conn.packets()  # SUBSCRIBE
        return conn

    def test_no_puback_until_the_subscriber_is_done(self) -> None:
        """A QoS 1 message whose callback returned a Deferred is acknowledged only once it fires."""
        pending: list[Deferred[None]] = []

        def handler(topic: str, payload: bytes, retained: bool) -> Deferred[None]:
            pending.append(Deferred())
            return pending[-1]

        conn = self.connected_with(handler)
        conn.send(publish_packet(TOPIC, b"k1", qos=1, mid=7))
        self.assertEqual(pubacks(self.exchange(conn)), [])
        self.assertEqual(len(pending), 1)
        pending[0].callback(None)
        self.assertEqual(pubacks(self.exchange(conn)), [7])

    def test_pubacks_keep_arrival_order(self) -> None:
        """A later message finished first is acknowledged after the earlier one (MQTT 3.1.1, 4.6)."""
        pending: dict[bytes, Deferred[None]] = {}

        def handler(topic: str, payload: bytes, retained: bool) -> Deferred[None]:
            pending[payload] = Deferred()
            return pending[payload]

        conn = self.connected_with(handler)
        conn.send(publish_packet(TOPIC, b"k1", qos=1, mid=1) + publish_packet(TOPIC, b"k2", qos=1, mid=2))
        self.exchange(conn)
        pending[b"k2"].callback(None)
        self.assertEqual(pubacks(self.exchange(conn)), [])
        pending[b"k1"].callback(None)
        self.assertEqual(pubacks(self.exchange(conn)), [1, 2])

    def test_plain_callback_acknowledged_at_once(self) -> None:
        """A callback that returns nothing is done: its message is acknowledged at once (the broker's)."""
        got: list[bytes] = []
        conn = self.connected_with(lambda t, p, r: got.append(p))
        conn.send(publish_packet(TOPIC, b"k1", qos=1, mid=3))
        self.assertEqual(pubacks(self.exchange(conn)), [3])
        self.assertEqual(got, [b"k1"])

    def test_later_failure_logged_and_acknowledged(self) -> None:
        """A Deferred failing with an error is logged and the message acknowledged (no endless redelivery)."""
        conn = self.connected_with(lambda t, p, r: fail(ZeroDivisionError("boom")))
        conn.send(publish_packet(TOPIC, b"k1", qos=1, mid=4))
        self.assertEqual(pubacks(self.exchange(conn)), [4])
        failures = [e for e in self.events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(ZeroDivisionError))

    def test_redeliver_leaves_it_to_the_server(self) -> None:
        """Redeliver: no PUBACK, nothing logged as an error; later messages are still acknowledged."""
        def handler(topic: str, payload: bytes, retained: bool) -> Deferred[None] | None:
            return fail(Redeliver("stopping")) if payload == b"k1" else None

        conn = self.connected_with(handler)
        conn.send(publish_packet(TOPIC, b"k1", qos=1, mid=5) + publish_packet(TOPIC, b"k2", qos=1, mid=6))
        self.assertEqual(pubacks(self.exchange(conn)), [6])
        self.assertEqual(self.texts(), [])

    def test_unacknowledged_message_comes_again_after_reconnect(self) -> None:
        """Cut before the subscriber was done: the DUP redelivery is handled, the late result of the
        first delivery sends nothing on the new connection, only the redelivery is acknowledged."""
        pending: list[Deferred[None]] = []

        def handler(topic: str, payload: bytes, retained: bool) -> Deferred[None]:
            pending.append(Deferred())
            return pending[-1]

        conn = self.connected_with(handler)
        conn.send(publish_packet(TOPIC, b"k1", qos=1, mid=9))
        self.exchange(conn)
        conn.close()
        self.read_only()  # the service notices the lost connection
        self.reactor.advance(1)  # the backoff
        conn2 = self.handshake(session_present=True)
        conn2.packets()
        dup = publish_packet(TOPIC, b"k1", qos=1, mid=9)
        conn2.send(bytes([dup[0] | 0x08]) + dup[1:])  # the server's redelivery, DUP set
        self.exchange(conn2)
        self.assertEqual(len(pending), 2)
        pending[0].callback(None)  # the first delivery's work finishes late
        self.assertEqual(pubacks(self.exchange(conn2)), [])
        pending[1].callback(None)
        self.assertEqual(pubacks(self.exchange(conn2)), [9])
        self.assertEqual([p.kind for p in conn2.packets() if p.kind == PUBLISH], [])
