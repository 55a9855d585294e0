"""log_level and the stdlib bridge: what an operator sees in the log."""

from __future__ import annotations

import logging
import warnings
from typing import cast

from twisted.logger import ILogObserver, LogBeginner, LogEvent, Logger, LogLevel, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from wgkex.logs import LoggingService


class LoggingServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[LogEvent] = []
        self.publisher = LogPublisher(cast(ILogObserver, self.events.append))
        self.root = logging.getLogger()
        self.old_level = self.root.level
        self.addCleanup(self.root.setLevel, self.old_level)
        self.beginner: LogBeginner | None = None

    def start(self, level: str, logging_config: dict | None = None) -> LoggingService:  # type: ignore[type-arg]
        service = LoggingService(level, logging_config, self.publisher, self.beginner)
        service.startService()

        def stop() -> None:
            if service.running:
                service.stopService()

        self.addCleanup(stop)
        return service

    def test_level_filters_twisted_events(self) -> None:
        """With log_level warn, info events are dropped and warnings pass."""
        self.start("warn")
        log = Logger(namespace="wgkex.test", observer=self.publisher)
        log.info("quiet")
        log.warn("loud")
        self.assertEqual([e["log_format"] for e in self.events], ["loud"])

    def test_stop_restores_observers(self) -> None:
        """After stop, events reach the original observers unfiltered again."""
        service = self.start("error")
        service.stopService()
        Logger(observer=self.publisher).info("again")
        self.assertEqual([e["log_format"] for e in self.events], ["again"])

    def test_stdlib_bridged(self) -> None:
        """A library's stdlib warning arrives as a Twisted event with its logger name and text."""
        self.start("info")
        logging.getLogger("pyroute2.test").warning("netlink %s", "trouble")
        found = [e for e in self.events if e.get("message") == "netlink trouble"]
        self.assertEqual(len(found), 1)
        self.assertEqual(found[0]["log_namespace"], "pyroute2.test")
        self.assertEqual(found[0]["log_level"], LogLevel.warn)

    def test_stdlib_level(self) -> None:
        """log_level also applies to stdlib loggers: debug records are dropped at info."""
        self.start("info")
        logging.getLogger("paho.test").debug("chatter")
        self.assertFalse([e for e in self.events if e.get("message") == "chatter"])

    def test_bad_logging_config_stops_start(self) -> None:
        """A logging_config dictConfig refuses (version 99, unknown handler class) ends the start: exit 1, one line."""
        import io

        for bad in ({"version": 99}, {"version": 1, "handlers": {"x": {"class": "no.such.Handler"}}}):
            stderr = io.StringIO()
            service = LoggingService("info", bad, self.publisher, None, config_path="/etc/w.yaml", stderr=stderr)
            with self.assertRaises(SystemExit) as cm:
                service.startService()
            self.assertEqual(cm.exception.code, 1)
            line = stderr.getvalue()
            self.assertEqual(len(line.splitlines()), 1, line)
            self.assertTrue(line.startswith("wgkex: configuration error: /etc/w.yaml: logging_config: "), line)
            service.stopService()

    def test_started_before_logging_began(self) -> None:
        """Under ``twist`` services start before logging begins: the start-up buffer replays intact."""
        import io
        import sys

        publisher = LogPublisher()
        self.publisher = publisher
        self.beginner = LogBeginner(publisher, io.StringIO(), sys, warnings)
        self.start("warn")
        log = Logger(namespace="wgkex.test", observer=publisher)
        log.info("before")
        self.beginner.beginLoggingTo([cast(ILogObserver, self.events.append)], redirectStandardIO=False)
        log.info("after")
        # Nothing is filtered here: twist filters its own observer with --log-level.
        self.assertEqual([e["log_format"] for e in self.events], ["before", "after"])
