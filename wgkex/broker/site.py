"""The twisted.web site of the broker: request bodies are limited as they arrive.

twisted.web normally buffers a whole request body (in a temporary *file* when
it is chunked or large) before any resource sees it. Here the request factory
enforces ``broker.max_body_size`` while the body arrives:

- the body is kept in memory, never in a file (it is small or refused);
- as soon as the limit is known to be exceeded -- from ``Content-Length``, or
  at the chunk that crosses it (Gluon's uclient-fetch always sends chunked) --
  a complete ``413`` reply with ``Connection: close`` is written at once;
- the rest of the body is read and thrown away without storing it, and the
  connection is closed when it has arrived. Closing earlier would make the
  kernel answer the unread data with a reset, and the client could lose the
  413 it was sent; beyond ``discard_limit`` bytes the connection is cut anyway.

With ``Expect: 100-continue`` and a ``Content-Length`` over the limit, the 413
goes out instead of the ``100 Continue`` and the connection is closed: the
client has not sent the body yet.

Form bodies are not parsed into ``request.args`` (Gluon sends JSON labelled
``application/x-www-form-urlencoded``): resources read ``request.content``.
Requests that twisted.web's parser itself rejects (a NUL in a header, broken
chunking, too many headers, a line over 16 KiB) get a JSON 400 too, from
:class:`BrokerChannel` (plain HTTP/1.1: routers never speak HTTP/2).

The broker faces the Internet, so each connection is bounded (:class:`BrokerChannel`):

- **Pipelining.** twisted.web answers pipelined requests one after another and
  keeps every reply in memory until the client reads it; a client that sends
  thousands of requests and never reads would grow the process without end.
  Here the bytes a connection sent are handed to the HTTP parser about one
  request at a time, and only while the previous reply has been answered and
  the transport's send buffer is not full (twisted's producer/consumer: the
  transport pauses the channel, and resumes it once the client has read).
  Meanwhile at most :data:`HELD_BYTES` bytes or :data:`MAX_PIPELINED` complete
  requests are held per connection; beyond that the broker stops reading from it.
- **Deadlines.** A request must arrive whole (headers and body) within
  ``broker.request_timeout`` seconds of its first byte, else 408 and close; a
  connection with nothing to do is closed after ``broker.idle_timeout``.
  A connection closed by the broker that does not take its last bytes is cut
  :data:`ABORT_AFTER` seconds later.
- **Half-close.** A client that shuts down its sending side after the request
  (``shutdown(SHUT_WR)``) still gets its reply; then the connection closes.
- **Connections** (:class:`BrokerSite`): at most ``broker.max_connections_per_address``
  at once from one address (new ones are closed at once), and at most
  ``max_connections`` in all: at that limit a new connection replaces one that
  is waiting for a request (preferably one waiting a second or more, of the
  address holding the most connections, the longest waiting), so file
  descriptors never run out and fresh clients are served.
"""

from __future__ import annotations

import io
import json
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import IResource
from zope.interface import implementer

DISCARD_LIMIT = 16 * 1024 * 1024
#: Bytes a connection may have sent that are not parsed yet before the broker stops reading it.
HELD_BYTES = 16 * 1024
#: Complete requests a connection may have pipelined (not parsed yet) before the broker stops reading it.
MAX_PIPELINED = 8
#: Most bytes handed to the HTTP parser at once when no end of a request head is in sight.
_SLICE = 4096
#: Seconds a connection the broker closed may take to read its last bytes before it is cut.
ABORT_AFTER = 15.0
#: The kernel send buffer of each connection (Linux doubles it). Left to autotuning it grows to
#: megabytes on fast links, and a client that never reads would have that much of pipelined
#: replies computed for it before twisted.web's own 64 KiB buffer fills and pauses the channel.
SEND_BUFFER = 32 * 1024
#: A connection must have waited this long (seconds) before a full site replaces it.
REPLACE_AFTER = 1.0


def _raw_reply(status: str, message: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection, bytes on the wire."""
    body = json.dumps({"error": {"message": message}}).encode("ascii")
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")
    return head + body


def too_large_reply(limit: int) -> bytes:
    """The 413 sent as soon as a body is known to be over ``limit``."""
    return _raw_reply(
        "413 Request Entity Too Large", f"request body is larger than {limit} bytes; send only the JSON object"
    )


BAD_REQUEST_REPLY = _raw_reply("400 Bad Request", "malformed HTTP request (request line, headers or chunking)")


def too_slow_reply(seconds: float) -> bytes:
    """The 408 for a request that did not arrive whole in time."""
    return _raw_reply("408 Request Timeout", f"the request did not arrive whole within {seconds:g} s")


@implementer(IHalfCloseableProtocol)
class BrokerChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with the bounds of the module docstring and JSON protocol errors.

    ``request_timeout`` and the idle ``timeOut`` are set by :class:`BrokerSite`;
    ``since`` is when the connection last started waiting for a request (the site
    replaces the longest waiting one when it is full).
    """

    request_timeout: float = 20.0

    def __init__(self) -> None:
        super().__init__()
        self.since = 0.0
        self._held = b""
        self._stalled = False  # the transport's send buffer is full: the client is not reading
        self._busy = False  # a complete request is being answered
        self._feeding = False
        self._paused_reading = False
        self._read_closed = False
        self._deadline: IDelayedCall | None = None
        self._abort: IDelayedCall | None = None

    @property
    def busy(self) -> bool:
        """True while a complete request is being answered."""
        return self._busy

    def connectionMade(self) -> None:
        handle = getattr(self.transport, "getHandle", None)
        sock = handle() if handle is not None else None
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        super().connectionMade()

    # -- reading, one request at a time ----------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._held += data
        self._feed()

    def _feed(self) -> None:
        """Hand held bytes to the parser while nothing holds the connection back."""
        if self._feeding:
            return  # re-entered from a reply finished while parsing; the outer loop goes on
        self._feeding = True
        try:
            while self._held and not (self._stalled or self._busy or self._closing()):
                end = self._held.find(b"\r\n\r\n", 0, _SLICE)
                end = end + 4 if end >= 0 else _SLICE
                piece, self._held = self._held[:end], self._held[end:]
                if self._deadline is None:
                    self._start_deadline()
                http.HTTPChannel.dataReceived(self, piece)
        finally:
            self._feeding = False
        self._regulate_reading()
        if self._read_closed and not self._busy and not self._held and not self._closing():
            self.loseConnection()

    def _closing(self) -> bool:
        transport: Any = self.transport
        return transport is None or bool(getattr(transport, "disconnecting", False)
                                         or getattr(transport, "disconnected", False))

    def _regulate_reading(self) -> None:
        """Stop reading while too much is held; read again once it has been parsed."""
        transport: Any = self.transport
        if self._closing():
            return
        if len(self._held) > HELD_BYTES or self._held.count(b"\r\n\r\n") > MAX_PIPELINED:
            self._paused_reading = True
            transport.pauseProducing()
        elif self._paused_reading and not self._stalled and not self._busy:
            self._paused_reading = False
            transport.resumeProducing()

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        self._busy = False
        factory = getattr(self, "factory", None)
        if isinstance(factory, BrokerSite):
            self.since = factory.reactor.seconds()
        super().requestDone(request)
        self._feed()

    # -- the transport's producer/consumer signals -------------------------------------------

    def pauseProducing(self) -> None:
        self._stalled = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._stalled = False
        super().resumeProducing()
        self._feed()

    # -- half-close ----------------------------------------------------------------------------

    def readConnectionLost(self) -> None:
        """The client will send nothing more: answer what it sent, then close."""
        self._read_closed = True
        self._feed()

    def writeConnectionLost(self) -> None:
        self.loseConnection()

    # -- deadlines -----------------------------------------------------------------------------

    def _start_deadline(self) -> None:
        if self.request_timeout > 0:
            self._deadline = self.callLater(self.request_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._busy or self._closing():
            return
        transport: Any = self.transport
        current = self.requests[-1] if self.requests else None
        if not (isinstance(current, LimitedRequest) and current.refused):
            transport.write(too_slow_reply(self.request_timeout))
        factory = getattr(self, "factory", None)
        if isinstance(factory, BrokerSite):
            factory.timed_out_requests += 1
        self._close_now()

    def timeoutConnection(self) -> None:
        # The idle timeout. twisted.web's version logs a line per connection, which an
        # idle-connection flood would turn into a log flood.
        self._close_now()

    def _close_now(self) -> None:
        """Close; cut the connection if the client does not take its last bytes in time."""
        transport: Any = self.transport
        transport.loseConnection()
        if self._abort is None:
            self._abort = self.callLater(ABORT_AFTER, transport.abortConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self._abort = None
        self._held = b""
        super().connectionLost(reason)
        factory = getattr(self, "factory", None)
        if isinstance(factory, BrokerSite):
            factory.forget(self)

    # -- protocol errors -----------------------------------------------------------------------

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web calls this private method for requests its parser refuses and has
        # no public hook to shape that reply; overriding it is the only way to make it
        # JSON like every other error. If it is renamed, clients get twisted's plain 400.
        transport: Any = self.transport
        transport.write(BAD_REQUEST_REPLY)
        self.loseConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request or header line over MAX_LENGTH: LineReceiver would just drop the
        # connection, leaving the client without any answer.
        self._respondToBadRequestAndDisconnect()


class LimitedRequest(server.Request):
    """A request that keeps its body in memory and refuses it beyond ``max_body`` bytes."""

    def __init__(
        self,
        channel: http.HTTPChannel,
        *args: Any,
        max_body: int,
        discard_limit: int = DISCARD_LIMIT,
        on_too_large: Callable[[bytes], None] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(channel, *args, **kw)
        self._max_body = max_body
        self._discard_limit = discard_limit
        self._on_too_large = on_too_large
        self._received = 0
        self._refused = False

    @property
    def refused(self) -> bool:
        """True once the 413 went out for this request."""
        return self._refused

    def _transport(self) -> Any:
        return self.channel.transport

    def gotLength(self, length: int | None) -> None:
        self.content = self._body = io.BytesIO()
        if length is not None and length > self._max_body:
            expecting = self.requestHeaders.getRawHeaders(b"Expect")
            if expecting and expecting[0].lower() == b"100-continue":
                # The channel would answer "100 Continue" after us; the client is waiting
                # for that before it sends the body, so there is nothing to drain.
                self.requestHeaders.removeHeader(b"Expect")
                self._refuse()
                self.channel.loseConnection()
                return
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            self._received += len(data)
            if self._received > self._discard_limit:
                self._transport().abortConnection()
            return
        self._received += len(data)
        if self._received > self._max_body:
            self._refuse()
            return
        self._body.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # The 413 is on its way and the body has been drained: now close.
            self.channel.loseConnection()
            return
        super().requestReceived(command, path, version)

    def _refuse(self) -> None:
        self._refused = True
        self.content = self._body = io.BytesIO()
        self._transport().write(too_large_reply(self._max_body))
        if self._on_too_large is not None:
            self._on_too_large(getattr(self.channel, "_path", b""))


@implementer(INonQueuedRequestFactory)
class LimitedRequestFactory:
    """Builds :class:`LimitedRequest` objects with the site's limits."""

    def __init__(
        self,
        max_body: int,
        discard_limit: int = DISCARD_LIMIT,
        on_too_large: Callable[[bytes], None] | None = None,
    ) -> None:
        self.max_body = max_body
        self.discard_limit = discard_limit
        self.on_too_large = on_too_large

    def __call__(self, channel: http.HTTPChannel) -> LimitedRequest:
        return LimitedRequest(
            channel, max_body=self.max_body, discard_limit=self.discard_limit, on_too_large=self.on_too_large
        )


class BrokerSite(server.Site):
    """A Site speaking plain HTTP/1.1 through :class:`BrokerChannel`, without an access log.

    It also counts connections: per client address (``max_per_address``) and in
    all (``max_connections``, see the module docstring). One access log line per
    request at thousands of requests per second helps nobody; the metrics count
    requests by endpoint and status instead.
    """

    protocol = BrokerChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(self, *args: Any, request_timeout: float, max_per_address: int, max_connections: int,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.request_timeout = request_timeout
        self.max_per_address = max_per_address
        self.max_connections = max_connections
        self.per_address: Counter[str] = Counter()
        self._open: dict[BrokerChannel, str] = {}
        self.refused_connections = 0
        self.replaced_connections = 0
        self.timed_out_requests = 0

    def log(self, request: object) -> None:
        pass

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = str(getattr(addr, "host", "local"))
        if self.max_per_address and self.per_address[host] >= self.max_per_address:
            self.refused_connections += 1
            return None  # Twisted closes the socket at once
        if self.max_connections and len(self._open) >= self.max_connections:
            self._replace_one()
        channel = super().buildProtocol(addr)
        if isinstance(channel, BrokerChannel):
            channel.request_timeout = self.request_timeout
            channel.since = self.reactor.seconds()
            self._open[channel] = host
            self.per_address[host] += 1
        return channel

    def _replace_one(self) -> None:
        """Cut a connection waiting for a request, chosen so that normal clients are spared.

        First those that have waited :data:`REPLACE_AFTER` seconds or more (a client
        that has just connected is sending its request); among them, those of the
        address holding the most connections (a flood of many connections per address
        does not push out clients holding one); then the one waiting longest.
        """
        fresh = self.reactor.seconds() - REPLACE_AFTER
        waiting = [c for c in self._open if not c.busy]
        if not waiting:
            return
        victim = min(waiting, key=lambda c: (c.since > fresh, -self.per_address[self._open[c]], c.since))
        self.replaced_connections += 1
        self.forget(victim)
        transport: Any = victim.transport
        if transport is not None:
            transport.abortConnection()

    def forget(self, channel: BrokerChannel) -> None:
        """``channel`` is closed (or being cut): stop counting it."""
        host = self._open.pop(channel, None)
        if host is not None:
            self.per_address[host] -= 1
            if self.per_address[host] <= 0:
                del self.per_address[host]

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._open)


def make_site(
    resource: IResource,
    max_body: int,
    reactor: Any = None,
    on_too_large: Callable[[bytes], None] | None = None,
    discard_limit: int = DISCARD_LIMIT,
    idle_timeout: float = 60.0,
    request_timeout: float = 20.0,
    max_per_address: int = 0,
    max_connections: int = 0,
) -> BrokerSite:
    """The broker's site: limited bodies in memory, no form parsing, JSON protocol errors.

    ``max_per_address`` and ``max_connections`` of 0 mean no limit.
    """
    return BrokerSite(
        resource,
        requestFactory=LimitedRequestFactory(max_body, discard_limit, on_too_large),
        parsePOSTFormSubmission=False,
        timeout=idle_timeout,
        reactor=reactor,
        request_timeout=request_timeout,
        max_per_address=max_per_address,
        max_connections=max_connections,
    )
