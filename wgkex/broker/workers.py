"""The broker's picture of the workers, built only from MQTT messages.

Workers publish three kinds of retained reports (docs/protocol.md, "MQTT"),
decoded by :mod:`wgkex.contract`:

- ``wireguard-worker/{worker}/status``: ``1`` online, ``0`` offline (also the last will);
- ``wireguard-worker/{worker}/{domain}/data``: JSON with ExternalAddress, Port, PublicKey, LinkAddress;
- ``wireguard-metrics/{domain}/{worker}/connected_peers``: ``-1`` or 0..10,000,000.

:class:`WorkerPicture` is the pure state (fed with topic + payload, asked for
v2 candidates); :class:`WorkerTracker` is the thin binding that subscribes it
to an MQTT service. Because the reports are retained, a broker that starts
after the workers gets the whole picture at once, and several brokers on one
bus hold the same picture without talking to each other.

The rule for what the bus says: the picture is always what a broker started
right now would build from the retained reports. So

- an empty payload (how a retained message is deleted on MQTT) clears what its
  topic stood for, never an error; a worker with none of its reports left is
  forgotten;
- a report the contract refuses (:class:`~wgkex.contract.Refused`: counted by
  kind and reason, logged at most once per kind and interval) on a well-formed
  topic *also* clears what that topic stood for: invalid data leaves the worker
  without data for the domain, an invalid count without a count, an invalid
  status offline. The worker stays ineligible until it sends a valid report;
- a report refused for its topic (shape, worker name, a domain not served
  here, beyond :data:`MAX_WORKERS`) changes nothing.

While the bus is down the picture is kept as it was: v2 keeps answering from
the last known state, and the retained messages re-sent on reconnect bring it
up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from wgkex import contract
from wgkex.broker.selection import Candidate, choose
from wgkex.bus import Bus
from wgkex.contract import Endpoint, Refused, ReportTopic

__all__ = ["Endpoint", "MAX_WORKERS", "Refused", "WorkerPicture", "WorkerState", "WorkerTracker"]

#: How many distinct worker names the picture holds; beyond that new names are refused,
#: so a misbehaving client on the bus cannot grow the broker's memory without bound.
MAX_WORKERS = 4096


@dataclass
class WorkerState:
    """Everything known about one worker."""

    name: str
    online: bool = False
    #: A status message (1 or 0) is retained for this worker (not deleted).
    has_status: bool = False
    #: domain -> endpoint data
    data: dict[str, Endpoint] = field(default_factory=dict)
    #: domain -> connected peers (the last metric, plus the broker's own choices since)
    peers: dict[str, int] = field(default_factory=dict)
    #: clock time of the last message about this worker
    last_seen: float | None = None

    def eligible(self, domain: str) -> bool:
        """Online for ``domain``: status 1, data for it and a metric >= 0."""
        return self.online and domain in self.data and self.peers.get(domain, -1) >= 0

    def total_peers(self) -> int:
        """Connected peers over all domains (negative metrics count as 0)."""
        return sum(p for p in self.peers.values() if p > 0)

    def forgotten(self) -> bool:
        """Nothing about this worker is retained on the bus any more."""
        return not self.has_status and not self.data and not self.peers

    def clear(self, where: ReportTopic) -> None:
        """Forget what the report topic ``where`` said about this worker."""
        if where.kind == "status":
            self.online = self.has_status = False
        elif where.kind == "data":
            self.data.pop(where.domain or "", None)
        else:
            self.peers.pop(where.domain or "", None)


class WorkerPicture:
    """The state of every worker as the bus tells it; pure apart from the clock."""

    def __init__(
        self,
        domains: tuple[str, ...] | list[str],
        weight: Callable[[str], int],
        clock: IReactorTime,
        max_workers: int = MAX_WORKERS,
    ) -> None:
        self.domains = frozenset(domains)
        self._weight = weight
        self._clock = clock
        self._max_workers = max_workers
        self.workers: dict[str, WorkerState] = {}
        #: (kind, reason) -> number of refused reports
        self.invalid: dict[tuple[str, str], int] = {}

    # -- feeding -------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Apply one report; raise :class:`Refused` if the contract refuses it (see the module rule)."""
        where = contract.report_topic(topic)
        state = self.workers.get(where.worker)
        if not payload:
            # A deleted retained message, of any domain: forget what it said.
            if state is not None:
                self._clear(state, where)
            return
        contract.check_domain(where, self.domains)
        try:
            self._apply(where, payload, state)
        except Refused:
            if state is not None:
                self._clear(state, where)
            raise

    def _apply(self, where: ReportTopic, payload: bytes, state: WorkerState | None) -> None:
        if where.kind == "status":
            online = contract.decode_status(payload)
            state = self._known(where, state)
            state.online = online
            state.has_status = True
        elif where.kind == "data":
            assert where.domain is not None
            endpoint = contract.decode_data(payload)
            self._known(where, state).data[where.domain] = endpoint
        else:
            assert where.domain is not None
            count = contract.decode_connected_peers(payload)
            self._known(where, state).peers[where.domain] = count

    def _known(self, where: ReportTopic, state: WorkerState | None) -> WorkerState:
        """The worker's state (created now, within :data:`MAX_WORKERS`), marked as just heard from."""
        if state is None:
            if len(self.workers) >= self._max_workers:
                raise Refused(
                    where.kind, "too_many_workers", f"more than {self._max_workers} workers; ignoring a new name"
                )
            state = self.workers[where.worker] = WorkerState(where.worker)
        state.last_seen = self._clock.seconds()
        return state

    def _clear(self, state: WorkerState, where: ReportTopic) -> None:
        state.last_seen = self._clock.seconds()
        state.clear(where)
        if state.forgotten():
            # A broker started now would not know the worker either (e.g. a
            # decommissioned gateway whose reports were deleted): drop it.
            del self.workers[state.name]

    def count_invalid(self, refused: Refused) -> None:
        key = (refused.kind, refused.reason)
        self.invalid[key] = self.invalid.get(key, 0) + 1

    # -- asking --------------------------------------------------------------------------

    def eligible(self, domain: str) -> Iterator[WorkerState]:
        """Workers online for ``domain``."""
        return (w for w in self.workers.values() if w.eligible(domain))

    def candidates(self, domain: str) -> list[Candidate]:
        """The v2 candidates for ``domain`` as the selection rule sees them."""
        weight = self._weight
        return [Candidate(w.name, w.total_peers(), weight(w.name)) for w in self.eligible(domain)]

    def next_choice(self, domain: str) -> str | None:
        """The worker v2 would choose for ``domain`` now (without committing to it)."""
        return choose(self.candidates(domain))

    def choose(self, domain: str) -> tuple[str, Endpoint] | None:
        """Choose a worker for a router on ``domain`` and count it locally (peers + 1).

        The local count spreads a burst by weight before the worker's next metric
        (which replaces it) arrives. :meth:`unchoose` takes it back.
        """
        name = self.next_choice(domain)
        if name is None:
            return None
        state = self.workers[name]
        state.peers[domain] = state.peers.get(domain, 0) + 1
        return name, state.data[domain]

    def unchoose(self, name: str, domain: str) -> None:
        """Undo :meth:`choose`'s local count (the key could not be accepted after all)."""
        state = self.workers.get(name)
        if state is not None and state.peers.get(domain, 0) > 0:
            state.peers[domain] -= 1

    def online_count(self, domain: str) -> int:
        return sum(1 for _ in self.eligible(domain))

    def weight(self, name: str) -> int:
        return self._weight(name)


class WorkerTracker:
    """Subscribes a :class:`WorkerPicture` to the worker reports; logs and counts refused ones."""

    log = Logger()

    def __init__(
        self,
        picture: WorkerPicture,
        clock: IReactorTime,
        on_invalid: Callable[[Refused], None] | None = None,
        log_interval: float = 60.0,
        after: Callable[[str, bytes, bool], None] | None = None,
    ) -> None:
        self.picture = picture
        #: Sees every report once the picture took it in (or refused it): the replayer.
        self._after = after
        self._clock = clock
        self._on_invalid = on_invalid
        self._log_interval = log_interval
        #: kind -> (clock time of the last logged line, messages suppressed since)
        self._last_logged: dict[str, tuple[float, int]] = {}

    def subscribe(self, bus: Bus) -> None:
        for topic_filter in contract.REPORT_FILTERS:
            bus.subscribe(topic_filter, 1, self.message)

    def message(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT callback: apply a report; a refused one is counted and logged, never raised."""
        try:
            self.picture.handle(topic, payload)
        except Refused as refused:
            self.picture.count_invalid(refused)
            if self._on_invalid is not None:
                self._on_invalid(refused)
            self._complain(refused, topic)
        if self._after is not None:
            self._after(topic, payload, retained)

    def _complain(self, refused: Refused, topic: str) -> None:
        """Log a refused report, at most once per kind and interval (with a suppressed count)."""
        kind = refused.kind
        now = self._clock.seconds()
        last = self._last_logged.get(kind)
        if last is not None and now - last[0] < self._log_interval:
            self._last_logged[kind] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        self._last_logged[kind] = (now, 0)
        self.log.warn(
            "Ignoring {kind} message on {topic}: {reason} ({suppressed} similar messages not logged)",
            kind=kind,
            topic=contract.shown(topic, 200),
            reason=str(refused),
            suppressed=suppressed,
        )
