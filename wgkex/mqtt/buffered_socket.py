"""Buffers on both sides of paho's socket: one ``recv`` serves many MQTT packets, one ``send`` many.

:class:`BufferedSocket` wraps the socket paho opens (see
:mod:`wgkex.mqtt.client`, which installs it); :mod:`wgkex.mqtt.paho_socket`
then drains what it holds like any other pending bytes, and *corks* it around
each ``loop_write`` so that every packet paho writes in one go leaves in one
``send``.
"""

from __future__ import annotations

import ssl
from typing import Any

#: Bytes asked of the socket per read (paho itself would read a packet in pieces).
READ_BUFFER = 65536

#: What a non-blocking send raises when the socket cannot take anything now.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError)


class BufferedSocket:
    """Paho's socket with a read buffer and a corkable write buffer.

    Reading: paho reads every packet with at least three ``recv`` calls (type,
    length, body). Each releases the GIL, and a thread that releases and
    retakes it that often starves the worker's pool threads (CPython wakes a
    waiting thread on every release but hands it the GIL only after a whole
    switch interval without one): a 20,000-key burst read unbuffered kept the
    first batch waiting for the GIL for 130 ms. So one ``recv`` of up to 64 KiB
    serves many packets; buffered bytes count as :meth:`pending`, like those
    inside an SSL object, so :meth:`wgkex.mqtt.paho_socket.ReactorSocket.read`
    drains them.

    Writing: paho writes each packet with its own ``send``. Between
    :meth:`cork` and :meth:`uncork` sends are collected (paho is told they
    went out) and leave together; what the socket does not take then is
    :attr:`unsent` and goes first, before anything paho writes later, so the
    order on the wire is paho's. A broker publishing thousands of keys a
    second hands over a dozen per reactor turn: one system call instead of a
    dozen, and the server reads them (and answers their PUBACKs) in one go too.

    Everything else goes to the wrapped socket.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._inner_pending = getattr(sock, "pending", None)
        self._corked = False
        self._collected: list[bytes] = []
        self._unsent = b""

    # -- reading -------------------------------------------------------------------------------

    def recv(self, size: int) -> bytes:
        if not self._buffer:
            data: bytes = self._sock.recv(max(size, READ_BUFFER))
            if len(data) <= size:
                return data
            self._buffer = data
        chunk, self._buffer = self._buffer[:size], self._buffer[size:]
        return chunk

    def pending(self) -> int:
        inner = self._inner_pending() if self._inner_pending is not None else 0
        return len(self._buffer) + inner

    # -- writing -------------------------------------------------------------------------------

    def send(self, data: bytes) -> int:
        if self._corked:
            self._collected.append(bytes(data))  # leaves after what is unsent (see uncork)
            return len(data)
        if self._unsent and not self._flush():
            raise BlockingIOError("earlier bytes are still waiting for the socket")
        sent: int = self._sock.send(data)
        return sent

    def cork(self) -> None:
        """Collect what paho sends from now on, until :meth:`uncork`."""
        self._corked = True

    def uncork(self) -> bool:
        """Send what was collected, in one go; True when nothing is left :attr:`unsent`."""
        self._corked = False
        if self._collected:
            self._unsent += b"".join(self._collected)
            self._collected = []
        return not self._unsent or self._flush()

    def flush(self) -> bool:
        """Send what was collected and what waits unsent, now (corked or not, it stays so);
        True when nothing is left."""
        corked = self._corked
        done = self.uncork()
        self._corked = corked
        return done

    @property
    def unsent(self) -> int:
        """Bytes paho was told are sent that the socket has not taken yet."""
        return len(self._unsent) + sum(map(len, self._collected))

    def _flush(self) -> bool:
        """Hand :attr:`unsent` bytes to the socket; True once all are taken."""
        try:
            sent: int = self._sock.send(self._unsent)
        except _WOULD_BLOCK:
            return False
        except OSError:
            # The connection is broken: paho notices when it next reads (EOF or the error)
            # and ends it; bytes for a dead connection mean nothing.
            self._unsent = b""
            return True
        self._unsent = self._unsent[sent:]
        return not self._unsent

    # -- the rest ------------------------------------------------------------------------------

    def fileno(self) -> int:
        fileno: int = self._sock.fileno()
        return fileno

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        """Send what paho wrote last (its DISCONNECT, say) as far as the socket takes it now; close."""
        self.uncork()
        self._buffer = self._unsent = b""
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
