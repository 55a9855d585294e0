"""The edges of MqttService's unit tests: an MQTT server by hand, thread pools, a base case.

The subject of those tests is the real service driving a real paho client. Only
the edges are stand-ins: time and the reactor's file-descriptor bookkeeping are a
``MemoryReactorClock`` (the test calls ``doRead``/``doWrite`` on the registered
descriptor), the connect thread pool runs its work synchronously
(:class:`SyncThreadPool`, or :class:`ManualThreadPool` for a slow connect), and the
MQTT server is :class:`FakeServer`, the test speaking MQTT 3.1.1 by hand on the far
end of a unix socket (``transport: unix``), so no network and no sleeps are
involved. :class:`MqttTestCase` wires them together.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, Logger, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.mqtt_wire import remaining_length, str16
from tests.support.reactors import ThreadedMemoryReactor
from wgkex.config import MqttConfig
from wgkex.mqtt import Backoff, MqttService


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
