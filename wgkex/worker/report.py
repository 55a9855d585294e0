"""What the worker tells the broker: status, per-domain data and connected-peer counts.

Topics and payloads (docs/protocol.md, "MQTT"; encoded by :mod:`wgkex.contract`),
all QoS 1 and retained:

* ``wireguard-worker/{worker}/status``: ``1`` on every (re)connect and with
  every metrics report, ``0`` on shutdown (and as the last will, set up by the
  service builder);
* ``wireguard-worker/{worker}/{domain}/data``: JSON ``{"ExternalAddress",
  "Port", "PublicKey", "LinkAddress"}`` on every (re)connect (and again with
  every metrics report, as last published), read in the pool
  from ``wg-<D>`` (``WireGuard.interface`` and ``Rtnl.link_local_address``); a
  domain whose interface is missing is logged and published on a later tick;
* ``wireguard-metrics/{domain}/{worker}/connected_peers``: peers with a
  handshake within 180 s, right after each (re)connect and every
  ``metrics_interval``; counted in the pool (a 100,000-peer dump never touches
  the reactor); ``-1`` on shutdown, and while the interface is missing (the
  worker cannot take routers for that domain then).

Why status and data are repeated (:meth:`Reporter.reannounce`): retained
messages alone do not reach every broker on every MQTT server. RabbitMQ keeps
them per cluster node and sends none for topic filters with wildcards (which is
how brokers subscribe), so a broker that starts, or moves to another node, after
a worker connected would never learn of it. Repeated with each metrics report,
the same messages give every broker the whole picture within one
``metrics_interval``, whatever node each is connected to; brokers of the
original wgkex read them as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.config import Config
from wgkex.contract import (
    NOT_ELIGIBLE,
    Endpoint,
    data_topic,
    encode_connected_peers,
    encode_data,
    encode_status,
    metric_topic,
    status_topic,
)
from wgkex.worker.backend import InterfaceMissing
from wgkex.worker.domains import Interfaces, domain_interfaces
from wgkex.worker.dumps import CONNECTED_WINDOW, DumpPacing, PeerCount, count_peers_of, timed_dump
from wgkex.bus import Bus
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.pool import Backends, Pool

@dataclass(frozen=True)
class DomainData:
    """What routers need to reach this worker on one domain."""

    public_key: str
    listen_port: int
    link_address: str


def read_domain_data(backends: Backends, interfaces: Mapping[str, str]) -> dict[str, DomainData | str]:
    """Pool thread: per domain its :class:`DomainData`, or a text saying why it is unavailable."""
    result: dict[str, DomainData | str] = {}
    for domain, wg in interfaces.items():
        try:
            info = backends.wireguard.interface(wg)
            address = backends.rtnl.link_local_address(wg)
        except InterfaceMissing:
            result[domain] = f"interface {wg} does not exist"
            continue
        except Exception as exc:
            result[domain] = f"reading {wg} failed: {type(exc).__name__}: {exc}"
            continue
        if address is None:
            result[domain] = f"interface {wg} has no link-local (fe80::/10) address"
            continue
        result[domain] = DomainData(info.public_key, info.listen_port, address)
    return result


def count_peers(
    backends: Backends,
    interfaces: Mapping[str, str],
    now: float,
    window: float = CONNECTED_WINDOW,
    monotonic: Callable[[], float] = time.monotonic,
) -> dict[str, tuple[PeerCount, float] | str]:
    """Pool thread: per domain its :class:`PeerCount` (peers, and those that shook hands within
    ``window``) with the seconds the dump took, or a text saying why it could not be read."""
    result: dict[str, tuple[PeerCount, float] | str] = {}
    for domain, wg in interfaces.items():
        with backends.gc_pause:  # a dump of 100,000 peers: see wgkex.worker.pool.GcPause
            try:
                peers, held = timed_dump(backends, wg, monotonic)
            except InterfaceMissing:
                result[domain] = f"interface {wg} does not exist"
                continue
            except Exception as exc:
                result[domain] = f"reading the peers of {wg} failed: {type(exc).__name__}: {exc}"
                continue
            result[domain] = (count_peers_of((p.last_handshake for p in peers), now, window), held)
            del peers
    return result


class Reporter:
    """Publishes status, data and peer counts; ``goodbye`` publishes -1 and status 0."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        bus: Bus,
        pool: Pool,
        metrics: WorkerMetrics,
        clock: IReactorTime,
        interfaces: Mapping[str, Interfaces] | None = None,
        pacing: DumpPacing | None = None,
    ) -> None:
        """``pacing``: the worker's one :class:`~wgkex.worker.dumps.DumpPacing`, shared with the
        sweeper (by default none: every count dumps)."""
        self._worker = config.worker.name
        self._external = config.worker.external_name
        self._domains = config.domains
        # The builder's map (computed once); tests may leave it to the configuration.
        by_domain = interfaces if interfaces is not None else domain_interfaces(config)
        self._interfaces = {d: i.wg for d, i in by_domain.items()}
        self._bus = bus
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        #: Shared with the sweeper (the worker service hands it on).
        self.pacing = pacing if pacing is not None else DumpPacing(paced=False)
        self._counting: Deferred[None] | None = None
        #: Domains whose data could not be published yet (retried with each count).
        self._data_missing: set[str] = set(config.domains)
        self._last_problem: dict[str, str] = {}
        #: The data last published per domain.
        self.published_data: dict[str, DomainData] = {}
        self.last_counts: dict[str, PeerCount | str] = {}
        #: Set by :meth:`goodbye`: nothing may overwrite the retained -1 / 0 afterwards.
        self._closed = False

    # -- publishing ---------------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes | str) -> None:
        if self._closed:
            # A count or data read still in the pool when the worker stopped: publishing it
            # now would replace the retained goodbye and keep the worker looking online.
            return
        try:
            d = self._bus.publish(topic, payload, qos=1, retain=True)
        except Exception as exc:  # QueueFull while disconnected: the next connect publishes afresh
            self.log.warn("Cannot publish {topic}: {error}", topic=topic, error=exc)
            return
        d.addErrback(lambda f: self.log.warn("Publishing {topic} failed: {error}", topic=topic, error=f.value))

    def on_connect(self) -> Deferred[None]:
        """After every (re)connect: status 1, then the data of every domain, then the counts."""
        self._publish(status_topic(self._worker), encode_status(True))
        d = self.publish_data(self._domains)
        d.addBoth(lambda _: self.publish_counts())
        return d

    def publish_data(self, domains: Iterable[str]) -> Deferred[None]:
        """Read the interfaces of ``domains`` in the pool and publish their data."""
        wanted = {d: self._interfaces[d] for d in domains}
        if not wanted:
            return succeed(None)
        d: Deferred[None] = self._pool.run(read_domain_data, wanted).addCallback(self._got_data)
        d.addErrback(self._log_failure, "reading interface data")
        return d

    def _endpoint(self, data: DomainData) -> Endpoint:
        return Endpoint(self._external, data.listen_port, data.public_key, data.link_address)

    def _got_data(self, results: Mapping[str, DomainData | str]) -> None:
        for domain, data in results.items():
            payload = b""
            if not isinstance(data, str):
                try:
                    payload = encode_data(self._endpoint(data))
                except ValueError as exc:  # brokers would refuse it: say so instead of publishing
                    data = f"its data would break the protocol: {exc}"
            if isinstance(data, str):
                self._data_missing.add(domain)
                # Log a problem once, not with every retry.
                if self._last_problem.get(domain) != data:
                    self._last_problem[domain] = data
                    self.log.warn(
                        "No data published for domain {domain} yet: {problem}; retrying with each metrics tick",
                        domain=domain,
                        problem=data,
                    )
                continue
            if domain in self._last_problem:
                del self._last_problem[domain]
                self.log.info("Domain {domain} is available again", domain=domain)
            self._data_missing.discard(domain)
            if self._bus.connected:
                self._publish(data_topic(self._worker, domain), payload)
                self.published_data[domain] = data

    def reannounce(self) -> None:
        """Publish status 1 and every available domain's data (as last published) again, when connected."""
        if not self._bus.connected:
            return
        self._publish(status_topic(self._worker), encode_status(True))
        for domain, data in self.published_data.items():
            # Not for a domain whose interface was missing at the last read or count.
            if domain not in self._data_missing and not isinstance(self.last_counts.get(domain), str):
                # Encoded before without complaint, so it encodes again.
                self._publish(data_topic(self._worker, domain), encode_data(self._endpoint(data)))

    def publish_counts(self) -> Deferred[None]:
        """Count connected peers in the pool, update the gauges, publish when connected.

        While whole dumps wait (:mod:`wgkex.worker.dumps`), a domain the last
        dump read is not dumped again: its counts from that dump are published.
        """
        if self._counting is not None:
            return self._counting
        cached = self.pacing.cached_counts()
        wanted = {d: wg for d, wg in self._interfaces.items() if d not in cached}
        started = self.pacing.now()
        counted: Deferred[dict[str, tuple[PeerCount, float] | str]] = (
            self._pool.run(count_peers, wanted, self._clock.seconds(), CONNECTED_WINDOW, self.pacing.now)
            if wanted
            else succeed({})
        )
        d: Deferred[None] = counted.addCallback(self._counted, cached, started)
        d.addErrback(self._log_failure, "counting peers")
        self._counting = d

        def done(_: object) -> None:
            self._counting = None

        d.addBoth(done)
        if d.called:
            self._counting = None
        return d

    def _counted(
        self, fresh: Mapping[str, tuple[PeerCount, float] | str], cached: Mapping[str, PeerCount], started: float
    ) -> Deferred[None] | None:
        """A count's dump is back: tell the pacing, then publish it with the cached domains' counts."""
        read = {d: c for d, c in fresh.items() if not isinstance(c, str)}
        self.pacing.dumped(started, {d: (held, c.total) for d, (c, held) in read.items()}, {d: c for d, (c, _) in read.items()})
        counts: dict[str, PeerCount | str] = {d: (c if isinstance(c, str) else c[0]) for d, c in fresh.items()}
        counts.update(cached)
        return self._got_counts({d: counts[d] for d in self._interfaces if d in counts})

    def _got_counts(self, counts: Mapping[str, PeerCount | str]) -> Deferred[None] | None:
        self.last_counts = dict(counts)
        for domain, count in counts.items():
            if isinstance(count, str):
                self._metrics.connected_peers.labels(domain=domain).set(NOT_ELIGIBLE)
                value = NOT_ELIGIBLE
            else:
                self._metrics.connected_peers.labels(domain=domain).set(count.connected)
                self._metrics.peers.labels(domain=domain).set(count.total)
                value = count.connected
            if self._bus.connected:
                self._publish(metric_topic(self._worker, domain), encode_connected_peers(value))
        missing = sorted(self._data_missing)
        if missing and self._bus.connected:
            return self.publish_data(missing)
        return None

    def _log_failure(self, failure: Failure, what: str) -> None:
        self.log.failure("{what} failed", failure, what=what)

    def goodbye(self) -> None:
        """On shutdown: metric -1 for every domain, then status 0 (made before MQTT stops)."""
        for domain in self._domains:
            self._publish(metric_topic(self._worker, domain), encode_connected_peers(NOT_ELIGIBLE))
        self._publish(status_topic(self._worker), encode_status(False))
        self._closed = True
