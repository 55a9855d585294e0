"""The broker's picture of the workers, built only from MQTT messages.

Workers publish three kinds of retained messages (docs/protocol.md, "MQTT"):

- ``wireguard-worker/{worker}/status``: ``1`` online, ``0`` offline (also the last will);
- ``wireguard-worker/{worker}/{domain}/data``: JSON with ExternalAddress, Port, PublicKey, LinkAddress;
- ``wireguard-metrics/{domain}/{worker}/connected_peers``: an integer, ``-1`` on shutdown.

:class:`WorkerPicture` is the pure state (fed with topic + payload, asked for
v2 candidates); :class:`WorkerTracker` is the thin binding that subscribes it
to an MQTT service. Because the messages are retained, a broker that starts
after the workers gets the whole picture at once, and several brokers on one
bus hold the same picture without talking to each other.

Payloads from the bus are untrusted: anything malformed (non-integer metric,
non-JSON or wrongly typed data, unknown domain, empty names) is refused with a
reason, counted per kind and logged (at most one line per kind and interval),
and never changes the picture. An empty payload is how a retained message is
deleted on MQTT, so it clears what it stood for (never an error, even for a
worker or domain not known here); a worker with none of its messages left is
forgotten, exactly as a broker started afterwards would not know it.

While the bus is down the picture is kept as it was: v2 keeps answering from
the last known state, and the retained messages re-sent on reconnect bring it
up to date.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from wgkex.broker.selection import Candidate, choose
from wgkex import topics
from wgkex.bus import Bus
from wgkex.keys import key_problem

STATUS_TOPIC = topics.STATUS_FILTER
DATA_TOPIC = topics.DATA_FILTER
METRICS_TOPIC = topics.METRICS_FILTER

#: How many distinct worker names the picture holds; beyond that new names are refused,
#: so a misbehaving client on the bus cannot grow the broker's memory without bound.
MAX_WORKERS = 4096


class BadMessage(ValueError):
    """A bus message that cannot be used; ``kind`` is its metric label, the text says why."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class Endpoint:
    """What a worker tells routers of domain D to connect to (its ``data`` message)."""

    address: str
    port: int
    public_key: str
    link_address: str

    def reply(self) -> dict[str, object]:
        """The v2 reply body as Gluon reads it (Port as a string, as the original sends)."""
        return {
            "Endpoint": {
                "Address": self.address,
                "Port": str(self.port),
                "AllowedIPs": [self.link_address],
                "PublicKey": self.public_key,
            }
        }


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


def parse_endpoint(payload: bytes) -> Endpoint:
    """Validate a ``data`` payload; raise :class:`BadMessage` saying what is wrong."""
    try:
        value = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadMessage("data", "payload is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise BadMessage("data", f"payload must be a JSON object, got {type(value).__name__}")
    address = value.get("ExternalAddress")
    port = value.get("Port")
    public_key = value.get("PublicKey")
    link = value.get("LinkAddress")
    if not isinstance(address, str) or not address or len(address) > 253 or any(c.isspace() for c in address):
        raise BadMessage("data", "ExternalAddress must be a non-empty host name or address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise BadMessage("data", "Port must be an integer in 1..65535")
    problem = key_problem(public_key)
    if problem is not None:
        raise BadMessage("data", f"PublicKey: {problem}")
    assert isinstance(public_key, str)
    if not isinstance(link, str):
        raise BadMessage("data", "LinkAddress must be a string")
    try:
        ipaddress.IPv6Address(link)
    except ValueError:
        raise BadMessage("data", "LinkAddress must be an IPv6 address") from None
    return Endpoint(address, port, public_key, link)


def parse_metric(payload: bytes) -> int:
    """Validate a ``connected_peers`` payload: an integer >= -1."""
    try:
        value = int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BadMessage("metric", "connected_peers must be an integer") from None
    if value < -1:
        raise BadMessage("metric", f"connected_peers must be >= -1, got {value}")
    return value


def parse_status(payload: bytes) -> bool:
    """Validate a ``status`` payload: ``1`` online, ``0`` offline."""
    text = payload.strip()
    if text == b"1":
        return True
    if text == b"0":
        return False
    raise BadMessage("status", "status must be 1 or 0")


def _valid_name(name: str) -> bool:
    return bool(name) and name.isprintable() and len(name) <= 255


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
        #: kind -> number of refused messages
        self.invalid: dict[str, int] = {}

    # -- feeding -------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """Apply one bus message; raise :class:`BadMessage` (picture unchanged) if unusable."""
        parts = topic.split("/")
        if len(parts) == 3 and parts[0] == "wireguard-worker" and parts[2] == "status":
            self._status(parts[1], payload)
        elif len(parts) == 4 and parts[0] == "wireguard-worker" and parts[3] == "data":
            self._data(parts[1], parts[2], payload)
        elif len(parts) == 4 and parts[0] == "wireguard-metrics" and parts[3] == "connected_peers":
            self._metric(parts[2], parts[1], payload)
        else:
            raise BadMessage("topic", f"unexpected topic {topic[:100]!r}")

    def _worker(self, name: str, kind: str) -> WorkerState:
        if not _valid_name(name):
            raise BadMessage(kind, "empty or unprintable worker name")
        state = self.workers.get(name)
        if state is None:
            if len(self.workers) >= self._max_workers:
                raise BadMessage(kind, f"more than {self._max_workers} workers; ignoring new name")
            state = self.workers[name] = WorkerState(name)
        return state

    def _domain(self, domain: str, kind: str) -> None:
        if domain not in self.domains:
            raise BadMessage(kind, f"domain {domain[:100]!r} is not configured on this broker")

    def _cleared(self, name: str) -> WorkerState | None:
        """The worker an empty payload (a deleted retained message) is about, if known."""
        state = self.workers.get(name)
        if state is not None:
            state.last_seen = self._clock.seconds()
        return state

    def _forget_if_gone(self, state: WorkerState) -> None:
        # Once all its retained messages are deleted a broker started now would not
        # know the worker either (a decommissioned gateway): drop it.
        if state.forgotten():
            del self.workers[state.name]

    def _status(self, name: str, payload: bytes) -> None:
        if payload == b"":
            state = self._cleared(name)
            if state is not None:
                state.online = state.has_status = False
                self._forget_if_gone(state)
            return
        online = parse_status(payload)
        state = self._worker(name, "status")
        state.online = online
        state.has_status = True
        state.last_seen = self._clock.seconds()

    def _data(self, name: str, domain: str, payload: bytes) -> None:
        if payload == b"":
            state = self._cleared(name)
            if state is not None:
                state.data.pop(domain, None)
                self._forget_if_gone(state)
            return
        self._domain(domain, "data")
        endpoint = parse_endpoint(payload)
        state = self._worker(name, "data")
        state.data[domain] = endpoint
        state.last_seen = self._clock.seconds()

    def _metric(self, name: str, domain: str, payload: bytes) -> None:
        if payload == b"":
            state = self._cleared(name)
            if state is not None:
                state.peers.pop(domain, None)
                self._forget_if_gone(state)
            return
        self._domain(domain, "metric")
        value = parse_metric(payload)
        state = self._worker(name, "metric")
        state.peers[domain] = value
        state.last_seen = self._clock.seconds()

    def count_invalid(self, kind: str) -> None:
        self.invalid[kind] = self.invalid.get(kind, 0) + 1

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
    """Subscribes a :class:`WorkerPicture` to the worker topics; logs and counts bad messages."""

    log = Logger()

    def __init__(
        self,
        picture: WorkerPicture,
        clock: IReactorTime,
        on_invalid: Callable[[str], None] | None = None,
        log_interval: float = 60.0,
    ) -> None:
        self.picture = picture
        self._clock = clock
        self._on_invalid = on_invalid
        self._log_interval = log_interval
        #: kind -> (clock time of the last logged line, messages suppressed since)
        self._last_logged: dict[str, tuple[float, int]] = {}

    def subscribe(self, bus: Bus) -> None:
        for topic in (STATUS_TOPIC, DATA_TOPIC, METRICS_TOPIC):
            bus.subscribe(topic, 1, self.message)

    def message(self, topic: str, payload: bytes, retained: bool) -> None:
        """MQTT callback: apply a message; a bad one is counted and logged, never raised."""
        try:
            self.picture.handle(topic, payload)
        except BadMessage as exc:
            self.picture.count_invalid(exc.kind)
            if self._on_invalid is not None:
                self._on_invalid(exc.kind)
            self._complain(exc.kind, topic, str(exc))

    def _complain(self, kind: str, topic: str, reason: str) -> None:
        """Log a refused message, at most once per kind and interval (with a suppressed count)."""
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
            topic=topic[:200],
            reason=reason,
            suppressed=suppressed,
        )
