"""A real mosquitto per test case, on a free 127.0.0.1 port, started and stopped by PID.

Usage in a trial ``TestCase``::

    self.broker = start_mosquitto(self)       # cleaned up automatically
    self.broker.port                           # where it listens
    self.broker.stop(); self.broker.start()    # a restart on the same port
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Protocol

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class _Cleanable(Protocol):
    def addCleanup(self, f: object, *args: object) -> None: ...


def have_mosquitto() -> bool:
    """True when a mosquitto binary is installed."""
    return os.path.exists(MOSQUITTO)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (zombies count as gone: see STYLE.md's lab facts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


class Mosquitto:
    """One mosquitto process with its own config, port and (optionally) unix socket."""

    def __init__(self, port: int | None = None, unix_socket: str | None = None, persistence: bool = True) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgkex-mosq-")
        self.port = port or free_port()
        self.unix_socket = unix_socket
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.dir, "mosquitto.log")

    def _write_config(self) -> str:
        path = os.path.join(self.dir, "mosquitto.conf")
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "max_queued_messages 100000",
        ]
        if self.unix_socket:
            lines += [f"listener 0 {self.unix_socket}", "user root"]
        else:
            lines.append("user root")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        """Start (or restart) mosquitto and wait until it accepts connections."""
        conf = self._write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", conf], stdout=log, stderr=log)
        log.close()

        def accepting() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                with open(self.log_path, errors="replace") as f:
                    raise AssertionError(f"mosquitto exited with {self.proc.returncode}: {f.read()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_for(accepting, 10.0, what=f"mosquitto on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        """Stop the process this object started (SIGTERM, or SIGKILL with ``kill``)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:
            proc.kill()
        else:
            proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_mosquitto(testcase: _Cleanable, **kwargs: object) -> Mosquitto:
    """Start a fresh mosquitto for ``testcase`` and register its teardown."""
    m = Mosquitto(**kwargs)  # type: ignore[arg-type]
    testcase.addCleanup(m.cleanup)
    m.start()
    return m
