"""Many waits of the same length on one timer: the key exchange's publish timeout.

Each key exchange request waits at most ``broker.publish_timeout`` seconds for
the MQTT server's acknowledgement. A timer per request (``callLater``, then
``cancel`` when the acknowledgement comes, a few milliseconds later) costs a
heap push, a cancellation and now and then a heap rebuild for every request.
Since every wait has the same length, they expire in the order they began:
:class:`Deadlines` keeps them in a FIFO and one timer for the oldest one still
waiting. Ending a wait early (:meth:`Wait.cancel`) only marks it; marked ones
leave the front of the queue as new ones arrive, so the queue holds about the
waits in flight, and the timer fires about once per wait length while
acknowledgements keep coming.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Wait:
    """One wait: ``expire()`` is called at its deadline unless :meth:`cancel` came first."""

    __slots__ = ("deadline", "expire")

    def __init__(self, deadline: float, expire: Callable[[], object]) -> None:
        self.deadline = deadline
        self.expire: Callable[[], object] | None = expire

    @property
    def active(self) -> bool:
        """True until it expired or was cancelled."""
        return self.expire is not None

    def cancel(self) -> None:
        """Do not call ``expire`` (it may already have been called; then nothing happens)."""
        self.expire = None


class Deadlines:
    """Waits of ``seconds`` each on ``clock``, expiring in the order they began."""

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self._clock = clock
        self.seconds = seconds
        self._waits: deque[Wait] = deque()
        self._timer: IDelayedCall | None = None

    def __len__(self) -> int:
        """Waits held (some may be cancelled and not dropped yet)."""
        return len(self._waits)

    def wait(self, expire: Callable[[], object]) -> Wait:
        """Call ``expire()`` in ``seconds`` unless the returned :class:`Wait` is cancelled first."""
        waits = self._waits
        while waits and waits[0].expire is None:
            waits.popleft()
        entry = Wait(self._clock.seconds() + self.seconds, expire)
        waits.append(entry)
        if self._timer is None:
            self._timer = self._clock.callLater(self.seconds, self._fire)
        return entry

    def _fire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        waits = self._waits
        while waits and (waits[0].expire is None or waits[0].deadline <= now):
            entry = waits.popleft()
            expire, entry.expire = entry.expire, None
            if expire is not None:
                expire()
        if waits and self._timer is None:
            self._timer = self._clock.callLater(max(0.0, waits[0].deadline - now), self._fire)
