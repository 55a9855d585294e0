"""The apply path: keys from the bus become WireGuard peers, /128 routes and VXLAN FDB entries.

On the reactor, :class:`KeyApplier` receives every message of
``wireguard/{domain}/+``, validates topic, domain and key again with
:func:`wgkex.contract.decode_key_message` (the bus is untrusted; refusals are
counted by reason and logged at most once per 10 s) and queues
the key. At most one batch is in the netlink pool at a time; keys arriving
meanwhile wait in an insertion-ordered set (a key already waiting is dropped as
a duplicate) and become the next batch, at most ``max_batch`` keys. So a burst
of thousands of keys costs a handful of round trips.

In the pool, :func:`apply_batch` does per interface and chunk of at most
:data:`CHUNK` keys: one ``add_peers`` (if it fails with a backend error the
chunk is bisected so that one bad key cannot sink the others), one
``replace_routes`` and one ``append_fdb`` for the keys whose peer is in. The
chunks form a two-stage pipeline: while rtnetlink installs the routes and FDB
entries of chunk *n*, the pool's WireGuard thread adds the peers of chunk
*n + 1* (wireguard-go and the kernel each keep a CPU busy; in sequence a burst
would cost their sum). Every key ends either applied or failed with a reason;
the failures are counted, logged with key and interface, and kept for a retry.

Recovery: every valid key is remembered in :class:`~wgkex.worker.known.KnownKeys`.
When the interface watch sees ``wg-<D>`` or ``vx-<D>`` come back (wireguard-go
restarted: the kernel dropped the VXLAN, its routes and FDB entries), the
worker calls :meth:`KeyApplier.reapply` with every known key of the domain;
keys that failed for another reason are retried by :meth:`KeyApplier.retry_failed`
(the service calls it with each metrics tick), at most :data:`MAX_RETRIES` times.
The gateway's own public key (anyone can post it: every v2 reply carries it)
is refused like an invalid key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.config import Config
from wgkex.contract import Refused, decode_key_message
from wgkex.keys import lladdr
from wgkex.worker.backend import BackendError, InterfaceMissing, PeersFailed, WireGuard
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.pool import Backends, Pool, PoolStopped
from wgkex.worker.ratelog import RateLimitedLog

#: How many keys of one failure a log line names (the count says the rest).
_SAMPLE = 5

#: Keys per step of the apply pipeline: small enough that the steps overlap
#: well (wireguard-go takes about 80 µs per new peer), large enough that a
#: UAPI transaction and a netlink send carry many keys.
CHUNK = 256

#: Retries of a key that failed for a reason other than a missing interface
#: (say, wireguard-go's limit of 65,536 peers) before the worker gives up on it;
#: the router's next registration brings it back.
MAX_RETRIES = 3


@dataclass(frozen=True)
class Interfaces:
    """The kernel interfaces of one domain."""

    wg: str
    vx: str


@dataclass(frozen=True)
class KeyFailure:
    """Why one key could not be installed."""

    reason: str  # one of metrics.FAILURE_REASONS
    message: str


@dataclass
class DomainResult:
    """What became of one domain's keys in a batch."""

    applied: list[str] = field(default_factory=list)
    failed: dict[str, KeyFailure] = field(default_factory=dict)


@dataclass(frozen=True)
class LastBatch:
    """One domain's part of the last batch applied (for the worker's ``/api/v1/status``)."""

    keys: int
    applied: int
    failed: int
    #: Seconds the whole batch took in the pool.
    seconds: float
    #: Clock time it finished.
    at: float


def _add_peers(
    wg: WireGuard, iface: str, keys: Sequence[str], addresses: Mapping[str, str], failed: dict[str, KeyFailure]
) -> list[str]:
    """Add ``keys`` as peers; returns those that are in.

    :class:`PeersFailed` names the refused keys. After any other error the outcome is
    unknown (retrying is safe): the batch is bisected, so one bad key costs about
    ``2 log2(n)`` extra calls and never sinks the others.
    """
    if not keys:
        return []
    try:
        wg.add_peers(iface, [(k, addresses[k] + "/128") for k in keys])
        return list(keys)
    except InterfaceMissing as exc:
        for key in keys:
            failed[key] = KeyFailure("interface_missing", str(exc) or f"interface {iface} is missing")
        return []
    except PeersFailed as exc:
        # The backend knows exactly which peers it refused; all others are in.
        for key, why in exc.failed.items():
            failed[key] = KeyFailure("wireguard", why)
        return [k for k in keys if k not in exc.failed]
    except Exception as exc:
        reason = "wireguard" if isinstance(exc, BackendError) else "internal"
        if len(keys) == 1:
            failed[keys[0]] = KeyFailure(reason, f"{type(exc).__name__}: {exc}")
            return []
    middle = len(keys) // 2
    return _add_peers(wg, iface, keys[:middle], addresses, failed) + _add_peers(
        wg, iface, keys[middle:], addresses, failed
    )


def _rtnl_step(
    step: Callable[[list[str]], Mapping[str, str]],
    reason: str,
    keys: list[str],
    addresses: Mapping[str, str],
    failed: dict[str, KeyFailure],
) -> list[str]:
    """Run one rtnetlink step for ``keys``; returns the keys it did not fail."""
    if not keys:
        return []
    try:
        failures = step([addresses[k] for k in keys])
    except InterfaceMissing as exc:
        for key in keys:
            failed[key] = KeyFailure("interface_missing", str(exc))
        return []
    except Exception as exc:
        why = reason if isinstance(exc, BackendError) else "internal"
        for key in keys:
            failed[key] = KeyFailure(why, f"{type(exc).__name__}: {exc}")
        return []
    ok = []
    for key in keys:
        problem = failures.get(addresses[key])
        if problem is None:
            ok.append(key)
        else:
            failed[key] = KeyFailure(reason, problem)
    return ok


def apply_domain(
    backends: Backends, ifaces: Interfaces, keys: Sequence[str], chunk: int = CHUNK
) -> DomainResult:
    """Install ``keys`` on one domain: peers, then routes and FDB entries for the keys whose peer is in.

    Chunk by chunk; the peers of the next chunk are added (in the WireGuard
    thread) while the routes and FDB entries of this one are installed. Returns
    only once nothing it started is still running.
    """
    result = DomainResult()
    addresses = {k: lladdr(k) for k in keys}
    chunks = [list(keys[i : i + chunk]) for i in range(0, len(keys), max(1, chunk))]

    def add_peers(part: list[str]) -> Callable[[WireGuard], tuple[list[str], dict[str, KeyFailure]]]:
        def add(wireguard: WireGuard) -> tuple[list[str], dict[str, KeyFailure]]:
            failed: dict[str, KeyFailure] = {}  # its own: the job thread writes result.failed meanwhile
            return _add_peers(wireguard, ifaces.wg, part, addresses, failed), failed

        return add

    adding: Future[tuple[list[str], dict[str, KeyFailure]]] | None = None
    if chunks:
        adding = backends.start_wireguard(add_peers(chunks[0]))
    try:
        for n in range(len(chunks)):
            assert adding is not None
            with_peer, failed = adding.result()
            adding = backends.start_wireguard(add_peers(chunks[n + 1])) if n + 1 < len(chunks) else None
            result.failed.update(failed)
            routed = _rtnl_step(
                lambda addrs: backends.rtnl.replace_routes(ifaces.wg, addrs),
                "route",
                with_peer,
                addresses,
                result.failed,
            )
            # The FDB entry is independent of the route: add it for every key whose peer is in.
            with_fdb = set(
                _rtnl_step(
                    lambda addrs: backends.rtnl.append_fdb(ifaces.vx, ifaces.wg, addrs),
                    "fdb",
                    with_peer,
                    addresses,
                    result.failed,
                )
            )
            result.applied.extend(k for k in routed if k in with_fdb)
    finally:
        if adding is not None:
            # Something failed here: still let the started step end before the job does.
            try:
                adding.result()
            except BaseException:
                pass
    return result


def apply_batch(
    backends: Backends, batch: Mapping[str, Sequence[str]], interfaces: Mapping[str, Interfaces]
) -> dict[str, DomainResult]:
    """Apply a batch (domain -> keys) in the pool thread; one domain's trouble never stops another."""
    results: dict[str, DomainResult] = {}
    for domain, keys in batch.items():
        try:
            results[domain] = apply_domain(backends, interfaces[domain], keys)
        except Exception as exc:  # a bug, not a kernel refusal: still isolate it to this domain
            results[domain] = DomainResult(
                failed={k: KeyFailure("internal", f"{type(exc).__name__}: {exc}") for k in keys}
            )
    return results


class KeyApplier:
    """Validates keys from the bus, coalesces them into batches and applies them in the pool."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        pool: Pool,
        known: KnownKeys,
        metrics: WorkerMetrics,
        clock: IReactorTime,
        monotonic: Callable[[], float] = time.monotonic,
        own_key: Callable[[str], str | None] = lambda domain: None,
    ) -> None:
        self._domains = frozenset(config.domains)
        #: The gateway's own public key on a domain's interface (None while unknown).
        self._own_key = own_key
        self._interfaces = {d: Interfaces(config.wg_interface(d), config.vx_interface(d)) for d in config.domains}
        self._max_batch = config.worker.max_batch
        self._pool = pool
        self._known = known
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._invalid_log = RateLimitedLog(self.log, clock, 10.0, "messages from the bus")
        # (domain, key) in arrival order; a dict is an insertion-ordered set.
        self._pending: dict[tuple[str, str], None] = {}
        self._failed: dict[str, set[str]] = {d: set() for d in config.domains}
        #: Consecutive failed attempts per (domain, key), for MAX_RETRIES.
        self._attempts: dict[tuple[str, str], int] = {}
        self._busy = False
        self._kicking = False
        self._accepting = True
        self._idle_waiters: list[Deferred[None]] = []
        #: domain -> its part of the last batch that had keys of it
        self.last_batch: dict[str, LastBatch] = {}

    # -- input ------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """MQTT callback for ``wireguard/{domain}/+`` (reactor thread)."""
        self._metrics.keys_received.inc()
        try:
            domain, key = decode_key_message(topic, payload, self._domains)
        except Refused as refused:
            self._metrics.keys_invalid.labels(reason=refused.reason).inc()
            self._invalid_log.warn("Ignoring invalid message from the bus: {problem}", problem=str(refused))
            return
        if key == self._own_key(domain):
            # Anyone can post it (every v2 reply carries it); as a "peer" it would only
            # leave a route and an FDB entry to the gateway's own address behind.
            self._metrics.keys_invalid.labels(reason="key").inc()
            self._invalid_log.warn(
                "Ignoring the gateway's own public key {key} for {domain} from the bus", key=key, domain=domain
            )
            return
        self.submit(domain, key)

    def submit(self, domain: str, key: str) -> bool:
        """Queue a validated key; False when it was already waiting (or the worker is stopping)."""
        if not self._accepting:
            self._metrics.keys_failed.labels(domain=domain, reason="stopped").inc()
            return False
        self._known.add(domain, key, self._clock.seconds())
        # A fresh registration earns a key its retries again.
        self._attempts.pop((domain, key), None)
        if not self._enqueue(domain, key):
            self._metrics.keys_duplicate.inc()
            return False
        self._metrics.pending.set(len(self._pending))
        self._kick()
        return True

    def _enqueue(self, domain: str, key: str) -> bool:
        """Add to the pending set (the caller updates the gauge once, however many it adds)."""
        item = (domain, key)
        if item in self._pending:
            return False
        self._pending[item] = None
        return True

    def reapply(self, domain: str, keys: Sequence[str] | None = None) -> int:
        """Queue known keys of ``domain`` again (all of them by default); returns how many were queued."""
        if not self._accepting:
            return 0
        keys = self._known.keys(domain) if keys is None else keys
        queued = sum(1 for key in keys if self._enqueue(domain, key))
        self._metrics.pending.set(len(self._pending))
        if queued:
            self._metrics.keys_reapplied.labels(domain=domain).inc(queued)
            self._kick()
        return queued

    def retry_failed(self) -> int:
        """Queue again every key whose last attempt failed (and that was not swept since); returns how many."""
        total = 0
        for domain, keys in self._failed.items():
            keys.intersection_update(k for k in list(keys) if self._known.first_seen(domain, k) is not None)
            if keys:
                total += self.reapply(domain, sorted(keys))
        return total

    @property
    def pending(self) -> int:
        return len(self._pending)

    def pending_by_domain(self) -> dict[str, int]:
        """Keys waiting for the next batch, per domain."""
        counts = dict.fromkeys(sorted(self._domains), 0)
        for domain, _ in self._pending:
            counts[domain] += 1
        return counts

    def failed_keys(self, domain: str) -> frozenset[str]:
        """Keys of ``domain`` whose last attempt failed (waiting for a retry)."""
        return frozenset(self._failed[domain])

    # -- batches ----------------------------------------------------------------------------------

    def _take_batch(self) -> dict[str, list[str]]:
        batch: dict[str, list[str]] = {}
        taken = 0
        for item in self._pending:
            if taken >= self._max_batch:
                break
            batch.setdefault(item[0], []).append(item[1])
            taken += 1
        if taken == len(self._pending):
            self._pending = {}
        else:
            for domain, keys in batch.items():
                for key in keys:
                    del self._pending[(domain, key)]
        self._metrics.pending.set(len(self._pending))
        return batch

    def _kick(self) -> None:
        """Start the next batch unless one is in flight (its completion kicks again)."""
        if self._kicking:
            # Re-entered from a batch that completed synchronously: the outer loop goes on.
            return
        self._kicking = True
        try:
            while not self._busy and self._pending:
                batch = self._take_batch()
                size = sum(len(keys) for keys in batch.values())
                self._busy = True
                d = self._pool.run(apply_batch, batch, self._interfaces)
                d.addCallbacks(
                    self._batch_done,
                    self._batch_failed,
                    callbackArgs=(size, self._monotonic()),
                    errbackArgs=(batch,),
                )
                d.addErrback(lambda f: self.log.failure("recording a batch result failed", f))
                d.addBoth(self._batch_finished)
        finally:
            self._kicking = False
        if not self._busy and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _batch_finished(self, _: object) -> None:
        self._busy = False
        self._kick()

    def _batch_done(self, results: dict[str, DomainResult], size: int, started: float) -> None:
        self._metrics.batch_size.observe(size)
        seconds = self._monotonic() - started
        self._metrics.apply_seconds.observe(seconds)
        now = self._clock.seconds()
        for domain, result in results.items():
            applied, failed = len(result.applied), len(result.failed)
            self.last_batch[domain] = LastBatch(applied + failed, applied, failed, seconds, now)
            failed_set = self._failed[domain]
            if result.applied:
                self._metrics.keys_applied.labels(domain=domain).inc(len(result.applied))
                failed_set.difference_update(result.applied)
                if self._attempts:
                    for key in result.applied:
                        self._attempts.pop((domain, key), None)
            if result.failed:
                self._record_failures(domain, result.failed)

    def _batch_failed(self, failure: Failure, batch: dict[str, list[str]]) -> None:
        self.log.failure("applying a batch of keys failed as a whole", failure)
        why = "stopped" if failure.check(PoolStopped) else "internal"
        message = failure.getErrorMessage()
        for domain, keys in batch.items():
            self._record_failures(domain, {k: KeyFailure(why, message) for k in keys})

    def _record_failures(self, domain: str, failures: Mapping[str, KeyFailure]) -> None:
        iface = self._interfaces[domain]
        failed_set = self._failed[domain]
        given_up: list[str] = []
        for key, failure in failures.items():
            if failure.reason in ("interface_missing", "stopped"):
                # Retried when the interface is back (the watch re-applies) or never needed.
                failed_set.add(key)
                continue
            attempts = self._attempts.get((domain, key), 0) + 1
            if attempts > MAX_RETRIES:
                self._attempts.pop((domain, key), None)
                failed_set.discard(key)
                given_up.append(key)
            else:
                self._attempts[(domain, key)] = attempts
                failed_set.add(key)
        if given_up:
            self.log.warn(
                "Giving up on {count} key(s) on {domain} after {retries} retries; they are tried again "
                "when their routers register again: {sample}",
                count=len(given_up),
                domain=domain,
                retries=MAX_RETRIES,
                sample=", ".join(given_up[:_SAMPLE]) + (" ..." if len(given_up) > _SAMPLE else ""),
            )
        by_reason: dict[tuple[str, str], list[str]] = {}
        for key, failure in failures.items():
            by_reason.setdefault((failure.reason, failure.message), []).append(key)
        for (reason, message), keys in by_reason.items():
            self._metrics.keys_failed.labels(domain=domain, reason=reason).inc(len(keys))
            self.log.error(
                "{count} key(s) on {domain} ({wg}/{vx}) failed ({reason}): {message}; keys: {sample}",
                count=len(keys),
                domain=domain,
                wg=iface.wg,
                vx=iface.vx,
                reason=reason,
                message=message,
                sample=", ".join(keys[:_SAMPLE]) + (" ..." if len(keys) > _SAMPLE else ""),
            )

    # -- shutdown ---------------------------------------------------------------------------------

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is pending or in flight."""
        if not self._busy and not self._pending:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def stop(self, timeout: float = 10.0) -> Deferred[None]:
        """Apply what is queued (keys still arriving until MQTT disconnects included), then refuse keys.

        Gives up after ``timeout`` seconds: what is still waiting then is dropped (and logged);
        routers send their keys again when they re-register.
        """
        self._invalid_log.stop()
        d = self.when_idle()
        if not d.called:
            self.log.info("Applying {count} queued key(s) before stopping", count=len(self._pending))

        def give_up() -> None:
            self._accepting = False
            dropped = len(self._pending)
            self._pending = {}
            self._metrics.pending.set(0)
            self.log.warn(
                "Stopping with {count} key(s) not applied; routers send them again when they re-register",
                count=dropped,
            )
            # The batch still in the pool fires the idle waiters when it completes.

        timer = self._clock.callLater(timeout, give_up)

        def done(result: None) -> None:
            self._accepting = False
            if timer.active():
                timer.cancel()
            return result

        return d.addBoth(done)
