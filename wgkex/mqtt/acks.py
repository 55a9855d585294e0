"""Acknowledging received messages once their subscribers are done with them, in arrival order.

The client runs paho with ``manual_ack``: paho no longer answers a QoS 1
PUBLISH with PUBACK as soon as the message callback returns. Instead each
message gets a :class:`Receipt` here, and the service settles it when the
subscribers are done (at once for a callback that returns nothing; when the
Deferred it returned fires, for the worker's keys once applied). Until then
the server keeps the message in the session, and a connection lost meanwhile
makes the server deliver it again (with DUP) on the next connect: a worker
killed between receiving a key and applying it loses nothing.

MQTT 3.1.1 (section 4.6) wants PUBACKs in the order the PUBLISHes arrived, so
a settled receipt waits for the ones before it: the head of the queue goes out
as soon as it is settled. A receipt settled without acknowledgement (the
subscriber wants the message again) leaves the queue silently; the server
sends that message again after the next connect.

Receipts belong to one connection: message ids mean nothing on the next one,
so :meth:`Acknowledgements.forget` (connection lost) drops them all, and a
receipt settled later is ignored.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable


class _State(enum.Enum):
    PENDING = "pending"
    ACK = "ack"
    SKIP = "skip"
    GONE = "gone"


class Receipt:
    """One received message waiting for its subscribers: ``mid`` and ``qos`` to acknowledge."""

    __slots__ = ("mid", "qos", "_state")

    def __init__(self, mid: int, qos: int, state: _State = _State.PENDING) -> None:
        self.mid = mid
        self.qos = qos
        self._state = state

    @property
    def settled(self) -> bool:
        """True once the subscribers are done (or the connection it came on is gone)."""
        return self._state is not _State.PENDING


class Acknowledgements:
    """The receipts of one connection, acknowledged in arrival order through ``send(mid, qos)``."""

    def __init__(self, send: Callable[[int, int], object]) -> None:
        self._send = send
        self._queue: deque[Receipt] = deque()

    @property
    def waiting(self) -> int:
        """Messages received and not yet acknowledged (settled ones behind an unsettled one count)."""
        return len(self._queue)

    def received(self, mid: int, qos: int) -> Receipt:
        """A message arrived; QoS 0 needs no acknowledgement and is settled from the start."""
        if qos == 0:
            return Receipt(mid, qos, _State.GONE)
        receipt = Receipt(mid, qos)
        self._queue.append(receipt)
        return receipt

    def settle(self, receipt: Receipt, acknowledge: bool = True) -> None:
        """The subscribers are done with ``receipt``'s message; with ``acknowledge`` false the
        server is to deliver it again after the next connect. Sends every acknowledgement due."""
        if receipt.settled:
            return
        receipt._state = _State.ACK if acknowledge else _State.SKIP
        queue = self._queue
        while queue and queue[0].settled:
            head = queue.popleft()
            if head._state is _State.ACK:
                self._send(head.mid, head.qos)

    def forget(self) -> int:
        """The connection is over: drop every receipt (the server redelivers); returns how many."""
        dropped = len(self._queue)
        for receipt in self._queue:
            receipt._state = _State.GONE
        self._queue.clear()
        return dropped
