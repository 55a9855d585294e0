"""Keys from the bus, on the reactor: validated, coalesced into batches, handed to the keys lane.

:class:`KeyApplier` receives every message of ``wireguard/{domain}/+``,
validates topic, domain and key again with
:func:`wgkex.contract.decode_key_message` (the bus is untrusted; refusals are
counted by reason and logged at most once per 10 s) and queues the key. At most one
batch is in the pool's keys lane at a time; keys arriving meanwhile wait in an
insertion-ordered set (a key already waiting is dropped as a duplicate) and
become the next batch, at most ``max_batch`` keys. So a burst of thousands of
keys costs a handful of round trips. The batch itself is installed by
:func:`wgkex.worker.apply.apply_batch` in the lane's thread.

Keys that trickle in wait a few milliseconds to share a batch
(:class:`~wgkex.worker.coalesce.BatchHold`).

Every valid key is remembered in :class:`~wgkex.worker.known.KnownKeys`. Keys
that failed are retried as :mod:`wgkex.worker.retry` says: when the interface
watch sees ``wg-<D>`` or ``vx-<D>`` come back, the service calls
:meth:`KeyApplier.reapply` with every known key of the domain; keys that failed
for another reason are queued again by :meth:`KeyApplier.retry_failed` (the
service calls it with each metrics tick). The gateway's own public key (anyone
can post it: every v2 reply carries it) is refused like an invalid key.

When the MQTT server may forget a key: :meth:`KeyApplier.on_message` returns
a Deferred that fires once the key's batch has run, and the MQTT service
acknowledges the message (PUBACK) only then. A worker killed between
receiving and applying a key gets it again from its persistent session; a
repeat is harmless (peer set, route replace, FDB append are idempotent). A
key whose first attempt *failed* is acknowledged too, and retried from the
ledger above: holding it would stall the server's in-flight window (20
messages by default in mosquitto) and with it every domain, and a key that
can never be applied would come back on every reconnect. A crash loses such
a failed key's retries; its router registers again within a minute anyway.
Invalid messages are acknowledged at once. Keys not applied because the
worker stops are left unacknowledged (:class:`~wgkex.bus.Redeliver`): the
server delivers them again on the next start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.bus import Redeliver
from wgkex.config import Config
from wgkex.contract import Refused, decode_key_message
from wgkex.worker.apply import DomainResult, KeyFailure, apply_batch
from wgkex.worker.coalesce import BatchHold
from wgkex.worker.domains import Interfaces
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.pool import Pool, PoolStopped
from wgkex.worker.ratelog import RateLimitedLog
from wgkex.worker.retry import RetryLedger

#: How many keys of one failure a log line names (the count says the rest).
_SAMPLE = 5


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


class KeyApplier:
    """Validates keys from the bus, coalesces them into batches and applies them in the pool."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        interfaces: Mapping[str, Interfaces],
        lane: Pool,
        known: KnownKeys,
        metrics: WorkerMetrics,
        clock: IReactorTime,
        monotonic: Callable[[], float] = time.monotonic,
        own_key: Callable[[str], str | None] = lambda domain: None,
        coalesce: float | None = None,
    ) -> None:
        """``coalesce``: seconds a batch waits for more keys when the previous one started less
        than that ago (see the module docstring); by default the lane's ``coalesce`` attribute
        (:data:`wgkex.worker.pool.KEYS_COALESCE` for the real keys lane), else 0: never wait."""
        self._domains = frozenset(config.domains)
        #: The gateway's own public key on a domain's interface (None while unknown).
        self._own_key = own_key
        self._interfaces = interfaces
        self._max_batch = config.worker.max_batch
        self._lane = lane
        self._known = known
        self._metrics = metrics
        self._clock = clock
        self._monotonic = monotonic
        self._hold = BatchHold(clock, getattr(lane, "coalesce", 0.0) if coalesce is None else coalesce, self._kick)
        self._invalid_log = RateLimitedLog(self.log, clock, 10.0, "messages from the bus")
        # (domain, key) in arrival order; a dict is an insertion-ordered set.
        self._pending: dict[tuple[str, str], None] = {}
        # Waiting keys that came from the bus: their messages are acknowledged after the batch.
        self._waiters: dict[tuple[str, str], list[Deferred[None]]] = {}
        self.retries = RetryLedger(config.domains)
        self._busy = False
        self._kicking = False
        self._accepting = True
        self._idle_waiters: list[Deferred[None]] = []
        #: domain -> its part of the last batch that had keys of it
        self.last_batch: dict[str, LastBatch] = {}

    # -- input ------------------------------------------------------------------------------------

    def on_message(self, topic: str, payload: bytes, retained: bool = False) -> Deferred[None] | None:
        """MQTT callback for ``wireguard/{domain}/+`` (reactor thread).

        None for a message refused as invalid (acknowledge it now); else a Deferred that fires
        once the key's batch has run, or fails with :class:`~wgkex.bus.Redeliver` when the
        worker stops before applying it.
        """
        self._metrics.keys_received.inc()
        try:
            domain, key = decode_key_message(topic, payload, self._domains)
        except Refused as refused:
            self._metrics.keys_invalid.labels(reason=refused.reason).inc()
            self._invalid_log.warn("Ignoring invalid message from the bus: {problem}", problem=str(refused))
            return None
        if key == self._own_key(domain):
            # Anyone can post it (every v2 reply carries it); as a "peer" it would only
            # leave a route and an FDB entry to the gateway's own address behind.
            self._metrics.keys_invalid.labels(reason="key").inc()
            self._invalid_log.warn(
                "Ignoring the gateway's own public key {key} for {domain} from the bus", key=key, domain=domain
            )
            return None
        if not self._accepting:
            self._metrics.keys_failed.labels(domain=domain, reason="stopped").inc()
            return fail(Redeliver(f"the worker is stopping: key {key} for {domain} not applied"))
        done: Deferred[None] = Deferred()
        self._waiters.setdefault((domain, key), []).append(done)
        self.submit(domain, key)
        return done

    def submit(self, domain: str, key: str) -> bool:
        """Queue a validated key; False when it was already waiting (or the worker is stopping)."""
        if not self._accepting:
            self._metrics.keys_failed.labels(domain=domain, reason="stopped").inc()
            return False
        self._known.add(domain, key, self._clock.seconds())
        # A fresh registration earns a key its retries again.
        self.retries.registered(domain, key)
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
        due = self.retries.due(lambda domain, key: self._known.first_seen(domain, key) is not None)
        return sum(self.reapply(domain, keys) for domain, keys in due.items())

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
        return self.retries.waiting(domain)

    # -- batches ----------------------------------------------------------------------------------

    def _take_batch(self) -> tuple[dict[str, list[str]], list[Deferred[None]]]:
        """The next batch, and the Deferreds of the messages its keys came in."""
        batch: dict[str, list[str]] = {}
        waiters: list[Deferred[None]] = []
        taken = 0
        for item in self._pending:
            if taken >= self._max_batch:
                break
            batch.setdefault(item[0], []).append(item[1])
            if self._waiters:
                waiters += self._waiters.pop(item, ())
            taken += 1
        if taken == len(self._pending):
            self._pending = {}
        else:
            for domain, keys in batch.items():
                for key in keys:
                    del self._pending[(domain, key)]
        self._metrics.pending.set(len(self._pending))
        return batch, waiters

    def _kick(self) -> None:
        """Start the next batch unless one is in flight (its completion kicks again)."""
        if self._kicking:
            # Re-entered from a batch that completed synchronously: the outer loop goes on.
            return
        self._kicking = True
        try:
            while not self._busy and self._pending:
                if self._hold.holds(len(self._pending) >= self._max_batch):
                    break
                batch, waiters = self._take_batch()
                size = sum(len(keys) for keys in batch.values())
                self._busy = True
                self._hold.started()
                d = self._lane.run(apply_batch, batch, self._interfaces)
                d.addCallbacks(
                    self._batch_done,
                    self._batch_failed,
                    callbackArgs=(size, self._monotonic()),
                    errbackArgs=(batch,),
                )
                d.addErrback(lambda f: self.log.failure("recording a batch result failed", f))
                d.addBoth(self._batch_finished, waiters)
        finally:
            self._kicking = False
        if not self._busy and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _batch_finished(self, attempted: object, waiters: list[Deferred[None]]) -> None:
        self._busy = False
        if attempted is False:
            _redeliver(waiters, "the keys lane stopped before the batch ran")
        else:
            for waiter in waiters:
                waiter.callback(None)
        self._kick()

    def _batch_done(self, results: dict[str, DomainResult], size: int, started: float) -> None:
        self._metrics.batch_size.observe(size)
        seconds = self._monotonic() - started
        self._metrics.apply_seconds.observe(seconds)
        now = self._clock.seconds()
        for domain, result in results.items():
            applied, failed = len(result.applied), len(result.failed)
            self.last_batch[domain] = LastBatch(applied + failed, applied, failed, seconds, now)
            if result.applied:
                self._metrics.keys_applied.labels(domain=domain).inc(len(result.applied))
                self.retries.applied(domain, result.applied)
            if result.failed:
                self._record_failures(domain, result.failed)

    def _batch_failed(self, failure: Failure, batch: dict[str, list[str]]) -> bool:
        """Records the failure; False when the batch never ran (the worker stops)."""
        self.log.failure("applying a batch of keys failed as a whole", failure)
        stopped = failure.check(PoolStopped) is not None
        why = "stopped" if stopped else "internal"
        message = failure.getErrorMessage()
        for domain, keys in batch.items():
            self._record_failures(domain, {k: KeyFailure(why, message) for k in keys})
        return not stopped

    def _record_failures(self, domain: str, failures: Mapping[str, KeyFailure]) -> None:
        iface = self._interfaces[domain]
        given_up = self.retries.failed(domain, failures)
        if given_up:
            self.log.warn(
                "Giving up on {count} key(s) on {domain} after {retries} retries; they are tried again "
                "when their routers register again: {sample}",
                count=len(given_up),
                domain=domain,
                retries=self.retries.max_retries,
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
            self._hold.cancel()
            dropped = len(self._pending)
            self._pending = {}
            waiters, self._waiters = self._waiters, {}
            _redeliver([w for ws in waiters.values() for w in ws], "the worker stopped before applying it")
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


def _redeliver(waiters: Sequence[Deferred[None]], why: str) -> None:
    """Leave these messages unacknowledged: the MQTT server delivers them again."""
    for waiter in waiters:
        waiter.errback(Redeliver(why))
