"""The one in-memory bus of the unit tests: :class:`wgkex.bus.Bus` without a server.

:class:`FakeBus` is what :class:`wgkex.mqtt.MqttService` is to the rest of
wgkex -- a service that publishes, subscribes and reports its connection --
with the server replaced by lists a test reads and methods a test calls.
Topics and filters are checked and matched by the real code
(:mod:`wgkex.mqtt.filters`), so a subscription that would never match on
mosquitto never matches here either.

A test drives it with :meth:`FakeBus.connect` / :meth:`FakeBus.disconnect`
(which run the connect and disconnect callbacks, as the real service does),
:meth:`FakeBus.deliver` (a message from the server) and, when built with
``acks=False``, :meth:`FakeBus.ack` (the server acknowledges what is
outstanding). It reads :attr:`FakeBus.published` and :attr:`FakeBus.events`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed

from wgkex.bus import MessageCallback, QueueFull
from wgkex.mqtt.filters import TopicFilter, check_filter, check_topic


class Published(NamedTuple):
    """One publish as the server would have received it (compares equal to the plain tuple)."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class FakeBus(Service):
    """A :class:`wgkex.bus.Bus` and a service, in memory.

    ``acks``: True fires each publish's Deferred at once (a server that
    acknowledges immediately); False leaves them to :meth:`ack` or to the test
    (:attr:`deferreds`). ``queue_limit``: while disconnected, at most this many
    unacknowledged publishes are kept before ``publish`` raises
    :class:`~wgkex.bus.QueueFull` (None: no limit), as the real outbox does.
    """

    def __init__(
        self, connected: bool = False, *, acks: bool = True, queue_limit: int | None = None, name: str = "mqtt"
    ) -> None:
        self.connected = connected
        self.reconnects = 0
        self.acks = acks
        self.queue_limit = queue_limit
        self.subscriptions: list[tuple[str, int, MessageCallback]] = []
        self._filters: list[TopicFilter] = []
        self.connect_callbacks: list[Callable[[], None]] = []
        self.disconnect_callbacks: list[Callable[[], None]] = []
        #: Every publish, in order.
        self.published: list[Published] = []
        #: The Deferred each publish returned, in the same order.
        self.deferreds: list[Deferred[None]] = []
        #: ``("publish", topic, payload)``, ``("start",)``, ``("stop",)`` in the order they happened;
        #: tests may append their own events to see them interleaved.
        self.events: list[tuple[Any, ...]] = []
        self.setName(name)

    # -- wgkex.bus.Bus ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Publishes not yet acknowledged while disconnected (the real outbox's waiting queue)."""
        return 0 if self.connected else self._unacknowledged()

    def subscribe(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        check_filter(topic_filter)
        self.subscriptions.append((topic_filter, qos, callback))
        self._filters.append(TopicFilter(topic_filter))

    def add_connect_callback(self, cb: Callable[[], None]) -> None:
        self.connect_callbacks.append(cb)

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None:
        self.disconnect_callbacks.append(cb)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]:
        check_topic(topic)
        if not self.connected and self.queue_limit is not None and self._unacknowledged() >= self.queue_limit:
            raise QueueFull(f"{self.queue_limit} publishes are waiting for the MQTT server")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        d: Deferred[None] = succeed(None) if self.acks else Deferred()
        self.published.append(Published(topic, data, qos, retain))
        self.deferreds.append(d)
        self.events.append(("publish", topic, data))
        return d

    # -- the service ------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.events.append(("start",))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.events.append(("stop",))
        return succeed(None)

    # -- test controls ----------------------------------------------------------------------

    def connect(self) -> None:
        """The connection comes up: run every connect callback."""
        self.connected = True
        for cb in list(self.connect_callbacks):
            cb()

    def disconnect(self) -> None:
        """The connection drops: run every disconnect callback."""
        self.connected = False
        for cb in list(self.disconnect_callbacks):
            cb()

    def deliver(self, topic: str, payload: bytes | str, retained: bool = False) -> None:
        """A message from the server: every subscription whose filter matches ``topic`` gets it."""
        data = payload.encode() if isinstance(payload, str) else payload
        for (_, _, callback), topic_filter in zip(list(self.subscriptions), list(self._filters)):
            if topic_filter.matches(topic):
                callback(topic, data, retained)

    def ack(self) -> None:
        """The server acknowledges every publish so far."""
        for d in self.deferreds:
            if not d.called:
                d.callback(None)

    def keys(self) -> list[tuple[str, bytes]]:
        """``(topic, payload)`` of every publish."""
        return [(p.topic, p.payload) for p in self.published]

    def last(self, topic: str) -> bytes | None:
        """The payload last published on ``topic``, or None."""
        for p in reversed(self.published):
            if p.topic == topic:
                return p.payload
        return None

    def _unacknowledged(self) -> int:
        return sum(1 for d in self.deferreds if not d.called)
