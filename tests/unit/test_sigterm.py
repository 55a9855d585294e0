"""CleanSigterm: SIGTERM stops the reactor without twistd's re-raise, so the exit status is 0 (broker and worker)."""

from __future__ import annotations

import signal
from typing import Any, Callable, cast

from twisted.logger import ILogObserver
from twisted.trial.unittest import SynchronousTestCase

from wgkex.reactor import IReactor
from wgkex.sigterm import CleanSigterm


class FakeReactor:
    """The part of a reactor CleanSigterm uses (passed cast to IReactor: it provides only this part)."""

    def __init__(self) -> None:
        self.running = True
        self.stopped = 0
        self.when_running: list[Callable[[], object]] = []

    def callWhenRunning(self, f: Callable[..., object], *args: object) -> None:
        self.when_running.append(lambda: f(*args))

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        f(*args)

    def stop(self) -> None:
        self.stopped += 1
        self.running = False

    def run(self) -> None:
        for f in self.when_running:
            f()


class FakeSignals:
    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {signal.SIGTERM: "reactor's handler"}

    def signal(self, number: int, handler: Any) -> Any:
        previous = self.handlers.get(number)
        self.handlers[number] = handler
        return previous


class CleanSigtermTests(SynchronousTestCase):
    """The handler is installed after the reactor's, stops it, and is removed on stop."""

    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.signals = FakeSignals()
        self.service = CleanSigterm(cast(IReactor, self.reactor), self.signals)

    def test_installed_once_running(self) -> None:
        """The handler replaces the reactor's only once the reactor runs."""
        self.service.startService()
        self.assertEqual(self.signals.handlers[signal.SIGTERM], "reactor's handler")
        self.reactor.run()
        self.assertNotEqual(self.signals.handlers[signal.SIGTERM], "reactor's handler")

    def test_sigterm_stops_reactor(self) -> None:
        """SIGTERM stops the reactor (and records no exit signal)."""
        self.service.startService()
        self.reactor.run()
        self.signals.handlers[signal.SIGTERM](signal.SIGTERM, None)
        self.assertEqual(self.reactor.stopped, 1)
        self.assertFalse(hasattr(self.reactor, "_exitSignal"))

    def test_stop_restores_previous(self) -> None:
        """stopService puts the previous handler back."""
        self.service.startService()
        self.reactor.run()
        self.service.stopService()
        self.assertEqual(self.signals.handlers[signal.SIGTERM], "reactor's handler")

    def test_stopped_before_running(self) -> None:
        """Stopped before the reactor ran: nothing is installed."""
        self.service.startService()
        self.service.stopService()
        self.reactor.run()
        self.assertEqual(self.signals.handlers[signal.SIGTERM], "reactor's handler")

    def test_sighup_logged_when_asked(self) -> None:
        """With a hangup message, SIGHUP is logged instead of ending the process; stop restores it."""
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        service = CleanSigterm(cast(IReactor, self.reactor), self.signals, hangup="nothing to reload")
        service.startService()
        self.reactor.run()
        self.signals.handlers[signal.SIGHUP](signal.SIGHUP, None)
        self.assertEqual(self.reactor.stopped, 0)
        self.assertTrue(any(e.get("what") == "nothing to reload" for e in events))
        service.stopService()
        self.assertEqual(self.signals.handlers[signal.SIGHUP], signal.SIG_DFL)

    def test_sighup_untouched_by_default(self) -> None:
        """Without a hangup message SIGHUP is left alone (the broker reloads key lists on it)."""
        self.service.startService()
        self.reactor.run()
        self.assertNotIn(signal.SIGHUP, self.signals.handlers)
