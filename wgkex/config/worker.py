"""The worker's settings: top-level keys of the original format (``externalName``, ...) and newer ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wgkex.config.endpoints import read_listen
from wgkex.config.reader import Reader
from wgkex.contract import host_problem, worker_name_problem
from wgkex.keys import key_problem

BACKENDS = ("auto", "kernel", "uapi")


@dataclass(frozen=True)
class WorkerConfig:
    """Settings only the worker reads."""

    #: This worker's name on the bus (``worker_name``, else the host name).
    name: str = ""
    #: What routers are told to connect to (``externalName``, else the host name).
    external_name: str = ""
    #: Endpoint description for /metrics and /healthz, or None for none.
    listen: str | None = "tcp:9101:interface=127.0.0.1"
    connectivity_check: bool = True
    connectivity_check_port: int = 80
    wireguard_backend: str = "auto"
    uapi_socket_dir: str = "/var/run/wireguard"
    metrics_interval: float = 60.0
    cleanup_interval: float = 3600.0
    peer_timeout: float = 3 * 3600.0
    keep_keys: frozenset[str] = frozenset()
    #: Most keys applied in one batch (the rest wait for the next batch).
    max_batch: int = 10_000


def read_worker(top: Reader, data: Mapping[str, Any], host: str) -> WorkerConfig:
    """The worker's settings of ``data`` (read by ``top``); ``host`` is this machine's name."""
    worker_listen: str | None
    if "worker_listen" in data and data["worker_listen"] in (None, False, "", "off", "none"):
        worker_listen = None
    else:
        worker_listen = read_listen(top, "worker_listen", "127.0.0.1", 9101)
    worker = WorkerConfig(
        name=top.string("worker_name", host),
        external_name=top.string("externalName", host),
        listen=worker_listen,
        connectivity_check=top.boolean("connectivity_check", True),
        connectivity_check_port=top.integer("connectivity_check_port", 80, 1, 65535),
        wireguard_backend=top.choice("wireguard_backend", "auto", BACKENDS),
        uapi_socket_dir=top.string("uapi_socket_dir", "/var/run/wireguard"),
        metrics_interval=top.number("metrics_interval", 60.0, 0),
        cleanup_interval=top.number("cleanup_interval", 3600.0, 0),
        peer_timeout=top.number("peer_timeout", 3 * 3600.0, 0),
        keep_keys=_read_key_list(top, "keep_keys"),
        max_batch=top.integer("max_batch", 10_000, 1),
    )
    # Both end up on the bus, where brokers refuse what breaks the wire contract.
    problem = worker_name_problem(worker.name)
    if problem is not None:
        source = "" if "worker_name" in data else " (the host name; set worker_name)"
        raise top.fail("worker_name", f"{problem}, got {worker.name!r}{source}")
    if data.get("externalName") is not None:
        # The host-name default is checked by the worker before it publishes (brokers
        # read this file too, and their host name need not be a DNS name).
        problem = host_problem(worker.external_name)
        if problem is not None:
            raise top.fail("externalName", f"{problem}, got {worker.external_name!r}")
    return worker


def _read_key_list(reader: Reader, name: str) -> frozenset[str]:
    keys = reader.string_list(name)
    for key in keys:
        problem = key_problem(key)
        if problem is not None:
            raise reader.fail(name, f"{key!r}: {problem}")
    return frozenset(keys)
