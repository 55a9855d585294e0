"""The worker's Prometheus metrics, in a registry of its own.

One :class:`WorkerMetrics` per worker (no module-level collectors, so two
workers can live side by side in one test process). All updates happen on the
reactor thread; ``/metrics`` renders the registry with
:func:`prometheus_client.generate_latest`.

Label values are bounded: domains come from the configuration, failure
reasons and invalid-message reasons from small fixed sets, never from the bus.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: Why a key failed (the ``reason`` label of ``wgkex_worker_keys_failed_total``).
FAILURE_REASONS = ("interface_missing", "wireguard", "route", "fdb", "internal", "stopped")

#: Why a message from the bus was refused (``wgkex_worker_keys_invalid_total``).
INVALID_REASONS = ("topic", "domain", "payload", "key")

_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SWEEP_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class WorkerMetrics:
    """Every metric the worker exports, registered in a private registry."""

    def __init__(self, domains: tuple[str, ...] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.keys_received = Counter(
            "wgkex_worker_keys_received", "Messages received on wireguard/{domain}/+ (valid or not).", registry=r
        )
        self.keys_invalid = Counter(
            "wgkex_worker_keys_invalid",
            "Messages refused before reaching the kernel, by reason (topic, domain, payload, key).",
            ["reason"],
            registry=r,
        )
        self.keys_duplicate = Counter(
            "wgkex_worker_keys_duplicate",
            "Valid keys dropped because the same key was already waiting for the next batch.",
            registry=r,
        )
        self.keys_applied = Counter(
            "wgkex_worker_keys_applied", "Keys installed (peer, route and FDB entry).", ["domain"], registry=r
        )
        self.keys_failed = Counter(
            "wgkex_worker_keys_failed", "Keys that could not be installed, by domain and reason.",
            ["domain", "reason"], registry=r,
        )
        self.keys_reapplied = Counter(
            "wgkex_worker_keys_reapplied",
            "Known keys queued again because their interface came back or an earlier attempt failed.",
            ["domain"],
            registry=r,
        )
        self.pending = Gauge("wgkex_worker_keys_pending", "Keys waiting for the next batch.", registry=r)
        self.batch_size = Histogram(
            "wgkex_worker_batch_size", "Keys per applied batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.apply_seconds = Histogram(
            "wgkex_worker_apply_seconds",
            "Wall time to apply one batch in the netlink pool (peers, routes, FDB).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.peers = Gauge("wgkex_worker_peers", "WireGuard peers on the domain's interface.", ["domain"], registry=r)
        self.connected_peers = Gauge(
            "wgkex_worker_connected_peers",
            "Peers with a handshake within the last 3 minutes (-1: interface missing).",
            ["domain"],
            registry=r,
        )
        self.mqtt_connected = Gauge("wgkex_worker_mqtt_connected", "1 while connected to MQTT.", registry=r)
        self.sweep_seconds = Histogram(
            "wgkex_worker_sweep_seconds", "Duration of a stale-peer sweep.", buckets=_SWEEP_BUCKETS, registry=r
        )
        self.swept_peers = Counter(
            "wgkex_worker_swept_peers", "Stale peers removed by sweeps.", ["domain"], registry=r
        )
        self.sweep_errors = Counter(
            "wgkex_worker_sweep_errors", "Sweeps of a domain that failed.", ["domain"], registry=r
        )
        # Pre-create the labelled children so that every series exists from the start.
        for reason in INVALID_REASONS:
            self.keys_invalid.labels(reason=reason)
        for domain in domains:
            self.keys_applied.labels(domain=domain)
            self.keys_reapplied.labels(domain=domain)
            self.swept_peers.labels(domain=domain)
            self.sweep_errors.labels(domain=domain)
            for failure in FAILURE_REASONS:
                self.keys_failed.labels(domain=domain, reason=failure)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
