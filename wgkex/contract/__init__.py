"""The MQTT wire contract: every topic and payload, encoded and decoded in one place.

Broker and worker read and write the bus only through this package
(docs/protocol.md, "MQTT", says the same in prose):

| message | topic | payload |
| --- | --- | --- |
| key | ``wireguard/{domain}/all`` | the base64 key (:func:`encode_key` / :func:`decode_key_message`) |
| status | ``wireguard-worker/{worker}/status`` | ``1`` / ``0`` (:func:`encode_status` / :func:`decode_status`) |
| data | ``wireguard-worker/{worker}/{domain}/data`` | JSON :class:`Endpoint` (:func:`encode_data` / :func:`decode_data`) |
| metric | ``wireguard-metrics/{domain}/{worker}/connected_peers`` | ``-1`` or 0..10,000,000 (:func:`encode_connected_peers` / :func:`decode_connected_peers`) |

The bus is untrusted. Decoders take any bytes and either return a value that
satisfies every rule or raise :class:`Refused` -- never anything else. A
refusal carries a ``kind`` and a ``reason`` from small fixed sets
(:data:`KEY_REASONS`, :data:`REPORT_KINDS`, :data:`REPORT_REASONS`), so that
they can label Prometheus counters, and a message that is safe to log
(anything quoted from the bus goes through :func:`shown`). Sizes are checked
before decoding and numbers are bounded by their text before conversion, so no
payload can make a reader do unbounded work or arithmetic on a huge integer.

Encoders refuse (``ValueError``) to produce what the decoders would refuse, so
a wgkex process never publishes a message another one throws away.

The modules of this package, each imported from here by the rest of wgkex:
:mod:`~wgkex.contract.topics` (where messages go),
:mod:`~wgkex.contract.codecs` (what they hold),
:mod:`~wgkex.contract.rules` (names, addresses, numbers) and
:mod:`~wgkex.contract.refusals` (how a reader says no).
"""

from wgkex.contract.codecs import (
    MAX_DATA_PAYLOAD,
    MAX_KEY_PAYLOAD,
    MAX_METRIC_PAYLOAD,
    MAX_STATUS_PAYLOAD,
    OFFLINE,
    ONLINE,
    Endpoint,
    ReportTopic,
    check_domain,
    decode_connected_peers,
    decode_data,
    decode_key,
    decode_key_message,
    decode_status,
    encode_connected_peers,
    encode_data,
    encode_key,
    encode_status,
    key_domain,
    report_topic,
)
from wgkex.contract.refusals import KEY_REASONS, REPORT_KINDS, REPORT_REASONS, Kind, Refused, shown
from wgkex.contract.rules import (
    MAX_CONNECTED_PEERS,
    MAX_NAME,
    NOT_ELIGIBLE,
    host_problem,
    link_address_problem,
    port_problem,
    worker_name_problem,
)
from wgkex.contract.topics import (
    DATA_FILTER,
    METRICS_FILTER,
    REPORT_FILTERS,
    STATUS_FILTER,
    data_topic,
    key_filter,
    key_topic,
    metric_topic,
    published_key_domain,
    status_topic,
)

__all__ = [
    "DATA_FILTER",
    "Endpoint",
    "KEY_REASONS",
    "Kind",
    "MAX_CONNECTED_PEERS",
    "MAX_DATA_PAYLOAD",
    "MAX_KEY_PAYLOAD",
    "MAX_METRIC_PAYLOAD",
    "MAX_NAME",
    "MAX_STATUS_PAYLOAD",
    "METRICS_FILTER",
    "NOT_ELIGIBLE",
    "OFFLINE",
    "ONLINE",
    "REPORT_FILTERS",
    "REPORT_KINDS",
    "REPORT_REASONS",
    "Refused",
    "ReportTopic",
    "STATUS_FILTER",
    "check_domain",
    "data_topic",
    "decode_connected_peers",
    "decode_data",
    "decode_key",
    "decode_key_message",
    "decode_status",
    "encode_connected_peers",
    "encode_data",
    "encode_key",
    "encode_status",
    "host_problem",
    "key_domain",
    "key_filter",
    "key_topic",
    "published_key_domain",
    "link_address_problem",
    "metric_topic",
    "port_problem",
    "report_topic",
    "shown",
    "status_topic",
    "worker_name_problem",
]
