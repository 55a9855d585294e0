"""Exit status 0 after a clean SIGTERM shutdown.

twistd stops the reactor on SIGTERM, runs the shutdown (our services publish
their goodbye and disconnect), and then kills itself with the same signal so
that its parent sees "terminated by SIGTERM". The contract wants a plain exit
status 0 after a clean shutdown, so this service replaces the reactor's
SIGTERM handler (once the reactor runs, as the reactor installs its own at
start) with one that only stops the reactor, and puts the previous handler
back when it stops.

A process with nothing to reload can also ask it to answer SIGHUP (which
``systemctl reload`` and log rotation send) with a log line instead of the
default action, which would end the process without a word.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from wgkex.reactor import IReactor


class CleanSigterm(Service):
    """On SIGTERM stop the reactor, without twistd's re-raise of the signal at exit."""

    name = "sigterm"
    log = Logger()

    def __init__(self, reactor: IReactor, signals: Any = signal, hangup: str | None = None) -> None:
        self._reactor = reactor
        self._signals = signals
        self._hangup = hangup
        self._previous: Any = None
        self._previous_hup: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._install)

    def _install(self) -> None:
        if not self.running:
            return
        self._previous = self._signals.signal(signal.SIGTERM, self._received)
        if self._hangup is not None:
            self._previous_hup = self._signals.signal(signal.SIGHUP, self._hung_up)
        self._installed = True

    def _received(self, signum: int, frame: FrameType | None) -> None:
        # Signal context: hand over to the reactor thread.
        self._reactor.callFromThread(self._stop)

    def _hung_up(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self._log_hangup)

    def _log_hangup(self) -> None:
        self.log.info("Received SIGHUP: {what}", what=self._hangup)

    def _stop(self) -> None:
        self.log.info("Received SIGTERM, shutting down.")
        if self._reactor.running:
            self._reactor.stop()

    def stopService(self) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            self._signals.signal(signal.SIGTERM, previous)
            if self._hangup is not None:
                hup = self._previous_hup if self._previous_hup is not None else signal.SIG_DFL
                self._signals.signal(signal.SIGHUP, hup)
            self._installed = False
        super().stopService()
