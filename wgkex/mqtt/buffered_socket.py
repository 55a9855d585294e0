"""A read buffer under paho's socket, so that one ``recv`` serves many MQTT packets.

:class:`BufferedSocket` wraps the socket paho opens (see
:mod:`wgkex.mqtt.client`, which installs it); :mod:`wgkex.mqtt.paho_socket`
then drains what it holds like any other pending bytes.
"""

from __future__ import annotations

from typing import Any

#: Bytes asked of the socket per read (paho itself would read a packet in pieces).
READ_BUFFER = 65536


class BufferedSocket:
    """Paho's socket with a read buffer: one ``recv`` of up to 64 KiB serves many packets.

    Paho reads every packet with at least three ``recv`` calls (type, length,
    body). Each releases the GIL, and a thread that releases and retakes it
    that often starves the worker's pool threads (CPython wakes a waiting
    thread on every release but hands it the GIL only after a whole switch
    interval without one): a 20,000-key burst read unbuffered kept the first
    batch waiting for the GIL for 130 ms. Buffered bytes count as
    :meth:`pending`, like those inside an SSL object, so
    :meth:`wgkex.mqtt.paho_socket.ReactorSocket.read` drains them. Everything
    else goes to the wrapped socket.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buffer = b""
        self._inner_pending = getattr(sock, "pending", None)

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

    def send(self, data: bytes) -> int:
        sent: int = self._sock.send(data)
        return sent

    def fileno(self) -> int:
        fileno: int = self._sock.fileno()
        return fileno

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._buffer = b""
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
