"""MqttService publishes: the bounded queue, QoS 0/1 completion, resending after a reconnect, the window.

The subject is the real service driving a real paho client. Only the edges are
stand-ins (:mod:`tests.support.mqtt_fakes`): time and the reactor's
file-descriptor bookkeeping are a ``MemoryReactorClock``, the connect thread pool
runs its work synchronously, and the MQTT server is the test speaking MQTT 3.1.1
by hand on the far end of a unix socket, so no network and no sleeps are involved.
"""

from __future__ import annotations

from tests.support.mqtt_fakes import PUBLISH, SUBSCRIBE, MqttTestCase, puback
from wgkex.mqtt import MqttStopped, QueueFull
from wgkex.mqtt.outbox import WINDOW


class PublishTests(MqttTestCase):
    def test_queue_is_bounded(self) -> None:
        """While disconnected, queue_limit publishes are queued and the next raises QueueFull."""
        service = self.make(queue_limit=3)
        for i in range(3):
            service.publish("t", str(i), qos=1)
        self.assertEqual(service.pending, 3)
        with self.assertRaises(QueueFull) as ctx:
            service.publish("t", "3", qos=1)
        self.assertIn("mqtt.queue_limit is 3", str(ctx.exception))
        self.assertEqual(service.pending, 3)

    def test_queue_flushed_in_order_after_subscriptions(self) -> None:
        """Publishes made while disconnected go out in order, after the SUBSCRIBE, on connect."""
        service = self.make()
        service.subscribe("x/+", 1, lambda t, p, r: None)
        published = [service.publish(f"t/{i}", f"m{i}", qos=i % 2, retain=i == 3) for i in range(5)]
        service.startService()
        conn = self.handshake()
        packets = conn.packets()
        self.assertEqual([p.kind for p in packets], [SUBSCRIBE] + [PUBLISH] * 5)
        self.assertEqual(
            [p.publish()[:4] for p in packets[1:]],
            [(f"t/{i}", f"m{i}".encode(), i % 2, i == 3) for i in range(5)],
        )
        self.assertEqual(service.pending, 0)
        for p in packets[1:]:
            if p.publish()[2]:
                conn.send(puback(p.publish()[4]))
        self.pump()
        for d in published:
            self.assertIsNone(self.successResultOf(d))

    def test_qos1_deferred_fires_on_puback(self) -> None:
        """A QoS 1 publish's Deferred fires only when the server's PUBACK for its id arrives."""
        service = self.make()
        conn = self.start_connected(service)
        first = service.publish("wireguard/ffmuc_welt/all", b"key1", qos=1)
        second = service.publish("wireguard/ffmuc_welt/all", b"key2", qos=1)
        self.pump()
        mids = [p.publish()[4] for p in conn.packets()]
        self.assertNoResult(first)
        conn.send(puback(mids[1]))
        self.pump()
        self.assertNoResult(first)
        self.assertIsNone(self.successResultOf(second))
        conn.send(puback(mids[0]))
        self.pump()
        self.assertIsNone(self.successResultOf(first))

    def test_puback_for_unknown_id_changes_nothing(self) -> None:
        """A PUBACK naming no publish in flight (a repeat, say) fires nothing; the right one still does."""
        service = self.make()
        conn = self.start_connected(service)
        sent = service.publish("wireguard/ffmuc_welt/all", b"key1", qos=1)
        self.pump()
        [mid] = [p.publish()[4] for p in conn.packets()]
        conn.send(puback(mid + 1 if mid < 65535 else 1))
        self.pump()
        self.assertNoResult(sent)
        self.assertTrue(service.connected)
        conn.send(puback(mid) + puback(mid))
        self.pump()
        self.assertIsNone(self.successResultOf(sent))
        self.assertTrue(service.connected)

    def test_malformed_puback_ends_the_connection(self) -> None:
        """A PUBACK of the wrong length is a protocol error: the connection ends, the publish is kept."""
        service = self.make()
        conn = self.start_connected(service)
        sent = service.publish("wireguard/ffmuc_welt/all", b"key1", qos=1)
        self.pump()
        [mid] = [p.publish()[4] for p in conn.packets()]
        conn.send(bytes([0x40, 3]) + mid.to_bytes(2, "big") + b"\x00")
        self.pump()
        self.assertFalse(service.connected)
        self.assertNoResult(sent)
        self.assertEqual(service.pending, 1)
        sent.addErrback(lambda failure: None)  # the test's cleanup stops the service with it still queued

    def test_qos0_deferred_fires_when_written(self) -> None:
        """A QoS 0 publish's Deferred fires once the message is written to the socket."""
        service = self.make()
        conn = self.start_connected(service)
        d = service.publish("t", b"x", qos=0)
        self.assertNoResult(d)
        self.pump()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([p.publish()[:3] for p in conn.packets()], [("t", b"x", 0)])

    def test_unacknowledged_publishes_resent_in_order_after_reconnect(self) -> None:
        """Publishes in flight when the connection drops are re-sent once, before later ones, in order."""
        service = self.make()
        conn = self.start_connected(service)
        acked = service.publish("t", b"a", qos=1)
        lost_b = service.publish("t", b"b", qos=1)
        self.pump()
        packets = conn.packets()
        conn.send(puback(packets[0].publish()[4]))  # acknowledge only a
        self.pump()
        lost_c = service.publish("t", b"c", qos=0)  # handed to paho, never written
        conn.close()
        self.read_only()
        self.assertFalse(service.connected)
        later = service.publish("t", b"d", qos=1)
        self.assertEqual(service.pending, 3)
        self.reactor.advance(0.5)
        conn = self.handshake()
        packets = conn.packets()
        self.assertEqual([p.publish()[1] for p in packets], [b"b", b"c", b"d"])
        for p in packets:
            if p.publish()[2]:
                conn.send(puback(p.publish()[4]))
        self.pump()
        for d in (acked, lost_b, lost_c, later):
            self.assertIsNone(self.successResultOf(d))
        # paho itself must not re-send b a second time.
        self.assertEqual(conn.packets(), [])

    def test_window_bounds_messages_in_flight(self) -> None:
        """At most WINDOW publishes are handed to the server unacknowledged; the rest wait in order."""
        service = self.make(queue_limit=20)
        conn = self.start_connected(service)
        published = [service.publish("t", str(i), qos=1) for i in range(WINDOW + 5)]
        for d in published:  # most are never acknowledged here; stopping fails them
            d.addErrback(lambda f: f.trap(MqttStopped))
        packets = self.exchange(conn)
        self.assertEqual(len(packets), WINDOW)
        self.assertEqual(service.pending, 5)
        conn.send(puback(packets[0].publish()[4]) + puback(packets[1].publish()[4]))
        self.pump()
        more = conn.packets()
        self.assertEqual([p.publish()[1] for p in more], [str(WINDOW).encode(), str(WINDOW + 1).encode()])
        self.assertEqual(service.pending, 3)

    def test_publish_refuses_bad_arguments(self) -> None:
        """Wildcards in a topic and QoS 2 are refused at once, not when the queue is flushed."""
        service = self.make()
        self.assertRaises(ValueError, service.publish, "wireguard/+/all", b"k")
        self.assertRaises(ValueError, service.publish, "", b"k")
        self.assertRaises(ValueError, service.publish, "t", b"k", 2)
        self.assertRaises(ValueError, service.subscribe, "a/#/b", 0, lambda t, p, r: None)
        self.assertEqual(service.pending, 0)
