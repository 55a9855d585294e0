"""The broker's read-only pages: status (HTML and JSON), metrics, health, readiness, OpenAPI.

None of them changes anything, and none is rate limited. The three expensive
ones -- ``GET /``, ``GET /api/v1/status`` and ``GET /metrics`` -- are rendered at
most once a second (:class:`~wgkex.broker.cache.RenderCache`), whatever the
request rate. The status page is drawn by :mod:`wgkex.broker.status`, the
metrics by :mod:`wgkex.broker.metrics`; :mod:`wgkex.broker.api` routes the paths here.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from wgkex.broker import status as status_page
from wgkex.broker.cache import RenderCache
from wgkex.broker.history import History
from wgkex.broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.replies import HTML, Replies
from wgkex.broker.workers import WorkerPicture
from wgkex.bus import Bus


class Pages:
    """The read-only pages of one broker."""

    def __init__(
        self,
        bus: Bus,
        picture: WorkerPicture,
        history: History,
        metrics: BrokerMetrics,
        clock: IReactorTime,
        replies: Replies,
    ) -> None:
        self.bus = bus
        self.picture = picture
        self.history = history
        self.metrics = metrics
        self.clock = clock
        self.replies = replies
        self._openapi: bytes | None = None
        self._cache = RenderCache(clock)

    def _status(self) -> dict[str, Any]:
        bus = self.bus
        return status_page.snapshot(
            self.picture, bus.connected, bus.reconnects, bus.pending, self.clock.seconds(), self.history
        )

    def index(self, request: IRequest) -> bytes:
        """``GET /``: the HTML status page."""
        body = self._cache.get("index", lambda: status_page.render_html(self._status()))
        return self.replies.send(request, "index", 200, body, None, HTML)

    def status(self, request: IRequest) -> bytes:
        """``GET /api/v1/status``: the status page's data as JSON."""
        body = self._cache.get("status", lambda: json.dumps(self._status()).encode("utf-8"))
        return self.replies.send(request, "status", 200, body)

    def openapi(self, request: IRequest) -> bytes:
        """``GET /api/openapi.json``: the OpenAPI 3.1 description of this API (package data, read once)."""
        if self._openapi is None:
            self._openapi = resources.files("wgkex.broker").joinpath("openapi.json").read_bytes()
        return self.replies.send(request, "other", 200, self._openapi)

    def prometheus(self, request: IRequest) -> bytes:
        """``GET /metrics``: Prometheus text exposition."""
        body = self._cache.get("metrics", self.metrics.render)
        return self.replies.send(request, "metrics", 200, body, None, METRICS_CONTENT_TYPE.encode())

    def healthz(self, request: IRequest) -> bytes:
        """``GET /healthz``: 200 while the process serves."""
        return self.replies.send(request, "healthz", 200, b'{"status": "ok"}')

    def readyz(self, request: IRequest) -> bytes:
        """``GET /readyz``: 200 while connected to MQTT, else 503."""
        if self.bus.connected:
            return self.replies.send(request, "readyz", 200, b'{"status": "ready", "mqtt": "connected"}')
        return self.replies.error(request, "readyz", 503, "not connected to the MQTT server; keys are only queued")
