"""The worker's ``/api/v1/status``: what it holds, per domain, as JSON.

Per configured domain: its interfaces (names, whether they exist, the
link-local address), the WireGuard backend its keys go through, its peers (all,
and those with a recent handshake) as last counted, keys applied and failed
(by reason) since start, keys pending and waiting for a retry, the domain's
part of the last batch (keys, seconds, when), and the last stale-peer sweep
(when, how long, peers looked at, what it removed). Read on the reactor thread
from the objects that already hold it; nothing here touches the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from wgkex.config import Config
from wgkex.worker.metrics import FAILURE_REASONS, WorkerMetrics
from wgkex.worker.peers import KeyApplier
from wgkex.worker.sweep import Sweeper
from wgkex.worker.watch import InterfaceState

#: Keys a sweep removed that the status names (the count says the rest).
REMOVED_SAMPLE = 10


def backend_of(config: Config, wg: str, exists: Callable[[str], bool] = os.path.exists) -> str:
    """``uapi`` or ``kernel``: where keys for ``wg`` go now (as ``auto`` decides: the socket if it exists)."""
    mode = config.worker.wireguard_backend
    if mode != "auto":
        return mode
    return "uapi" if exists(os.path.join(config.worker.uapi_socket_dir, f"{wg}.sock")) else "kernel"


def _sample(metrics: WorkerMetrics, name: str, labels: dict[str, str]) -> int | None:
    value = metrics.registry.get_sample_value(name, labels)
    return None if value is None else int(value)


def worker_status(
    config: Config,
    states: Mapping[str, InterfaceState],
    applier: KeyApplier,
    sweeper: Sweeper,
    metrics: WorkerMetrics,
    mqtt_connected: bool,
    now: float,
    exists: Callable[[str], bool] = os.path.exists,
) -> dict[str, Any]:
    """The status as JSON-able data."""
    pending = applier.pending_by_domain()
    sweep = sweeper.last_sweep
    domains: dict[str, Any] = {}
    for domain in config.domains:
        wg, vx = config.wg_interface(domain), config.vx_interface(domain)
        state = states.get(domain)
        failed = {
            reason: count
            for reason in FAILURE_REASONS
            if (count := _sample(metrics, "wgkex_worker_keys_failed_total", {"domain": domain, "reason": reason}))
        }
        batch = applier.last_batch.get(domain)
        last_sweep = None
        if sweep is not None and domain in sweep[2]:
            result = sweep[2][domain]
            last_sweep = {
                "at": sweep[0],
                "seconds": round(sweep[1], 6),
                "peers": result.peers,
                "removed": len(result.removed),
                "removed_keys": result.removed[:REMOVED_SAMPLE],
                "error": result.error,
            }
        domains[domain] = {
            "interface": {
                "wireguard": wg,
                "vxlan": vx,
                "present": state is not None and state.complete,
                "wireguard_present": state is not None and state.wg_index is not None,
                "vxlan_present": state is not None and state.vx_index is not None,
                "link_address": state.link_address if state is not None else None,
            },
            "backend": backend_of(config, wg, exists),
            "peers": _sample(metrics, "wgkex_worker_peers", {"domain": domain}),
            "connected_peers": _sample(metrics, "wgkex_worker_connected_peers", {"domain": domain}),
            "keys": {
                "applied": _sample(metrics, "wgkex_worker_keys_applied_total", {"domain": domain}) or 0,
                "failed": failed,
                "pending": pending.get(domain, 0),
                "waiting_for_retry": len(applier.failed_keys(domain)),
            },
            "last_batch": None if batch is None else {
                "keys": batch.keys,
                "applied": batch.applied,
                "failed": batch.failed,
                "seconds": round(batch.seconds, 6),
                "at": batch.at,
            },
            "last_sweep": last_sweep,
        }
    return {
        "worker": config.worker.name,
        "mqtt": {"connected": mqtt_connected},
        "pending": applier.pending,
        "time": now,
        "domains": domains,
    }
