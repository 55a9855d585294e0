"""The outbox: every publish on its way to the MQTT server, until the server has it.

No paho and no sockets here. Publishes enter one FIFO. While a connection is
open (:meth:`Outbox.open` with a *sender* that hands one publish to the client
and returns its message id) up to :data:`WINDOW` of them are in flight at a
time; the rest wait in the queue, which holds at most ``limit`` publishes
(:class:`~wgkex.bus.QueueFull` beyond). Each publish's Deferred fires when the
server has it (:meth:`Outbox.acknowledged`, then :meth:`Outbox.settle`).

The delivery guarantee: a publish whose Deferred has not fired is never dropped
while the outbox lives. When the connection ends (:meth:`Outbox.close`) what was
in flight goes back in front of the queue, in order, and everything is sent
again on the next :meth:`Outbox.open`: at least once, in publish order.
:meth:`Outbox.drain` waits (bounded, on the injected clock) for the publishes
made so far; :meth:`Outbox.abandon` fails what is left when the service stops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from wgkex.bus import QueueFull
from wgkex.mqtt.filters import check_topic

#: Publishes handed to the client and not yet acknowledged, at most. Paho's default of
#: 20 in-flight QoS 1 messages lets a busy broker run far ahead of the bus.
WINDOW = 1000


@dataclass(eq=False)
class Publish:
    """One publish on its way: queued, or handed to the client and awaiting acknowledgement."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    deferred: Deferred[None] = field(default_factory=Deferred)


#: Hands one publish to the client: its message id, or None when the client refused it now.
Sender = Callable[[Publish], "int | None"]


class Timer(Protocol):
    """What the outbox needs of a clock (``task.Clock`` in tests, the reactor otherwise)."""

    def callLater(self, delay: float, f: Callable[..., Any], /, *args: Any, **kw: Any) -> IDelayedCall: ...


def fire(d: Deferred[None]) -> None:
    """Fire ``d`` unless something already did."""
    if not d.called:
        d.callback(None)


class Outbox:
    """The queue, the in-flight window and the acknowledgements of one MQTT connection."""

    def __init__(self, clock: Timer, limit: int, server: str, window: int = WINDOW) -> None:
        self._clock = clock
        self.limit = limit
        #: The server as log lines and errors name it.
        self.server = server
        self.window = window
        self._queue: deque[Publish] = deque()
        self._inflight: dict[int, Publish] = {}
        self._acked: list[Publish] = []
        self._drain_waiters: list[tuple[set[Publish], Deferred[None]]] = []
        self._send: Sender | None = None

    @property
    def pending(self) -> int:
        """Publishes waiting in the queue (made while disconnected, or beyond the window)."""
        return len(self._queue)

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]:
        """Send now if the window has room, else queue; see :meth:`wgkex.bus.Bus.publish`."""
        check_topic(topic)
        if qos not in (0, 1):
            raise ValueError(f"MQTT publish QoS must be 0 or 1, got {qos!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if self._queue or not self._can_send():
            if len(self._queue) >= self.limit:
                raise QueueFull(
                    f"{len(self._queue)} publishes already wait for the MQTT server {self.server}"
                    f" (mqtt.queue_limit is {self.limit})"
                )
            entry = Publish(topic, data, qos, retain)
            self._queue.append(entry)
            return entry.deferred
        entry = Publish(topic, data, qos, retain)
        if not self._hand_over(entry):
            self._queue.append(entry)
        return entry.deferred

    # -- the connection's side ------------------------------------------------------------------

    def open(self, send: Sender) -> None:
        """A connection is up: send through ``send`` from now on, starting with the queue."""
        self._send = send
        self.fill()

    def close(self) -> None:
        """The connection is gone: what was in flight goes back in front of the queue, in order."""
        self._send = None
        if self._inflight:
            self._queue.extendleft(reversed(list(self._inflight.values())))
            self._inflight.clear()

    def acknowledged(self, mid: int) -> None:
        """The server has message ``mid``; its Deferred fires at the next :meth:`settle`."""
        entry = self._inflight.pop(mid, None)
        if entry is not None:
            self._acked.append(entry)

    def settle(self) -> None:
        """Fire what was acknowledged, then fill the window again (after each bout of I/O)."""
        self._fire_acked()
        self.fill()

    def fill(self) -> None:
        """Hand queued publishes to the connection while the window has room."""
        while self._queue and self._can_send():
            entry = self._queue.popleft()
            if not self._hand_over(entry):
                self._queue.appendleft(entry)
                break

    # -- stopping -------------------------------------------------------------------------------

    def drain(self, timeout: float) -> Deferred[int]:
        """Wait until every publish made so far is acknowledged, at most ``timeout`` seconds.

        Fires with the number still unacknowledged (0 when all made it).
        """
        outstanding = set(self._inflight.values()) | set(self._queue) | set(self._acked)
        result: Deferred[int] = Deferred()
        if not outstanding:
            result.callback(0)
            return result
        done: Deferred[None] = Deferred()
        waiter = (outstanding, done)
        self._drain_waiters.append(waiter)
        timer = self._clock.callLater(timeout, fire, done)

        def over(_: None) -> None:
            if timer.active():
                timer.cancel()
            self._drain_waiters.remove(waiter)
            result.callback(len(outstanding))

        done.addCallback(over)
        return result

    def abandon(self, error: Callable[[Publish], Exception]) -> int:
        """Fire what was acknowledged, fail every other publish with ``error(entry)``; how many failed."""
        self._send = None
        self._fire_acked()
        leftover = list(self._inflight.values()) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        for entry in leftover:
            if not entry.deferred.called:
                entry.deferred.errback(error(entry))
        return len(leftover)

    # -- inside ---------------------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self._send is not None and len(self._inflight) < self.window

    def _hand_over(self, entry: Publish) -> bool:
        assert self._send is not None
        mid = self._send(entry)
        if mid is None:
            return False
        self._inflight[mid] = entry
        return True

    def _fire_acked(self) -> None:
        while self._acked:
            acked, self._acked = self._acked, []
            for entry in acked:
                for outstanding, done in list(self._drain_waiters):
                    outstanding.discard(entry)
                    if not outstanding:
                        fire(done)
                if not entry.deferred.called:
                    entry.deferred.callback(None)
