"""The worker's service tree: :func:`build_worker` makes it from a configuration and a reactor.

Nothing is opened while the tree is built (twistd forks afterwards); sockets,
threads and timers start in ``startService``. The tree, in start order (an
:class:`~wgkex.services.OrderedMultiService`: it stops in reverse, each part
after the one started after it has stopped)::

    worker root
     ├─ logging, sigterm   log levels; SIGTERM ends the reactor cleanly   (stop last)
     ├─ netlink-pool       the keys and housekeeping lanes with their backends
     ├─ worker             keys in (peers.KeyApplier), sweeps, interface watch,
     │   │                 connectivity check; on stop: applies what is queued
     │   ├─ interface-watch  every 5 s, at once on start
     │   ├─ metrics          every metrics_interval: status and data again, peer counts,
     │   │                   retries of failed keys
     │   └─ sweep            every cleanup_interval: stale peers
     ├─ status-http        /metrics and /healthz on worker_listen (optional)
     ├─ mqtt               subscriptions, persistent session, last will status 0
     └─ goodbye            on stop: metric -1 per domain and status 0, before MQTT stops

So at shutdown the goodbye is queued first; MQTT then waits for its
acknowledgements and disconnects; the worker applies the keys that arrived
until then; only then do the lanes close their backends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from twisted.application.internet import TimerService
from twisted.application.service import IService, IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from wgkex.config import Config
from wgkex.reactor import IReactor
from wgkex.contract import encode_status, key_filter, status_topic
from wgkex.services import LaterTimerService, OrderedMultiService
from wgkex.bus import Bus
from wgkex.worker.domains import Interfaces, domain_interfaces
from wgkex.worker.http import ConnectivityCheck, Listen, StatusListener, status_site
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.peers import KeyApplier
from wgkex.worker.pool import Pool
from wgkex.worker.dumps import DumpPacing
from wgkex.worker.report import Reporter
from wgkex.worker.status import worker_status
from wgkex.worker.sweep import Sweeper
from wgkex.worker.watch import InterfaceState, InterfaceWatch, if_index

#: Seconds between interface checks (cheap: two ioctls and one netlink request per domain).
WATCH_INTERVAL = 5.0
#: Longest wait at shutdown for queued keys to be applied.
DRAIN_TIMEOUT = 10.0
#: What the worker says to SIGHUP.
HANGUP = "the worker has nothing to reload; restart it to apply a changed configuration"


class _Child(Protocol):
    """Enough of a service to join the tree."""

    def setServiceParent(self, parent: IServiceCollection) -> None: ...


class BusService(Bus, _Child, Protocol):
    """The MQTT service as the tree sees it (``MqttService``; tests pass a fake)."""


class LanesService(_Child, Protocol):
    """The netlink pool as the tree sees it (``BackendPool``; tests pass a fake)."""

    @property
    def keys(self) -> Pool: ...

    @property
    def housekeeping(self) -> Pool: ...


class WorkerService(MultiService):
    """Keys from the bus to the kernel and the housekeeping timers (its children)."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        interfaces: Mapping[str, Interfaces],
        reactor: IReactor,
        bus: Bus,
        lanes: LanesService,
        metrics: WorkerMetrics,
        reporter: Reporter,
        *,
        ifindex: Callable[[str], int | None] = if_index,
        listen: Listen | None = None,
        watch_interval: float = WATCH_INTERVAL,
        drain_timeout: float = DRAIN_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.setName("worker")
        self.config = config
        self._interfaces = interfaces
        self._clock = reactor
        self._bus = bus
        self._drain_timeout = drain_timeout
        self.metrics = metrics
        self.reporter = reporter
        self.known = KnownKeys(config.domains)
        self.applier = KeyApplier(
            config, interfaces, lanes.keys, self.known, metrics, reactor, monotonic, own_key=self._own_key
        )
        self.sweeper = Sweeper(
            config, interfaces, lanes.housekeeping, self.known, metrics, reactor, self.applier.reapply, monotonic,
            pacing=reporter.pacing,
        )
        self.watch = InterfaceWatch(interfaces, lanes.keys, self._interface_changed, ifindex)
        self.connectivity: ConnectivityCheck | None = None
        if config.worker.connectivity_check:
            self.connectivity = ConnectivityCheck(
                reactor, config.worker.connectivity_check_port, {d: i.wg for d, i in interfaces.items()}, listen
            )
        w = config.worker
        for name, timer in (
            ("interface-watch", TimerService(watch_interval, self._check_interfaces)),
            ("metrics", LaterTimerService(w.metrics_interval, self._metrics_tick)),
            ("sweep", LaterTimerService(w.cleanup_interval, self.sweeper.sweep)),
        ):
            timer.setName(name)
            timer.clock = reactor
            timer.setServiceParent(self)
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
        self.log.info(
            "Worker {name} serving domains {domains}", name=self.config.worker.name, domains=", ".join(self.config.domains)
        )
        # The start-up dump goes first into the housekeeping lane, before any sweep or count.
        self.sweeper.seed()
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Stop the timers (a sweep in progress ends after its current job), close the connectivity
        check, apply what is queued."""
        self.sweeper.stop()
        timers: Deferred[Any] = super().stopService()
        waits: list[Deferred[Any]] = [timers, self.applier.stop(self._drain_timeout)]
        if self.connectivity is not None:
            waits.append(self.connectivity.stop())
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

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
        wg, vx = self._interfaces[domain].wg, self._interfaces[domain].vx
        if old is not None or not new.complete:
            # The last dump's counts may no longer describe the interface: the next count reads it.
            self.reporter.pacing.forget(domain)
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


class Goodbye(Service):
    """Publishes the goodbye (metric -1 per domain, status 0) when the tree stops, before MQTT stops."""

    def __init__(self, reporter: Reporter) -> None:
        self.setName("goodbye")
        self._reporter = reporter

    def stopService(self) -> None:
        super().stopService()
        self._reporter.goodbye()


def _mqtt(config: Config, reactor: IReactor) -> BusService:
    from wgkex.mqtt import MqttService, Will

    worker = config.worker
    return MqttService(
        reactor,
        config.mqtt,
        client_id=config.mqtt.client_id or worker.name,
        clean_session=False,
        will=Will(status_topic(worker.name), encode_status(False), qos=1, retain=True),
        name="mqtt",
    )


def _pool(config: Config, reactor: IReactor, gc_pause: AbstractContextManager[None] | None) -> LanesService:
    from wgkex.worker.pool import BackendPool
    from wgkex.worker.rtnl import PyrouteRtnl
    from wgkex.worker.wireguard import AutoWireGuard

    worker = config.worker
    return BackendPool(
        reactor,
        lambda: AutoWireGuard(worker.wireguard_backend, worker.uapi_socket_dir),
        PyrouteRtnl,
        gc_pause=gc_pause,
    )


def _support(config: Config, reactor: IReactor) -> list[IService]:
    from wgkex.logs import LoggingService
    from wgkex.sigterm import CleanSigterm

    return [
        LoggingService(config.log_level, config.logging_config, config_path=config.path),
        CleanSigterm(reactor, hangup=HANGUP),
    ]


def build_worker(
    config: Config,
    reactor: IReactor,
    *,
    bus: BusService | None = None,
    pool: LanesService | None = None,
    support: Sequence[IService] | None = None,
    ifindex: Callable[[str], int | None] = if_index,
    listen: Listen | None = None,
    watch_interval: float = WATCH_INTERVAL,
    drain_timeout: float = DRAIN_TIMEOUT,
    monotonic: Callable[[], float] = time.monotonic,
    gc_pause: AbstractContextManager[None] | None = None,
) -> OrderedMultiService:
    """The whole worker tree from a configuration (nothing started, nothing opened).

    By default with the real MQTT service, netlink pool, logging set-up and
    SIGTERM handler; tests pass fakes for ``bus`` and ``pool``, ``support=()``,
    and fakes for the interface lookups (``ifindex``, ``listen``). ``gc_pause``:
    the process's collector pause (made by the tap), for the real pool.
    """
    interfaces = domain_interfaces(config)
    bus = bus if bus is not None else _mqtt(config, reactor)
    pool = pool if pool is not None else _pool(config, reactor, gc_pause)
    metrics = WorkerMetrics(config.domains)
    # One pacing of whole dumps for the sweeper and the peer count (wgkex.worker.dumps).
    pacing = DumpPacing(config.worker.wireguard_backend != "kernel", monotonic)
    reporter = Reporter(config, bus, pool.housekeeping, metrics, reactor, interfaces, pacing)
    worker = WorkerService(
        config,
        interfaces,
        reactor,
        bus,
        pool,
        metrics,
        reporter,
        ifindex=ifindex,
        listen=listen,
        watch_interval=watch_interval,
        drain_timeout=drain_timeout,
        monotonic=monotonic,
    )
    root = OrderedMultiService()
    for service in support if support is not None else _support(config, reactor):
        service.setServiceParent(root)
    pool.setServiceParent(root)
    worker.setServiceParent(root)
    if config.worker.listen is not None:
        status = StatusListener(reactor, config.worker.listen, status_site(metrics, worker.health, worker.status))
        status.setName("status-http")
        status.setServiceParent(root)
    bus.setServiceParent(root)
    Goodbye(reporter).setServiceParent(root)
    return root
