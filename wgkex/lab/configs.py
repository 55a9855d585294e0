"""wgkex configuration files for lab processes (plain YAML, the format operators write).

The functions return the YAML document as a dict so a test can tweak a key
before :func:`write_config` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import yaml


def broker_config(
    *,
    domains: list[str],
    prefixes: list[str],
    weights: Mapping[str, int],
    mqtt_port: int,
    listen_port: int,
    mqtt_host: str = "127.0.0.1",
    keepalive: int = 5,
    reconnect_max_delay: float = 2.0,
) -> dict[str, Any]:
    """The broker's config: the original keys plus a short reconnect backoff for the lab."""
    return {
        "domains": list(domains),
        "domain_prefixes": list(prefixes),
        "workers": {name: {"weight": weight} for name, weight in weights.items()},
        "mqtt": {
            "broker_url": mqtt_host,
            "broker_port": mqtt_port,
            "keepalive": keepalive,
            "reconnect_max_delay": reconnect_max_delay,
        },
        "broker_listen": {"host": "127.0.0.1", "port": listen_port},
    }


def worker_config(
    *,
    name: str,
    external_name: str,
    domains: list[str],
    prefixes: list[str],
    mqtt_socket: str,
    keepalive: int = 5,
    reconnect_max_delay: float = 2.0,
    metrics_interval: float = 60.0,
    worker_listen: str | None = "127.0.0.1:9101",
    mqtt: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A worker's config: MQTT over the unix socket (it runs inside a namespace), UAPI backend.

    ``worker_listen`` is inside the gateway's namespace, so every gateway can
    use the same address. ``mqtt`` replaces the whole ``mqtt`` section (e.g. a
    list of TCP servers reached through a relay into the namespace).
    """
    return {
        "domains": list(domains),
        "domain_prefixes": list(prefixes),
        "worker_name": name,
        "externalName": external_name,
        "mqtt": dict(mqtt) if mqtt is not None else {
            "transport": "unix",
            "broker_url": mqtt_socket,
            "keepalive": keepalive,
            "reconnect_max_delay": reconnect_max_delay,
        },
        "wireguard_backend": "uapi",
        "metrics_interval": metrics_interval,
        "worker_listen": worker_listen if worker_listen is not None else "off",
    }


def write_config(path: str, data: Mapping[str, Any]) -> str:
    """Write ``data`` as YAML to ``path`` (mode 0600: configs may hold MQTT passwords); returns path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# written by wgkex.lab\n")
        yaml.safe_dump(dict(data), f, sort_keys=False)
    return path
