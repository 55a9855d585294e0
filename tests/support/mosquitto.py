"""A real mosquitto per test case, on a free 127.0.0.1 port, started and stopped by PID.

A thin test wrapper over :class:`wgkex.lab.mosquitto.Mosquitto` (the lab's
server) that gives each test its own temporary directory and cleanup::

    self.broker = start_mosquitto(self)       # cleaned up automatically
    self.broker.port                           # where it listens
    self.broker.stop(); self.broker.start()    # a restart on the same port
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Protocol, TypeVar

from wgkex.lab import mosquitto as lab_mosquitto
from wgkex.lab.mosquitto import MOSQUITTO, free_port
from wgkex.lab.proc import LabError, process_stat, wait_until

__all__ = ["Mosquitto", "free_port", "have_mosquitto", "process_gone", "start_mosquitto", "wait_for"]

T = TypeVar("T")


class _Cleanable(Protocol):
    def addCleanup(self, f: object, *args: object) -> None: ...


def have_mosquitto() -> bool:
    """True when a mosquitto binary is installed."""
    return os.path.exists(MOSQUITTO)


def wait_for(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes; return that value.

    The lab's ``wait_until``, failing the test (AssertionError) rather than the lab.
    """
    try:
        value: T = wait_until(predicate, timeout, what, interval)
    except LabError as exc:
        raise AssertionError(str(exc)) from None
    return value


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (zombies count as gone: see STYLE.md's lab facts)."""
    st = process_stat(pid)
    return st is None or st[0] in ("Z", "X")


class Mosquitto(lab_mosquitto.Mosquitto):
    """The lab's mosquitto in a temporary directory of its own."""

    def __init__(self, port: int | None = None, unix_socket: str | None = None, persistence: bool = True,
                 save_every_change: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgkex-mosq-")
        super().__init__(self.dir, port=port, unix_socket=unix_socket, persistence=persistence,
                         save_every_change=save_every_change)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_mosquitto(testcase: _Cleanable, port: int | None = None, unix_socket: str | None = None,
                    persistence: bool = True, save_every_change: bool = False) -> Mosquitto:
    """Start a fresh mosquitto for ``testcase`` and register its teardown (``save_every_change``:
    a SIGKILL loses nothing it acknowledged, see :mod:`wgkex.lab.mosquitto`)."""
    m = Mosquitto(port=port, unix_socket=unix_socket, persistence=persistence, save_every_change=save_every_change)
    testcase.addCleanup(m.cleanup)
    m.start()
    return m
