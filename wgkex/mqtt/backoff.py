"""How long to wait before the next connect attempt: capped exponential backoff."""

from __future__ import annotations

import random
from collections.abc import Callable

#: First reconnect delay, seconds (doubled per failure up to ``reconnect_max_delay``).
INITIAL_DELAY = 0.5


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
