"""Paho's socket on the reactor: readable -> ``loop_read``, writable -> ``loop_write``.

Paho 2.x runs without its own thread when something else watches its socket.
:class:`ReactorSocket` is that something: once a connect attempt has opened the
socket it registers a descriptor with the reactor, follows paho's
``on_socket_register_write`` / ``on_socket_unregister_write`` requests, and
after every bout of I/O tells its owner (who then fires acknowledged publishes
and refills the window). Paho reads one packet per ``loop_read`` in three or
more ``recv`` calls; a read buffer under paho
(:class:`~wgkex.mqtt.buffered_socket.BufferedSocket`) and up to
:data:`READ_BURST` packets per reactor turn make a burst of thousands of QoS 1
messages cost about 20 µs of CPU each (32 µs before). Around each
``loop_write`` the buffer is corked (:meth:`BufferedSocket.cork
<wgkex.mqtt.buffered_socket.BufferedSocket.cork>`), so the packets paho writes
in one go leave in one ``send``; the socket stays watched for writing while
some of them wait for room.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReadWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wgkex.mqtt.outbox import fire
from wgkex.reactor import IReactor

#: Packets read in one go while they keep coming (paho reads one per
#: ``loop_read``). Saves a reactor turn per message in a burst of thousands,
#: and bounded so that timers and HTTP still get their turn meanwhile.
READ_BURST = 100


def _tcp_socket(sock: Any) -> Any:
    """The TCP socket under paho's socket object, to shut it down.

    With ``transport: websockets`` paho wraps the TCP socket in its private
    ``_WebsocketWrapper``, which keeps it in the private ``_socket`` and has no
    ``shutdown``; there is no public accessor, so this one place reaches in.
    """
    return getattr(sock, "_socket", sock)


def _unsent(sock: Any) -> int:
    """Bytes a corked socket still holds for the server (0 for any other socket)."""
    return int(getattr(sock, "unsent", 0))


@implementer(IReadWriteDescriptor)
class _Descriptor:
    """One connection's socket as the reactor sees it."""

    def __init__(self, owner: ReactorSocket, sock: Any) -> None:
        self.owner = owner
        self.sock = sock
        # Cached: the reactor must find the descriptor by this number even after a close.
        self._fileno: int = sock.fileno()

    def fileno(self) -> int:
        return self._fileno

    def doRead(self) -> None:
        self.owner.read(self)

    def doWrite(self) -> None:
        self.owner.write(self)

    def connectionLost(self, reason: Failure) -> None:
        # Only reached when the reactor drops us itself (e.g. at its shutdown);
        # paho closes its socket through on_socket_close otherwise.
        if self is self.owner.descriptor:
            self.owner.abort("dropped by the reactor")

    def logPrefix(self) -> str:
        return self.owner.name


class ReactorSocket:
    """The open connection's socket, watched by the reactor on paho's behalf.

    ``after_io()`` runs after every read, write and keepalive tick;
    ``lost(reason)`` when this side cut the connection (:meth:`abort`) because
    paho could not notice itself.
    """

    log = Logger()

    def __init__(
        self, reactor: IReactor, name: str, after_io: Callable[[], None], lost: Callable[[str], None]
    ) -> None:
        self._reactor = reactor
        self.name = name
        self._after_io = after_io
        self._lost = lost
        self.client: paho.Client | None = None
        self.server = ""
        self.descriptor: _Descriptor | None = None
        self._reading = False
        self._writing = False
        #: Messages and acknowledgements paho handed over (tells :meth:`read` whether to read on).
        self.handled = 0
        #: A read scheduled because buffered bytes were left after READ_BURST packets.
        self._read_again: IDelayedCall | None = None
        self._close_waiters: list[Deferred[None]] = []

    def follow(self, client: paho.Client, attempting: Callable[[], bool]) -> None:
        """Take paho's socket callbacks. While ``attempting()`` a connect attempt owns the client
        and paho calls from the pool thread: those calls are ignored (:meth:`attach` catches up)."""
        self.client = client

        def unless_attempting(f: Callable[[], None]) -> Callable[[paho.Client, Any, Any], None]:
            return lambda _client, _userdata, _sock: None if attempting() else f()

        client.on_socket_close = unless_attempting(self.detach)
        client.on_socket_register_write = unless_attempting(self.want_write)
        client.on_socket_unregister_write = unless_attempting(self.written)

    def unfollow(self, client: paho.Client) -> None:
        """Let go of ``client`` (the service stopped)."""
        client.on_socket_close = client.on_socket_register_write = client.on_socket_unregister_write = None
        self.client = None

    @property
    def attached(self) -> bool:
        """True while a connection's socket is registered with the reactor."""
        return self.descriptor is not None

    def attach(self, client: paho.Client, sock: Any, server: str) -> None:
        """A connect attempt opened ``sock``: watch it (CONNECT waits to be written)."""
        self.client = client
        self.server = server
        self.descriptor = _Descriptor(self, sock)
        self._reactor.addReader(self.descriptor)
        self._reading = True
        if client.want_write():
            self.want_write()

    def want_write(self) -> None:
        """Paho has bytes to write (``on_socket_register_write``)."""
        if self.descriptor is not None and not self._writing:
            self._reactor.addWriter(self.descriptor)
            self._writing = True

    def written(self) -> None:
        """Paho has nothing more to write (``on_socket_unregister_write``)."""
        if self.descriptor is not None and self._writing and not _unsent(self.descriptor.sock):
            self._reactor.removeWriter(self.descriptor)
            self._writing = False

    async def disconnect(self, timeout: float) -> None:
        """Say DISCONNECT (a clean goodbye: no last will) and close; cut after ``timeout`` seconds."""
        if self.descriptor is None or self.client is None:
            return
        closed: Deferred[None] = Deferred()
        self._close_waiters.append(closed)
        timer = self._reactor.callLater(timeout, fire, closed)
        self.client.disconnect()
        await closed
        if timer.active():
            timer.cancel()
        if self.descriptor is not None:
            self.log.warn(
                "MQTT DISCONNECT to {server} not written within {timeout} s; closing the connection",
                server=self.server, timeout=timeout,
            )
            self.abort("stopping")

    def read(self, descriptor: _Descriptor) -> None:
        self._read_again = None
        client = self.client
        if client is None or descriptor is not self.descriptor:
            return
        try:
            pending = getattr(descriptor.sock, "pending", None)
            for _ in range(READ_BURST):
                handled = self.handled
                client.loop_read()
                if self.descriptor is not descriptor:
                    break
                # Bytes waiting in a buffer (ours, or TLS's decrypted ones) make no readable
                # event: read on. So does a completed packet: more may have come meanwhile. A
                # partial packet waits for the next readable event.
                if not (pending is not None and pending()) and self.handled == handled:
                    break
            else:
                if pending is not None and self.descriptor is descriptor and pending():
                    # Bounded, so timers and HTTP get their turn; the rest in the next reactor turn.
                    self._read_again = self._reactor.callLater(0, self.read, descriptor)
        except Exception:
            self.log.failure("MQTT: unexpected error reading from {server}", server=self.server)
            self.abort("unexpected error while reading")
        self._after_io()

    def write(self, descriptor: _Descriptor) -> None:
        client = self.client
        if client is None or descriptor is not self.descriptor:
            return
        sock = descriptor.sock
        corked = hasattr(sock, "cork")
        try:
            if corked:
                sock.cork()
            try:
                client.loop_write()
            finally:
                if corked and not sock.uncork() and self.descriptor is descriptor:
                    self.want_write()  # the rest when the socket has room
            if corked and self.descriptor is descriptor and not client.want_write():
                self.written()
        except Exception:
            self.log.failure("MQTT: unexpected error writing to {server}", server=self.server)
            self.abort("unexpected error while writing")
        self._after_io()

    def flush(self) -> None:
        """Send now what paho wrote into the corked buffer (see :meth:`write`).

        Paho tells its owner that a connection ended (``on_disconnect``) right after
        writing DISCONNECT and before closing the socket, in the middle of
        ``loop_write``: the owner calls this first, so the goodbye is on the wire
        before anything reacts to it (as it was before writes were corked).
        """
        descriptor = self.descriptor
        if descriptor is not None and hasattr(descriptor.sock, "flush"):
            descriptor.sock.flush()

    def misc(self) -> None:
        """Paho's keepalive pings and timeouts (``loop_misc``), while a connection is open."""
        client = self.client
        if client is None or self.descriptor is None:
            return
        try:
            client.loop_misc()
        except Exception:
            self.log.failure("MQTT: unexpected error in keepalive handling for {server}", server=self.server)
        self._after_io()

    def detach(self) -> None:
        """Stop watching the socket (paho closed it, or :meth:`abort` did)."""
        if self._read_again is not None and self._read_again.active():
            self._read_again.cancel()
        self._read_again = None
        descriptor, self.descriptor = self.descriptor, None
        if descriptor is not None:
            if self._reading:
                self._reactor.removeReader(descriptor)
            if self._writing:
                self._reactor.removeWriter(descriptor)
        self._reading = self._writing = False
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            fire(d)

    def abort(self, reason: str) -> None:
        """Cut the connection without DISCONNECT, letting paho notice (EOF) when it can."""
        descriptor = self.descriptor
        if descriptor is None:
            return
        try:
            _tcp_socket(descriptor.sock).shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client = self.client
        if client is not None:
            try:
                client.loop_read()
            except Exception:
                pass
        if self.descriptor is descriptor:
            # Paho did not close it: do its bookkeeping here.
            self.detach()
            try:
                descriptor.sock.close()
            except OSError:
                pass
            self._lost(reason)
