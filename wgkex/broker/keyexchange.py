"""The key exchange (docs/protocol.md, "HTTP API"): ``POST /api/v1|v2/wg/key/exchange``.

A key travels through :meth:`KeyExchange.handle`:

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

Nothing is published for a refused request; every refusal is a JSON error
(:class:`Refused`, written by :class:`~wgkex.broker.replies.Replies`) and counted
by its reason. :mod:`wgkex.broker.api` routes both paths here.
"""

from __future__ import annotations

import json

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from wgkex.broker.deadlines import Deadlines
from wgkex.broker.history import History
from wgkex.broker.keylists import KeyLists
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.ratelimit import RateLimiter, client_address, parse_networks
from wgkex.broker.replies import Replies
from wgkex.broker.workers import WorkerPicture
from wgkex.bus import Bus, MqttStopped, QueueFull
from wgkex.config import Config
from wgkex.contract import Endpoint, encode_key, key_topic
from wgkex.keys import key_problem

V1_PATH = "/api/v1/wg/key/exchange"
V2_PATH = "/api/v2/wg/key/exchange"

_OK_BODY = b'{"Message": "OK"}'
#: Encoded v2 replies kept (one per worker and domain is the need).
_REPLIES_KEPT = 1024


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


class KeyExchange:
    """Both key exchange endpoints of one broker: admit a key, publish it, answer."""

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
        history: History,
        replies: Replies,
    ) -> None:
        self.bus = bus
        self.picture = picture
        self.lists = lists
        self.limiter = limiter
        self.metrics = metrics
        self.clock = clock
        self.history = history
        self.replies = replies
        self._domains = frozenset(config.domains)
        self._trusted = parse_networks(config.broker.trusted_proxies)
        self._max_body = config.broker.max_body_size
        self._timeout = config.broker.publish_timeout
        self._deadlines = Deadlines(clock, self._timeout)
        #: id(endpoint) -> (endpoint, its v2 reply body)
        self._replies: dict[int, tuple[Endpoint, bytes]] = {}

    def v1(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``POST /api/v1/wg/key/exchange``: publish the key, reply ``{"Message": "OK"}``."""
        return self.handle(request, "v1")

    def v2(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``POST /api/v2/wg/key/exchange``: publish the key, reply with the chosen worker's endpoint."""
        return self.handle(request, "v2")

    def handle(self, request: IRequest, endpoint: str) -> bytes | Deferred[bytes]:
        """Admit, publish and answer one key exchange request on ``endpoint`` ("v1" or "v2")."""
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
                reply = self._reply(target)
            acked = self._publish(domain, key)
        except Refused as refusal:
            if chosen is not None:
                self.picture.unchoose(*chosen)
            self.history.registration(domain or refusal.domain, refusal.reason)
            return self._refused(request, endpoint, refusal, start)
        self.history.registration(domain)
        if chosen is not None:
            self.metrics.child(self.metrics.choices, *chosen).inc()
        if acked is None:
            return self.replies.send(request, endpoint, 200, reply, start)

        def answered(_: object) -> bytes:
            return self.replies.send(request, endpoint, 200, reply, start)

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

    def _reply(self, target: Endpoint) -> bytes:
        """The v2 reply naming ``target``, encoded once per endpoint object (a worker's data
        message makes a new one)."""
        cached = self._replies.get(id(target))
        if cached is not None and cached[0] is target:
            return cached[1]
        if len(self._replies) >= _REPLIES_KEPT:
            self._replies.clear()
        reply = json.dumps(target.reply()).encode("utf-8")
        self._replies[id(target)] = (target, reply)
        return reply

    def _refused(self, request: IRequest, endpoint: str, refusal: Refused, start: float | None) -> bytes:
        for name, value in refusal.headers.items():
            request.setHeader(name, value)
        self.metrics.child(self.metrics.refused, refusal.reason).inc()
        return self.replies.error(request, endpoint, refusal.code, refusal.message, start)

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
        published = self.metrics.child(self.metrics.published, domain)

        def acknowledged(result: object) -> object:
            published.inc()
            return result

        d.addCallback(acknowledged)
        if not connected:
            self.metrics.child(self.metrics.queued, domain).inc()
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
        The timeouts of all requests share one timer (:class:`~wgkex.broker.deadlines.Deadlines`).
        """
        result: Deferred[bytes] = Deferred(lambda _: wait.cancel())

        def timed_out() -> None:
            self.log.warn(
                "MQTT server did not acknowledge key {key} for {domain} within {timeout} s; answering anyway",
                key=key, domain=domain, timeout=self._timeout,
            )
            result.callback(b"")

        def done(outcome: object) -> None:
            wait.cancel()
            if result.called:
                if isinstance(outcome, Failure):
                    self._lost(outcome, key, domain)
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(b"")

        wait = self._deadlines.wait(timed_out)
        d.addBoth(done)
        return result
