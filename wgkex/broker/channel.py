"""One HTTP connection of the broker, bounded: :class:`BrokerChannel`.

The broker faces the Internet, so each connection is bounded:

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
- **Protocol errors.** Requests that twisted.web's parser itself rejects (a NUL
  in a header, broken chunking, too many headers, a line over 16 KiB) get a
  JSON 400 like every other error (plain HTTP/1.1: routers never speak HTTP/2).

The body of each request is limited by the request it is parsed into
(:mod:`wgkex.broker.body_limit`). The site (:mod:`wgkex.broker.site`) builds the
channels, sets their timeouts and counts them: a channel tells it, through
:class:`Ledger`, when it waits for a request, when a request took too long and
when it is gone.
"""

from __future__ import annotations

import socket
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

from wgkex.broker.body_limit import LimitedRequest, raw_reply

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

#: twisted.web's parser, looked up once: ``twisted.web.http`` is a deprecation proxy module,
#: and each attribute read through it costs a few microseconds.
_parse = http.HTTPChannel.dataReceived

BAD_REQUEST_REPLY = raw_reply("400 Bad Request", "malformed HTTP request (request line, headers or chunking)")


def too_slow_reply(seconds: float) -> bytes:
    """The 408 for a request that did not arrive whole in time."""
    return raw_reply("408 Request Timeout", f"the request did not arrive whole within {seconds:g} s")


class Ledger(Protocol):
    """What a channel tells the site that counts it (:class:`wgkex.broker.site.BrokerSite`)."""

    def waiting(self, channel: BrokerChannel) -> None:
        """``channel`` has answered a request and waits for the next one."""

    def timed_out(self, channel: BrokerChannel) -> None:
        """A request on ``channel`` did not arrive whole in time; the channel closes."""

    def forget(self, channel: BrokerChannel) -> None:
        """``channel`` is closed: stop counting it."""


@implementer(IHalfCloseableProtocol)
class BrokerChannel(http.HTTPChannel):
    """An HTTP/1.1 channel with the bounds of the module docstring and JSON protocol errors.

    ``request_timeout``, the idle ``timeOut`` and ``ledger`` are set by the site
    that builds it; ``since`` is when the connection last started waiting for a
    request (the site sets it, and replaces the longest waiting one when it is full).
    """

    request_timeout: float = 20.0
    ledger: Ledger | None = None

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
                _parse(self, piece)
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
        if self.ledger is not None:
            self.ledger.waiting(self)
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
        if self.ledger is not None:
            self.ledger.timed_out(self)
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
        if self.ledger is not None:
            self.ledger.forget(self)

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

