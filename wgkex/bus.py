"""The message bus as the rest of wgkex sees it: one protocol, two errors.

The broker's API, its worker picture and metrics, and the worker's services are
typed against :class:`Bus`, never against the MQTT implementation
(:class:`wgkex.mqtt.MqttService` provides it; tests hand in small in-memory
fakes). Importing this module pulls in neither paho nor a reactor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred

#: ``callback(topic, payload, retained)`` for one message matching a subscription. It returns
#: None when it is done with the message, or a Deferred that fires when it is (a key once
#: applied): only then is the message acknowledged to the MQTT server, which until then keeps
#: it and delivers it again after a lost connection. A failure of that Deferred is logged and
#: the message acknowledged all the same (a message that fails would fail again), except for
#: :class:`Redeliver`.
MessageCallback = Callable[[str, bytes, bool], "Deferred[None] | None"]


class Redeliver(Exception):
    """A message callback's Deferred fails with this to leave the message unacknowledged: the
    MQTT server delivers it again after the next connect (the subscriber is stopping)."""


class QueueFull(Exception):
    """``publish`` refused: the queue of publishes waiting for the MQTT server is full."""


class MqttStopped(Exception):
    """The bus stopped before the MQTT server acknowledged this publish."""


class Bus(Protocol):
    """One MQTT connection kept up by a service: publish, subscribe, and its state."""

    @property
    def connected(self) -> bool:
        """True while connected (CONNACK received, connection not lost since)."""
        ...

    @property
    def reconnects(self) -> int:
        """Successful connects after the first."""
        ...

    @property
    def pending(self) -> int:
        """Publishes waiting for the server (made while disconnected, or beyond the window)."""
        ...

    def subscribe(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        """Call ``callback`` for every message matching ``topic_filter``, for as long as the bus lives.

        A QoS 1 message is acknowledged once the callback is done with it (see :data:`MessageCallback`).
        """
        ...

    def add_connect_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` after every (re)connect, once the subscriptions have been sent."""
        ...

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None:
        """Call ``cb()`` whenever an established connection ends."""
        ...

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]:
        """Publish, or queue while disconnected; the Deferred fires once the server has it.

        Raises :class:`QueueFull` when the queue is full.
        """
        ...


class ForwardingBus:
    """A :class:`Bus` that hands everything to another one; subclasses change one part.

    The broker layers two such views over its MQTT service: one that lets the
    history see the workers' reports too (:class:`wgkex.broker.history.AlsoTo`)
    and one that remembers acknowledged keys for replays
    (:class:`wgkex.broker.recent.RecordingBus`).
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    @property
    def connected(self) -> bool:
        return self._bus.connected

    @property
    def reconnects(self) -> int:
        return self._bus.reconnects

    @property
    def pending(self) -> int:
        return self._bus.pending

    def subscribe(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        self._bus.subscribe(topic_filter, qos, callback)

    def add_connect_callback(self, cb: Callable[[], None]) -> None:
        self._bus.add_connect_callback(cb)

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None:
        self._bus.add_disconnect_callback(cb)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]:
        return self._bus.publish(topic, payload, qos, retain)
