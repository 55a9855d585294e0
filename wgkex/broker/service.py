"""The broker's service tree, built from the configuration by :func:`build_broker`.

The tree is one :class:`~wgkex.services.OrderedMultiService` (as the worker's):
its children start in this order and stop in the reverse one, each only after
the one after it has stopped:

- ``logging``: applies ``log_level`` / ``logging_config``;
- ``keylists``: reads the key block/allow lists, re-reads them on SIGHUP;
- ``mqtt``: the MQTT connection; the worker picture subscribes through it; keys
  not yet acknowledged are kept in a spool under ``broker.state_dir``, keys
  acknowledged in the last ``broker.replay_window`` seconds in memory, for a
  worker back on the bus (:mod:`wgkex.broker.replay`);
- ``sigterm``: a clean SIGTERM exits with status 0;
- ``http``: the listener for ``broker_listen`` (:class:`wgkex.listen.ListenService`,
  any Twisted server endpoint description; ``backlog=`` is added for
  tcp/ssl/unix ones when absent, since Twisted's default of 50 drops
  connections under bursts of routers).

Nothing is opened while the tree is built (twistd forks afterwards). The
listener binds in ``privilegedStartService``, which runs on the whole tree
before any ``startService``: a port that cannot be bound stops the process with
one line before MQTT connects. On stop the listener goes first (it was added
last), so no new request arrives while MQTT flushes what was queued (bounded),
and logging goes last, so that what the others log while stopping is kept.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from twisted.internet.interfaces import IReactorTime

from wgkex.broker.api import BrokerApi
from wgkex.broker.history import AlsoTo, History
from wgkex.broker.keylists import KeyLists, KeyListService
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.ratelimit import RateLimiter
from wgkex.broker.recent import RecentKeys, RecordingBus
from wgkex.broker.replay import Replayer
from wgkex.broker.site import BrokerSite, make_site
from wgkex.broker.workers import WorkerPicture, WorkerTracker
from wgkex.config import Config
from wgkex.contract import METRICS_FILTER
from wgkex.listen import ListenService, with_backlog
from wgkex.logs import LoggingService
from wgkex.mqtt import MqttService
from wgkex.mqtt.spool import Spool
from wgkex.reactor import IReactor
from wgkex.services import OrderedMultiService
from wgkex.sigterm import CleanSigterm

__all__ = ["Broker", "build_broker", "too_large_counter", "with_backlog"]

_ENDPOINTS = {b"/api/v1/wg/key/exchange": "v1", b"/api/v2/wg/key/exchange": "v2"}


@dataclass(frozen=True)
class Broker:
    """One broker: the service tree twistd runs, and the parts tests and tools look at."""

    service: OrderedMultiService
    mqtt: MqttService
    picture: WorkerPicture
    tracker: WorkerTracker
    metrics: BrokerMetrics
    history: History
    api: BrokerApi
    site: BrokerSite
    listener: ListenService


def too_large_counter(metrics: BrokerMetrics, history: History) -> Callable[[bytes], None]:
    """What the site calls for a 413 it answered by itself (before any resource saw the request)."""

    def count(path: bytes) -> None:
        endpoint = _ENDPOINTS.get(path.split(b"?", 1)[0], "other")
        metrics.refused.labels("too_large").inc()
        if endpoint != "other":
            history.registration(None, "too_large")
        metrics.observe(endpoint, 413, None)

    return count


#: File descriptors kept free of HTTP connections: MQTT, logs, key lists, the listener itself.
FD_RESERVE = 64


def open_files() -> int:
    """This process's soft limit of open files (``ulimit -n``)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_limit(open_files: int) -> int:
    """How many HTTP connections may be open at once under ``open_files`` (``broker.max_connections: 0``).

    Beyond this the site replaces the connection that waited longest, so
    ``accept()`` never fails for lack of descriptors (twisted.web would then spin
    on the listening socket and fresh clients would wait in the kernel's queue).
    """
    return max(16, open_files - FD_RESERVE)


def build_broker(
    config: Config,
    reactor: IReactor,
    mqtt_factory: Callable[..., MqttService] = MqttService,
) -> Broker:
    """Build (not start) the whole broker for ``config`` on ``reactor``."""
    clock: IReactorTime = reactor
    b = config.broker
    spool = Spool(b.state_dir, label=f"wgkex broker: {config.path}: broker.state_dir")
    mqtt = mqtt_factory(reactor, config.mqtt, name="mqtt", spool=spool)
    picture = WorkerPicture(config.domains, config.weight, clock)
    metrics = BrokerMetrics(picture, lambda: mqtt)
    recent = RecentKeys(clock, b.replay_window, b.replay_limit)
    replayer = Replayer(mqtt, picture, recent, clock)
    replayer.attach()
    metrics.watch_replays(replayer.counters, recent.__len__)
    tracker = WorkerTracker(picture, clock, on_invalid=metrics.count_bus_invalid, after=replayer.report)
    history = History(config.domains, clock)
    tracker.subscribe(AlsoTo(mqtt, METRICS_FILTER, history.on_metric))
    lists = KeyLists(b.key_blocklist, b.key_allowlist)
    limiter = RateLimiter(b.rate_limit, b.rate_burst, clock)
    # Keys go out through RecordingBus so that the replayer has the recent ones.
    api = BrokerApi(config, RecordingBus(mqtt, recent), picture, lists, limiter, metrics, clock, history)
    site = make_site(
        api.resource(), b.max_body_size, reactor, on_too_large=too_large_counter(metrics, history),
        idle_timeout=b.idle_timeout, request_timeout=b.request_timeout,
        max_per_address=b.max_connections_per_address,
        max_connections=b.max_connections or connection_limit(open_files()),
    )
    metrics.watch_connections(site)
    listener = ListenService(reactor, with_backlog(b.listen, b.backlog), site, config.path, "broker_listen")

    tree = OrderedMultiService()
    LoggingService(config.log_level, config.logging_config, config_path=config.path).setServiceParent(tree)
    KeyListService(lists, reactor).setServiceParent(tree)
    mqtt.setServiceParent(tree)
    CleanSigterm(reactor).setServiceParent(tree)
    # Last in: stopped first, so no new request arrives while MQTT flushes.
    listener.setServiceParent(tree)
    return Broker(tree, mqtt, picture, tracker, metrics, history, api, site, listener)
