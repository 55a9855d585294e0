"""Rate-limited logging of untrusted input: one line per interval plus a count of the rest."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.ratelog import RateLimitedLog


class RateLimitedLogTests(SynchronousTestCase):
    """RateLimitedLog driven by a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = RateLimitedLog(Logger(), self.clock, interval=10.0, what="messages")

    def test_first_logged_at_once(self) -> None:
        """The first event is logged immediately with its own fields."""
        with capturedLogs() as events:
            self.log.warn("bad {thing}", thing="x")
        self.assertEqual([e["thing"] for e in events], ["x"])

    def test_burst_suppressed_and_counted(self) -> None:
        """A burst gives one line now and one count line when the interval ends."""
        with capturedLogs() as events:
            for n in range(100):
                self.log.warn("bad {n}", n=n)
            self.assertEqual(len(events), 1)
            self.clock.advance(10)
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1]["count"], 99)

    def test_steady_stream_bounded(self) -> None:
        """A steady stream for a minute logs about one line per interval."""
        with capturedLogs() as events:
            for _ in range(600):
                self.log.warn("bad")
                self.clock.advance(0.1)
            self.clock.advance(10)
        self.assertLessEqual(len(events), 8)
        self.assertEqual(sum(e.get("count", 1) for e in events), 600)

    def test_quiet_after_interval(self) -> None:
        """After a quiet interval the next event is logged at once again."""
        with capturedLogs() as events:
            self.log.warn("one")
            self.clock.advance(11)
            self.log.warn("two")
        self.assertEqual([e["log_format"] for e in events], ["one", "two"])

    def test_stop_flushes(self) -> None:
        """stop() logs the pending count and leaves no timer behind."""
        with capturedLogs() as events:
            self.log.warn("a")
            self.log.warn("b")
            self.log.stop()
        self.assertEqual(events[-1]["count"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
