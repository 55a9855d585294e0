"""Reading a worker that runs in a network namespace: its status listener and its log.

The bench talks to the worker's ``worker_listen`` (``/metrics``, ``/healthz``)
from the root namespace over a socket made inside the worker's namespace
(:func:`connect_in_netns`), so nothing needs to be routed between the two.
"""

from __future__ import annotations

import http.client
import os
import socket
import threading
from typing import Any

from tests.support.netns_relay import setns


def file_tail(path: str, lines: int = 30) -> str:
    """The last ``lines`` lines of the text file at ``path`` ("" if it cannot be read)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def connect_in_netns(netns: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP connection made inside network namespace ``netns`` (the socket keeps that namespace).

    A helper thread switches itself (only itself) into the namespace with
    ``setns``, connects and ends; the socket is then used from anywhere.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            setns(target)
            result["sock"] = socket.create_connection(address, timeout)
        except BaseException as e:  # handed to the caller
            result["error"] = e
        finally:
            os.close(target)

    thread = threading.Thread(target=work, name=f"connect-in-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    sock: socket.socket = result["sock"]
    return sock


class StatusClient:
    """GETs on the worker's status listener inside the namespace, over one keep-alive connection."""

    def __init__(self, netns: str, port: int) -> None:
        self.netns = netns
        self.port = port
        self._conn: http.client.HTTPConnection | None = None

    def get(self, path: str) -> bytes:
        for attempt in (1, 2):
            if self._conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.sock = connect_in_netns(self.netns, ("127.0.0.1", self.port))
                self._conn = conn
            try:
                self._conn.request("GET", path)
                response = self._conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: HTTP {response.status}")
                return body
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as ``{'name{labels}': value}``."""
        out: dict[str, float] = {}
        for line in self.get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
