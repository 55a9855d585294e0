"""Stale peers: find and remove them (peer, route, FDB entry), in the pool.

Rules (docs/protocol.md, "Stale peers"), decided by the pure :func:`stale_keys`:

* a peer whose latest handshake is older than ``peer_timeout`` is stale;
* a peer that never shook hands is stale only once the worker has known it
  (:class:`~wgkex.worker.known.KnownKeys`) for longer than ``peer_timeout``; a
  peer the worker has never seen before gets "now" as its first-seen time;
* a key on ``keep_keys`` is never stale.

:class:`Sweeper` runs a sweep every ``cleanup_interval`` (the service owns the
timer). The whole dump-decide-remove job runs in the pool on a snapshot of the
first-seen times, so a 100,000-peer interface never blocks the reactor; the
result updates the memory and the metrics on the reactor and is logged as one
line. :meth:`Sweeper.seed` is the start-up dump that fills the memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.config import Config
from wgkex.keys import lladdr
from wgkex.worker.backend import InterfaceMissing, PeerInfo, PeersFailed
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.peers import Interfaces
from wgkex.worker.pool import Backends, Pool, gc_paused


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


@dataclass
class DomainSweep:
    """The outcome of sweeping one domain."""

    peers: int = 0
    removed: list[str] = field(default_factory=list)
    unseen: list[str] = field(default_factory=list)
    error: str | None = None


def sweep_stale(
    backends: Backends,
    interfaces: Mapping[str, Interfaces],
    first_seen: Mapping[str, Mapping[str, float]],
    keep: frozenset[str],
    now: float,
    timeout: float,
) -> dict[str, DomainSweep]:
    """Pool thread: dump each interface, remove its stale peers with their routes and FDB entries."""
    results: dict[str, DomainSweep] = {}
    for domain, ifaces in interfaces.items():
        result = results[domain] = DomainSweep()
        with gc_paused:  # a dump of 100,000 peers: see wgkex.worker.pool
            try:
                peers = backends.wireguard.peers(ifaces.wg)
            except InterfaceMissing:
                result.error = f"interface {ifaces.wg} does not exist"
                continue
            except Exception as exc:
                result.error = f"dumping the peers of {ifaces.wg} failed: {type(exc).__name__}: {exc}"
                continue
            result.peers = len(peers)
            stale, result.unseen = stale_keys(peers, first_seen.get(domain, {}), keep, now, timeout)
            del peers
        if not stale:
            continue
        problems = []
        try:
            backends.wireguard.remove_peers(ifaces.wg, stale)
        except PeersFailed as exc:
            problems.append(f"{len(exc.failed)} of {len(stale)} stale peers could not be removed: {exc}")
            stale = [k for k in stale if k not in exc.failed]
        except Exception as exc:
            result.error = f"removing {len(stale)} stale peers from {ifaces.wg} failed: {type(exc).__name__}: {exc}"
            continue
        result.removed = stale
        addresses = [lladdr(k) for k in stale]
        for what, step in (
            ("routes", lambda: backends.rtnl.delete_routes(ifaces.wg, addresses)),
            ("FDB entries", lambda: backends.rtnl.delete_fdb(ifaces.vx, addresses)),
        ):
            try:
                step()
            except Exception as exc:
                problems.append(f"deleting the {what} failed: {type(exc).__name__}: {exc}")
        if problems:
            result.error = "; ".join(problems)
    return results


def dump_keys(backends: Backends, interfaces: Mapping[str, str]) -> dict[str, list[str] | str]:
    """Pool thread: the keys of every peer per domain (or why they could not be read)."""
    result: dict[str, list[str] | str] = {}
    for domain, wg in interfaces.items():
        try:
            with gc_paused:  # a dump of 100,000 peers: see wgkex.worker.pool
                result[domain] = [p.public_key for p in backends.wireguard.peers(wg)]
        except InterfaceMissing:
            result[domain] = f"interface {wg} does not exist"
        except Exception as exc:
            result[domain] = f"dumping the peers of {wg} failed: {type(exc).__name__}: {exc}"
    return result


class Sweeper:
    """Seeds the key memory at start-up and sweeps stale peers on request."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        pool: Pool,
        known: KnownKeys,
        metrics: WorkerMetrics,
        clock: IReactorTime,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interfaces = {d: Interfaces(config.wg_interface(d), config.vx_interface(d)) for d in config.domains}
        self._keep = config.worker.keep_keys
        self._timeout = config.worker.peer_timeout
        self._pool = pool
        self._known = known
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._running: Deferred[dict[str, DomainSweep]] | None = None
        #: The last sweep that finished: (clock time it started, seconds, outcome per domain).
        self.last_sweep: tuple[float, float, dict[str, DomainSweep]] | None = None

    def seed(self) -> Deferred[None]:
        """Remember every peer already on the interfaces as first seen now."""
        now = self._clock.seconds()
        dumped = self._pool.run(dump_keys, {d: i.wg for d, i in self._interfaces.items()})

        def got(result: Mapping[str, list[str] | str]) -> None:
            for domain, keys in result.items():
                if isinstance(keys, str):
                    self.log.warn("Start-up dump of domain {domain}: {problem}", domain=domain, problem=keys)
                    continue
                self._known.seed(domain, keys, now)
                self.log.info(
                    "Found {count} peer(s) on {wg} at start-up", count=len(keys), wg=self._interfaces[domain].wg
                )

        d: Deferred[None] = dumped.addCallback(got)
        d.addErrback(lambda f: self.log.failure("the start-up peer dump failed", f))
        return d

    def sweep(self) -> Deferred[dict[str, DomainSweep]]:
        """Run one sweep now (or return the one already running)."""
        if self._running is not None:
            return self._running
        now = self._clock.seconds()
        started = self._monotonic()
        snapshot = self._known.snapshot()
        d = self._pool.run(sweep_stale, self._interfaces, snapshot, self._keep, now, self._timeout)
        d.addCallbacks(self._done, self._failed, callbackArgs=(now, started))
        self._running = d

        def finished(result: dict[str, DomainSweep]) -> dict[str, DomainSweep]:
            self._running = None
            return result

        d.addBoth(finished)
        if d.called:
            self._running = None
        return d

    def _done(self, results: dict[str, DomainSweep], now: float, started: float) -> dict[str, DomainSweep]:
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
