"""Fresh-connection HTTP load from one thread: many requests in flight on a bare epoll loop.

What routers do to a broker after an outage: each request on its own TCP
connection, written at once, the reply read until the server closes
(``Connection: close``). :func:`fire` keeps ``concurrency`` such requests in
flight with non-blocking sockets and one ``select.epoll`` -- no event loop
library, no stream objects, no task per request -- and records each one's
latency and raw reply (or the error that ended it).

Why not asyncio: its streams cost the herd's load generator 0.43 ms of CPU per
request (4.3 CPU-s for 10,000 routers, measured 2026-12-02), as much as a third
of the broker's own work, on the same two cores. This loop makes the same
requests for 0.09-0.12 ms each against ``bench/broker.py --control``'s servers
(its ``client_cpu_ms_per_request``), and ``bench/herd.py --server mosquitto``
spent 1.3-1.5 CPU-s in it for 10,000 routers (load 2-3).

Per request it makes the system calls a client cannot avoid: ``socket``,
``connect`` (returns at once; on loopback the handshake is already done, so
the request is written right away and ``EPOLLOUT`` is waited for only when the
server's accept queue is full), ``send``, one ``epoll_ctl``, ``recv`` until EOF
and ``close`` (which also takes the socket out of the epoll set).
"""

from __future__ import annotations

import errno
import select
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: Most bytes read per ``recv``; a reply of the broker is a few hundred.
_READ = 65536


@dataclass
class Load:
    """What :func:`fire` measured, request by request (in the order given)."""

    #: Seconds from opening the connection to the server closing it (or the error).
    latencies: list[float]
    #: The raw reply (status line, headers, body), or the name of the error that ended it.
    replies: list[bytes | str]
    #: Wall-clock seconds of the whole run.
    seconds: float


def status_of(reply: bytes | str) -> str:
    """``"200"`` and the like for a reply, ``"bad"`` for garbage, the error's name for an error."""
    if isinstance(reply, str):
        return reply
    return reply[9:12].decode() if reply.startswith(b"HTTP/1.1 ") else "bad"


def body_of(reply: bytes | str) -> bytes:
    """The body of a reply (empty for an error)."""
    if isinstance(reply, str):
        return b""
    return reply.partition(b"\r\n\r\n")[2]


class _Request:
    __slots__ = ("index", "sock", "start", "data", "chunks")

    def __init__(self, index: int, sock: socket.socket, start: float, data: bytes) -> None:
        self.index = index
        self.sock = sock
        self.start = start
        self.data = data  # still to be written
        self.chunks: list[bytes] = []


def fire(requests: Sequence[tuple[tuple[str, int], bytes]], concurrency: int, timeout: float = 60.0) -> Load:
    """Send each ``(address, bytes)`` on a fresh connection, ``concurrency`` at a time.

    A request still unanswered ``timeout`` seconds after it began is cut and
    recorded as ``"timeout"``.
    """
    count = len(requests)
    latencies = [0.0] * count
    replies: list[bytes | str] = [""] * count
    poller = select.epoll()
    open_: dict[int, _Request] = {}
    clock = time.perf_counter
    pollin, pollout = select.EPOLLIN, select.EPOLLOUT
    next_index = 0

    def finish(r: _Request, reply: bytes | str) -> None:
        latencies[r.index] = clock() - r.start
        replies[r.index] = reply
        del open_[r.sock.fileno()]
        r.sock.close()

    def begin(index: int) -> None:
        address, data = requests[index]
        start = clock()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        r = _Request(index, sock, start, data)
        fd = sock.fileno()
        open_[fd] = r
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            finish(r, errno.errorcode.get(code, str(code)))
            return
        if write(r):
            if fd in open_:  # not ended by an error
                poller.register(fd, pollin)
        else:
            poller.register(fd, pollout)

    def write(r: _Request) -> bool:
        """Write what is left of the request; True once all of it is written."""
        try:
            sent = r.sock.send(r.data)
        except BlockingIOError:
            return False  # not connected yet (accept queue full) or buffer full
        except OSError as exc:
            finish(r, type(exc).__name__)
            return True
        r.data = r.data[sent:]
        return not r.data

    def read(r: _Request) -> None:
        sock = r.sock
        try:
            while True:
                chunk = sock.recv(_READ)
                if not chunk:
                    finish(r, b"".join(r.chunks))
                    return
                r.chunks.append(chunk)
        except BlockingIOError:
            return
        except OSError as exc:
            finish(r, type(exc).__name__)

    started = clock()
    last_sweep = started
    try:
        while next_index < count and len(open_) < concurrency:
            begin(next_index)
            next_index += 1
        while open_:
            for fd, events in poller.poll(1.0):
                r = open_.get(fd)
                if r is None:
                    continue
                if events & pollout:
                    if write(r) and fd in open_:
                        poller.modify(fd, pollin)
                else:
                    read(r)
            while next_index < count and len(open_) < concurrency:
                begin(next_index)
                next_index += 1
            now = clock()
            if now - last_sweep > 1.0:
                last_sweep = now
                for r in [r for r in open_.values() if now - r.start > timeout]:
                    finish(r, "timeout")
    finally:
        for r in list(open_.values()):
            r.sock.close()
        poller.close()
    return Load(latencies, replies, clock() - started)
