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

The two key exchange paths -- nearly every request a broker sees -- do not go
through Klein's router: :class:`_GuardedResource` hands ``POST`` on exactly
those paths straight to their handler and writes its answer itself, with the
same results (the same errors for a bad Host, a cancelled wait when the client
goes away, a JSON 500 for an unexpected exception). Klein's dispatch (werkzeug
routing, two ``maybeDeferred``, its response processing) cost about 0.2 ms of
CPU per request there, a quarter of the broker's whole cost per request
(``bench/broker.py --control``: a bare twisted.web answer costs 0.27 ms, the
same answer through Klein 0.53 ms). Every other request, and any variant of
these paths (trailing slash, percent-encoding, another method), goes to Klein
as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
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
        hot = {V1_PATH.encode("ascii"): self.exchange.v1, V2_PATH.encode("ascii"): self.exchange.v2}
        return _GuardedResource(self.app, self._unroutable, hot, self._unexpected)

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


#: A handler of the key exchange: the reply body now, or a Deferred of it.
Handler = Callable[[IRequest], "bytes | Deferred[bytes]"]
#: Host names checked by :func:`_routable_host`, at most this many remembered.
_HOSTS_KEPT = 256


class _GuardedResource(KleinResource):
    """Klein's resource, but a URL or Host it cannot route gets a JSON 400 (not HTML or a 500).

    Klein decodes the URL and binds werkzeug's router to the Host header before any
    error handler is in place; a bad Host raises werkzeug's ``BadHost`` straight out.

    ``POST`` on a path of ``hot`` goes straight to its handler (see the module
    docstring); ``unexpected`` answers an exception the handler raised, as Klein's
    error handler would.
    """

    log = Logger()

    def __init__(self, app: Klein, unroutable: Callable[[IRequest, Failure | None], bytes],
                 hot: Mapping[bytes, Handler] | None = None,
                 unexpected: Callable[[IRequest, Failure], bytes] | None = None) -> None:
        super().__init__(app)
        self._unroutable = unroutable
        self._hot = dict(hot or {})
        self._unexpected = unexpected
        #: Host name -> whether werkzeug would route it (IDNA-encodable), as checked before.
        self._hosts: dict[bytes, bool] = {}

    def render(self, request: IRequest) -> Any:
        if request.method == b"POST" and self._unexpected is not None:
            handler = self._hot.get(request.path)
            if handler is not None and self._routable_host(request.getRequestHostname()):
                return self._serve(request, handler, self._unexpected)
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

    def _routable_host(self, host: bytes) -> bool:
        """True for a Host Klein would route: UTF-8, and IDNA-encodable as werkzeug binds it.

        Anything else takes Klein's way, which answers it with the JSON 400 of :meth:`render`.
        """
        known = self._hosts.get(host)
        if known is None:
            try:
                host.decode("utf-8").lower().encode("idna")
                known = True
            except UnicodeError:
                known = False
            if len(self._hosts) >= _HOSTS_KEPT:
                self._hosts.clear()
            self._hosts[host] = known
        return known

    @staticmethod
    def _serve(request: IRequest, handler: Handler, unexpected: Callable[[IRequest, Failure], bytes]) -> Any:
        """Run ``handler`` for ``request`` and write what it answers (now, or when it fires).

        The twin of Klein's dispatch for one route: bytes returned now are
        written by twisted.web; a Deferred is cancelled if the client goes away
        first (the handler counts that), and written when it fires.
        """
        try:
            result = handler(request)
        except Exception:
            return unexpected(request, Failure())
        if isinstance(result, bytes):
            return result
        gone: list[bool] = []

        def client_gone(reason: Failure) -> None:
            gone.append(True)
            result.cancel()

        def write(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            if gone:
                _GuardedResource.log.failure("Unexpected error after the client went away", failure)
                return
            write(unexpected(request, failure))

        request.notifyFinish().addErrback(client_gone)  # type: ignore[attr-defined]
        result.addCallbacks(write, failed)
        return NOT_DONE_YET
