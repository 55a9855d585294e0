"""The last hour of the broker, in bounded memory: what the status page draws.

Two kinds of series, one slot per minute, in fixed rings of :data:`MINUTES`
slots (a slot is reused when its minute comes round again, so memory does not
grow with time or with the request rate):

- per configured domain, key exchange requests: accepted (``ok``) and refused,
  counted by reason (the ``reason`` labels of ``wgkex_broker_refused``). Requests
  that name no configured domain (a body that is not JSON, an unknown domain, a
  rate-limited client) are counted in one extra ring, ``no_domain``;
- per gateway and domain, the connected peers from its metrics reports
  (``wireguard-metrics/{domain}/{worker}/connected_peers``): the last value
  reported in each minute. At most :data:`MAX_SERIES` such series are kept; a
  series with no report for an hour is dropped first.

The clock is injected (the reactor; ``task.Clock`` in tests). Everything runs on
the reactor thread: recording a request is a few list operations.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from wgkex.bus import Bus, ForwardingBus, MessageCallback
from wgkex.contract import Refused, decode_connected_peers, report_topic

#: Minutes of history kept and shown.
MINUTES = 60
#: Seconds per slot.
MINUTE = 60

#: Peer series (gateway x domain) kept at most; a bus full of made-up names cannot grow memory.
MAX_SERIES = 512

#: Why a key exchange was refused, in the order the page stacks them.
REASONS = (
    "bad_request", "bad_key", "bad_domain", "key_list", "rate_limited",
    "no_worker", "queue_full", "publish_failed", "too_large",
)


class MinuteCounts:
    """Requests per minute of the last hour: accepted, and refused per reason."""

    __slots__ = ("_starts", "_ok", "_refused")

    def __init__(self) -> None:
        self._starts = [-1] * MINUTES
        self._ok = [0] * MINUTES
        self._refused: list[dict[str, int] | None] = [None] * MINUTES

    def add(self, minute: int, reason: str | None) -> None:
        """Count one request in ``minute`` (minutes since the epoch); ``reason`` None means accepted."""
        i = minute % MINUTES
        if self._starts[i] != minute:
            self._starts[i] = minute
            self._ok[i] = 0
            self._refused[i] = None
        if reason is None:
            self._ok[i] += 1
            return
        refused = self._refused[i]
        if refused is None:
            refused = self._refused[i] = {}
        refused[reason] = refused.get(reason, 0) + 1

    def minutes(self, current: int) -> list[dict[str, Any]]:
        """The :data:`MINUTES` minutes up to ``current``, oldest first (zeros where nothing came)."""
        out = []
        for minute in range(current - MINUTES + 1, current + 1):
            i = minute % MINUTES
            if self._starts[i] == minute:
                ok, refused = self._ok[i], dict(self._refused[i] or {})
            else:
                ok, refused = 0, {}
            out.append({"start": minute * MINUTE, "ok": ok, "refused": refused})
        return out


class PeerSeries:
    """One gateway's connected peers on one domain: the last report of each minute."""

    __slots__ = ("_starts", "_values", "last")

    def __init__(self) -> None:
        self._starts = [-1] * MINUTES
        self._values = [0] * MINUTES
        #: The minute of the newest report.
        self.last = -1

    def add(self, minute: int, peers: int) -> None:
        i = minute % MINUTES
        self._starts[i] = minute
        self._values[i] = peers
        self.last = max(self.last, minute)

    def points(self, current: int) -> list[dict[str, int]]:
        """``{"start", "peers"}`` for each minute of the last hour with a report, oldest first."""
        return [
            {"start": minute * MINUTE, "peers": self._values[minute % MINUTES]}
            for minute in range(current - MINUTES + 1, current + 1)
            if self._starts[minute % MINUTES] == minute
        ]


class History:
    """The broker's last hour; fed by the API (requests) and the bus (peer reports)."""

    def __init__(self, domains: Iterable[str], clock: IReactorTime, max_series: int = MAX_SERIES) -> None:
        self._clock = clock
        self._max_series = max_series
        self._requests = {domain: MinuteCounts() for domain in domains}
        self._no_domain = MinuteCounts()
        #: (domain, worker) -> series
        self._peers: dict[tuple[str, str], PeerSeries] = {}

    def _minute(self) -> int:
        return int(self._clock.seconds() // MINUTE)

    def registration(self, domain: str | None, reason: str | None = None) -> None:
        """Count a key exchange request: ``reason`` None if accepted, else why it was refused."""
        counts = self._requests.get(domain) if domain is not None else None
        (counts or self._no_domain).add(self._minute(), reason)

    def peers_reported(self, worker: str, domain: str, peers: int) -> None:
        """A gateway reported its connected peers on a configured domain."""
        if domain not in self._requests:
            return
        minute = self._minute()
        series = self._peers.get((domain, worker))
        if series is None:
            if len(self._peers) >= self._max_series and not self._drop_stale(minute):
                return
            series = self._peers[(domain, worker)] = PeerSeries()
        series.add(minute, peers)

    def _drop_stale(self, minute: int) -> bool:
        """Drop every series without a report in the last hour; True if that made room."""
        for key in [k for k, s in self._peers.items() if s.last <= minute - MINUTES]:
            del self._peers[key]
        return len(self._peers) < self._max_series

    def on_metric(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT callback for ``wireguard-metrics/+/+/connected_peers``.

        Malformed reports are skipped quietly: the worker tracker, subscribed to
        the same topics, counts and logs them.
        """
        if not payload:
            return
        try:
            where = report_topic(topic)
            peers = decode_connected_peers(payload)
        except Refused:
            return
        if where.kind == "metric" and where.domain is not None:
            self.peers_reported(where.worker, where.domain, peers)

    def snapshot(self) -> dict[str, Any]:
        """The last hour as JSON-able data (the ``history`` section of ``/api/v1/status``)."""
        current = self._minute()
        domains: dict[str, Any] = {}
        for domain in sorted(self._requests):
            peers = {
                worker: points
                for (d, worker), series in sorted(self._peers.items())
                if d == domain and (points := series.points(current))
            }
            domains[domain] = {"registrations": self._requests[domain].minutes(current), "peers": peers}
        return {"minutes": MINUTES, "domains": domains, "no_domain": self._no_domain.minutes(current)}


class AlsoTo(ForwardingBus):
    """A :class:`~wgkex.bus.Bus` that hands one filter's messages to a second callback too.

    The worker tracker subscribes through it, so the history sees every metrics
    report without a second MQTT subscription of the same filter. Everything
    else goes straight to the bus.
    """

    def __init__(self, bus: Bus, topic_filter: str, also: MessageCallback) -> None:
        super().__init__(bus)
        self._filter = topic_filter
        self._also = also

    def subscribe(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        if topic_filter != self._filter:
            self._bus.subscribe(topic_filter, qos, callback)
            return
        also = self._also

        def both(topic: str, payload: bytes, retained: bool) -> None:
            callback(topic, payload, retained)
            also(topic, payload, retained)

        self._bus.subscribe(topic_filter, qos, both)
