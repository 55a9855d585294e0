"""The request-size limit: a request body is limited as it arrives, and kept in memory.

twisted.web normally buffers a whole request body (in a temporary *file* when
it is chunked or large) before any resource sees it. Here the request factory
(:class:`LimitedRequestFactory`, installed by :func:`wgkex.broker.site.make_site`)
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

Such replies are written straight to the transport, before any resource runs:
:func:`raw_reply` builds them (the connection's own 400 and 408 of
:mod:`wgkex.broker.channel` too), JSON like every other error of the API.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from twisted.web import http, server
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import implementer

#: Bytes of a refused body read and thrown away before the connection is cut.
DISCARD_LIMIT = 16 * 1024 * 1024


def raw_reply(status: str, message: str) -> bytes:
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
    return raw_reply(
        "413 Request Entity Too Large", f"request body is larger than {limit} bytes; send only the JSON object"
    )


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
