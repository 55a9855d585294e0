"""Stopping a daemon that cannot start: one line naming file, key and problem, exit status 1.

Configuration errors found while options are parsed are printed by
:mod:`wgkex.options` before twistd starts anything. Some problems only show
when the services start: a ``broker_listen`` address that cannot be bound, a
``logging_config`` that :func:`logging.config.dictConfig` refuses. They end the
process the same way, with the same line::

    wgkex: configuration error: /etc/wgkex.yaml: broker_listen: cannot listen on ...

By then twistd has replaced ``sys.stderr`` with a log redirection (the line would
turn into a log event with a prefix), so the line goes to the process's original
standard error, :data:`sys.__stderr__`.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn, TextIO

from twisted.internet.interfaces import IReactorCore

from wgkex.config import ConfigError


def error_line(error: ConfigError) -> str:
    """The one line shown for a configuration error."""
    return f"wgkex: configuration error: {error}"


def _write_line(error: ConfigError, stderr: TextIO | None) -> None:
    stream = stderr if stderr is not None else (sys.__stderr__ or sys.stderr)
    stream.write(error_line(error) + "\n")
    stream.flush()


def exit_at_start(error: ConfigError, stderr: TextIO | None = None) -> NoReturn:
    """Write the error line and raise ``SystemExit(1)``; for failures while services start.

    twistd and ``twist`` start the service tree synchronously before the reactor
    runs and let ``SystemExit`` through: the process ends there with status 1.
    """
    _write_line(error, stderr)
    raise SystemExit(1)


def exit_when_running(reactor: IReactorCore, error: ConfigError, stderr: TextIO | None = None) -> None:
    """Write the error line, stop the reactor cleanly, then end the process with status 1.

    For a failure that arrives after start-up began (an endpoint that fails to
    listen asynchronously). twistd has no way to set the exit status once the
    reactor runs (it exits 0 after ``reactor.run()`` returns), so the last
    shutdown phase ends the process itself, after every service has stopped.
    """
    _write_line(error, stderr)
    reactor.addSystemEventTrigger("after", "shutdown", _exit_now, 1)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def _exit_now(status: int) -> None:
    # Flush what the logging observers hold, then leave without unwinding the reactor
    # (see exit_when_running for why).
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    os._exit(status)
