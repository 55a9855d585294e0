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

With a :class:`~wgkex.mqtt.spool.Spool` (the broker's) every publish is also
written there before it is queued or sent, and released from it when
acknowledged; :meth:`Outbox.start` queues what an earlier run left in it, and
:meth:`Outbox.abandon` leaves what is unacknowledged there for the next start.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from wgkex.bus import QueueFull
from wgkex.mqtt.filters import check_topic
from wgkex.mqtt.spool import Spool, SpoolError, Ticket

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
    #: Where the spool keeps it (None: not spooled).
    ticket: Ticket | None = None


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

    log = Logger()

    def __init__(
        self, clock: Timer, limit: int, server: str, window: int = WINDOW, spool: Spool | None = None
    ) -> None:
        self._clock = clock
        self.spool = spool
        self._spool_failing = False
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
        entry = Publish(topic, data, qos, retain)
        if self._queue or not self._can_send():
            if len(self._queue) >= self.limit:
                raise QueueFull(
                    f"{len(self._queue)} publishes already wait for the MQTT server {self.server}"
                    f" (mqtt.queue_limit is {self.limit})"
                )
            self._keep(entry)
            self._queue.append(entry)
            return entry.deferred
        self._keep(entry)
        if not self._hand_over(entry):
            self._queue.append(entry)
        return entry.deferred

    def start(self) -> None:
        """Open the spool and queue, in order, what an earlier run left unacknowledged in it.

        Raises :class:`~wgkex.mqtt.spool.SpoolError` when the spool cannot be used.
        """
        if self.spool is None:
            return
        records = self.spool.open()
        for r in records:
            self._queue.append(Publish(r.topic, r.payload, r.qos, r.retain, ticket=r.ticket))
        if records or self.spool.skipped:
            self.log.info(
                "MQTT: {count} publishes an earlier run left unacknowledged are queued again from {directory}"
                " ({skipped} unreadable lines skipped)",
                count=len(records), directory=self.spool.directory, skipped=self.spool.skipped,
            )

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
        """The service stops: fire what was acknowledged, fail the rest with ``error(entry)``.

        What is unacknowledged stays in the spool, if there is one, for the next start; one
        line says how many. Returns how many publishes failed.
        """
        self._send = None
        self._fire_acked()
        leftover = list(self._inflight.values()) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        for entry in leftover:
            if not entry.deferred.called:
                entry.deferred.errback(error(entry))
        if self.spool is not None:
            kept = self.spool.close()
            if kept:
                self.log.warn(
                    "MQTT stopped with {count} publishes not acknowledged by {server}; they stay in {directory}"
                    " and are published on the next start",
                    count=kept, server=self.server, directory=self.spool.directory,
                )
        elif leftover:
            self.log.warn(
                "MQTT service stopped with {count} publishes not acknowledged by {server}; they are dropped",
                count=len(leftover), server=self.server,
            )
        return len(leftover)

    # -- inside ---------------------------------------------------------------------------------

    def _keep(self, entry: Publish) -> None:
        """Spool ``entry`` before anyone is told it was accepted; QueueFull when that fails."""
        if self.spool is None:
            return
        try:
            entry.ticket = self.spool.append(entry.topic, entry.payload, entry.qos, entry.retain)
        except SpoolError as exc:
            if not self._spool_failing:
                self.log.error("MQTT: cannot spool publishes, refusing them until it works again: {error}", error=exc)
            self._spool_failing = True
            raise QueueFull(f"the publish cannot be kept until the server has it: {exc}") from None
        if self._spool_failing:
            self.log.info("MQTT: spooling publishes works again")
            self._spool_failing = False

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
            if self.spool is not None:
                tickets = [entry.ticket for entry in acked if entry.ticket is not None]
                for entry in acked:
                    entry.ticket = None
                if tickets:
                    self.spool.release_all(tickets)  # one write for the PUBACKs of one read
            for entry in acked:
                if self._drain_waiters:
                    for outstanding, done in list(self._drain_waiters):
                        outstanding.discard(entry)
                        if not outstanding:
                            fire(done)
                if not entry.deferred.called:
                    entry.deferred.callback(None)
