"""The broker's Prometheus metrics: a private registry, rendered inside the request.

Nothing here starts a thread or an HTTP server: ``GET /metrics`` calls
:meth:`BrokerMetrics.render`, which runs ``generate_latest`` on the registry of
this broker only (so tests can build several brokers side by side).

Counted as things happen: requests by endpoint and status, request latency,
keys published (acknowledged by the MQTT server) and queued (accepted while it
was unreachable), requests refused by the rate limiter or the key lists, v2
choices per worker, malformed bus messages. Read at scrape time from the live
objects: MQTT connected and reconnects, keys pending, workers online per
domain, peers per worker and domain, keys replayed to workers back on the bus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from wgkex.broker.replay import ReplayCounters
from wgkex.broker.workers import WorkerPicture
from wgkex.bus import Bus
from wgkex.contract import Refused

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Endpoint labels: a fixed set, never the raw path (which clients choose).
ENDPOINTS = ("v1", "v2", "index", "status", "metrics", "healthz", "readyz", "other")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _LiveCollector:
    """Reads MQTT and worker state at scrape time."""

    def __init__(self, bus: Callable[[], Bus | None], picture: WorkerPicture) -> None:
        self._bus = bus
        self._picture = picture

    def collect(self) -> Iterator[Metric]:
        bus = self._bus()
        connected = GaugeMetricFamily("wgkex_broker_mqtt_connected", "1 while connected to the MQTT server")
        connected.add_metric([], 1.0 if bus is not None and bus.connected else 0.0)
        yield connected
        reconnects = CounterMetricFamily(
            "wgkex_broker_mqtt_reconnects", "Successful MQTT connections after the first"
        )
        reconnects.add_metric([], float(bus.reconnects if bus is not None else 0))
        yield reconnects
        pending = GaugeMetricFamily(
            "wgkex_broker_keys_pending", "Keys queued for MQTT while the server is unreachable"
        )
        pending.add_metric([], float(bus.pending if bus is not None else 0))
        yield pending

        picture = self._picture
        online = GaugeMetricFamily(
            "wgkex_broker_workers_online", "Workers eligible for v2 per domain", labels=["domain"]
        )
        for domain in sorted(picture.domains):
            online.add_metric([domain], float(picture.online_count(domain)))
        yield online
        peers = GaugeMetricFamily(
            "wgkex_broker_worker_peers",
            "Connected peers per worker and domain (last metric plus local v2 choices since)",
            labels=["worker", "domain"],
        )
        worker_online = GaugeMetricFamily(
            "wgkex_broker_worker_online", "1 while the worker's status is online", labels=["worker"]
        )
        for name in sorted(picture.workers):
            state = picture.workers[name]
            worker_online.add_metric([name], 1.0 if state.online else 0.0)
            for domain in sorted(state.peers):
                peers.add_metric([name, domain], float(state.peers[domain]))
        yield peers
        yield worker_online


class ConnectionCounts(Protocol):
    """What the site counts about connections (:class:`wgkex.broker.site.BrokerSite`)."""

    @property
    def open_connections(self) -> int: ...

    refused_connections: int
    replaced_connections: int
    timed_out_requests: int


class _ConnectionCollector:
    """Reads the site's connection counts at scrape time."""

    def __init__(self, counts: ConnectionCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self._counts
        open_now = GaugeMetricFamily("wgkex_broker_http_connections", "HTTP connections open now")
        open_now.add_metric([], float(c.open_connections))
        yield open_now
        closed = CounterMetricFamily(
            "wgkex_broker_http_connections_cut",
            "HTTP connections closed by the broker's bounds: refused (per-address cap),"
            " replaced (site full), request_timeout (408)",
            labels=["reason"],
        )
        closed.add_metric(["refused"], float(c.refused_connections))
        closed.add_metric(["replaced"], float(c.replaced_connections))
        closed.add_metric(["request_timeout"], float(c.timed_out_requests))
        yield closed


class _ReplayCollector:
    """Reads the replay counts and the recent keys held (:mod:`wgkex.broker.replay`) at scrape time."""

    def __init__(self, counters: ReplayCounters, held: Callable[[], int]) -> None:
        self._counters = counters
        self._held = held

    def collect(self) -> Iterator[Metric]:
        c = self._counters
        for name, text, counts in (
            ("wgkex_broker_keys_replayed", "Recent keys re-published for a worker back on the bus", c.replayed),
            ("wgkex_broker_keys_replay_skipped",
             "Recent keys not re-published: the MQTT queue was full or the connection ended", c.skipped),
            ("wgkex_broker_replays", "Replays of a domain's recent keys started for a worker back on the bus",
             c.replays),
        ):
            family = CounterMetricFamily(name, text, labels=["domain"])
            for domain in sorted(counts):
                family.add_metric([domain], float(counts[domain]))
            yield family
        held = GaugeMetricFamily("wgkex_broker_recent_keys", "Keys kept for replay (broker.replay_window)")
        held.add_metric([], float(self._held()))
        yield held


class BrokerMetrics:
    """All metrics of one broker, in a registry of its own."""

    def __init__(self, picture: WorkerPicture, bus: Callable[[], Bus | None], process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "wgkex_broker_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "wgkex_broker_request_seconds",
            "Time from request received to reply, by endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.published = Counter(
            "wgkex_broker_keys_published", "Keys acknowledged by the MQTT server", ["domain"], registry=r
        )
        self.queued = Counter(
            "wgkex_broker_keys_queued", "Keys accepted while MQTT was unreachable (sent later)", ["domain"], registry=r
        )
        self.queue_full = Counter(
            "wgkex_broker_keys_queue_full", "Keys refused with 503 because the pending queue was full", registry=r
        )
        self.rate_limited = Counter(
            "wgkex_broker_rate_limited", "Requests refused with 429 by the per-address rate limit", registry=r
        )
        self.refused = Counter(
            "wgkex_broker_refused", "Requests refused, by reason (bad_request, blocklist, too_large, ...)",
            ["reason"], registry=r,
        )
        self.choices = Counter(
            "wgkex_broker_v2_choices", "Workers chosen for v2 replies", ["worker", "domain"], registry=r
        )
        self.bus_invalid = Counter(
            "wgkex_broker_bus_messages_invalid",
            "Worker reports refused by the wire contract, by kind and reason (docs/protocol.md)",
            ["kind", "reason"],
            registry=r,
        )
        r.register(_LiveCollector(bus, picture))
        if process:
            ProcessCollector(registry=r)
            GCCollector(registry=r)
        # Labelled children for the hot path, looked up once (``labels()`` costs a lock and a
        # dict walk per call). Label values come from fixed sets or the configuration.
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._latency_children = {e: self.latency.labels(e) for e in ENDPOINTS}
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}

    def observe(self, endpoint: str, status: int, seconds: float | None) -> None:
        """Count one answered request (``seconds`` None when no latency is known)."""
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self._request_children[(endpoint, status)] = self.requests.labels(endpoint, str(status))
        child.inc()
        if seconds is not None:
            self._latency_children[endpoint].observe(seconds)

    def child(self, counter: Counter, *labels: str) -> Counter:
        """``counter.labels(*labels)``, looked up once per label values (for the key exchange's counters:
        domains and worker names come from the configuration and the bounded worker picture)."""
        key = (counter, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = counter.labels(*labels)
        return found

    def count_bus_invalid(self, refused: Refused) -> None:
        """Count one refused worker report (both labels come from the contract's fixed sets)."""
        self.bus_invalid.labels(refused.kind, refused.reason).inc()

    def watch_connections(self, counts: ConnectionCounts) -> None:
        """Export the HTTP site's connection counts (open, and closed by which bound)."""
        self.registry.register(_ConnectionCollector(counts))

    def watch_replays(self, counters: ReplayCounters, held: Callable[[], int]) -> None:
        """Export what replays did and how many recent keys are kept for them."""
        self.registry.register(_ReplayCollector(counters, held))

    def render(self) -> bytes:
        """The text exposition of every metric of this broker."""
        data: bytes = generate_latest(self.registry)
        return data
