"""A log line whenever Python's garbage collector stops the process for long.

A collection of the oldest generation walks every container object the
process holds, with the GIL held: every thread stands still meanwhile (the
reactor, the worker's netlink lanes). At 100,000 peers that can reach seconds
on a small machine, and from the outside it looks like the kernel or the MQTT
server being slow. :class:`SlowCollections` (a ``gc.callbacks`` entry, installed
by the twistd plugins) times each collection and logs one warning for each that
took :data:`SLOW_COLLECTION` seconds or more: how long, which generation, how
many objects it freed.

The callback itself runs inside the collection, on whichever thread triggered
it: it only reads a clock and, for a slow one, hands the line to the reactor
thread (``callFromThread``), which logs it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from wgkex.reactor import IReactor

__all__ = ["SLOW_COLLECTION", "SlowCollections", "watch_collections"]

#: Seconds from which a collection is logged.
SLOW_COLLECTION = 0.2


class SlowCollections:
    """Times garbage collections; logs those of ``threshold`` seconds or more (see module docstring)."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorThreads,
        threshold: float = SLOW_COLLECTION,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._reactor = reactor
        self.threshold = threshold
        self._clock = clock
        self._started: float | None = None
        #: Collections logged so far.
        self.slow = 0

    def install(self) -> None:
        """Follow every collection of this process from now on."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        started, self._started = self._started, None
        if started is None:
            return
        seconds = self._clock() - started
        if seconds >= self.threshold:
            self.slow += 1
            self._reactor.callFromThread(
                self._report, seconds, int(info.get("generation", -1)), int(info.get("collected", 0))
            )

    def _report(self, seconds: float, generation: int, collected: int) -> None:
        self.log.warn(
            "Python's garbage collector stopped every thread of this process for {seconds:.2f} s "
            "(generation {generation}, {collected} objects freed)",
            seconds=seconds, generation=generation, collected=collected,
        )


def watch_collections(reactor: IReactor) -> SlowCollections:
    """Log slow collections while ``reactor`` runs (the twistd plugins call this)."""
    watch = SlowCollections(reactor)
    reactor.callWhenRunning(watch.install)
    reactor.addSystemEventTrigger("after", "shutdown", watch.uninstall)
    return watch
