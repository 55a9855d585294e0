"""A mosquitto MQTT server for the lab: a config the lab writes, its own port, a unix socket.

Processes inside a network namespace cannot reach the root namespace's
127.0.0.1, but a unix socket is a file and reachable from every namespace.
So the server listens on ``127.0.0.1:<port>`` (the broker, tools) *and* on a
unix socket (workers inside gateway namespaces, with ``mqtt: {transport: unix,
broker_url: <socket path>}``). mosquitto drops its privileges before it binds a
unix socket, so the config says ``user root``.

Persistence: the store (``mosquitto.db``) lives in the server's directory and
a restart reuses it, so persistent sessions (the worker's) and the QoS 1
messages queued for them survive a restart. How much a SIGKILL can lose
depends on when mosquitto saves. By default (the lab's) every second or two
(``autosave_interval 1``): a SIGKILL loses what changed since, e.g. keys it
acknowledged but had not delivered yet, or a session created a moment before;
the broker publishes recent keys again when the worker is back
(:mod:`wgkex.broker.replay`), and the worker subscribes on every connect. With
``save_every_change`` after every change (``autosave_on_changes true``,
``autosave_interval 1``): a fresh subscription or a queued message is on disk
before the next event is handled. Saving writes the whole store, so that makes
a backlog of thousands of messages slow (a 2,000-key burst to a worker: 15 s
instead of 1 s here); only the test that pins mosquitto's own promise uses it.

Example::

    m = Mosquitto("/tmp/lab", unix_socket="/tmp/lab/mqtt.sock")
    m.start()          # waits until both listeners accept
    m.restart()        # same port, same socket, same persistence file
    m.stop()
"""

from __future__ import annotations

import os
import signal
import shutil
import socket

from wgkex.lab.proc import LabError, Proc, spawn, wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _accepts_unix(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        try:
            s.connect(path)
            return True
        except OSError:
            return False


class Mosquitto:
    """One mosquitto process with its files in ``directory``."""

    def __init__(
        self,
        directory: str,
        port: int | None = None,
        unix_socket: str | None = None,
        host: str = "127.0.0.1",
        persistence: bool = True,
        save_every_change: bool = False,
    ) -> None:
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self.unix_socket = unix_socket
        self.persistence = persistence
        self.save_every_change = save_every_change
        self.config_path = os.path.join(directory, "mosquitto.conf")
        self.log_path = os.path.join(directory, "mosquitto.log")
        self.proc: Proc | None = None

    def write_config(self) -> str:
        """Write the server's config file; returns its path."""
        os.makedirs(self.directory, exist_ok=True)
        lines = [
            "# written by wgkex.lab: a throwaway server for a local lab",
            "user root",
            "allow_anonymous true",
            f"listener {self.port} {self.host}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.directory}/",
            # autosave_interval counts changes with autosave_on_changes, else seconds.
            f"autosave_on_changes {'true' if self.save_every_change else 'false'}",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",  # one line per SUBSCRIBE: who listened when, after a restart
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if self.unix_socket:
            lines += [f"listener 0 {self.unix_socket}"]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return self.config_path

    def start(self, timeout: float = 10.0) -> Proc:
        """Start the server and wait until every listener accepts connections."""
        if self.proc is not None and self.proc.is_ours():
            return self.proc
        self.write_config()
        if self.unix_socket and os.path.exists(self.unix_socket):
            os.unlink(self.unix_socket)  # a stale socket from a killed server
        proc = spawn("mosquitto", [MOSQUITTO, "-c", self.config_path], self.log_path)
        self.proc = proc

        def ready() -> bool:
            if not proc.is_ours():
                raise LabError(f"mosquitto exited: {proc.log_tail()}")
            if not _accepts_tcp(self.host, self.port):
                return False
            return self.unix_socket is None or _accepts_unix(self.unix_socket)

        wait_until(ready, timeout, f"mosquitto on {self.host}:{self.port}")
        return proc

    def stop(self, kill: bool = False) -> None:
        """Stop the server (SIGTERM: it saves its sessions; ``kill``: SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if kill:
            proc.send(signal.SIGKILL)
            proc.wait_gone(10.0)
        else:
            proc.stop()

    def restart(self) -> Proc:
        """Stop and start again on the same port and socket."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.is_ours()
