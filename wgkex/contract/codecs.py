"""The encoder and decoder of every MQTT message: key, status, data, connected peers.

Decoders take any bytes and either return a value that satisfies every rule
of :mod:`wgkex.contract.rules` or raise :class:`~wgkex.contract.refusals.Refused`
-- never anything else. Sizes are checked before decoding and numbers are
bounded by their text before conversion, so no payload can make a reader do
unbounded work or arithmetic on a huge integer. Encoders refuse
(``ValueError``) to produce what the decoders would refuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Literal, cast

from wgkex.contract.refusals import Refused, shown
from wgkex.contract.rules import (
    MAX_CONNECTED_PEERS,
    NOT_ELIGIBLE,
    host_problem,
    link_address_problem,
    port_problem,
    worker_name_problem,
)
from wgkex.keys import key_problem

# -- key (broker -> workers) -------------------------------------------------------------------

MAX_KEY_PAYLOAD = 64


def encode_key(key: str) -> bytes:
    """The payload of a key message; ``ValueError`` for an invalid key."""
    problem = key_problem(key)
    if problem is not None:
        raise ValueError(problem)
    return key.encode("ascii")


def key_domain(topic: str, domains: Container[str]) -> str:
    """The domain of a message on ``wireguard/{domain}/+``; :class:`Refused` unless it is one of ``domains``."""
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "wireguard":
        raise Refused("key", "topic", f"unexpected topic {shown(topic)}")
    if parts[1] not in domains:
        raise Refused("key", "domain", f"domain {shown(parts[1])} is not configured here")
    return parts[1]


def decode_key(payload: bytes) -> str:
    """The key in a key message (surrounding whitespace tolerated); :class:`Refused` if invalid."""
    if len(payload) > MAX_KEY_PAYLOAD:
        raise Refused("key", "payload", f"payload of {len(payload)} bytes is too long for a key")
    try:
        key = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        raise Refused("key", "payload", f"payload is not ASCII ({len(payload)} bytes)") from None
    problem = key_problem(key)
    if problem is not None:
        raise Refused("key", "key", f"{problem}: {shown(key, 60)}")
    return key


def decode_key_message(topic: str, payload: bytes, domains: Container[str]) -> tuple[str, str]:
    """``(domain, key)`` of a key message, or :class:`Refused` saying why not."""
    domain = key_domain(topic, domains)
    try:
        return domain, decode_key(payload)
    except Refused as refused:
        raise Refused("key", refused.reason, f"{refused} on {shown(topic)}") from None


# -- worker reports (workers -> broker) --------------------------------------------------------


@dataclass(frozen=True)
class ReportTopic:
    """Where a worker report came from: its kind, the worker, and the domain (None for status)."""

    kind: Literal["status", "data", "metric"]
    worker: str
    domain: str | None


def report_topic(topic: str) -> ReportTopic:
    """Split a report topic and check its worker name; :class:`Refused` otherwise.

    The domain is returned as found: whether it is served here is the reader's
    question (:func:`check_domain`), since deleting a retained message of any
    domain is not an error.
    """
    parts = topic.split("/")
    where: ReportTopic
    if len(parts) == 3 and parts[0] == "wireguard-worker" and parts[2] == "status":
        where = ReportTopic("status", parts[1], None)
    elif len(parts) == 4 and parts[0] == "wireguard-worker" and parts[3] == "data":
        where = ReportTopic("data", parts[1], parts[2])
    elif len(parts) == 4 and parts[0] == "wireguard-metrics" and parts[3] == "connected_peers":
        where = ReportTopic("metric", parts[2], parts[1])
    else:
        raise Refused("topic", "topic", f"unexpected topic {shown(topic)}")
    problem = worker_name_problem(where.worker)
    if problem is not None:
        raise Refused(where.kind, "worker_name", f"{problem}, got {shown(where.worker)}")
    return where


def check_domain(where: ReportTopic, domains: Container[str]) -> None:
    """:class:`Refused` when the report is about a domain not in ``domains``."""
    if where.domain is not None and where.domain not in domains:
        raise Refused(where.kind, "domain", f"domain {shown(where.domain)} is not configured here")


MAX_STATUS_PAYLOAD = 16
ONLINE = b"1"
OFFLINE = b"0"


def encode_status(online: bool) -> bytes:
    """``1`` online, ``0`` offline (also the last will)."""
    return ONLINE if online else OFFLINE


def decode_status(payload: bytes) -> bool:
    """True for ``1``, False for ``0`` (surrounding whitespace tolerated); :class:`Refused` otherwise."""
    if len(payload) > MAX_STATUS_PAYLOAD:
        raise Refused("status", "too_large", f"status payload of {len(payload)} bytes")
    text = payload.strip()
    if text == ONLINE:
        return True
    if text == OFFLINE:
        return False
    raise Refused("status", "value", f"status must be 1 or 0, got {shown(text, 16)}")


MAX_METRIC_PAYLOAD = 32
_INTEGER = re.compile(rb"-?[0-9]+")


def encode_connected_peers(count: int) -> bytes:
    """The decimal count, ``-1`` for "not eligible"; ``ValueError`` outside the contract's range."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise ValueError(f"connected peers must be an integer, got {type(count).__name__}")
    if count != NOT_ELIGIBLE and not 0 <= count <= MAX_CONNECTED_PEERS:
        raise ValueError(f"connected peers must be -1 or 0..{MAX_CONNECTED_PEERS}, got {count}")
    return str(count).encode("ascii")


def decode_connected_peers(payload: bytes) -> int:
    """``-1`` or a count in 0..10,000,000, bounded before conversion; :class:`Refused` otherwise."""
    if len(payload) > MAX_METRIC_PAYLOAD:
        raise Refused("metric", "too_large", f"connected_peers payload of {len(payload)} bytes")
    text = payload.strip()
    if _INTEGER.fullmatch(text) is None:
        raise Refused("metric", "syntax", f"connected_peers must be a decimal integer, got {shown(text, 32)}")
    if text == b"-1":
        return NOT_ELIGIBLE
    # At most 8 digits (leading zeros aside) can be in range: never convert more.
    digits = text.lstrip(b"-").lstrip(b"0") or b"0"
    if text.startswith(b"-") or len(digits) > len(str(MAX_CONNECTED_PEERS)) or int(digits) > MAX_CONNECTED_PEERS:
        raise Refused(
            "metric", "range", f"connected_peers must be -1 or 0..{MAX_CONNECTED_PEERS}, got {shown(text, 32)}"
        )
    return int(digits)


MAX_DATA_PAYLOAD = 4096


def _got(value: object) -> str:
    return shown(value, 60) if isinstance(value, str) else f"a JSON {type(value).__name__}"


def _endpoint_problem(address: object, port: object, key: object, link: object) -> tuple[str, str] | None:
    """``(reason, message)`` for the first data field that breaks the rules, or None."""
    checks = (
        ("address", "ExternalAddress", address, host_problem(address)),
        ("port", "Port", port, port_problem(port)),
        ("public_key", "PublicKey", key, key_problem(key)),
        ("link_address", "LinkAddress", link, link_address_problem(link)),
    )
    for reason, field, value, problem in checks:
        if problem is not None:
            return reason, f"{field}: {problem}, got {_got(value)}"
    return None


@dataclass(frozen=True)
class Endpoint:
    """A worker's data for one domain: what routers of that domain connect to."""

    #: ``ExternalAddress``: a DNS host name or an IP address literal.
    address: str
    #: ``Port``: the WireGuard interface's listen port.
    port: int
    #: ``PublicKey``: the WireGuard interface's public key.
    public_key: str
    #: ``LinkAddress``: the interface's IPv6 link-local address, without zone.
    link_address: str

    def problem(self) -> tuple[str, str] | None:
        """``(reason, message)`` for the first field that breaks the rules, or None."""
        return _endpoint_problem(self.address, self.port, self.public_key, self.link_address)

    def reply(self) -> dict[str, object]:
        """The API v2 reply body as Gluon reads it (Port as a string, as the original sends)."""
        return {
            "Endpoint": {
                "Address": self.address,
                "Port": str(self.port),
                "AllowedIPs": [self.link_address],
                "PublicKey": self.public_key,
            }
        }


def encode_data(endpoint: Endpoint) -> bytes:
    """The retained data message, shaped as the original writes it; ``ValueError`` if a field is invalid."""
    problem = endpoint.problem()
    if problem is not None:
        raise ValueError(problem[1])
    return json.dumps(
        {
            "ExternalAddress": endpoint.address,
            "Port": endpoint.port,
            "PublicKey": endpoint.public_key,
            "LinkAddress": endpoint.link_address,
        }
    ).encode("ascii")


def decode_data(payload: bytes) -> Endpoint:
    """The :class:`Endpoint` in a data message (other JSON fields ignored); :class:`Refused` otherwise."""
    if len(payload) > MAX_DATA_PAYLOAD:
        raise Refused("data", "too_large", f"data payload of {len(payload)} bytes (at most {MAX_DATA_PAYLOAD})")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("data", "encoding", "data payload is not UTF-8") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise Refused("data", "syntax", "data payload is not JSON") from None
    if not isinstance(value, dict):
        raise Refused("data", "value", f"data payload must be a JSON object, got {type(value).__name__}")
    address, port, key, link = (value.get(f) for f in ("ExternalAddress", "Port", "PublicKey", "LinkAddress"))
    problem = _endpoint_problem(address, port, key, link)
    if problem is not None:
        raise Refused("data", *problem)
    return Endpoint(cast(str, address), cast(int, port), cast(str, key), cast(str, link))
