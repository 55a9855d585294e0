"""MQTT on the Twisted reactor: one service owning one paho-mqtt client.

The picture: :class:`MqttService` is a ``twisted.application.service.Service``
that owns a paho-mqtt 2.x client without paho's network thread. Paho's socket
is handed to the reactor (``on_socket_close`` / ``on_socket_register_write`` /
``on_socket_unregister_write``) through :class:`_PahoSocket`, a read/write
descriptor whose ``doRead``/``doWrite`` call ``loop_read``/``loop_write``; a
``LoopingCall`` calls ``loop_misc`` every second for keepalive pings and
timeouts. So every paho callback, and therefore every message callback and
every Deferred this module fires, runs on the reactor thread. Paho reads one
packet per ``loop_read`` in three or more ``recv`` calls; a read buffer under
paho (:class:`_BufferedSocket`) and up to :data:`READ_BURST` packets per
reactor turn make a burst of thousands of QoS 1 messages cost about 20 µs of
CPU each (32 µs before).

Only the blocking part of connecting (DNS, TCP, TLS handshake, websocket
upgrade: paho's ``reconnect()``) runs elsewhere, in a one-thread pool the
service starts in ``startService`` and stops in ``stopService``. While that
thread works, the reactor thread does not touch the client. A failed attempt
or a lost connection schedules the next attempt with capped exponential
backoff (:class:`Backoff`: 0.5 s doubling up to ``reconnect_max_delay``,
reset by a successful CONNACK), forever.

Publishing. Every publish goes through one FIFO: while connected, up to
:data:`WINDOW` publishes at a time are handed to paho (paho's own in-flight
limit is raised to match, so it never holds one back); the rest wait in the
queue, which is bounded by ``queue_limit`` (:class:`QueueFull` beyond it).
``publish`` returns a Deferred that fires when the server has the message:
on PUBACK for QoS 1, once written to the socket for QoS 0.

The delivery guarantee. A publish whose Deferred has not fired is never
dropped while the service runs: when a connection drops, everything paho had
in flight and not yet acknowledged is taken back from paho and put in front
of the queue, and the whole queue is re-sent in the original order after the
next CONNACK (after the subscriptions). Delivery is therefore at least once
and in publish order per service; a message whose PUBACK was lost with the
connection arrives twice. Cancelling the Deferred does not withdraw the
message.

Stopping. ``stopService`` waits up to :data:`STOP_TIMEOUT` seconds for the
publishes made before it (still reconnecting meanwhile if it must), lets a
connect attempt already in the pool finish (at most :data:`CONNECT_TIMEOUT`
plus DNS), sends DISCONNECT (a clean goodbye: the server drops the last will)
and gives it :data:`DISCONNECT_TIMEOUT` to be written before cutting the
socket. With the server unreachable a stop therefore ends within about 11 s.
Whatever is still unacknowledged then fails with :class:`MqttStopped`.

Subscriptions registered with :meth:`MqttService.subscribe` live as long as
the service and are re-sent on every connect (with a persistent session too:
it is harmless and covers a server that lost its sessions). One callback
raising is logged with its topic and never stops the next message.
"""

from __future__ import annotations

import random
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReadWriteDescriptor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from wgkex.config import MqttConfig

#: First reconnect delay, seconds (doubled per failure up to ``reconnect_max_delay``).
INITIAL_DELAY = 0.5
#: Publishes handed to paho and not yet acknowledged, at most. Paho's default of
#: 20 in-flight QoS 1 messages lets a busy broker run far ahead of the bus.
WINDOW = 1000
#: How long ``stopService`` waits for outstanding acknowledgements, seconds.
STOP_TIMEOUT = 5.0
#: How long ``stopService`` waits for DISCONNECT to be written before cutting.
DISCONNECT_TIMEOUT = 1.0
#: Timeout of the blocking TCP connect and TLS handshake, seconds.
CONNECT_TIMEOUT = 5.0
#: Period of paho's ``loop_misc`` (keepalive pings, CONNACK and PINGRESP timeouts).
MISC_INTERVAL = 1.0
#: Packets read in one go while they keep coming (paho reads one per
#: ``loop_read``). Saves a reactor turn per message in a burst of thousands,
#: and bounded so that timers and HTTP still get their turn meanwhile.
READ_BURST = 100
#: Bytes asked of the socket per read (paho itself would read a packet in pieces).
READ_BUFFER = 65536

MessageCallback = Callable[[str, bytes, bool], None]


class QueueFull(Exception):
    """``publish`` refused: the queue of publishes waiting for the MQTT server is full."""


class MqttStopped(Exception):
    """The service stopped before the MQTT server acknowledged this publish."""


@dataclass(frozen=True)
class Will:
    """The last will: what the server publishes when this client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class Backoff:
    """Capped exponential backoff: ``initial``, doubled per call to :meth:`next`, at most ``maximum``.

    With ``jitter`` j > 0 each delay is shortened by a random fraction of up to j, so that a
    fleet of workers cut off together does not reconnect in lockstep. ``rand`` returns a
    float in [0, 1) and is there for tests.
    """

    def __init__(
        self,
        initial: float = INITIAL_DELAY,
        maximum: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial = min(initial, maximum)
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.rand = rand
        self._current = self.initial

    def next(self) -> float:
        """The delay before the next attempt; the one after it will be longer (up to the cap)."""
        delay = self._current
        self._current = min(self._current * self.factor, self.maximum)
        return delay * (1.0 - self.jitter * self.rand())

    def reset(self) -> None:
        """Start again from ``initial`` (after a successful connect)."""
        self._current = self.initial


class _Reactor(Protocol):
    """What the service needs of its reactor (time, file descriptors, thread hand-off)."""

    def callLater(self, delay: float, f: Callable[..., Any], /, *args: Any, **kw: Any) -> IDelayedCall: ...
    def seconds(self) -> float: ...
    def addReader(self, reader: Any) -> None: ...
    def removeReader(self, reader: Any) -> None: ...
    def addWriter(self, writer: Any) -> None: ...
    def removeWriter(self, writer: Any) -> None: ...
    def callFromThread(self, f: Callable[..., Any], /, *args: Any, **kw: Any) -> None: ...


@dataclass(eq=False)
class _Publish:
    """One publish on its way: queued, or handed to paho and awaiting acknowledgement."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    deferred: Deferred[None] = field(default_factory=Deferred)


class _BufferedSocket:
    """Paho's socket with a read buffer: one ``recv`` of up to 64 KiB serves many packets.

    Paho reads every packet with at least three ``recv`` calls (type, length,
    body). Each releases the GIL, and a thread that releases and retakes it
    that often starves the worker's pool threads (CPython wakes a waiting
    thread on every release but hands it the GIL only after a whole switch
    interval without one): a 20,000-key burst read unbuffered kept the first
    batch waiting for the GIL for 130 ms. Buffered bytes count as
    :meth:`pending`, like those inside an SSL object, so :meth:`MqttService._read`
    drains them. Everything else goes to the wrapped socket.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._inner_pending = getattr(sock, "pending", None)

    def recv(self, size: int) -> bytes:
        if not self._buffer:
            data: bytes = self._sock.recv(max(size, READ_BUFFER))
            if len(data) <= size:
                return data
            self._buffer = data
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        return chunk

    def pending(self) -> int:
        inner = self._inner_pending() if self._inner_pending is not None else 0
        return len(self._buffer) + inner

    def send(self, data: bytes) -> int:
        sent: int = self._sock.send(data)
        return sent

    def fileno(self) -> int:
        fileno: int = self._sock.fileno()
        return fileno

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._buffer = b""
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Client(paho.Client):
    """paho's client, reading through :class:`_BufferedSocket`."""

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket())


@implementer(IReadWriteDescriptor)
class _PahoSocket:
    """Paho's socket as a reactor descriptor: readable -> ``loop_read``, writable -> ``loop_write``."""

    def __init__(self, service: MqttService, sock: Any) -> None:
        self.service = service
        self.sock = sock
        # Cached: the reactor must find the descriptor by this number even after a close.
        self._fileno: int = sock.fileno()

    def fileno(self) -> int:
        return self._fileno

    def doRead(self) -> None:
        self.service._read(self)

    def doWrite(self) -> None:
        self.service._write(self)

    def connectionLost(self, reason: Failure) -> None:
        # Only reached when the reactor drops us itself (e.g. at its shutdown);
        # paho closes its socket through on_socket_close otherwise.
        self.service._descriptor_lost(self)

    def logPrefix(self) -> str:
        return self.service.name or "mqtt"


def describe_server(settings: MqttConfig) -> str:
    """The MQTT server as an operator would write it, for log lines."""
    if settings.transport == "unix":
        return f"unix socket {settings.broker_url}"
    host = settings.broker_url
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if settings.transport == "websockets":
        return f"{'wss' if settings.tls else 'ws'}://{host}:{settings.broker_port}/mqtt"
    return f"{host}:{settings.broker_port}{' (TLS)' if settings.tls else ''}"


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"invalid MQTT topic to publish to: {topic!r}")


def _check_filter(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    ok = bool(topic_filter) and "\0" not in topic_filter and len(topic_filter.encode()) <= 65535
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            ok = False
        if "+" in level and level != "+":
            ok = False
    if not ok:
        raise ValueError(f"invalid MQTT topic filter: {topic_filter!r}")


class TopicFilter:
    """An MQTT topic filter compiled once, matched per message (paho's ``topic_matches_sub``
    builds a matcher tree on every call)."""

    def __init__(self, topic_filter: str) -> None:
        self.text = topic_filter
        self._levels = topic_filter.split("/")
        self._exact = "+" not in topic_filter and "#" not in topic_filter
        # MQTT 3.1.1, 4.7.2: a filter starting with a wildcard does not match topics starting with "$".
        self._skips_system = self._levels[0] in ("+", "#")

    def matches(self, topic: str) -> bool:
        if self._exact:
            return topic == self.text
        if self._skips_system and topic.startswith("$"):
            return False
        levels = topic.split("/")
        for i, want in enumerate(self._levels):
            if want == "#":
                return True  # also the parent level itself: "a/#" matches "a"
            if i >= len(levels) or (want != "+" and want != levels[i]):
                return False
        return len(levels) == len(self._levels)


def _disconnect_reason(reason: ReasonCode, keepalive: int) -> str:
    name = str(reason)
    if name == "Keep alive timeout":
        return f"no answer from the server within the keepalive of {keepalive} s"
    if name == "Unspecified error":
        return "connection closed by the server or the network"
    return name


class MqttService(Service):
    """One MQTT connection, kept up for as long as the service runs. See the module docstring."""

    log = Logger()

    def __init__(
        self,
        reactor: _Reactor,
        settings: MqttConfig,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        will: Will | None = None,
        name: str = "mqtt",
    ) -> None:
        self._reactor = reactor
        self.settings = settings
        self.client_id = client_id if client_id is not None else (settings.client_id or "")
        if not clean_session and not self.client_id:
            raise ValueError(
                "an MQTT persistent session (clean session off) needs a fixed client id: "
                "set mqtt.client_id in the configuration"
            )
        self.clean_session = clean_session
        self.will = will
        self.name = name
        self.server = describe_server(settings)
        self.backoff = Backoff(INITIAL_DELAY, settings.reconnect_max_delay, jitter=0.2)
        #: Successful connects after the first.
        self.reconnects = 0

        self._subscriptions: list[tuple[TopicFilter, int, MessageCallback]] = []
        self._connect_callbacks: list[Callable[[], None]] = []
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._queue: deque[_Publish] = deque()
        self._inflight: dict[int, _Publish] = {}
        self._acked: list[_Publish] = []
        self._drain_waiters: list[tuple[set[_Publish], Deferred[None]]] = []
        self._close_waiters: list[Deferred[None]] = []
        self._attempt_waiters: list[Deferred[None]] = []

        self._client: paho.Client | None = None
        self._pool: ThreadPool | None = None
        self._misc: LoopingCall | None = None
        self._retry: IDelayedCall | None = None
        self._socket: _PahoSocket | None = None
        self._reading = False
        self._writing = False
        self._attempting = False  # paho.reconnect() runs in the pool: hands off the client
        self._connected = False
        self._ever_connected = False
        self._stopping = False
        self._refusal: str | None = None
        #: Messages and acknowledgements paho handed us (tells :meth:`_read` whether to read on).
        self._handled = 0
        #: A read scheduled because buffered bytes were left after READ_BURST packets.
        self._read_again: IDelayedCall | None = None

    # -- the interface -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while connected (CONNACK received, connection not lost since)."""
        return self._connected

    @property
    def pending(self) -> int:
        """Publishes waiting in the queue (made while disconnected, or beyond the window)."""
        return len(self._queue)

    def subscribe(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        """Call ``callback(topic, payload, retained)`` for every message matching ``topic_filter``.

        The subscription lasts as long as the service and is sent again on every connect.
        """
        _check_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos!r}")
        self._subscriptions.append((TopicFilter(topic_filter), qos, callback))
        if self._connected and self._client is not None:
            self._client.subscribe(topic_filter, qos)

    def add_connect_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` after every (re)connect, once the subscriptions have been sent."""
        self._connect_callbacks.append(cb)

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` whenever an established connection ends (lost or stopped)."""
        self._disconnect_callbacks.append(cb)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]:
        """Publish, or queue while disconnected; the Deferred fires once the server has it.

        Raises :class:`QueueFull` at once when ``queue_limit`` publishes already wait (while
        disconnected, or when the server is that far behind), ``ValueError`` for a topic with
        wildcards or a QoS other than 0 or 1.
        """
        _check_topic(topic)
        if qos not in (0, 1):
            raise ValueError(f"MQTT publish QoS must be 0 or 1, got {qos!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if self._queue or not self._can_send():
            if len(self._queue) >= self.settings.queue_limit:
                raise QueueFull(
                    f"{len(self._queue)} publishes already wait for the MQTT server {self.server}"
                    f" (mqtt.queue_limit is {self.settings.queue_limit})"
                )
            entry = _Publish(topic, data, qos, retain)
            self._queue.append(entry)
            return entry.deferred
        entry = _Publish(topic, data, qos, retain)
        if not self._send(entry):
            self._queue.append(entry)
        return entry.deferred

    # -- service life ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call,unused-ignore]
        self._stopping = False
        self._client = self._make_client()
        self._pool = self._make_thread_pool()
        self._pool.start()
        self._misc = LoopingCall(self._loop_misc)
        self._misc.clock = self._reactor  # type: ignore[assignment]
        self._misc.start(MISC_INTERVAL, now=False)
        self._connect()

    def stopService(self) -> Deferred[None]:
        """Wait (at most ~5 s) for earlier publishes, send DISCONNECT, close, stop the pool."""
        super().stopService()  # type: ignore[no-untyped-call,unused-ignore]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        outstanding = set(self._inflight.values()) | set(self._queue) | set(self._acked)
        if outstanding and self._client is not None:
            await self._wait_drained(outstanding)
        self._stopping = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempting:
            waiter: Deferred[None] = Deferred()
            self._attempt_waiters.append(waiter)
            await waiter
        if self._socket is not None and self._client is not None:
            closed: Deferred[None] = Deferred()
            self._close_waiters.append(closed)
            timer = self._reactor.callLater(DISCONNECT_TIMEOUT, self._fire, closed)
            self._client.disconnect()
            await closed
            if timer.active():
                timer.cancel()
            if self._socket is not None:
                self.log.warn(
                    "MQTT DISCONNECT to {server} not written within {timeout} s; closing the connection",
                    server=self.server,
                    timeout=DISCONNECT_TIMEOUT,
                )
                self._abort(self._socket, "stopping")
        if self._misc is not None and self._misc.running:
            self._misc.stop()
        self._misc = None
        if self._pool is not None:
            self._pool.stop()
        self._pool = None
        if self._client is not None:
            for attr in ("on_connect", "on_disconnect", "on_message", "on_publish", "on_socket_close",
                         "on_socket_register_write", "on_socket_unregister_write"):
                setattr(self._client, attr, None)
        self._client = None
        self._fire_acked()
        leftover = list(self._inflight.values()) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        if leftover:
            self.log.warn(
                "MQTT service stopped with {count} publishes not acknowledged by {server}; they are dropped",
                count=len(leftover),
                server=self.server,
            )
        for entry in leftover:
            if not entry.deferred.called:
                entry.deferred.errback(MqttStopped(f"MQTT service stopped before {self.server} acknowledged {entry.topic}"))

    async def _wait_drained(self, outstanding: set[_Publish]) -> None:
        done: Deferred[None] = Deferred()
        waiter = (outstanding, done)
        self._drain_waiters.append(waiter)
        timer = self._reactor.callLater(STOP_TIMEOUT, self._fire, done)
        await done
        if timer.active():
            timer.cancel()
        self._drain_waiters.remove(waiter)
        if outstanding:
            self.log.warn(
                "MQTT: {count} publishes still unacknowledged by {server} after {timeout} s; stopping anyway",
                count=len(outstanding),
                server=self.server,
                timeout=STOP_TIMEOUT,
            )

    @staticmethod
    def _fire(d: Deferred[None]) -> None:
        if not d.called:
            d.callback(None)

    # -- seams (tests replace these) ------------------------------------------------------------

    def _make_thread_pool(self) -> ThreadPool:
        return ThreadPool(minthreads=0, maxthreads=1, name=f"{self.name}-connect")

    def _make_client(self) -> paho.Client:
        s = self.settings
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=self.clean_session,
            protocol=MQTTProtocolVersion.MQTTv311,
            transport=s.transport,  # type: ignore[arg-type]
            reconnect_on_failure=False,
        )
        # Without this, one exception in any callback silently stops all reading.
        client.suppress_exceptions = True
        client.max_inflight_messages = WINDOW
        client.connect_timeout = CONNECT_TIMEOUT
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            try:
                client.tls_set(ca_certs=s.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"mqtt.ca_file {s.ca_file!r}: cannot load CA certificates: {exc}") from None
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        # Only records where to connect; the blocking part is reconnect(), in the pool.
        client.connect_async(s.broker_url, s.broker_port, s.keepalive)
        return client

    # -- connecting ---------------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        client, pool = self._client, self._pool
        if self._stopping or client is None or pool is None:
            return
        self.log.debug("MQTT connecting to {server} as {client_id!r}", server=self.server, client_id=self.client_id)
        self._attempting = True
        d = deferToThreadPool(self._reactor, pool, client.reconnect)  # type: ignore[arg-type]
        d.addCallbacks(self._connect_sent, self._connect_failed, callbackArgs=(client,), errbackArgs=(client,))

    def _connect_sent(self, rc: MQTTErrorCode, client: paho.Client) -> None:
        """Back on the reactor: the socket is open and CONNECT is queued; wait for CONNACK."""
        self._attempting = False
        sock = client.socket()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
            self._attempt_over()
            self._retry_later(f"connection to {self.server} failed ({paho.error_string(rc)})")
            return
        self._socket = _PahoSocket(self, sock)
        self._reactor.addReader(self._socket)
        self._reading = True
        if client.want_write():
            self._reactor.addWriter(self._socket)
            self._writing = True
        self._attempt_over()

    def _connect_failed(self, failure: Failure, client: paho.Client) -> None:
        self._attempting = False
        self._attempt_over()
        exc = failure.value
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._retry_later(f"connection to {self.server} failed ({reason})")

    def _attempt_over(self) -> None:
        waiters, self._attempt_waiters = self._attempt_waiters, []
        for d in waiters:
            d.callback(None)

    def _retry_later(self, what: str) -> None:
        if self._stopping or self._client is None:
            return
        if self._retry is not None and self._retry.active():
            return
        delay = self.backoff.next()
        self.log.warn("MQTT {what}; reconnecting in {delay:.1f} s", what=what, delay=delay)
        self._retry = self._reactor.callLater(delay, self._connect)

    # -- paho callbacks (reactor thread) ------------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            # Paho closes the socket next; on_disconnect schedules the retry.
            self._refusal = f"refused by the server: {reason}"
            return
        self.backoff.reset()
        if self._stopping:
            # DISCONNECT is already queued behind CONNECT: nothing more to send.
            return
        self._connected = True
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.log.info(
            "MQTT connected to {server} as {client_id!r} (session present: {session})",
            server=self.server,
            client_id=self.client_id,
            session=flags.session_present,
        )
        wanted: dict[str, int] = {}
        for topic_filter, qos, _ in self._subscriptions:
            wanted[topic_filter.text] = max(qos, wanted.get(topic_filter.text, 0))
        if wanted:
            client.subscribe(list(wanted.items()))
        self._fill_window()
        for cb in list(self._connect_callbacks):
            try:
                cb()
            except Exception:
                self.log.failure("MQTT connect callback {cb!r} failed", cb=cb)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        self._lost(client, _disconnect_reason(reason, self.settings.keepalive))

    def _lost(self, client: paho.Client | None, reason: str) -> None:
        """The connection (or the attempt) is over: take back what is unacknowledged, retry."""
        was_connected, self._connected = self._connected, False
        if self._inflight:
            # Unacknowledged publishes go back in front of the queue, in their order; paho
            # must not also re-send them itself on the next connection.
            self._queue.extendleft(reversed(list(self._inflight.values())))
            self._inflight.clear()
        if client is not None:
            client.drop_out_messages()
        if was_connected:
            for cb in list(self._disconnect_callbacks):
                try:
                    cb()
                except Exception:
                    self.log.failure("MQTT disconnect callback {cb!r} failed", cb=cb)
        refusal, self._refusal = self._refusal, None
        if self._stopping:
            self.log.info("MQTT disconnected from {server}", server=self.server)
            return
        if was_connected:
            self._retry_later(f"connection to {self.server} lost ({reason})")
        else:
            self._retry_later(f"connection to {self.server} failed ({refusal or reason})")

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._handled += 1
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.log.warn("MQTT message ignored: its topic is not UTF-8 (from {server})", server=self.server)
            return
        payload = bytes(message.payload)
        retained = bool(message.retain)
        for topic_filter, _, callback in list(self._subscriptions):
            if not topic_filter.matches(topic):
                continue
            try:
                callback(topic, payload, retained)
            except Exception:
                self.log.failure(
                    "MQTT message callback for topic {topic} failed (subscription {filter}); "
                    "later messages are still delivered",
                    topic=topic,
                    filter=topic_filter.text,
                )

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        self._handled += 1
        entry = self._inflight.pop(mid, None)
        if entry is not None:
            # Fired after paho has finished with the packet (see _after_io), not from inside it.
            self._acked.append(entry)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._attempting:
            self._drop_descriptor()

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # During an attempt paho calls this from the pool thread; _connect_sent registers then.
        if not self._attempting and self._socket is not None and not self._writing:
            self._reactor.addWriter(self._socket)
            self._writing = True

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if not self._attempting and self._socket is not None and self._writing:
            self._reactor.removeWriter(self._socket)
            self._writing = False

    # -- reactor side of the socket --------------------------------------------------------------

    def _read(self, descriptor: _PahoSocket) -> None:
        self._read_again = None
        client = self._client
        if client is None or descriptor is not self._socket:
            return
        try:
            pending = getattr(descriptor.sock, "pending", None)
            for _ in range(READ_BURST):
                handled = self._handled
                client.loop_read()
                if self._socket is not descriptor:
                    break
                # Bytes waiting in a buffer (ours, or TLS's decrypted ones) make no readable
                # event: read on. So does a completed packet: more may have come meanwhile. A
                # partial packet waits for the next readable event.
                if not (pending is not None and pending()) and self._handled == handled:
                    break
            else:
                if pending is not None and self._socket is descriptor and pending():
                    # Bounded, so timers and HTTP get their turn; the rest in the next reactor turn.
                    self._read_again = self._reactor.callLater(0, self._read, descriptor)
        except Exception:
            self.log.failure("MQTT: unexpected error reading from {server}", server=self.server)
            self._abort(descriptor, "unexpected error while reading")
        self._after_io()

    def _write(self, descriptor: _PahoSocket) -> None:
        client = self._client
        if client is None or descriptor is not self._socket:
            return
        try:
            client.loop_write()
        except Exception:
            self.log.failure("MQTT: unexpected error writing to {server}", server=self.server)
            self._abort(descriptor, "unexpected error while writing")
        self._after_io()

    def _loop_misc(self) -> None:
        client = self._client
        if client is None or self._socket is None or self._attempting:
            return
        try:
            client.loop_misc()
        except Exception:
            self.log.failure("MQTT: unexpected error in keepalive handling for {server}", server=self.server)
        self._after_io()

    def _descriptor_lost(self, descriptor: _PahoSocket) -> None:
        if descriptor is self._socket:
            self._abort(descriptor, "dropped by the reactor")

    def _drop_descriptor(self) -> None:
        if self._read_again is not None and self._read_again.active():
            self._read_again.cancel()
        self._read_again = None
        descriptor, self._socket = self._socket, None
        if descriptor is not None:
            if self._reading:
                self._reactor.removeReader(descriptor)
            if self._writing:
                self._reactor.removeWriter(descriptor)
        self._reading = self._writing = False
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            self._fire(d)

    def _abort(self, descriptor: _PahoSocket, reason: str) -> None:
        """Cut the connection without DISCONNECT, letting paho notice (EOF) when it can."""
        raw = getattr(descriptor.sock, "_socket", descriptor.sock)  # websockets wrap the socket
        try:
            raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client = self._client
        if client is not None:
            try:
                client.loop_read()
            except Exception:
                pass
        if self._socket is descriptor:
            # Paho did not close it: do its bookkeeping here.
            self._drop_descriptor()
            try:
                descriptor.sock.close()
            except OSError:
                pass
            self._lost(client, reason)

    # -- publishing ---------------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self._connected and self._client is not None and len(self._inflight) < WINDOW

    def _send(self, entry: _Publish) -> bool:
        """Hand ``entry`` to paho; False when paho refused it (it stays ours to queue)."""
        assert self._client is not None
        info = self._client.publish(entry.topic, entry.payload, entry.qos, entry.retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.log.warn(
                "MQTT: paho refused a publish to {topic} ({error}); keeping it queued",
                topic=entry.topic,
                error=paho.error_string(info.rc),
            )
            return False
        # NO_CONN: the connection is going away; on_disconnect takes the entry back.
        self._inflight[info.mid] = entry
        return True

    def _fill_window(self) -> None:
        while self._queue and self._can_send():
            entry = self._queue.popleft()
            if not self._send(entry):
                self._queue.appendleft(entry)
                break

    def _after_io(self) -> None:
        self._fire_acked()
        self._fill_window()

    def _fire_acked(self) -> None:
        while self._acked:
            acked, self._acked = self._acked, []
            for entry in acked:
                for outstanding, done in self._drain_waiters:
                    outstanding.discard(entry)
                    if not outstanding:
                        self._fire(done)
                if not entry.deferred.called:
                    entry.deferred.callback(None)
