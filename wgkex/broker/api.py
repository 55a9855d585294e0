"""The broker's HTTP API (docs/protocol.md, "HTTP API"), as a Klein app built from the configuration.

:class:`BrokerApi` only assembles: it routes the two key exchange paths to
:class:`~wgkex.broker.keyexchange.KeyExchange` (where a key is admitted,
published and answered) and the read-only pages to
:class:`~wgkex.broker.pages.Pages`, and answers everything else itself.

Every reply is JSON with ``Content-Type: application/json`` (except ``GET /``
and ``/metrics``), written and counted by :class:`~wgkex.broker.replies.Replies`;
errors are ``{"error": {"message": ...}}`` and never contain a traceback:
Klein's HTML defaults for 404/405 and unexpected exceptions are replaced here,
and :class:`_GuardedResource` answers a URL or Host header that cannot even be
routed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from wgkex.broker.history import History
from wgkex.broker.keyexchange import V1_PATH, V2_PATH, KeyExchange
from wgkex.broker.keylists import KeyLists
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.pages import Pages
from wgkex.broker.ratelimit import RateLimiter
from wgkex.broker.replies import Replies
from wgkex.broker.workers import WorkerPicture
from wgkex.bus import Bus
from wgkex.config import Config


class BrokerApi:
    """The HTTP API of one broker; :meth:`resource` is what the site serves."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        bus: Bus,
        picture: WorkerPicture,
        lists: KeyLists,
        limiter: RateLimiter,
        metrics: BrokerMetrics,
        clock: IReactorTime,
        history: History | None = None,
    ) -> None:
        self.history = history if history is not None else History(config.domains, clock)
        self.replies = Replies(metrics, clock)
        self.exchange = KeyExchange(config, bus, picture, lists, limiter, metrics, clock, self.history, self.replies)
        self.pages = Pages(bus, picture, self.history, metrics, clock, self.replies)
        self.app = self._build_app()

    def _build_app(self) -> Klein:
        app = Klein()
        app.route(V1_PATH, methods=["POST"])(self.exchange.v1)
        app.route(V2_PATH, methods=["POST"])(self.exchange.v2)
        app.route("/", methods=["GET"])(self.pages.index)
        app.route("/api/v1/status", methods=["GET"])(self.pages.status)
        app.route("/api/openapi.json", methods=["GET"])(self.pages.openapi)
        app.route("/metrics", methods=["GET"])(self.pages.prometheus)
        app.route("/healthz", methods=["GET"])(self.pages.healthz)
        app.route("/readyz", methods=["GET"])(self.pages.readyz)
        app.handle_errors(HTTPException)(self._http_error)
        app.handle_errors(Exception)(self._unexpected)
        return app

    def resource(self) -> IResource:
        """The root resource: Klein's, behind a guard that turns undecodable URLs into JSON 400s."""
        return _GuardedResource(self.app, self._unroutable)

    # -- errors --------------------------------------------------------------------------

    def _http_error(self, request: IRequest, failure: Failure) -> bytes:
        """404, 405 and the like from routing, as JSON."""
        exc = failure.value
        assert isinstance(exc, HTTPException)
        code = exc.code or 500
        for name, value in exc.get_response({}).headers:
            if name.lower() in ("allow", "location"):
                request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        messages = {
            404: "no such path; the key exchange is POST /api/v1/wg/key/exchange or /api/v2/wg/key/exchange",
            405: "method not allowed for this path",
        }
        message = messages.get(code, exc.description or exc.name)
        return self.replies.error(request, "other", code, message)

    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("Unexpected error answering {method} {path}", failure,
                         method=request.method, path=request.path)
        return self.replies.error(request, "other", 500, "internal error; the broker logged the details")

    def _unroutable(self, request: IRequest, failure: Failure | None) -> bytes:
        """A URL or Host header Klein cannot even route (not UTF-8, not a host name)."""
        if failure is not None and failure.check(HTTPException):
            return self._http_error(request, failure)
        if failure is not None:
            self.log.failure("Cannot route {method} {path}", failure, method=request.method, path=request.path)
        return self.replies.error(request, "other", 400, "the URL or Host header cannot be parsed")


class _GuardedResource(KleinResource):
    """Klein's resource, but a URL or Host it cannot route gets a JSON 400 (not HTML or a 500).

    Klein decodes the URL and binds werkzeug's router to the Host header before any
    error handler is in place; a bad Host raises werkzeug's ``BadHost`` straight out.
    """

    def __init__(self, app: Klein, unroutable: Callable[[IRequest, Failure | None], bytes]) -> None:
        super().__init__(app)
        self._unroutable = unroutable

    def render(self, request: IRequest) -> Any:
        try:
            request.getRequestHostname().decode("utf-8")
            for segment in (request.prepath or []) + (request.postpath or []):
                segment.decode("utf-8")
        except UnicodeDecodeError:
            return self._unroutable(request, None)
        try:
            return super().render(request)
        except Exception:
            return self._unroutable(request, Failure())
