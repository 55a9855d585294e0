"""The broker's service tree: built from the configuration, started by twistd.

``BrokerService`` (a ``MultiService``) holds, in order:

- ``logging``: applies ``log_level`` / ``logging_config``;
- ``keylists``: reads the key block/allow lists, re-reads them on SIGHUP;
- ``mqtt``: the MQTT connection; the worker picture subscribes through it;
- ``http``: the listener for ``broker_listen`` (any Twisted server endpoint
  description; ``backlog=`` is added for tcp/ssl/unix ones when absent, since
  Twisted's default of 50 drops connections under bursts of routers).

Nothing is opened while the tree is built (twistd forks afterwards). On start
the listener goes first, so a port that cannot be bound stops the process with
one line before anything else runs; then the rest start, the broker takes over
SIGTERM so a clean shutdown exits with status 0 (twistd would re-raise the
signal), and ``gc.freeze()`` moves everything built so far out of the garbage
collector's way. On stop, children stop in reverse: the listener first, then
MQTT, which flushes what was queued (bounded).
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from wgkex.broker.api import BrokerApi
from wgkex.broker.history import AlsoTo, History
from wgkex.broker.keylists import KeyLists, KeyListService
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.ratelimit import RateLimiter
from wgkex.broker.site import make_site
from wgkex.broker.workers import METRICS_TOPIC, WorkerPicture, WorkerTracker
from wgkex.config import Config
from wgkex.logs import LoggingService
from wgkex.sigterm import CleanSigterm
from wgkex.mqtt import MqttService

_BACKLOG_KINDS = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=N`` added for endpoint kinds that take one."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_KINDS or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


class HttpListener(Service):
    """Listens on a server endpoint description with a site; stops listening on stop."""

    name = "http"
    log = Logger()

    def __init__(self, reactor: Any, description: str, factory: Site) -> None:
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        try:
            endpoint = serverFromString(self._reactor, self.description)
        except Exception as exc:
            raise SystemExit(f"wgkex broker: broker_listen {self.description!r} is not usable: {exc}") from None
        failures: list[Failure] = []
        d = endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            raise SystemExit(
                f"wgkex broker: cannot listen on {self.description!r}: {failures[0].getErrorMessage()}"
            )

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("Broker HTTP API listening on {address}", address=port.getHost())

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        d: Deferred[None] | None = port.stopListening()
        return d


class BrokerService(MultiService):
    """The whole broker for one configuration."""

    def __init__(
        self,
        reactor: Any,
        config: Config,
        mqtt_factory: Callable[..., MqttService] = MqttService,
        freeze_gc: bool = True,
    ) -> None:
        super().__init__()
        self.config = config
        self._freeze_gc = freeze_gc
        clock: IReactorTime = reactor
        b = config.broker

        self.mqtt = mqtt_factory(reactor, config.mqtt, name="mqtt")
        self.picture = WorkerPicture(config.domains, config.weight, clock)
        self.metrics = BrokerMetrics(self.picture, lambda: self.mqtt)
        self.tracker = WorkerTracker(self.picture, clock, on_invalid=self._count_invalid)
        self.history = History(config.domains, clock)
        self.tracker.subscribe(AlsoTo(self.mqtt, METRICS_TOPIC, self.history.on_metric))
        self.lists = KeyLists(b.key_blocklist, b.key_allowlist)
        self.limiter = RateLimiter(b.rate_limit, b.rate_burst, clock)
        self.api = BrokerApi(config, self.mqtt, self.picture, self.lists, self.limiter, self.metrics, clock,
                             self.history)
        self.site = make_site(self.api.resource(), b.max_body_size, reactor, on_too_large=self._too_large)
        self.http = HttpListener(reactor, with_backlog(b.listen, b.backlog), self.site)

        LoggingService(config.log_level, config.logging_config).setServiceParent(self)
        KeyListService(self.lists, reactor).setServiceParent(self)
        self.mqtt.setServiceParent(self)
        CleanSigterm(reactor).setServiceParent(self)
        # Last in: stopped first, so no new request arrives while MQTT flushes.
        self.http.setServiceParent(self)

    def _count_invalid(self, kind: str) -> None:
        self.metrics.bus_invalid.labels(kind).inc()

    def _too_large(self, path: bytes) -> None:
        route = path.split(b"?", 1)[0]
        endpoint = {b"/api/v1/wg/key/exchange": "v1", b"/api/v2/wg/key/exchange": "v2"}.get(route, "other")
        self.metrics.refused.labels("too_large").inc()
        if endpoint != "other":
            self.history.registration(None, "too_large")
        self.metrics.observe(endpoint, 413, None)

    def startService(self) -> None:
        # The listener first: a port that cannot be bound stops the process before
        # anything else has started (no thread pool, no MQTT connection to unwind).
        self.http.startService()
        Service.startService(self)
        for child in self:
            if not child.running:
                child.startService()
        if self._freeze_gc:
            # Everything built so far lives as long as the process: take it out of the
            # collector's generations so collections stay short under request load.
            gc.collect()
            gc.freeze()
