"""The worker's service tree and the logic that ties its pieces together.

:func:`build_worker` assembles (without starting anything)::

    WorkerRoot
     ├─ BackendPool     the netlink/UAPI thread and its backends   (starts first)
     ├─ WorkerService   keys in, reports out, sweeps, interface watch, connectivity check
     ├─ status HTTP     /metrics and /healthz on worker_listen     (optional; a busy address is retried)
     └─ MQTT            subscriptions, last will                    (starts last)

Start order is the list order: the pool exists before a key can arrive, the
start-up dump is queued before the first key. Stop order is explicit
(:meth:`WorkerRoot.stopService`) because the contract needs it: the worker
publishes metric ``-1`` per domain and status ``0`` synchronously in its
``stopService``, *before* MQTT's ``stopService`` runs (which waits for their
acknowledgements, then disconnects cleanly); meanwhile queued keys are still
applied; the pool stops (closing the backends in their thread) only after that.

Timers of :class:`WorkerService`:

* interface watch every ``watch_interval`` (5 s): re-applies known keys of a
  domain whose interfaces were recreated, republishes its data, keeps the
  connectivity check bound;
* metrics every ``metrics_interval``: status and data again, connected-peer
  counts (also right after each connect) and a retry of keys that failed;
* sweep every ``cleanup_interval``: stale peers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.config import Config
from wgkex.reactor import IReactor
from wgkex.contract import key_filter
from wgkex.bus import Bus
from wgkex.worker.http import ConnectivityCheck, Listen, StatusListener, status_site
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.peers import KeyApplier
from wgkex.worker.pool import Pool
from wgkex.worker.report import Reporter
from wgkex.worker.status import worker_status
from wgkex.worker.sweep import Sweeper
from wgkex.worker.watch import InterfaceState, InterfaceWatch, if_index

#: Seconds between interface checks (cheap: two ioctls and one netlink request per domain).
WATCH_INTERVAL = 5.0
#: Longest wait at shutdown for queued keys to be applied.
DRAIN_TIMEOUT = 10.0


class WorkerService(Service):
    """Keys from the bus to the kernel, state back to the bus, and the housekeeping timers."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: IReactor,
        bus: Bus,
        pool: Pool,
        *,
        metrics: WorkerMetrics | None = None,
        ifindex: Callable[[str], int | None] = if_index,
        listen: Listen | None = None,
        watch_interval: float = WATCH_INTERVAL,
        drain_timeout: float = DRAIN_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.setName("worker")
        self.config = config
        self._clock = reactor
        self._bus = bus
        self._watch_interval = watch_interval
        self._drain_timeout = drain_timeout
        self.metrics = metrics or WorkerMetrics(config.domains)
        self.known = KnownKeys(config.domains)
        self.applier = KeyApplier(config, pool, self.known, self.metrics, reactor, monotonic, own_key=self._own_key)
        self.reporter = Reporter(config, bus, pool, self.metrics, reactor)
        self.sweeper = Sweeper(config, pool, self.known, self.metrics, reactor, monotonic)
        self.watch = InterfaceWatch(config, pool, self._interface_changed, ifindex)
        self.connectivity: ConnectivityCheck | None = None
        if config.worker.connectivity_check:
            self.connectivity = ConnectivityCheck(
                reactor,
                config.worker.connectivity_check_port,
                {d: config.wg_interface(d) for d in config.domains},
                listen,
            )
        self._loops: list[LoopingCall] = []
        # Registering callbacks opens nothing; the MQTT service (re)subscribes on every connect.
        for domain in config.domains:
            bus.subscribe(key_filter(domain), 1, self.applier.on_message)
        bus.add_connect_callback(self._connected)
        bus.add_disconnect_callback(self._disconnected)

    def _own_key(self, domain: str) -> str | None:
        """The public key of ``domain``'s interface, as last published (None before that)."""
        data = self.reporter.published_data.get(domain)
        return data.public_key if data is not None else None

    # -- lifecycle ----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "Worker {name} serving domains {domains}", name=self.config.worker.name, domains=", ".join(self.config.domains)
        )
        w = self.config.worker
        self.sweeper.seed()
        self._start_loop(self._check_interfaces, self._watch_interval, now=True)
        self._start_loop(self._metrics_tick, w.metrics_interval, now=False)
        self._start_loop(self.sweeper.sweep, w.cleanup_interval, now=False)

    def _start_loop(self, fn: Callable[[], object], interval: float, now: bool) -> None:
        loop = LoopingCall(fn)
        loop.clock = self._clock
        self._loops.append(loop)
        loop.start(interval, now=now).addErrback(self._loop_failed, getattr(fn, "__name__", repr(fn)))

    def _loop_failed(self, failure: Failure, name: str) -> None:
        self.log.failure("the periodic task {name} stopped", failure, name=name)

    def stopService(self) -> Deferred[object]:
        """Publish the goodbye now, then close listeners and apply what is queued."""
        super().stopService()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        self.reporter.goodbye()
        waits: list[Deferred[Any]] = [self.applier.stop(self._drain_timeout)]
        if self.connectivity is not None:
            waits.append(self.connectivity.stop())
        return DeferredList(waits, consumeErrors=True)  # type: ignore[return-value]

    # -- MQTT ---------------------------------------------------------------------------------

    def _connected(self) -> None:
        self.metrics.mqtt_connected.set(1)
        if self.running:
            self.log.info("Connected to MQTT: publishing status, data and peer counts")
            self.reporter.on_connect()

    def _disconnected(self) -> None:
        self.metrics.mqtt_connected.set(0)

    # -- timers -------------------------------------------------------------------------------

    def _metrics_tick(self) -> Deferred[None]:
        self.applier.retry_failed()
        # Status and data again before the counts: see wgkex.worker.report for why.
        self.reporter.reannounce()
        return self.reporter.publish_counts()

    def _check_interfaces(self) -> Deferred[None]:
        d = self.watch.check()
        if self.connectivity is not None:
            connectivity = self.connectivity
            d.addCallback(lambda _: connectivity.sync(self.watch.states))
        return d

    def _interface_changed(self, domain: str, old: InterfaceState | None, new: InterfaceState) -> None:
        wg, vx = self.config.wg_interface(domain), self.config.vx_interface(domain)
        if not new.complete:
            missing = " and ".join(name for name, index in ((wg, new.wg_index), (vx, new.vx_index)) if index is None)
            if old is None or old.complete:
                self.log.warn("Domain {domain}: {missing} missing; its keys fail until it exists", domain=domain, missing=missing)
            return
        recreated = old is not None and (old.wg_index != new.wg_index or old.vx_index != new.vx_index)
        if recreated:
            # The peers come back without a handshake: give them peer_timeout to make one.
            self.known.restart_clock(domain, self._clock.seconds())
            count = self.applier.reapply(domain)
            self.log.info(
                "Domain {domain}: {wg}/{vx} (re)appeared; re-applying {count} known key(s)",
                domain=domain,
                wg=wg,
                vx=vx,
                count=count,
            )
        else:
            failed = sorted(self.applier.failed_keys(domain))
            if failed:
                self.applier.reapply(domain, failed)
        if old is not None and self._bus.connected and (recreated or old.link_address != new.link_address):
            self.reporter.publish_data([domain])

    def status(self) -> Mapping[str, object]:
        """What ``/api/v1/status`` shows (see :mod:`wgkex.worker.status`)."""
        return worker_status(self.config, self.watch.states, self.applier, self.sweeper, self.metrics,
                             self._bus.connected, self._clock.seconds())

    def health(self) -> Mapping[str, object]:
        """Details for /healthz."""
        return {"mqtt_connected": self._bus.connected, "pending_keys": self.applier.pending}


class WorkerRoot(MultiService):
    """Starts children in order; stops the worker, then MQTT and the status listener, then the pool."""

    def __init__(
        self,
        pool: IService,
        worker: WorkerService,
        bus: IService,
        status: IService | None = None,
        support: Sequence[IService] = (),
    ) -> None:
        super().__init__()
        self.pool = pool
        self.worker = worker
        self.bus = bus
        self.status = status
        #: Started first, stopped last (logging set-up, the SIGTERM handler).
        self.support = list(support)
        for child in (*self.support, pool, worker, status, bus):
            if child is not None:
                child.setServiceParent(self)

    def stopService(self) -> Deferred[object]:
        Service.stopService(self)
        # The worker publishes its goodbye synchronously here, before MQTT's stopService
        # (which waits for the acknowledgements) is even called.
        worker_done = maybeDeferred(self.worker.stopService)
        others = [maybeDeferred(self.bus.stopService)]
        if self.status is not None:
            others.append(maybeDeferred(self.status.stopService))
        # The pool goes last: queued keys are still being applied through it.
        worker_done.addBoth(lambda _: self.pool.stopService())
        done = DeferredList([worker_done, *others], consumeErrors=True)

        def stop_support(_: object) -> Deferred[Any]:
            return DeferredList([maybeDeferred(s.stopService) for s in reversed(self.support)], consumeErrors=True)

        return done.addBoth(stop_support)


def build_worker(
    config: Config,
    reactor: IReactor,
    bus: Bus,
    pool: Pool,
    *,
    support: Sequence[IService] = (),
    **kwargs: Any,
) -> WorkerRoot:
    """The whole worker tree from a config, an MQTT service and a pool (nothing started).

    ``bus`` and ``pool`` must also be services (``MqttService``, ``BackendPool``);
    ``support`` services start first and stop last; ``kwargs`` go to :class:`WorkerService`.
    """
    worker = WorkerService(config, reactor, bus, pool, **kwargs)
    status = None
    if config.worker.listen is not None:
        status = StatusListener(reactor, config.worker.listen, status_site(worker.metrics, worker.health, worker.status))
        status.setName("status-http")
    return WorkerRoot(pool, worker, bus, status, support)  # type: ignore[arg-type]
