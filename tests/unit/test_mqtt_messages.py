"""MqttService reads and delivers messages: failing callbacks, retained flags, bursts and partial packets.

The subject is the real service driving a real paho client. Only the edges are
stand-ins (:mod:`tests.support.mqtt_fakes`): time and the reactor's
file-descriptor bookkeeping are a ``MemoryReactorClock``, the connect thread pool
runs its work synchronously, and the MQTT server is the test speaking MQTT 3.1.1
by hand on the far end of a unix socket, so no network and no sleeps are involved.
"""

from __future__ import annotations

from twisted.logger import LogLevel, formatEvent

from tests.support.mqtt_fakes import PUBACK, MqttTestCase, publish_packet
from wgkex.mqtt.paho_socket import READ_BURST


class MessageTests(MqttTestCase):
    def test_callback_exception_does_not_stop_next_message(self) -> None:
        """A callback raising is logged with the topic; the next message is still delivered."""
        service = self.make()
        got: list[tuple[str, bytes, bool]] = []

        def callback(topic: str, payload: bytes, retained: bool) -> None:
            got.append((topic, payload, retained))
            if payload == b"bad":
                raise ZeroDivisionError("boom")

        service.subscribe("wireguard/+/all", 1, callback)
        conn = self.start_connected(service)
        conn.packets()
        conn.send(publish_packet("wireguard/ffmuc_welt/all", b"bad", qos=1, mid=7))
        conn.send(publish_packet("wireguard/ffmuc_welt/all", b"good", qos=1, mid=8))
        self.pump()
        self.assertEqual(got, [("wireguard/ffmuc_welt/all", b"bad", False), ("wireguard/ffmuc_welt/all", b"good", False)])
        failures = [e for e in self.events if e["log_level"] == LogLevel.critical]
        self.assertEqual(len(failures), 1)
        self.assertTrue(failures[0]["log_failure"].check(ZeroDivisionError))
        self.assertIn("topic wireguard/ffmuc_welt/all failed", formatEvent(failures[0]))
        # Both QoS 1 messages are acknowledged to the server.
        self.assertEqual([(p.kind, p.body) for p in conn.packets()], [(PUBACK, b"\x00\x07"), (PUBACK, b"\x00\x08")])

    def test_only_matching_callbacks_get_retained_flag(self) -> None:
        """Each message reaches the callbacks whose filter matches, with its retained flag."""
        service = self.make()
        status: list[tuple[str, bytes, bool]] = []
        keys: list[tuple[str, bytes, bool]] = []
        service.subscribe("wireguard-worker/+/status", 1, lambda *a: status.append(a))
        service.subscribe("wireguard/#", 1, lambda *a: keys.append(a))
        conn = self.start_connected(service)
        conn.send(publish_packet("wireguard-worker/gw1/status", b"1", retain=True))
        conn.send(publish_packet("wireguard/ffmuc_welt/all", b"k"))
        self.pump()
        self.assertEqual(status, [("wireguard-worker/gw1/status", b"1", True)])
        self.assertEqual(keys, [("wireguard/ffmuc_welt/all", b"k", False)])


    def test_burst_read_in_bounded_turns(self) -> None:
        """Messages waiting together are read READ_BURST per reactor turn, each acknowledged."""
        service = self.make()
        got: list[bytes] = []
        service.subscribe("wireguard/+/all", 1, lambda topic, payload, retained: got.append(payload))
        conn = self.start_connected(service)
        conn.packets()
        total = 2 * READ_BURST + 50
        conn.send(b"".join(
            publish_packet("wireguard/ffmuc_welt/all", b"k%d" % n, qos=1, mid=n + 1) for n in range(total)
        ))
        (reader,) = self.reactor.getReaders()
        reader.doRead()
        self.assertEqual(len(got), READ_BURST)
        # The rest waits in the read buffer, where no readable event announces it: a call comes next turn.
        self.assertIn(0, [c.getTime() - self.reactor.seconds() for c in self.reactor.getDelayedCalls()])
        self.reactor.advance(0)
        self.assertEqual(len(got), total)
        packets = self.exchange(conn)
        self.assertEqual(got, [b"k%d" % n for n in range(total)])
        self.assertEqual([p.body for p in packets if p.kind == PUBACK], [(n + 1).to_bytes(2, "big") for n in range(total)])

    def test_partial_packet_waits_for_the_rest(self) -> None:
        """A read stops at a half-arrived packet without blocking; the rest completes it later."""
        service = self.make()
        got: list[bytes] = []
        service.subscribe("wireguard/+/all", 1, lambda topic, payload, retained: got.append(payload))
        conn = self.start_connected(service)
        second = publish_packet("wireguard/ffmuc_welt/all", b"second", qos=1, mid=2)
        conn.send(publish_packet("wireguard/ffmuc_welt/all", b"first", qos=1, mid=1) + second[:7])
        (reader,) = self.reactor.getReaders()
        reader.doRead()
        self.assertEqual(got, [b"first"])
        conn.send(second[7:])
        reader.doRead()
        self.assertEqual(got, [b"first", b"second"])


    def test_buffered_read_dropped_with_the_connection(self) -> None:
        """A read scheduled for buffered bytes is cancelled when the connection goes away."""
        service = self.make()
        got: list[bytes] = []
        service.subscribe("wireguard/+/all", 1, lambda topic, payload, retained: got.append(payload))
        conn = self.start_connected(service)
        conn.send(b"".join(publish_packet("wireguard/ffmuc_welt/all", b"k", qos=1, mid=n + 1)
                           for n in range(READ_BURST + 10)))
        (reader,) = self.reactor.getReaders()
        reader.doRead()
        self.assertEqual(len(got), READ_BURST)
        scheduled = service._io._read_again
        assert scheduled is not None and scheduled.active()
        conn.close()
        # What an unexpected read error does: cut the connection (the buffered bytes die with it).
        service._io.abort("test")
        self.assertFalse(scheduled.active())
        delivered = len(got)
        self.reactor.advance(0)
        self.assertEqual(len(got), delivered)
        self.assertFalse(service.connected)
