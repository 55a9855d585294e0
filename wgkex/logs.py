"""Logging for both roles: twisted.logger for wgkex, stdlib logging bridged into it.

wgkex logs through :class:`twisted.logger.Logger`; twistd decides where lines
go (stdout under ``-n``, which systemd hands to the journal, or ``--logfile``).
Libraries that log through the standard library (paho-mqtt, pyroute2) are
bridged into the same stream, unless the configuration's ``logging_config``
(the original implementation's key, a :func:`logging.config.dictConfig`
mapping) says where their lines go instead.

``log_level`` filters both: stdlib records below it are dropped at the root
logger, and Twisted events below it are dropped by a filter placed in front of
the observers twistd installed.

A ``logging_config`` that ``dictConfig`` refuses (``version: 99``, a handler
class that does not exist) stops the daemon at start with the one-line
configuration error (:mod:`wgkex.startup`), like any other bad setting.
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Mapping
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogBeginner,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    Logger,
    globalLogBeginner,
    globalLogPublisher,
)
from zope.interface import implementer

from wgkex.config import ConfigError
from wgkex.startup import exit_at_start

_TWISTED_LEVELS: dict[str, LogLevel] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}
_STDLIB_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_THRESHOLDS: tuple[tuple[int, LogLevel], ...] = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


def twisted_level(record_level: int) -> LogLevel:
    """The Twisted log level matching a stdlib record level."""
    for threshold, level in _THRESHOLDS:
        if record_level >= threshold:
            return level
    debug: LogLevel = LogLevel.debug
    return debug


class StdlibToTwisted(logging.Handler):
    """A stdlib logging handler that re-emits records as Twisted log events."""

    def __init__(self, publisher: ILogObserver | None = None) -> None:
        super().__init__()
        self._publisher = publisher

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not kill the caller
            message = f"{record.msg!r} {record.args!r}"
        log = Logger(namespace=record.name, observer=self._publisher)
        log.emit(twisted_level(record.levelno), "{message}", message=message)


@implementer(ILogObserver)
class _LevelGate:
    """Forwards events at or above a level to the observers it took over."""

    def __init__(self, observers: list[ILogObserver], level: LogLevel) -> None:
        self._inner = LogPublisher(*observers)
        self._filtered = FilteringLogObserver(self._inner, [LogLevelFilterPredicate(defaultLogLevel=level)])

    def __call__(self, event: LogEvent) -> None:
        self._filtered(event)


class LoggingService(Service):
    """Applies ``log_level`` and ``logging_config`` when the process starts.

    Built in ``makeService`` from the parsed configuration; does its work in
    :meth:`startService`, after twistd has set up its own log observers.
    """

    name = "logging"

    def __init__(
        self,
        level: str,
        logging_config: Mapping[str, Any] | None,
        publisher: LogPublisher = globalLogPublisher,
        beginner: LogBeginner | None = None,
        config_path: str = "<config>",
        stderr: TextIO | None = None,
    ) -> None:
        self.level = level
        self.config_path = config_path
        self._stderr = stderr
        self._beginner = beginner if beginner is not None else globalLogBeginner
        self.logging_config = logging_config
        self._publisher = publisher
        self._bridge: StdlibToTwisted | None = None
        self._gate: _LevelGate | None = None
        self._taken: list[ILogObserver] = []
        self._log = Logger(observer=publisher)

    def startService(self) -> None:
        super().startService()
        self._gate_twisted_events()
        root = logging.getLogger()
        if self.logging_config:
            try:
                logging.config.dictConfig(dict(self.logging_config))
            except (ValueError, TypeError, AttributeError, ImportError, KeyError) as exc:
                problem = " ".join(f"cannot be applied by Python's logging.config.dictConfig: {exc}".split())
                exit_at_start(ConfigError(self.config_path, "logging_config", problem), self._stderr)
            else:
                return
        self._bridge = StdlibToTwisted(self._publisher)
        root.addHandler(self._bridge)
        root.setLevel(_STDLIB_LEVELS[self.level])

    def stopService(self) -> None:
        if self._bridge is not None:
            logging.getLogger().removeHandler(self._bridge)
            self._bridge = None
        if self._gate is not None:
            self._publisher.removeObserver(self._gate)
            for observer in self._taken:
                self._publisher.addObserver(observer)
            self._gate = None
            self._taken = []
        super().stopService()

    def _gate_twisted_events(self) -> None:
        """Put a level filter in front of the observers twistd installed.

        twistd creates its observer (stdout, --logfile or --syslog) after
        ``makeService`` and offers no hook to wrap it, so the observers are
        taken off the publisher here and re-added behind the filter. Debug is
        the default of the observers themselves, so nothing is done for it;
        nor under ``twist``, which has not begun logging yet at this point.
        """
        if self.level == "debug":
            return
        if not _logging_has_begun(self._beginner):
            # ``twist`` starts the services first and then begins logging to its own
            # observer, filtered by its --log-level. Taking the beginner's start-up
            # buffer off the publisher would break the replay of the buffered events
            # (and twist with it).
            return
        observers = _observers_of(self._publisher)
        if not observers:
            return
        for observer in observers:
            self._publisher.removeObserver(observer)
        self._taken = observers
        self._gate = _LevelGate(observers, _TWISTED_LEVELS[self.level])
        self._publisher.addObserver(self._gate)


# twisted.logger has no public way to ask whether logging has begun or which
# observers a publisher holds, and twistd offers no hook to wrap the observer it
# creates. These two functions are the only places that read Twisted's private
# attributes; each falls back to "do nothing" if the attribute goes away.


def _logging_has_begun(beginner: LogBeginner) -> bool:
    """False while ``beginner`` still buffers start-up events (``twist`` before it begins logging)."""
    return getattr(beginner, "_temporaryObserver", None) is None


def _observers_of(publisher: LogPublisher) -> list[ILogObserver]:
    """The observers ``publisher`` currently forwards to."""
    return list(getattr(publisher, "_observers", ()))
