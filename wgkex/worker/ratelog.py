"""Log lines that untrusted input can trigger, at most one per interval.

Anyone on the bus can publish garbage as fast as the MQTT server lets them; a
log line per message would flood the gateway's disk. :class:`RateLimitedLog`
emits the first event at once, swallows the rest of the interval (counting
them), and at the end of the interval says how many it swallowed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class RateLimitedLog:
    """At most one warning per ``interval`` seconds, plus a count of the suppressed ones."""

    def __init__(self, log: Logger, clock: IReactorTime, interval: float = 10.0, what: str = "messages") -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._what = what
        self._last: float | None = None
        self._suppressed = 0
        self._flush_call: IDelayedCall | None = None

    def warn(self, format: str, **kwargs: Any) -> None:
        """Log ``format`` now, or count it when a line was logged less than ``interval`` ago."""
        now = self._clock.seconds()
        if self._last is None or now - self._last >= self._interval:
            self._flush()
            self._last = now
            self._log.warn(format, **kwargs)
            return
        self._suppressed += 1
        if self._flush_call is None:
            self._flush_call = self._clock.callLater(self._last + self._interval - now, self._flush)

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if self._suppressed:
            self._log.warn(
                "{count} more invalid {what} suppressed in the last {interval:g} s",
                count=self._suppressed,
                what=self._what,
                interval=self._interval,
            )
            self._suppressed = 0
            self._last = self._clock.seconds()

    def stop(self) -> None:
        """Say how many were suppressed and cancel the pending timer."""
        self._flush()
