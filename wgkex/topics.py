"""The MQTT topics of docs/protocol.md, in one place for broker and worker.

| topic | payload | who publishes |
| --- | --- | --- |
| ``wireguard/{domain}/all`` | the base64 key | broker (QoS 1) |
| ``wireguard-worker/{worker}/status`` | ``1`` / ``0`` (also the last will) | worker (QoS 1, retained) |
| ``wireguard-worker/{worker}/{domain}/data`` | JSON endpoint data | worker (QoS 1, retained) |
| ``wireguard-metrics/{domain}/{worker}/connected_peers`` | integer, ``-1`` on shutdown | worker (retained) |

The worker subscribes ``wireguard/{domain}/+`` (:func:`key_filter`); the
broker subscribes the three worker filters below.
"""

from __future__ import annotations

#: Broker side: what it subscribes to for its picture of the workers.
STATUS_FILTER = "wireguard-worker/+/status"
DATA_FILTER = "wireguard-worker/+/+/data"
METRICS_FILTER = "wireguard-metrics/+/+/connected_peers"


def key_topic(domain: str) -> str:
    """Where the broker publishes a router's key for ``domain``."""
    return f"wireguard/{domain}/all"


def key_filter(domain: str) -> str:
    """What a worker subscribes to for ``domain``'s keys."""
    return f"wireguard/{domain}/+"


def status_topic(worker: str) -> str:
    """A worker's retained online state (and its last will)."""
    return f"wireguard-worker/{worker}/status"


def data_topic(worker: str, domain: str) -> str:
    """A worker's retained endpoint data for ``domain``."""
    return f"wireguard-worker/{worker}/{domain}/data"


def metric_topic(worker: str, domain: str) -> str:
    """A worker's retained connected-peer count for ``domain``."""
    return f"wireguard-metrics/{domain}/{worker}/connected_peers"
