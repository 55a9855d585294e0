"""Processes the lab starts, identified so that only they are ever stopped.

A :class:`Proc` is a process this lab spawned: its PID *and* its kernel start
time (field 22 of ``/proc/PID/stat``), so that a PID recycled by the kernel
after our process died is never mistaken for ours. Records survive the Python
process that made them (``python -m wgkex.lab up`` exits; ``down`` later reads
the records back and stops exactly those processes).

Processes start in a session of their own, so a Ctrl-C in the terminal reaches
the lab (which then tears down in order), not every daemon at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class LabError(Exception):
    """Something in the lab could not be set up; the message says what and why."""


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 15.0,
) -> str:
    """Run a short command, return its stdout; raise :class:`LabError` naming it on failure."""
    try:
        done = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{argv[0]}: command not found (make deps installs the lab tools)") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout} s") from None
    if check and done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise LabError(f"{' '.join(argv)}: exit status {done.returncode}: {detail}")
    return done.stdout


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something true; raise :class:`LabError` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def process_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    return fields[0], int(fields[19])


@dataclass
class Proc:
    """One process the lab started (or a record of it read back from the state file)."""

    name: str
    pid: int
    start_time: int
    argv: list[str]
    log: str | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def is_ours(self) -> bool:
        """True while the PID still names the process we started (zombies excluded)."""
        if self._popen is not None:
            self._popen.poll()  # reap it if it exited, so /proc/PID goes away
        st = process_stat(self.pid)
        return st is not None and st[1] == self.start_time and st[0] not in ("Z", "X")

    @property
    def alive(self) -> bool:
        return self.is_ours()

    def send(self, sig: int) -> bool:
        """Send ``sig`` if the process is still ours; False if it is already gone."""
        if not self.is_ours():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def wait_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout
        while self.is_ours():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Stop the process (``sig``, then SIGKILL after ``timeout``) and wait until it is gone."""
        if not self.send(sig):
            return
        if not self.wait_gone(timeout):
            self.send(signal.SIGKILL)
            if not self.wait_gone(5.0):
                raise LabError(f"{self.name} (pid {self.pid}) did not exit after SIGKILL")

    def exit_status(self) -> int | None:
        """The exit status if this process object started it and it has exited, else None."""
        return self._popen.poll() if self._popen is not None else None

    def record(self) -> dict[str, Any]:
        """What the state file keeps of this process."""
        return {"name": self.name, "pid": self.pid, "start_time": self.start_time, "argv": self.argv, "log": self.log}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> Proc:
        return cls(data["name"], int(data["pid"]), int(data["start_time"]), list(data["argv"]), data.get("log"))

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of this process's log, for error messages."""
        if not self.log:
            return ""
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: Sequence[str], log_path: str, env: Mapping[str, str] | None = None) -> Proc:
    """Start ``argv`` in its own session with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=dict(env) if env is not None else None,
            )
        except FileNotFoundError:
            raise LabError(f"{argv[0]}: command not found (make deps installs the lab tools)") from None
    st = process_stat(popen.pid)
    if st is None:  # exited (and was reaped?) before we looked: keep a record that never matches
        popen.wait()
        raise LabError(f"{name} exited at once: {' '.join(argv)}; see {log_path}")
    return Proc(name, popen.pid, st[1], list(argv), log_path, popen)
