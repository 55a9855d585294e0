"""The MQTT service: one paho client kept connected for as long as the service runs.

:class:`MqttService` coordinates the pieces of this package and provides
:class:`wgkex.bus.Bus`. Only the blocking part of connecting (DNS, TCP, TLS
handshake, websocket upgrade: paho's ``reconnect()``) runs off the reactor, in a
one-thread pool started in ``startService`` and stopped in ``stopService``;
while that thread works, the reactor thread does not touch the client. Once
connected, :class:`~wgkex.mqtt.paho_socket.ReactorSocket` drives paho from the
reactor, so every paho callback, message callback and Deferred runs on the
reactor thread. A failed attempt or a lost connection schedules the next attempt,
on the next configured server (:mod:`~wgkex.mqtt.connect`), after a
:class:`~wgkex.mqtt.backoff.Backoff` delay (0.5 s doubling up to
``reconnect_max_delay``, reset by a successful CONNACK), forever.

Publishes go through the :class:`~wgkex.mqtt.outbox.Outbox`, opened on each
CONNACK (after the subscriptions are sent again) and closed when the connection
ends. Stopping waits up to :data:`STOP_TIMEOUT` seconds for the publishes made
before it (still reconnecting meanwhile if it must), lets a connect attempt
already in the pool finish, sends DISCONNECT (a clean goodbye: the server drops
the last will) and gives it :data:`DISCONNECT_TIMEOUT` to be written before
cutting the socket: with the server unreachable a stop ends within about 11 s.
What is still unacknowledged then fails with :class:`~wgkex.bus.MqttStopped`;
with a :class:`~wgkex.mqtt.spool.Spool` (the broker's) it stays there and is
published again on the next start, and the stop logs one line saying how many.

Received QoS 1 messages are acknowledged (PUBACK) once their subscribers are
done with them, in arrival order (:mod:`~wgkex.mqtt.acks`): a callback that
returns a Deferred holds the acknowledgement until it fires. What is not
acknowledged when the connection ends, the server delivers again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from wgkex.bus import MessageCallback, MqttStopped
from wgkex.config import MqttConfig
from wgkex.mqtt.acks import Acknowledgements
from wgkex.mqtt.backoff import INITIAL_DELAY, Backoff
from wgkex.mqtt.client import Will, make_client
from wgkex.mqtt.connect import Connector
from wgkex.mqtt.filters import Subscriptions
from wgkex.mqtt.outbox import Outbox, Publish
from wgkex.mqtt.paho_socket import ReactorSocket
from wgkex.mqtt.servers import ServerList, describe_server, disconnect_reason
from wgkex.mqtt.spool import Spool, SpoolError
from wgkex.reactor import IReactor

#: How long ``stopService`` waits for outstanding acknowledgements, seconds.
STOP_TIMEOUT = 5.0
#: How long ``stopService`` waits for DISCONNECT to be written before cutting.
DISCONNECT_TIMEOUT = 1.0
#: Period of paho's ``loop_misc`` (keepalive pings, CONNACK and PINGRESP timeouts).
MISC_INTERVAL = 1.0
_CALLBACKS = ("on_connect", "on_disconnect", "on_message", "on_publish")


class MqttService(Service):
    """One MQTT connection, kept up for as long as the service runs. See the module docstring."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactor,
        settings: MqttConfig,
        *,
        client_id: str | None = None,
        clean_session: bool = True,
        will: Will | None = None,
        name: str = "mqtt",
        spool: Spool | None = None,
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
        self.connector = Connector(
            reactor, ServerList(settings), Backoff(INITIAL_DELAY, settings.reconnect_max_delay, jitter=0.2),
            settings.keepalive, self._opened, lambda: self._make_thread_pool(),
        )
        #: Successful connects after the first.
        self.reconnects = 0
        self.subscriptions = Subscriptions()
        #: Received messages waiting for their subscribers before they are acknowledged.
        self.acks = Acknowledgements(self._acknowledge)
        self.outbox = Outbox(reactor, settings.queue_limit, describe_server(settings), spool=spool)
        self._io = ReactorSocket(reactor, name, self.outbox.settle, self._lost)
        self._connect_callbacks: list[Callable[[], None]] = []
        self._disconnect_callbacks: list[Callable[[], None]] = []
        self._client: paho.Client | None = None
        self._misc: LoopingCall | None = None
        self._connected = False
        self._ever_connected = False
        self._stopping = False
        self._refusal: str | None = None

    # -- the Bus ------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        """The server connected to (or tried next), as log lines name it."""
        return self.connector.servers.name

    @property
    def connected(self) -> bool:
        """True while connected (CONNACK received, connection not lost since)."""
        return self._connected

    @property
    def pending(self) -> int:
        """Publishes waiting in the queue (made while disconnected, or beyond the window)."""
        return self.outbox.pending

    def subscribe(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        """Call ``callback(topic, payload, retained)`` for every message matching ``topic_filter``.

        The subscription lasts as long as the service and is sent again on every connect.
        """
        self.subscriptions.add(topic_filter, qos, callback)
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

        Raises :class:`~wgkex.bus.QueueFull` at once when ``queue_limit`` publishes already
        wait, ``ValueError`` for a topic with wildcards or a QoS other than 0 or 1.
        """
        return self.outbox.publish(topic, payload, qos, retain)

    # -- service life -------------------------------------------------------------------------

    def startService(self) -> None:
        try:
            self.outbox.start()
        except SpoolError as exc:
            raise SystemExit(str(exc)) from None  # one line: the spool names file, key and problem
        super().startService()  # type: ignore[no-untyped-call,unused-ignore]
        self._stopping = False
        client = make_client(self.settings, self.client_id, self.clean_session, self.will)
        for attr in _CALLBACKS:
            setattr(client, attr, getattr(self, "_" + attr))
        self._io.follow(client, lambda: self.connector.attempting)
        self._client = client
        self._misc = LoopingCall(self._loop_misc)
        self._misc.clock = self._reactor
        self._misc.start(MISC_INTERVAL, now=False)
        self.connector.start(client)

    def stopService(self) -> Deferred[None]:
        """Wait (at most ~5 s) for earlier publishes, send DISCONNECT, close, stop the pool."""
        super().stopService()  # type: ignore[no-untyped-call,unused-ignore]
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._client is not None:
            await self.outbox.drain(STOP_TIMEOUT)  # what is left then, abandon() reports in one line
        self._stopping = True
        self.connector.stop()
        await self.connector.settled()
        await self._io.disconnect(DISCONNECT_TIMEOUT)
        if self._misc is not None and self._misc.running:
            self._misc.stop()
        self._misc = None
        self.connector.close()
        if self._client is not None:
            for attr in _CALLBACKS:
                setattr(self._client, attr, None)
            self._io.unfollow(self._client)
        self._client = None
        self.outbox.abandon(self._stopped_error)

    def _stopped_error(self, entry: Publish) -> Exception:
        return MqttStopped(f"MQTT service stopped before {self.server} acknowledged {entry.topic}")

    def _make_thread_pool(self) -> ThreadPool:
        """The connect thread (tests plug in a synchronous one)."""
        return ThreadPool(minthreads=0, maxthreads=1, name=f"{self.name}-connect")

    def _opened(self, client: paho.Client, sock: Any) -> None:
        self._io.attach(client, sock, self.server)

    def _loop_misc(self) -> None:
        if not self.connector.attempting:
            self._io.misc()

    # -- paho callbacks (on the reactor thread) -------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            # Paho closes the socket next; on_disconnect schedules the retry.
            self._refusal = f"refused by the server: {reason}"
            return
        self.connector.backoff.reset()
        if self._stopping:
            return  # DISCONNECT is already queued behind CONNECT: nothing more to send.
        self._connected = True
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self.log.info(
            "MQTT connected to {server} as {client_id!r} (session present: {session})",
            server=self.server, client_id=self.client_id, session=flags.session_present,
        )
        wanted = self.subscriptions.wanted()
        if wanted:
            client.subscribe(wanted)
        self.outbox.open(self._send)
        self._run(self._connect_callbacks, "connect")

    def _send(self, entry: Publish) -> int | None:
        """Hand ``entry`` to paho: its message id, or None when paho refused it (it stays queued)."""
        assert self._client is not None
        info = self._client.publish(entry.topic, entry.payload, entry.qos, entry.retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self.log.warn(
                "MQTT: paho refused a publish to {topic} ({error}); keeping it queued",
                topic=entry.topic, error=paho.error_string(info.rc),
            )
            return None
        # NO_CONN: the connection is going away; closing the outbox takes the entry back.
        return info.mid

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags, reason: ReasonCode, properties: Any
    ) -> None:
        self._io.flush()  # a DISCONNECT paho just wrote leaves before anything reacts to the end
        self._lost(disconnect_reason(reason, self.settings.keepalive))

    def _lost(self, reason: str) -> None:
        """The connection (or the attempt) is over: take back what is unacknowledged, retry."""
        was_connected, self._connected = self._connected, False
        self.outbox.close()
        self.acks.forget()  # message ids of this connection; the server delivers those again
        if self._client is not None:
            # Unacknowledged publishes are the outbox's to re-send: paho must not re-send them too.
            self._client.drop_out_messages()
        if was_connected:
            self._run(self._disconnect_callbacks, "disconnect")
        refusal, self._refusal = self._refusal, None
        if self._stopping:
            self.log.info("MQTT disconnected from {server}", server=self.server)
        elif was_connected:
            self.connector.retry_later(f"connection to {self.server} lost ({reason})")
        else:
            self.connector.retry_later(f"connection to {self.server} failed ({refusal or reason})")

    def _run(self, callbacks: list[Callable[[], None]], what: str) -> None:
        for cb in list(callbacks):
            try:
                cb()
            except Exception:
                self.log.failure("MQTT {what} callback {cb!r} failed", what=what, cb=cb)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._io.handled += 1
        receipt = self.acks.received(message.mid, message.qos)
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.log.warn("MQTT message ignored: its topic is not UTF-8 (from {server})", server=self.server)
            self.acks.settle(receipt)
            return
        done = self.subscriptions.dispatch(topic, bytes(message.payload), bool(message.retain))
        if done is None:
            self.acks.settle(receipt)
        else:
            done.addCallback(lambda acknowledge: self.acks.settle(receipt, acknowledge))

    def _acknowledge(self, mid: int, qos: int) -> None:
        """PUBACK (PUBCOMP for QoS 2) for a message of the current connection."""
        if self._client is not None and self._connected:
            self._client.ack(mid, qos)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        self._io.handled += 1
        # Fired after paho has finished with the packet (ReactorSocket calls settle), not from inside it.
        self.outbox.acknowledged(mid)
