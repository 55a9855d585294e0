"""The MQTT topics of the wire contract: where each message is published and what is subscribed to.

Readers split topics in :mod:`wgkex.contract.codecs` (:func:`~wgkex.contract.codecs.key_domain`,
:func:`~wgkex.contract.codecs.report_topic`); docs/protocol.md, "MQTT", lists them in prose.
"""

from __future__ import annotations

#: What the broker subscribes to for its picture of the workers.
STATUS_FILTER = "wireguard-worker/+/status"
DATA_FILTER = "wireguard-worker/+/+/data"
METRICS_FILTER = "wireguard-metrics/+/+/connected_peers"
REPORT_FILTERS = (STATUS_FILTER, DATA_FILTER, METRICS_FILTER)


def key_topic(domain: str) -> str:
    """Where the broker publishes a router's key for ``domain``."""
    return f"wireguard/{domain}/all"


def published_key_domain(topic: str) -> str | None:
    """The domain of ``topic`` if it is where a broker publishes keys (:func:`key_topic`), else None."""
    prefix, _, rest = topic.partition("/")
    domain, _, last = rest.partition("/")
    if prefix != "wireguard" or last != "all" or not domain:
        return None
    return domain


def key_filter(domain: str) -> str:
    """What a worker subscribes to for ``domain``'s keys (any last level, as the original)."""
    return f"wireguard/{domain}/+"


def status_topic(worker: str) -> str:
    """A worker's retained online state (and its last will)."""
    return f"wireguard-worker/{worker}/status"


def data_topic(worker: str, domain: str) -> str:
    """A worker's retained endpoint data for ``domain``."""
    return f"wireguard-worker/{worker}/{domain}/data"


def metric_topic(worker: str, domain: str) -> str:
    """A worker's retained connected-peer count for ``domain`` (note: domain first)."""
    return f"wireguard-metrics/{domain}/{worker}/connected_peers"
