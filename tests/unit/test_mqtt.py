"""MqttService's state machine: backoff, queue, resubscribe, callbacks, acknowledgements, stop.

The subject is the real service driving a real paho client. Only the edges are
stand-ins: time and the reactor's file-descriptor bookkeeping are a
``MemoryReactorClock`` (the test calls ``doRead``/``doWrite`` on the registered
descriptor), the connect thread pool runs its work synchronously, and the MQTT
server is this test speaking MQTT 3.1.1 by hand on the far end of a unix
socket (``transport: unix``), so no network and no sleeps are involved.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import paho.mqtt.client as paho
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.mqtt_wire import remaining_length, str16
from tests.support.reactors import ThreadedMemoryReactor
from wgkex.config import MqttConfig
from wgkex.mqtt import Backoff, MqttService, MqttStopped, QueueFull, TopicFilter, Will, describe_server
from wgkex.mqtt.outbox import WINDOW
from wgkex.mqtt.buffered_socket import READ_BUFFER, BufferedSocket
from wgkex.mqtt.paho_socket import READ_BURST

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 1, 2, 3, 4, 8, 9, 12, 13, 14


# -- the MQTT server end, by hand ------------------------------------------------------------


def connack(rc: int = 0, session_present: bool = False) -> bytes:
    return bytes([0x20, 2, int(session_present), rc])


def puback(mid: int) -> bytes:
    return bytes([0x40, 2]) + mid.to_bytes(2, "big")


def suback(mid: int, count: int) -> bytes:
    return bytes([0x90, 2 + count]) + mid.to_bytes(2, "big") + bytes([1] * count)


def publish_packet(topic: str, payload: bytes, qos: int = 0, retain: bool = False, mid: int = 1) -> bytes:
    body = str16(topic) + (mid.to_bytes(2, "big") if qos else b"") + payload
    return bytes([0x30 | qos << 1 | int(retain)]) + remaining_length(len(body)) + body


@dataclass
class Packet:
    kind: int
    flags: int
    body: bytes

    def _str(self, pos: int) -> tuple[bytes, int]:
        n = int.from_bytes(self.body[pos:pos + 2], "big")
        return self.body[pos + 2:pos + 2 + n], pos + 2 + n

    def publish(self) -> tuple[str, bytes, int, bool, int]:
        """(topic, payload, qos, retain, mid) of a PUBLISH."""
        topic, pos = self._str(0)
        qos = (self.flags >> 1) & 3
        mid = 0
        if qos:
            mid = int.from_bytes(self.body[pos:pos + 2], "big")
            pos += 2
        return topic.decode(), self.body[pos:], qos, bool(self.flags & 1), mid

    def subscribe(self) -> tuple[int, list[tuple[str, int]]]:
        """(mid, [(filter, qos)]) of a SUBSCRIBE."""
        mid = int.from_bytes(self.body[:2], "big")
        pos, filters = 2, []
        while pos < len(self.body):
            name, pos = self._str(pos)
            filters.append((name.decode(), self.body[pos]))
            pos += 1
        return mid, filters

    def connect(self) -> dict[str, Any]:
        """The fields of a CONNECT."""
        proto, pos = self._str(0)
        level, flags = self.body[pos], self.body[pos + 1]
        keepalive = int.from_bytes(self.body[pos + 2:pos + 4], "big")
        client_id, pos = self._str(pos + 4)
        fields: dict[str, Any] = {
            "protocol": proto, "level": level, "keepalive": keepalive, "client_id": client_id.decode(),
            "clean_session": bool(flags & 0x02), "will": None, "username": None, "password": None,
        }
        if flags & 0x04:
            topic, pos = self._str(pos)
            message, pos = self._str(pos)
            fields["will"] = (topic.decode(), message, (flags >> 3) & 3, bool(flags & 0x20))
        if flags & 0x80:
            user, pos = self._str(pos)
            fields["username"] = user.decode()
        if flags & 0x40:
            password, pos = self._str(pos)
            fields["password"] = password.decode()
        return fields


def split_packets(buffer: bytes) -> tuple[list[Packet], bytes]:
    """The complete MQTT packets at the start of ``buffer``, and what is left over."""
    out: list[Packet] = []
    while len(buffer) >= 2:
        length, mult, pos = 0, 1, 1
        while True:
            if pos >= len(buffer):
                return out, buffer
            byte = buffer[pos]
            length += (byte & 127) * mult
            mult *= 128
            pos += 1
            if not byte & 128:
                break
        if len(buffer) < pos + length:
            break
        out.append(Packet(buffer[0] >> 4, buffer[0] & 15, buffer[pos:pos + length]))
        buffer = buffer[pos + length:]
    return out, buffer


class ServerConnection:
    """One accepted connection: what the client sent, and a way to answer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def packets(self) -> list[Packet]:
        """Every complete packet the client has written since the last call."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffer += chunk
        out, self.buffer = split_packets(self.buffer)
        return out

    def close(self) -> None:
        self.sock.close()


class FakeServer:
    """A listening unix socket standing in for the MQTT server."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgkex-mqtt-unit-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "mqtt.sock")
        self.listener: socket.socket | None = None
        self.connections: list[ServerConnection] = []
        testcase.addCleanup(self.shutdown)

    def listen(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            os.unlink(self.path)

    def accept(self) -> ServerConnection:
        assert self.listener is not None
        self.listener.settimeout(0)
        sock, _ = self.listener.accept()
        conn = ServerConnection(sock)
        self.connections.append(conn)
        return conn

    def shutdown(self) -> None:
        for conn in self.connections:
            conn.close()
        self.stop_listening()


# -- the other edges -------------------------------------------------------------------------


class SyncThreadPool:
    """A thread pool that runs its work at once, on the calling thread, and counts it."""

    def __init__(self) -> None:
        self.started = False
        self.stopped = False
        self.calls = 0

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        self.calls += 1
        try:
            result = f(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ManualThreadPool(SyncThreadPool):
    """A thread pool whose work waits until the test calls :meth:`run_pending` (a slow connect)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Callable[[], None]] = []

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        self.waiting.append(lambda: SyncThreadPool.callInThreadWithCallback(self, onResult, f, *args, **kw))

    def run_pending(self) -> None:
        waiting, self.waiting = self.waiting, []
        for work in waiting:
            work()


def observe_logs(service: MqttService, observer: Callable[[LogEvent], None]) -> None:
    """Send what ``service`` and its parts log to ``observer`` (and nowhere else)."""
    for part in (service, service.connector, service._io, service.subscriptions):
        part.log = Logger(namespace="wgkex.mqtt", observer=cast(ILogObserver, observer))


class _Service(MqttService):
    """The real service with the synchronous pool plugged in."""

    pool: SyncThreadPool

    def _make_thread_pool(self) -> Any:
        return self.pool


class MqttTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.pool = SyncThreadPool()
        self.server = FakeServer(self)
        self.server.listen()
        self.events: list[LogEvent] = []

    def make(self, **kwargs: Any) -> _Service:
        settings_args: dict[str, Any] = {
            "transport": "unix", "broker_url": self.server.path, "keepalive": 60, "reconnect_max_delay": 8.0,
        }
        for key in ("queue_limit", "username", "password", "client_id", "reconnect_max_delay", "servers"):
            if key in kwargs:
                settings_args[key] = kwargs.pop(key)
        service = _Service(self.reactor, MqttConfig(**settings_args), **kwargs)
        service.pool = self.pool
        service.connector.backoff = Backoff(0.5, service.settings.reconnect_max_delay)  # no jitter: exact delays
        observe_logs(service, self.events.append)
        self.addCleanup(self.stop_quietly, service)
        return service

    def stop_quietly(self, service: MqttService) -> None:
        if service.running:
            d = service.stopService()
            for _ in range(10):
                self.pump()
                self.reactor.advance(1)
            self.successResultOf(d)

    def pump(self, rounds: int = 30) -> None:
        """Let the service read and write whatever its socket has for it."""
        for _ in range(rounds):
            for writer in list(self.reactor.getWriters()):
                if writer in self.reactor.getWriters():
                    writer.doWrite()
            for reader in list(self.reactor.getReaders()):
                if reader in self.reactor.getReaders():
                    reader.doRead()

    def exchange(self, conn: ServerConnection) -> list[Packet]:
        """Pump and collect until the client has nothing more to say (socket buffers are finite)."""
        packets: list[Packet] = []
        quiet = 0
        while quiet < 3:
            self.pump(1)
            new = conn.packets()
            packets += new
            quiet = 0 if new else quiet + 1
        return packets

    def read_only(self) -> None:
        """Let the service read (and notice a closed connection) without writing anything."""
        for reader in list(self.reactor.getReaders()):
            reader.doRead()

    def handshake(self, conn: ServerConnection | None = None, session_present: bool = False) -> ServerConnection:
        """Accept the service's connection, check CONNECT, answer CONNACK."""
        conn = conn or self.server.accept()
        self.pump()
        packets = conn.packets()
        self.assertEqual([p.kind for p in packets][:1], [CONNECT])
        self.last_connect = packets[0].connect()
        conn.send(connack(session_present=session_present))
        self.pump()
        return conn

    def start_connected(self, service: MqttService) -> ServerConnection:
        service.startService()
        conn = self.handshake()
        self.assertTrue(service.connected)
        return conn

    def delays(self) -> list[float]:
        return [e["delay"] for e in self.events if "delay" in e]

    def texts(self) -> list[str]:
        """The warnings and errors logged, as text."""
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]


# -- backoff ----------------------------------------------------------------------------------


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


# -- connecting and reconnecting ---------------------------------------------------------------


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


# -- publishing ----------------------------------------------------------------------------------


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


# -- receiving -------------------------------------------------------------------------------------


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


class StubSocket:
    """A non-blocking socket stand-in: hands out ``chunks`` one per recv, then would block."""

    def __init__(self, chunks: list[bytes], inner_pending: int = 0) -> None:
        self.chunks = chunks
        self.asked: list[int] = []
        self.inner_pending = inner_pending
        self.closed = False
        self.timeout: float | None = None

    def recv(self, size: int) -> bytes:
        self.asked.append(size)
        if not self.chunks:
            raise BlockingIOError()
        return self.chunks.pop(0)[:size]

    def pending(self) -> int:
        return self.inner_pending

    def close(self) -> None:
        self.closed = True

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout


class BufferedSocketTests(SynchronousTestCase):
    def test_one_recv_serves_many_small_reads(self) -> None:
        """Paho's small reads are served from one large recv; the rest counts as pending."""
        stub = StubSocket([b"\x30\x05hello\x30"])
        sock = BufferedSocket(stub)
        self.assertEqual(sock.recv(1), b"\x30")
        self.assertEqual(sock.pending(), 7)
        self.assertEqual(sock.recv(1), b"\x05")
        self.assertEqual(sock.recv(5), b"hello")
        self.assertEqual(sock.recv(1), b"\x30")
        self.assertEqual(stub.asked, [READ_BUFFER])
        self.assertEqual(sock.pending(), 0)
        self.assertRaises(BlockingIOError, sock.recv, 1)

    def test_large_read_passes_through(self) -> None:
        """A read of more than the buffer size asks the socket for that much and buffers nothing."""
        stub = StubSocket([b"x" * (READ_BUFFER + 10)])
        sock = BufferedSocket(stub)
        self.assertEqual(len(sock.recv(READ_BUFFER + 10)), READ_BUFFER + 10)
        self.assertEqual(stub.asked, [READ_BUFFER + 10])
        self.assertEqual(sock.pending(), 0)

    def test_end_of_file(self) -> None:
        """The peer closing (recv gives b'') reaches paho as b''."""
        sock = BufferedSocket(StubSocket([b""]))
        self.assertEqual(sock.recv(1), b"")

    def test_pending_includes_the_ssl_object(self) -> None:
        """Decrypted bytes inside an SSL object count as pending too."""
        sock = BufferedSocket(StubSocket([b"ab"], inner_pending=3))
        sock.recv(1)
        self.assertEqual(sock.pending(), 4)
        self.assertEqual(BufferedSocket(object()).pending(), 0)  # a plain socket has no pending()

    def test_other_calls_reach_the_socket(self) -> None:
        """close() drops the buffer and closes the socket; anything else goes straight through."""
        stub = StubSocket([b"abc"])
        sock = BufferedSocket(stub)
        sock.recv(1)
        sock.settimeout(3.0)
        self.assertEqual(stub.timeout, 3.0)
        sock.close()
        self.assertTrue(stub.closed)
        self.assertEqual(sock.pending(), 0)


class TopicFilterTests(SynchronousTestCase):
    def test_matches_like_the_mqtt_spec(self) -> None:
        """Wildcards match as MQTT 3.1.1 section 4.7 says, checked against paho's own matcher."""
        levels = ["wireguard", "ffmuc_welt", "all", "", "$SYS", "+", "#"]
        filters = ["#", "+", "wireguard/+/+", "wireguard/#", "wireguard/+/all", "+/+/all", "wireguard/ffmuc_welt/all",
                   "+/#", "wireguard/+", "/+", "$SYS/#", "wireguard//all", "+/ffmuc_welt/#"]
        topics = ["/".join(p) for n in (1, 2, 3, 4) for p in itertools.product(levels[:5], repeat=n)]
        for topic_filter in filters:
            compiled = TopicFilter(topic_filter)
            for topic in topics:
                self.assertEqual(compiled.matches(topic), paho.topic_matches_sub(topic_filter, topic),
                                 f"{topic_filter!r} against {topic!r}")

    def test_examples(self) -> None:
        """The examples every MQTT reader knows: a/# matches a; + skips $ topics; + matches an empty level."""
        self.assertTrue(TopicFilter("sport/#").matches("sport"))
        self.assertFalse(TopicFilter("+/status").matches("$SYS/status"))
        self.assertTrue(TopicFilter("a/+/c").matches("a//c"))
        self.assertFalse(TopicFilter("wireguard/+/+").matches("wireguard/ffmuc_welt"))
        self.assertFalse(TopicFilter("wireguard/+/+").matches("wireguard/ffmuc_welt/all/more"))


# -- stopping ----------------------------------------------------------------------------------------


class StopTests(MqttTestCase):
    def test_stop_waits_for_acknowledgement_then_disconnects(self) -> None:
        """stopService waits for the PUBACK of an earlier publish, then sends DISCONNECT and closes."""
        service = self.make()
        conn = self.start_connected(service)
        published = service.publish("wireguard-worker/gw1/status", b"0", qos=1, retain=True)
        stopped = service.stopService()
        self.pump()
        packets = conn.packets()
        self.assertEqual([p.kind for p in packets], [PUBLISH])
        self.assertNoResult(stopped)
        conn.send(puback(packets[0].publish()[4]))
        self.pump()
        self.assertIsNone(self.successResultOf(published))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [DISCONNECT])
        self.assertFalse(service.connected)
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(self.pool.stopped)

    def test_stop_with_server_down_is_bounded(self) -> None:
        """With the server gone, stop gives up after 5 s and fails what it could not deliver."""
        self.server.stop_listening()
        service = self.make()
        service.startService()
        queued = service.publish("t", b"x", qos=1)
        stopped = service.stopService()
        self.reactor.advance(4.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertIsNone(self.successResultOf(stopped))
        self.failureResultOf(queued, MqttStopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        attempts = self.pool.calls
        self.reactor.advance(60)
        self.assertEqual(self.pool.calls, attempts)

    def test_stop_keeps_trying_to_deliver_while_waiting(self) -> None:
        """A publish queued while down is still delivered if the server returns during the stop wait."""
        self.server.stop_listening()
        service = self.make()
        service.startService()
        queued = service.publish("wireguard-worker/gw1/status", b"0", qos=1)
        stopped = service.stopService()
        self.server.listen()
        self.reactor.advance(0.5)
        conn = self.handshake()
        packet = conn.packets()[0]
        conn.send(puback(packet.publish()[4]))
        self.pump()
        self.assertIsNone(self.successResultOf(queued))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [DISCONNECT])

    def test_stop_during_connect_attempt_waits_then_disconnects(self) -> None:
        """A stop while the connect thread works waits for it, then says DISCONNECT on the new socket."""
        self.pool = ManualThreadPool()
        service = self.make()
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(self.pool.waiting)
        self.pool.run_pending()
        conn = self.server.accept()
        self.pump()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [CONNECT, DISCONNECT])
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_during_failing_connect_attempt(self) -> None:
        """A connect attempt that fails after stop began schedules no retry."""
        self.pool = ManualThreadPool()
        self.server.stop_listening()
        service = self.make()
        service.startService()
        stopped = service.stopService()
        self.pool.run_pending()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.pool.waiting, [])

    def test_stop_with_unresponsive_server(self) -> None:
        """A server that never acknowledges delays the stop by 5 s, then gets DISCONNECT anyway."""
        service = self.make()
        conn = self.start_connected(service)
        unacked = service.publish("t", b"x", qos=1)
        stopped = service.stopService()
        self.pump()
        self.reactor.advance(5)
        self.pump()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [PUBLISH, DISCONNECT])
        self.failureResultOf(unacked, MqttStopped)

