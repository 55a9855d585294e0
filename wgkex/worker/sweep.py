"""Stale peers: find and remove them (peer, route, FDB entry), without delaying new keys.

Rules (docs/protocol.md, "Stale peers"), decided by the pure :func:`stale_keys`:

* a peer whose latest handshake is older than ``peer_timeout`` is stale;
* a peer that never shook hands is stale only once the worker has known it
  (:class:`~wgkex.worker.known.KnownKeys`) for longer than ``peer_timeout``; a
  peer the worker has never seen before gets "now" as its first-seen time;
* a key on ``keep_keys`` is never stale.

:class:`Sweeper` runs a sweep every ``cleanup_interval`` (the service owns the
timer), in the pool's *housekeeping* lane, so a key arriving meanwhile is
applied at once in the *keys* lane (:mod:`wgkex.worker.pool`):

1. :func:`find_stale` dumps each interface and decides on a snapshot of the
   first-seen times (a 100,000-peer dump never touches the reactor);
2. :func:`remove_chunk` removes the stale peers and their routes,
   :data:`SWEEP_CHUNK` keys per job, so the WireGuard device and rtnetlink
   are never held long at a time;
3. :func:`delete_fdb_entries` deletes their FDB entries in one job, as the
   worker appended them (via ``wg-<D>``): the FDB is dumped only for entries
   made some other way.

Before each removal job, keys received again from the bus since the sweep
began are taken out (their routers are alive); a key received while its
removal job ran is re-applied right after it. The result updates the memory
and the metrics on the reactor and is logged as one line. :meth:`Sweeper.seed`
is the start-up dump that fills the memory.

After a dump that took long, the next sweep waits, and the peer count reuses what the dump
counted (:mod:`wgkex.worker.dumps`).

Measured with ``bench/sweep_latency.py`` (100,000 peers and FDB entries,
``cleanup_interval`` 0.05 s, a key every 0.25 s on average; a shared 2-core
machine), publish-to-installed p50/p99/max: 40.5/54.2/54.3 s when keys queued
behind the sweep in one thread; 0.13/1.84/2.02 s with the lanes and chunks
(load 5-12); 26/618/664 ms (load 5) once the fake daemon no longer scanned
all its peers on every set, where every key over 150 ms had arrived while the
daemon built a dump (0.4-0.8 s, its device locked) or queued behind such a
key; with the sweeps paced 19/202/1062 ms over 741 keys in 180 s (load 2-4):
each key over 140 ms arrived during one of the 4 dumps (3 of them the peer
count of ``metrics_interval``) or queued behind one that did. The real
wireguard-go behaves alike: a set sent during a dump of 65,530 peers waits
0.5-0.7 s (``bench/uapi_dump_lock.py``). With one pacing for every dump
(:mod:`wgkex.worker.dumps`: the count reuses the last dump, 0.5 % of the time
at most): 15.7/40.2/113 ms over 1,179 keys in 300 s (load 3.2), one dump
(0.32 s) in the whole run; the 10 keys published during the sweep: p99 91 ms.
The kernel backend dumps in chunks and has no such wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.config import Config
from wgkex.keys import lladdr
from wgkex.worker.backend import InterfaceMissing, PeerInfo, PeersFailed
from wgkex.worker.dumps import DumpPacing, PeerCount, count_peers_of, timed_dump
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.domains import Interfaces
from wgkex.worker.pool import Backends, Pool


def stale_keys(
    peers: Iterable[PeerInfo],
    first_seen: Mapping[str, float],
    keep: frozenset[str],
    now: float,
    timeout: float,
) -> tuple[list[str], list[str]]:
    """``(stale, unseen)``: keys to remove, and never-handshaked keys the worker did not know yet."""
    stale: list[str] = []
    unseen: list[str] = []
    for peer in peers:
        key = peer.public_key
        if key in keep:
            continue
        # wireguard reports "never" as 0; backends should say None, accept both.
        if peer.last_handshake:
            if now - peer.last_handshake > timeout:
                stale.append(key)
            continue
        seen = first_seen.get(key)
        if seen is None:
            unseen.append(key)
        elif now - seen > timeout:
            stale.append(key)
    return stale, unseen


#: Stale peers removed per job: the WireGuard device (wireguard-go's UAPI lock, the
#: kernel's device lock) and rtnetlink are held at most that long at a time.
SWEEP_CHUNK = 256

@dataclass
class DomainSweep:
    """The outcome of sweeping one domain."""

    peers: int = 0
    #: What the dump counted (None when it could not be read): the peer count may publish it.
    count: PeerCount | None = None
    #: How long the dump took (seconds, reading and parsing it): at least as long as the
    #: device was held for it.
    dump_seconds: float = 0.0
    #: Decided stale by the dump (the removal jobs may spare some).
    stale: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    def finish(self) -> None:
        """Fold the problems of the removal jobs into :attr:`error`."""
        if self.problems:
            self.error = "; ".join(([self.error] if self.error else []) + self.problems)


def find_stale(
    backends: Backends,
    interfaces: Mapping[str, Interfaces],
    first_seen: Mapping[str, Mapping[str, float]],
    keep: frozenset[str],
    now: float,
    timeout: float,
    monotonic: Callable[[], float] = time.monotonic,
) -> dict[str, DomainSweep]:
    """Housekeeping lane: dump each interface and decide which of its peers are stale (``DomainSweep.stale``)."""
    results: dict[str, DomainSweep] = {}
    for domain, ifaces in interfaces.items():
        result = results[domain] = DomainSweep()
        with backends.gc_pause:  # a dump of 100,000 peers: see wgkex.worker.pool.GcPause
            try:
                peers, result.dump_seconds = timed_dump(backends, ifaces.wg, monotonic)
            except InterfaceMissing:
                result.error = f"interface {ifaces.wg} does not exist"
                continue
            except Exception as exc:
                result.error = f"dumping the peers of {ifaces.wg} failed: {type(exc).__name__}: {exc}"
                continue
            result.peers = len(peers)
            result.count = count_peers_of((p.last_handshake for p in peers), now)
            result.stale, result.unseen = stale_keys(peers, first_seen.get(domain, {}), keep, now, timeout)
            del peers
    return results


def remove_chunk(backends: Backends, ifaces: Interfaces, keys: Sequence[str]) -> tuple[list[str], list[str]]:
    """Housekeeping lane: remove these peers and their routes; ``(removed keys, problems)``."""
    problems: list[str] = []
    try:
        backends.wireguard.remove_peers(ifaces.wg, keys)
    except PeersFailed as exc:
        problems.append(f"{len(exc.failed)} of {len(keys)} stale peers could not be removed: {exc}")
        keys = [k for k in keys if k not in exc.failed]
    except Exception as exc:
        return [], [f"removing {len(keys)} stale peers from {ifaces.wg} failed: {type(exc).__name__}: {exc}"]
    try:
        backends.rtnl.delete_routes(ifaces.wg, [lladdr(k) for k in keys])
    except Exception as exc:
        problems.append(f"deleting the routes failed: {type(exc).__name__}: {exc}")
    return list(keys), problems


def delete_fdb_entries(backends: Backends, ifaces: Interfaces, keys: Sequence[str]) -> list[str]:
    """Housekeeping lane: delete the FDB entries of these (removed) keys; the problems, if any."""
    try:
        backends.rtnl.delete_fdb(ifaces.vx, [lladdr(k) for k in keys], ifaces.wg)
    except Exception as exc:
        return [f"deleting the FDB entries failed: {type(exc).__name__}: {exc}"]
    return []


@dataclass(frozen=True)
class DomainKeys:
    """The start-up dump of one domain: every peer's key, what it counted, how long it held the device."""

    keys: list[str]
    count: PeerCount
    dump_seconds: float


def dump_keys(
    backends: Backends, interfaces: Mapping[str, str], now: float, monotonic: Callable[[], float] = time.monotonic
) -> dict[str, DomainKeys | str]:
    """Pool thread: the keys of every peer per domain (or why they could not be read)."""
    result: dict[str, DomainKeys | str] = {}
    for domain, wg in interfaces.items():
        try:
            with backends.gc_pause:  # a dump of 100,000 peers: see wgkex.worker.pool.GcPause
                peers, held = timed_dump(backends, wg, monotonic)
                result[domain] = DomainKeys(
                    [p.public_key for p in peers], count_peers_of((p.last_handshake for p in peers), now), held
                )
                del peers
        except InterfaceMissing:
            result[domain] = f"interface {wg} does not exist"
        except Exception as exc:
            result[domain] = f"dumping the peers of {wg} failed: {type(exc).__name__}: {exc}"
    return result


class Sweeper:
    """Seeds the key memory at start-up and sweeps stale peers on request, in the housekeeping lane."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        interfaces: Mapping[str, Interfaces],
        lane: Pool,
        known: KnownKeys,
        metrics: WorkerMetrics,
        clock: IReactorTime,
        reapply: Callable[[str, Sequence[str]], object] = lambda domain, keys: None,
        monotonic: Callable[[], float] = time.monotonic,
        pacing: DumpPacing | None = None,
    ) -> None:
        """``pacing``: the worker's one :class:`~wgkex.worker.dumps.DumpPacing`, shared with the
        peer count (by default one of its own, paced unless the backend is the kernel's)."""
        self._interfaces = interfaces
        self._keep = config.worker.keep_keys
        self._timeout = config.worker.peer_timeout
        self._cleanup_interval = config.worker.cleanup_interval
        self._lane = lane
        self._known = known
        self._metrics = metrics
        self._clock = clock
        #: Queues keys again on the keys lane (the applier's reapply).
        self._reapply = reapply
        self._monotonic = monotonic
        self._running: Deferred[dict[str, DomainSweep]] | None = None
        self._stopping = False
        self.pacing = pacing if pacing is not None else DumpPacing(config.worker.wireguard_backend != "kernel", monotonic)
        #: The last sweep that finished: (clock time it started, seconds, outcome per domain).
        self.last_sweep: tuple[float, float, dict[str, DomainSweep]] | None = None

    def seed(self) -> Deferred[None]:
        """Remember every peer already on the interfaces as first seen now."""
        now = self._clock.seconds()
        started = self._monotonic()
        dumped = self._lane.run(dump_keys, {d: i.wg for d, i in self._interfaces.items()}, now, self._monotonic)

        def got(result: Mapping[str, DomainKeys | str]) -> None:
            read: dict[str, DomainKeys] = {}
            for domain, found in result.items():
                if isinstance(found, str):
                    self.log.warn("Start-up dump of domain {domain}: {problem}", domain=domain, problem=found)
                    continue
                read[domain] = found
                self._known.seed(domain, found.keys, now)
                self.log.info(
                    "Found {count} peer(s) on {wg} at start-up", count=len(found.keys), wg=self._interfaces[domain].wg
                )
            self.pacing.dumped(
                started, {d: (f.dump_seconds, len(f.keys)) for d, f in read.items()}, {d: f.count for d, f in read.items()}
            )

        d: Deferred[None] = dumped.addCallback(got)
        d.addErrback(lambda f: self.log.failure("the start-up peer dump failed", f))
        return d

    def sweep(self) -> Deferred[dict[str, DomainSweep]]:
        """Run one sweep now (or return the one already running; or nothing while dumps wait, see
        :mod:`wgkex.worker.dumps`)."""
        if self._running is not None:
            return self._running
        if not self.pacing.allows_dump():
            return succeed({})
        started = self._monotonic()
        now = self._clock.seconds()
        snapshot = self._known.snapshot()
        d = self._lane.run(
            find_stale, self._interfaces, snapshot, self._keep, now, self._timeout, self._monotonic
        )
        d.addCallback(self._remove)
        d.addCallbacks(self._done, self._failed, callbackArgs=(now, started))
        self._running = d

        def finished(result: dict[str, DomainSweep]) -> dict[str, DomainSweep]:
            self._running = None
            return result

        d.addBoth(finished)
        if d.called:
            self._running = None
        return d

    @inlineCallbacks
    def _remove(self, results: dict[str, DomainSweep]) -> Generator[Deferred[Any], Any, dict[str, DomainSweep]]:
        """One removal job after the other; new keys never wait for more than one of them."""
        for domain, result in results.items():
            ifaces = self._interfaces[domain]
            for start in range(0, len(result.stale), SWEEP_CHUNK):
                keys = self._not_received_again(domain, result.stale[start : start + SWEEP_CHUNK])
                if not keys or self._stopping:
                    continue
                removed, problems = yield self._lane.run(remove_chunk, ifaces, keys)
                result.removed.extend(removed)
                result.problems.extend(problems)
                self._reapply_received_again(domain, removed)
            # The FDB entries of removed peers go even while stopping: their peers are gone.
            fdb = self._not_received_again(domain, result.removed)
            if fdb:
                problems = yield self._lane.run(delete_fdb_entries, ifaces, fdb)
                result.problems.extend(problems)
                self._reapply_received_again(domain, fdb)
            result.finish()
        return results

    def stop(self) -> None:
        """The worker stops: a sweep in progress submits no more removal jobs (the next sweep finds the rest)."""
        self._stopping = True

    def _not_received_again(self, domain: str, keys: Sequence[str]) -> list[str]:
        """``keys`` without those received from the bus since the sweep began (their routers are alive)."""
        again = self._known.received_during_sweep(domain)
        return [k for k in keys if k not in again] if again else list(keys)

    def _reapply_received_again(self, domain: str, removed: Sequence[str]) -> None:
        """A key received while its removal job ran lost its peer, route or FDB entry: install it again."""
        again = self._known.received_during_sweep(domain)
        if again:
            lost = [k for k in removed if k in again]
            if lost:
                self._reapply(domain, lost)

    def _pace(self, results: Mapping[str, DomainSweep], started: float) -> None:
        """Tell the pacing what the dump found and how long it held the device (see :mod:`wgkex.worker.dumps`)."""
        pause = self.pacing.dumped(
            started,
            {d: (r.dump_seconds, r.peers) for d, r in results.items()},
            {d: r.count for d, r in results.items() if r.count is not None},
        )
        if pause is not None and pause.seconds > self._cleanup_interval:
            self.log.info(
                "Next sweep in {gap:.0f} s rather than {interval:g} s: dumping {peers} peers held the"
                " WireGuard device {seconds:.2f} s, and new keys wait for that (peer counts reuse this dump meanwhile)",
                gap=pause.seconds,
                interval=self._cleanup_interval,
                peers=pause.peers,
                seconds=pause.held,
            )

    def _done(self, results: dict[str, DomainSweep], now: float, started: float) -> dict[str, DomainSweep]:
        self._pace(results, started)
        self._metrics.sweep_seconds.observe(self._monotonic() - started)
        self.last_sweep = (now, self._monotonic() - started, results)
        self._known.sweep_done(
            {d: r.removed for d, r in results.items()}, {d: r.unseen for d, r in results.items()}, now
        )
        parts = []
        for domain, result in results.items():
            if result.removed:
                self._metrics.swept_peers.labels(domain=domain).inc(len(result.removed))
            if result.error is not None:
                self._metrics.sweep_errors.labels(domain=domain).inc()
                self.log.error(
                    "Sweeping domain {domain} ({wg}): {problem}",
                    domain=domain,
                    wg=self._interfaces[domain].wg,
                    problem=result.error,
                )
            parts.append(f"{domain}: {len(result.removed)} of {result.peers}")
        total = sum(len(r.removed) for r in results.values())
        self.log.info(
            "Stale-peer sweep removed {total} peer(s) ({detail}) in {seconds:.3f} s",
            total=total,
            detail=", ".join(parts),
            seconds=self._monotonic() - started,
        )
        return results

    def _failed(self, failure: Failure) -> dict[str, DomainSweep]:
        self._known.sweep_failed()
        self.log.failure("The stale-peer sweep failed", failure)
        return {}
