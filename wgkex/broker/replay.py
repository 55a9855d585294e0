"""Keys published lately, and re-published to a worker that may have missed them.

Why: an MQTT server that crashes (SIGKILL, power loss) restores its store from
the last save. A key it acknowledged (PUBACK) after that save and had not yet
delivered to a worker is gone, and the broker, whose outbox released the key
on the PUBACK, does not have it either. A worker's session made after the save
(its subscriptions) is gone too. Saving the store after every change closes
that gap at a price no operator should pay (a 2,000-key burst took 15 s
instead of 1 s), so the broker closes it itself, with any periodic autosave:

- :class:`~wgkex.broker.recent.RecentKeys` (in :mod:`wgkex.broker.recent`) keeps every key the MQTT server acknowledged in the last
  ``broker.replay_window`` seconds, at most ``broker.replay_limit`` of them
  (32 bytes each, packed per domain and second: 100,000 keys take about 3 MB),
  and the keys handed to the MQTT server whose PUBACK has not arrived yet.
  :class:`~wgkex.broker.recent.RecordingBus` feeds it from the key exchange's publishes.
- :class:`Replayer` re-publishes a domain's recent keys when a worker announces
  itself *live* after a possible loss: a **non-retained** status ``1`` that is
  the first from that worker since the broker's own MQTT (re)connect, or since
  the worker was last seen offline (status ``0``, its last will, or a
  connected-peer count turning ``-1``). The worker's MQTT service subscribes
  on each connect before it publishes its status on the same connection, so
  once the broker sees that status the subscription exists and the replayed
  keys reach it. A *retained* status (what the MQTT server hands the broker
  from its store on subscribe) says nothing about the worker being back, and
  the periodic re-announce (every ``metrics_interval``, for servers that do not
  deliver retained messages to wildcard subscribers) is not a transition: neither
  replays. The domains replayed are those the worker has data for; data for a
  further domain arriving while it is live replays that domain once.

A replayed key is a harmless duplicate for a worker that had it (applying a
key is idempotent). Replays go through the normal outbox, paced so that they
never take a queue slot a router's key could need: a replayed key is handed
over only while nothing waits in the outbox's queue and fewer than
:data:`REPLAY_IN_FLIGHT` replayed keys await their acknowledgement; otherwise
the replay waits for one of those or polls again shortly. A replay that meets
a full queue or a lost connection stops and counts what it skipped (the next
connect starts another one anyway). Each replay logs one summary line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from wgkex import contract
from wgkex.broker.recent import KEY_BYTES, RecentKeys, distinct_keys
from wgkex.broker.workers import WorkerPicture
from wgkex.bus import Bus, QueueFull
from wgkex.contract import Refused, key_topic

__all__ = ["REPLAY_IN_FLIGHT", "REPLAY_RETRY", "Replayer", "ReplayCounters"]

#: Replayed keys handed to the outbox and not yet acknowledged, at most, per replay.
REPLAY_IN_FLIGHT = 100

#: Seconds a replay waits before trying again while router keys wait in the outbox's queue.
REPLAY_RETRY = 0.5


@dataclass
class ReplayCounters:
    """What replays did, per domain (the broker's metrics read these at scrape time)."""

    #: domain -> keys re-published (handed to the outbox)
    replayed: dict[str, int] = field(default_factory=dict)
    #: domain -> keys not re-published: the outbox's queue was full or MQTT went away
    skipped: dict[str, int] = field(default_factory=dict)
    #: domain -> replays started
    replays: dict[str, int] = field(default_factory=dict)

    def add(self, counts: dict[str, int], domain: str, n: int) -> None:
        if n:
            counts[domain] = counts.get(domain, 0) + n


class _Replay:
    """Re-publishing one domain's recent keys for one worker, paced (see the module docstring)."""

    log = Logger()

    def __init__(self, owner: Replayer, worker: str, domain: str, packed: bytes, why: str) -> None:
        self._owner = owner
        self.worker = worker
        self.domain = domain
        #: Keys at most (repeats included), for the count of those skipped.
        self._total = len(packed) // KEY_BYTES
        self._keys = distinct_keys(packed)
        #: The next key to hand over (None: none left).
        self._key = next(self._keys, None)
        self._why = why
        self._in_flight = 0
        self.sent = 0
        self.skipped = 0
        self._retry: IDelayedCall | None = None
        self._pumping = False
        self.done = False

    def pump(self) -> None:
        """Hand over what the pacing allows now; finish when every key is handed over and acknowledged."""
        if self.done or self._pumping:
            return  # an acknowledgement that fired inside publish(): the loop below goes on
        self._pumping = True
        try:
            self._hand_over()
        finally:
            self._pumping = False
        if not self.done and self._key is None and self._in_flight == 0:
            self._finish(None)

    def _hand_over(self) -> None:
        bus = self._owner.bus
        topic = key_topic(self.domain)
        while self._key is not None and self._in_flight < REPLAY_IN_FLIGHT:
            if not bus.connected:
                self.stop("MQTT disconnected")
                return
            if bus.pending:
                if self._in_flight == 0:
                    self._wait()
                return
            try:
                d = bus.publish(topic, self._key.encode("ascii"), qos=1)
            except QueueFull:
                self.stop("the MQTT queue is full")
                return
            self._key = next(self._keys, None)
            self._in_flight += 1
            self.sent += 1
            self._owner.counters.add(self._owner.counters.replayed, self.domain, 1)
            d.addBoth(self._acknowledged)

    def _acknowledged(self, result: object) -> None:
        # A failure here is MqttStopped (the service stops): the outbox logs that, once.
        self._in_flight -= 1
        self.pump()

    def _wait(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self._owner.clock.callLater(REPLAY_RETRY, self.pump)

    def stop(self, reason: str) -> None:
        """Give up on the keys not handed over yet (counted as skipped)."""
        if self.done:
            return
        # Repeats of keys already sent count as skipped too: close enough for a rare event.
        self.skipped = self._total - self.sent if self._key is not None else 0
        self._key = None
        self._owner.counters.add(self._owner.counters.skipped, self.domain, self.skipped)
        self._finish(reason)

    def _finish(self, reason: str | None) -> None:
        self.done = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._owner.finished(self)
        if reason is None:
            self.log.info(
                "Re-published {sent} keys of domain {domain} from the last {window} s for worker {worker} ({why})",
                sent=self.sent, domain=self.domain, window=self._owner.recent.window, worker=self.worker, why=self._why,
            )
        else:
            self.log.warn(
                "Re-published {sent} keys of domain {domain} for worker {worker} ({why}); {skipped} skipped: {reason}",
                sent=self.sent, domain=self.domain, worker=self.worker, why=self._why, skipped=self.skipped,
                reason=reason,
            )


class Replayer:
    """Watches the worker reports and replays recent keys to workers that came back (module docstring).

    :meth:`report` must see each report after the :class:`WorkerPicture` has
    (:class:`~wgkex.broker.workers.WorkerTracker` calls it so); :meth:`connected`
    and :meth:`disconnected` are the bus's connect and disconnect callbacks.
    """

    log = Logger()

    def __init__(self, bus: Bus, picture: WorkerPicture, recent: RecentKeys, clock: IReactorTime) -> None:
        self.bus = bus
        self.picture = picture
        self.recent = recent
        self.clock = clock
        self.counters = ReplayCounters()
        #: worker -> domains replayed since its live status (the workers known live to this connection)
        self._live: dict[str, set[str]] = {}
        #: workers seen offline since this connection began (only for the log line's reason)
        self._were_offline: set[str] = set()
        #: (worker, domain) -> the worker's last connected-peer count there was >= 0
        self._counting: dict[tuple[str, str], bool] = {}
        self.running: list[_Replay] = []

    def attach(self) -> None:
        """Follow the bus's connection (call once, before it connects)."""
        self.bus.add_connect_callback(self.connected)
        self.bus.add_disconnect_callback(self.disconnected)

    def connected(self) -> None:
        """A new MQTT connection: no worker is known live to it yet."""
        self._live.clear()
        self._were_offline.clear()

    def disconnected(self) -> None:
        """The connection ended: running replays stop (the next live status starts new ones)."""
        for replay in list(self.running):
            replay.stop("MQTT disconnected")

    def report(self, topic: str, payload: bytes, retained: bool) -> None:
        """A worker report, after the picture took it in."""
        try:
            where = contract.report_topic(topic)
        except Refused:
            return
        name = where.worker
        state = self.picture.workers.get(name)
        if state is None or not state.online:
            self._offline(name)
            if state is None:
                for pair in [p for p in self._counting if p[0] == name]:
                    del self._counting[pair]
            return
        if where.kind == "status":
            if retained or name in self._live:
                return
            why = "back after being offline" if name in self._were_offline else "first live status on this connection"
            self._live[name] = set()
            for domain in sorted(state.data):
                self._replay(name, domain, why)
        elif where.kind == "data":
            domains = self._live.get(name)
            domain = where.domain or ""
            if domains is not None and domain in state.data and domain not in domains:
                self._replay(name, domain, "data for a further domain")
        else:
            pair = (name, where.domain or "")
            count = state.peers.get(pair[1])
            was_counting = self._counting.pop(pair, False)
            if count is not None:
                self._counting[pair] = count >= 0
                if count < 0 and was_counting:
                    self._offline(name)

    def _offline(self, name: str) -> None:
        if self._live.pop(name, None) is not None:
            self._were_offline.add(name)
        elif name in self.picture.workers:
            self._were_offline.add(name)

    def _replay(self, worker: str, domain: str, why: str) -> None:
        self._live[worker].add(domain)
        packed = self.recent.packed(domain)
        if not packed:
            return
        self.counters.add(self.counters.replays, domain, 1)
        replay = _Replay(self, worker, domain, packed, why)
        self.running.append(replay)
        replay.pump()

    def finished(self, replay: _Replay) -> None:
        if replay in self.running:
            self.running.remove(replay)
