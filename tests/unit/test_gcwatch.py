"""wgkex.gcwatch: a slow garbage collection leaves one warning, a quick one nothing."""

from __future__ import annotations

import gc
from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wgkex.gcwatch import SLOW_COLLECTION, SlowCollections


class _Reactor:
    """callFromThread runs the call at once (the tests run on one thread)."""

    def callFromThread(self, f: object, *args: object, **kwargs: object) -> None:
        f(*args, **kwargs)  # type: ignore[operator]


class SlowCollectionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.watch = SlowCollections(_Reactor(), clock=self.clock.seconds)  # type: ignore[arg-type]
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def collect(self, seconds: float, generation: int = 2) -> None:
        self.watch("start", {"generation": generation})
        self.clock.advance(seconds)
        self.watch("stop", {"generation": generation, "collected": 7, "uncollectable": 0})

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace", "").startswith("wgkex.gcwatch")]

    def test_slow_collection_is_logged(self) -> None:
        self.collect(SLOW_COLLECTION + 2.0)
        [line] = self.lines()
        self.assertIn("stopped every thread of this process for 2.20 s", line)
        self.assertIn("generation 2, 7 objects freed", line)
        self.assertEqual(self.watch.slow, 1)

    def test_quick_collections_are_not(self) -> None:
        for _ in range(3):
            self.collect(SLOW_COLLECTION / 2, generation=0)
        self.assertEqual(self.lines(), [])

    def test_stop_without_start_is_ignored(self) -> None:
        self.watch("stop", {"generation": 2, "collected": 0})
        self.assertEqual(self.lines(), [])

    def test_install_follows_real_collections(self) -> None:
        """Installed, it is called by the interpreter's own collections; uninstalled, no more."""
        self.watch.threshold = 0.0  # every collection counts as slow
        self.watch.install()
        self.addCleanup(self.watch.uninstall)
        gc.collect()
        self.assertGreaterEqual(self.watch.slow, 1)
        self.watch.uninstall()
        before = self.watch.slow
        gc.collect()
        self.assertEqual(self.watch.slow, before)
