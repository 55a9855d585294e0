"""The broker's HTTP API (docs/protocol.md, "HTTP API"), as a Klein app built from the configuration.

A key travels through :meth:`BrokerApi.key_exchange`:

1. the client address (:func:`~wgkex.broker.ratelimit.client_address`) takes a
   token from its bucket, else 429 with ``Retry-After``;
2. the body -- JSON whatever the Content-Type says, since Gluon labels it
   ``application/x-www-form-urlencoded`` -- must be a UTF-8 JSON object with
   string ``domain`` and ``public_key`` (else 400; over the size limit 413,
   normally already answered by :mod:`wgkex.broker.body_limit` as it arrived);
3. the key must be a valid WireGuard public key and the domain configured (400),
   and pass the block/allow lists (403);
4. v2 only: a worker is chosen for the domain (:mod:`wgkex.broker.selection`),
   503 if none is online;
5. the key is published on ``wireguard/{domain}/all`` at QoS 1. While MQTT is
   connected the reply waits for the server's acknowledgement, at most
   ``broker.publish_timeout`` seconds (after that the key is still queued in the
   client, so the reply is 200 anyway). While MQTT is down the key is queued
   (and written to the spool in ``broker.state_dir``, so a restart or a crash
   does not lose it) and the reply is 200 at once; a full queue gives 503.

Nothing is published for a refused request. Every reply is JSON with
``Content-Type: application/json`` (except ``GET /`` and ``/metrics``),
errors are ``{"error": {"message": ...}}`` and never contain a traceback:
Klein's HTML defaults for 404/405 and unexpected exceptions are replaced.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources
from typing import Any

from klein import Klein
from klein.resource import KleinResource
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from wgkex.broker import status as status_page
from wgkex.broker.cache import RenderCache
from wgkex.broker.history import History
from wgkex.broker.keylists import KeyLists
from wgkex.broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.ratelimit import RateLimiter, client_address, parse_networks
from wgkex.broker.workers import WorkerPicture
from wgkex.bus import Bus, MqttStopped, QueueFull
from wgkex.config import Config
from wgkex.keys import key_problem
from wgkex.contract import encode_key, key_topic

JSON = b"application/json"
HTML = b"text/html; charset=utf-8"

V1_PATH = "/api/v1/wg/key/exchange"
V2_PATH = "/api/v2/wg/key/exchange"

_OK_BODY = b'{"Message": "OK"}'


class Refused(Exception):
    """A request the API answers with an error; ``reason`` labels the metric."""

    def __init__(self, code: int, message: str, reason: str, headers: dict[bytes, bytes] | None = None,
                 domain: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.headers = headers or {}
        #: The configured domain the request named, where known (for the status page's history).
        self.domain = domain


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message}}).encode("utf-8")


def _reason(failure: Failure) -> str:
    """One line for a failed publish: exception type and message."""
    name = failure.type.__name__ if failure.type is not None else "error"
    return f"{name}: {failure.getErrorMessage()}"


def _kind(value: object) -> str:
    """A JSON type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "a string"


def parse_body(body: bytes, max_body: int) -> tuple[str, str]:
    """``(domain, public_key)`` from a request body; raise :class:`Refused` saying what is wrong."""
    if len(body) > max_body:
        raise Refused(413, f"request body is larger than {max_body} bytes; send only the JSON object", "too_large")
    if not body.strip():
        raise Refused(400, 'request body is empty; send {"domain": ..., "public_key": ...} as JSON', "bad_request")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "request body is not UTF-8 text", "bad_request") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise Refused(400, "request body is not JSON: nested too deeply", "bad_request") from None
    except ValueError as exc:
        raise Refused(400, f"request body is not JSON: {exc}", "bad_request") from None
    if not isinstance(data, dict):
        raise Refused(
            400, f'request body must be a JSON object {{"domain": ..., "public_key": ...}}, got {_kind(data)}',
            "bad_request",
        )
    for field in ("domain", "public_key"):
        if field not in data:
            raise Refused(400, f"{field} is missing from the request body", "bad_request")
        if not isinstance(data[field], str):
            raise Refused(400, f"{field} must be a string, got {_kind(data[field])}", "bad_request")
    domain: str = data["domain"]
    key: str = data["public_key"]
    problem = key_problem(key)
    if problem is not None:
        raise Refused(400, problem, "bad_key", domain=domain)
    return domain, key


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
        self.config = config
        self.bus = bus
        self.picture = picture
        self.lists = lists
        self.limiter = limiter
        self.metrics = metrics
        self.clock = clock
        self.history = history if history is not None else History(config.domains, clock)
        self._openapi: bytes | None = None
        self._domains = frozenset(config.domains)
        self._trusted = parse_networks(config.broker.trusted_proxies)
        self._max_body = config.broker.max_body_size
        self._timeout = config.broker.publish_timeout
        self._pages = RenderCache(clock)
        self.app = self._build_app()

    # -- the app -------------------------------------------------------------------------

    def _build_app(self) -> Klein:
        app = Klein()
        app.route(V1_PATH, methods=["POST"])(self.key_exchange_v1)
        app.route(V2_PATH, methods=["POST"])(self.key_exchange_v2)
        app.route("/", methods=["GET"])(self.index)
        app.route("/api/v1/status", methods=["GET"])(self.status)
        app.route("/api/openapi.json", methods=["GET"])(self.openapi)
        app.route("/metrics", methods=["GET"])(self.prometheus)
        app.route("/healthz", methods=["GET"])(self.healthz)
        app.route("/readyz", methods=["GET"])(self.readyz)
        app.handle_errors(HTTPException)(self._http_error)
        app.handle_errors(Exception)(self._unexpected)
        return app

    def resource(self) -> IResource:
        """The root resource: Klein's, behind a guard that turns undecodable URLs into JSON 400s."""
        return _GuardedResource(self.app, self._unroutable)

    # -- replies -------------------------------------------------------------------------

    def _reply(self, request: IRequest, endpoint: str, code: int, body: bytes, start: float | None,
               content_type: bytes = JSON) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        self.metrics.observe(endpoint, code, None if start is None else self.clock.seconds() - start)
        return body

    def _refused(self, request: IRequest, endpoint: str, refusal: Refused, start: float | None) -> bytes:
        for name, value in refusal.headers.items():
            request.setHeader(name, value)
        self.metrics.refused.labels(refusal.reason).inc()
        return self._reply(request, endpoint, refusal.code, error_body(refusal.message), start)

    # -- key exchange --------------------------------------------------------------------

    def key_exchange_v1(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``POST /api/v1/wg/key/exchange``: publish the key, reply ``{"Message": "OK"}``."""
        return self.key_exchange(request, "v1")

    def key_exchange_v2(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``POST /api/v2/wg/key/exchange``: publish the key, reply with the chosen worker's endpoint."""
        return self.key_exchange(request, "v2")

    def key_exchange(self, request: IRequest, endpoint: str) -> bytes | Deferred[bytes]:
        start = self.clock.seconds()
        chosen: tuple[str, str] | None = None
        domain: str | None = None
        try:
            domain, key = self._admit(request)
            reply = _OK_BODY
            if endpoint == "v2":
                choice = self.picture.choose(domain)
                if choice is None:
                    raise Refused(
                        503, f"no gateway is online for domain {domain}; try again later (or use API v1)",
                        "no_worker",
                    )
                name, target = choice
                chosen = (name, domain)
                reply = json.dumps(target.reply()).encode("utf-8")
            acked = self._publish(domain, key)
        except Refused as refusal:
            if chosen is not None:
                self.picture.unchoose(*chosen)
            self.history.registration(domain or refusal.domain, refusal.reason)
            return self._refused(request, endpoint, refusal, start)
        self.history.registration(domain)
        if chosen is not None:
            self.metrics.choices.labels(*chosen).inc()
        if acked is None:
            return self._reply(request, endpoint, 200, reply, start)

        def answered(_: object) -> bytes:
            return self._reply(request, endpoint, 200, reply, start)

        def failed(failure: Failure) -> bytes | Failure:
            if failure.check(CancelledError):
                # The client went away while we waited (Klein cancels); the key is still on
                # its way. Klein drops the cancellation quietly.
                self.metrics.observe(endpoint, 499, None)
                return failure
            self.log.warn("Publishing key {key} for domain {domain} failed: {reason}; answering 503",
                          key=key, domain=domain, reason=_reason(failure))
            if chosen is not None:
                self.picture.unchoose(*chosen)
            self.history.registration(domain, "publish_failed")
            return self._refused(
                request, endpoint, Refused(503, "the key could not be handed to the message bus; try again",
                                           "publish_failed"), start
            )

        return acked.addCallbacks(answered, failed)

    def _admit(self, request: IRequest) -> tuple[str, str]:
        """Rate limit, parse, validate and list-check a key exchange request."""
        who = client_address(
            request.getClientAddress(), request.requestHeaders.getRawHeaders(b"X-Forwarded-For"), self._trusted
        )
        wait = self.limiter.acquire(who)
        if wait:
            self.metrics.rate_limited.inc()
            raise Refused(
                429, f"too many requests from {who}; retry in {wait} s", "rate_limited",
                {b"Retry-After": str(wait).encode("ascii")},
            )
        content = request.content
        body = content.read(self._max_body + 1) if content is not None else b""
        domain, key = parse_body(body, self._max_body)
        if domain not in self._domains:
            raise Refused(400, f"domain {domain[:80]!r} is not configured on this broker", "bad_domain")
        refusal = self.lists.refusal(key)
        if refusal is not None:
            raise Refused(403, refusal, "key_list", domain=domain)
        return domain, key

    def _publish(self, domain: str, key: str) -> Deferred[bytes] | None:
        """Publish ``key``; None when queued (answer now), else a Deferred for the answer."""
        bus = self.bus
        connected = bus.connected
        try:
            d = bus.publish(key_topic(domain), encode_key(key), qos=1)
        except QueueFull:
            self.metrics.queue_full.inc()
            raise Refused(
                503, "the message bus is unreachable and the queue of pending keys is full; try again later",
                "queue_full",
            ) from None
        published = self.metrics.published.labels(domain)

        def acknowledged(result: object) -> object:
            published.inc()
            return result

        d.addCallback(acknowledged)
        if not connected:
            self.metrics.queued.labels(domain).inc()
            d.addErrback(self._lost, key, domain)
            return None
        return self._bounded(d, key, domain)

    def _lost(self, failure: Failure, key: str, domain: str) -> None:
        # The MQTT service fails a publish only when it stops before the server has it; it
        # logs one line for all of them (and keeps them in its spool for the next start).
        if failure.check(MqttStopped):
            return
        self.log.warn("Key {key} for domain {domain}, already answered 200, was not published: {reason}",
                      key=key, domain=domain, reason=_reason(failure))

    def _bounded(self, d: Deferred[None], key: str, domain: str) -> Deferred[bytes]:
        """A Deferred that fires when ``d`` does or after the publish timeout, whichever is first.

        The publish itself is never cancelled: on timeout it stays queued in the MQTT client.
        """
        result: Deferred[bytes] = Deferred(lambda _: timer.cancel() if timer.active() else None)
        timer: IDelayedCall

        def timed_out() -> None:
            self.log.warn(
                "MQTT server did not acknowledge key {key} for {domain} within {timeout} s; answering anyway",
                key=key, domain=domain, timeout=self._timeout,
            )
            result.callback(b"")

        def done(outcome: object) -> None:
            if timer.active():
                timer.cancel()
            if result.called:
                if isinstance(outcome, Failure):
                    self._lost(outcome, key, domain)
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(b"")

        timer = self.clock.callLater(self._timeout, timed_out)
        d.addBoth(done)
        return result

    # -- the other pages -----------------------------------------------------------------

    def _status(self) -> dict[str, Any]:
        bus = self.bus
        return status_page.snapshot(
            self.picture, bus.connected, bus.reconnects, bus.pending, self.clock.seconds(), self.history
        )

    # The three read-only pages below are rendered at most once a second (RenderCache).

    def index(self, request: IRequest) -> bytes:
        """``GET /``: the HTML status page."""
        body = self._pages.get("index", lambda: status_page.render_html(self._status()))
        return self._reply(request, "index", 200, body, None, HTML)

    def status(self, request: IRequest) -> bytes:
        """``GET /api/v1/status``: the status page's data as JSON."""
        body = self._pages.get("status", lambda: json.dumps(self._status()).encode("utf-8"))
        return self._reply(request, "status", 200, body, None)

    def openapi(self, request: IRequest) -> bytes:
        """``GET /api/openapi.json``: the OpenAPI 3.1 description of this API (package data, read once)."""
        if self._openapi is None:
            self._openapi = resources.files("wgkex.broker").joinpath("openapi.json").read_bytes()
        return self._reply(request, "other", 200, self._openapi, None)

    def prometheus(self, request: IRequest) -> bytes:
        """``GET /metrics``: Prometheus text exposition."""
        body = self._pages.get("metrics", self.metrics.render)
        return self._reply(request, "metrics", 200, body, None, METRICS_CONTENT_TYPE.encode())

    def healthz(self, request: IRequest) -> bytes:
        """``GET /healthz``: 200 while the process serves."""
        return self._reply(request, "healthz", 200, b'{"status": "ok"}', None)

    def readyz(self, request: IRequest) -> bytes:
        """``GET /readyz``: 200 while connected to MQTT, else 503."""
        if self.bus.connected:
            return self._reply(request, "readyz", 200, b'{"status": "ready", "mqtt": "connected"}', None)
        return self._reply(
            request, "readyz", 503, error_body("not connected to the MQTT server; keys are only queued"), None
        )

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
        return self._reply(request, "other", code, error_body(message), None)

    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure("Unexpected error answering {method} {path}", failure,
                         method=request.method, path=request.path)
        return self._reply(request, "other", 500, error_body("internal error; the broker logged the details"), None)

    def _unroutable(self, request: IRequest, failure: Failure | None) -> bytes:
        """A URL or Host header Klein cannot even route (not UTF-8, not a host name)."""
        if failure is not None and failure.check(HTTPException):
            return self._http_error(request, failure)
        if failure is not None:
            self.log.failure("Cannot route {method} {path}", failure, method=request.method, path=request.path)
        return self._reply(request, "other", 400, error_body("the URL or Host header cannot be parsed"), None)


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
