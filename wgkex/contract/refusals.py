"""How a reader of the bus says no: :class:`Refused` and the fixed sets of its labels.

A refusal carries a ``kind`` and a ``reason`` from small fixed sets
(:data:`KEY_REASONS`, :data:`REPORT_KINDS`, :data:`REPORT_REASONS`), so that
they can label Prometheus counters, and a message that is safe to log
(anything quoted from the bus goes through :func:`shown`).
"""

from __future__ import annotations

from typing import Literal

#: Why a worker refuses a key message (``wgkex_worker_keys_invalid_total{reason}``).
KEY_REASONS = ("topic", "domain", "payload", "key")

#: What kind of worker report the broker refused; ``topic`` when the topic has no known shape.
REPORT_KINDS = ("status", "data", "metric", "topic")

#: Why the broker refused a worker report (``wgkex_broker_bus_messages_invalid_total{reason}``).
REPORT_REASONS = (
    "topic",  # not one of the three report topics
    "worker_name",  # the worker level breaks the name rule
    "domain",  # a domain this reader does not serve
    "too_many_workers",  # the broker's bound on distinct workers
    "too_large",  # payload over its size limit
    "encoding",  # not ASCII / UTF-8
    "syntax",  # not the payload's grammar (not an integer, not JSON)
    "value",  # parsed, but not an allowed value or shape
    "range",  # a number out of its range
    "address",  # ExternalAddress
    "port",  # Port
    "public_key",  # PublicKey
    "link_address",  # LinkAddress
)

Kind = Literal["key", "status", "data", "metric", "topic"]


class Refused(ValueError):
    """A bus message that breaks the contract. ``kind``/``reason`` label counters; ``str()`` says why."""

    def __init__(self, kind: Kind, reason: str, message: str) -> None:
        super().__init__(message)
        self.kind: Kind = kind
        self.reason = reason


def shown(text: str | bytes, limit: int = 80) -> str:
    """``text`` from the bus made safe for a log line: at most ``limit`` characters, ASCII-escaped, quoted."""
    cut = text[:limit]
    more = "..." if len(text) > limit else ""
    return ascii(cut) + more
