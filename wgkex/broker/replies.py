"""How the broker's API writes a reply: status, content type, length, and one count in the metrics.

Every route of :mod:`wgkex.broker.api` -- the key exchange
(:mod:`wgkex.broker.keyexchange`), the read-only pages (:mod:`wgkex.broker.pages`)
and the error handlers -- answers through :meth:`Replies.send`, so each reply is
counted once in ``wgkex_broker_requests_total`` by endpoint and status (and its
duration observed where the caller gives a start time). The body is JSON unless
the caller says otherwise; errors are ``{"error": {"message": ...}}``
(:func:`error_body`).
"""

from __future__ import annotations

import json

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from wgkex.broker.metrics import BrokerMetrics

JSON = b"application/json"
HTML = b"text/html; charset=utf-8"


def error_body(message: str) -> bytes:
    """The JSON body of every error reply."""
    return json.dumps({"error": {"message": message}}).encode("utf-8")


class Replies:
    """Writes replies and counts them in ``metrics``, timing them on ``clock``."""

    def __init__(self, metrics: BrokerMetrics, clock: IReactorTime) -> None:
        self.metrics = metrics
        self.clock = clock

    def send(self, request: IRequest, endpoint: str, code: int, body: bytes, start: float | None = None,
             content_type: bytes = JSON) -> bytes:
        """Set status and headers of ``request``, count the reply, and return ``body`` for Klein to write."""
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        self.metrics.observe(endpoint, code, None if start is None else self.clock.seconds() - start)
        return body

    def error(self, request: IRequest, endpoint: str, code: int, message: str, start: float | None = None) -> bytes:
        """An error reply saying ``message``."""
        return self.send(request, endpoint, code, error_body(message), start)
