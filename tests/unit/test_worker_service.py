"""The whole worker tree with fakes at the boundaries: bus in, kernel out, timers, start and stop order."""

from __future__ import annotations

import dataclasses
import errno
import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.address import IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.support.bus import FakeBus
from tests.support.reactors import ThreadedMemoryReactor
from tests.support.worker_fakes import (
    GATEWAY_KEY,
    KEY_A,
    KEY_B,
    FakeKernel,
    ManualPool,
    SyncPool,
    backends_for,
    key,
    make_config,
)
from wgkex.config import Config
from wgkex.worker.http import STATUS_RETRY_INTERVAL, status_site
from wgkex.keys import lladdr
from wgkex.worker.apply import CHUNK
from wgkex.worker.retry import MAX_RETRIES
from wgkex.worker.pool import Backends
from wgkex.services import OrderedMultiService
from wgkex.worker.service import WATCH_INTERVAL, build_worker

START = 1_700_000_000.0
STATUS = "wireguard-worker/gw1/status"
DATA_WELT = "wireguard-worker/gw1/ffmuc_welt/data"
METRIC_WELT = "wireguard-metrics/ffmuc_welt/gw1/connected_peers"
METRIC_OST = "wireguard-metrics/ffmuc_ost/gw1/connected_peers"


class _ServiceBits:
    """Enough of IService for a pool fake to sit in the tree; records start/stop in ``events``."""

    name = "netlink-pool"
    running = 0
    parent: Any = None
    events: list[tuple[Any, ...]]

    def setServiceParent(self, parent: Any) -> None:
        self.parent = parent
        parent.addService(self)

    def privilegedStartService(self) -> None:
        pass

    def startService(self) -> None:
        self.running = 1
        self.events.append(("pool-start",))

    def stopService(self) -> Deferred[None]:
        self.running = 0
        self.events.append(("pool-stop",))
        return succeed(None)


class SyncPoolService(_ServiceBits, SyncPool):
    """Both lanes run their jobs at once."""

    def __init__(self, backends: Backends, events: list[tuple[Any, ...]]) -> None:
        SyncPool.__init__(self, backends)
        self.events = events
        self.keys = self.housekeeping = self


class ManualPoolService(_ServiceBits, ManualPool):
    """Both lanes share one queue of held jobs, released in order."""

    def __init__(self, backends: Backends, events: list[tuple[Any, ...]]) -> None:
        ManualPool.__init__(self, backends)
        self.events = events
        self.keys = self.housekeeping = self


@implementer(IListeningPort)
class FakePort:
    def __init__(self, address: str, ifindex: int, port: int) -> None:
        self.where = (address, ifindex, port)
        self.listening = True

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> IPv6Address:
        return IPv6Address("TCP", self.where[0], self.where[2])


class WorkerTreeTests(SynchronousTestCase):
    """build_worker + WorkerRoot with a fake bus, kernel and pool."""

    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.reactor.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt", address="fe80::1")
        self.kernel.add_domain("ost", address="fe80::2")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.bus = FakeBus()
        self.ports: list[FakePort] = []
        self.bind_error: OSError | None = None

    def listen(self, address: str, ifindex: int, port: int, factory: object) -> FakePort:
        if self.bind_error is not None:
            raise self.bind_error
        p = FakePort(address, ifindex, port)
        self.ports.append(p)
        return p

    def build(self, config: Config | None = None, manual: bool = False) -> OrderedMultiService:
        self.config = config or make_config(metrics_interval=60, cleanup_interval=3600, peer_timeout=10800)
        pool: Any = (ManualPoolService if manual else SyncPoolService)(self.backends, self.bus.events)
        self.pool = pool
        root = build_worker(
            self.config, self.reactor, bus=self.bus, pool=pool, support=(), ifindex=self.kernel.ifindex, listen=self.listen
        )
        self.root = root
        return root

    def start(self, config: Config | None = None, manual: bool = False) -> OrderedMultiService:
        root = self.build(config, manual)
        root.startService()
        self.addCleanup(lambda: root.running and root.stopService())
        return root

    def listening(self) -> set[tuple[str, int, int]]:
        return {p.where for p in self.ports if p.listening}

    def test_subscribes_every_domain(self) -> None:
        """wireguard/{domain}/+ for each configured domain at QoS 1."""
        self.build()
        self.assertEqual(
            [(t, q) for t, q, _ in self.bus.subscriptions],
            [("wireguard/ffmuc_welt/+", 1), ("wireguard/ffmuc_ost/+", 1)],
        )

    def test_build_opens_nothing(self) -> None:
        """Building the tree starts nothing: no listener, no job, no timer."""
        self.build()
        self.assertEqual(self.reactor.tcpServers, [])
        self.assertEqual(self.pool.jobs, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.bus.events, [])

    def test_start_order(self) -> None:
        """The pool starts first, the start-up dump is its first job, MQTT starts last."""
        self.start()
        self.assertEqual(self.bus.events[0], ("pool-start",))
        self.assertEqual(self.bus.events[-1], ("start",))
        self.assertEqual(self.pool.jobs[0], "dump_keys")
        self.assertEqual(self.reactor.tcpServers[0][0], 9101)  # worker_listen default

    def test_key_from_bus_installed(self) -> None:
        """A key published on the bus becomes peer, route and FDB entry."""
        self.start()
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_connect_and_reconnect_publish(self) -> None:
        """Every (re)connect publishes status 1, the data and the counts."""
        self.start()
        self.bus.connect()
        self.assertEqual(self.bus.last(STATUS), b"1")
        self.assertEqual(json.loads(self.bus.last(DATA_WELT) or b"")["LinkAddress"], "fe80::1")
        self.assertEqual(self.bus.last(METRIC_WELT), b"0")
        self.bus.disconnect()
        self.bus.published.clear()
        self.bus.connect()
        self.assertEqual(
            [t for t, _, _, _ in self.bus.published],
            [STATUS, DATA_WELT, "wireguard-worker/gw1/ffmuc_ost/data", METRIC_WELT, METRIC_OST],
        )

    def test_metrics_every_interval(self) -> None:
        """Connected-peer counts are published every metrics_interval."""
        self.start()
        self.bus.connect()
        self.wg.add_peers("wg-welt", [(KEY_A, "fe80::5/128")])
        self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        self.bus.published.clear()
        self.reactor.advance(59)
        self.assertIsNone(self.bus.last(METRIC_WELT))
        self.reactor.advance(1)
        self.assertEqual(self.bus.last(METRIC_WELT), b"1")

    def test_metrics_tick_reannounces_status_and_data(self) -> None:
        """Each metrics tick publishes status 1 and the data again before the counts."""
        self.start()
        self.bus.connect()
        self.bus.published.clear()
        self.reactor.advance(60)
        self.assertEqual(
            [t for t, _, _, _ in self.bus.published],
            [STATUS, DATA_WELT, "wireguard-worker/gw1/ffmuc_ost/data", METRIC_WELT, METRIC_OST],
        )
        self.assertEqual(self.bus.last(STATUS), b"1")

    def test_stop_publishes_goodbye_before_disconnect(self) -> None:
        """On stop: metric -1 per domain and status 0 are published before MQTT stops; the pool stops last."""
        root = self.start()
        self.bus.connect()
        self.bus.events.clear()
        self.successResultOf(root.stopService())
        self.assertEqual(
            self.bus.events,
            [
                ("publish", METRIC_WELT, b"-1"),
                ("publish", METRIC_OST, b"-1"),
                ("publish", STATUS, b"0"),
                ("stop",),
                ("pool-stop",),
            ],
        )
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_applies_queued_keys_before_pool_stops(self) -> None:
        """Keys queued at stop are applied before the pool stops."""
        root = self.start(manual=True)
        self.pool.release()
        self.bus.connect()
        self.pool.release()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_B.encode())
        d = root.stopService()
        self.assertNotIn(("pool-stop",), self.bus.events)
        self.assertIn(("stop",), self.bus.events)
        self.pool.release()
        self.successResultOf(d)
        self.assertEqual(self.bus.events[-1], ("pool-stop",))
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("welt", KEY_B))

    def test_interface_recreated_reapplies_known_keys(self) -> None:
        """wireguard-go restarted (wg-* and vx-* recreated, everything on them gone): keys come back."""
        self.start()
        self.bus.connect()
        for k in (KEY_A, KEY_B):
            self.bus.deliver("wireguard/ffmuc_welt/all", k.encode())
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.reactor.advance(WATCH_INTERVAL)
        self.kernel.add_domain("welt", port=51999, address="fe80::1")
        self.bus.published.clear()
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("welt", KEY_B))
        self.assertEqual(json.loads(self.bus.last(DATA_WELT) or b"")["Port"], 51999)

    def test_recreated_interface_gives_peers_time_to_shake_hands(self) -> None:
        """Peers re-installed after wireguard-go restarted are not swept before they could shake hands again."""
        self.start()  # cleanup_interval 1 h, peer_timeout 3 h
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        # The router stays connected: a fresh handshake every half hour.
        for _ in range(7):
            self.reactor.advance(1800)
            self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        self.reactor.advance(1800 - 60)
        self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        # wireguard-go restarts a minute before the 4 h sweep: the peer is back, not yet handshaked.
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.kernel.add_domain("welt", address="fe80::1")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.reactor.advance(60 - WATCH_INTERVAL)  # the sweep at 4 h
        self.assertTrue(self.kernel.has("welt", KEY_A))
        # A router that really went away is still swept, peer_timeout after the restart.
        self.reactor.advance(3 * 3600 + 60)
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))

    def test_recreated_between_checks(self) -> None:
        """An interface recreated between two checks (new index, same name) is noticed too."""
        self.start()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.kernel.add_domain("welt")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_keys_for_missing_interface_land_when_it_appears(self) -> None:
        """Keys received while the interface is missing are installed once it appears, without restart."""
        self.kernel.delete("wg-ost")
        self.kernel.delete("vx-ost")
        with capturedLogs() as events:
            self.start()
            self.bus.deliver("wireguard/ffmuc_ost/all", KEY_A.encode())
        self.assertTrue(any(e["log_level"] == LogLevel.warn and e.get("domain") == "ffmuc_ost" for e in events))
        self.assertFalse(self.kernel.has("ost", KEY_A))
        self.kernel.add_domain("ost")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertTrue(self.kernel.has("ost", KEY_A))

    def test_failed_keys_retried_with_metrics_tick(self) -> None:
        """A key that failed for another reason is retried with the next metrics tick."""
        self.start()
        self.rtnl.refuse_routes.add("fe80::2a6:8fff:fe21:5465")
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertFalse(self.kernel.has("welt", KEY_A))
        self.rtnl.refuse_routes.clear()
        self.reactor.advance(60)
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_gateway_own_key_refused(self) -> None:
        """The gateway's own public key from the bus never reaches the kernel and counts as invalid."""
        self.start()
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", GATEWAY_KEY.encode())
        self.assertFalse(self.kernel.has("welt", GATEWAY_KEY))
        self.assertNotIn(lladdr(GATEWAY_KEY), self.kernel.routes.get("wg-welt", set()))
        invalid = self.root.getServiceNamed("worker").metrics.registry.get_sample_value("wgkex_worker_keys_invalid_total", {"reason": "key"})
        self.assertEqual(invalid, 1)

    def test_failing_key_given_up_after_retries(self) -> None:
        """A key that keeps failing is retried MAX_RETRIES times, then left until its router registers again."""
        self.start()
        self.bus.connect()
        self.rtnl.refuse_routes.add(lladdr(KEY_A))
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        for _ in range(MAX_RETRIES + 2):
            self.reactor.advance(60)
        failed = self.root.getServiceNamed("worker").metrics.registry.get_sample_value(
            "wgkex_worker_keys_failed_total", {"domain": "ffmuc_welt", "reason": "route"}
        )
        self.assertEqual(failed, 1 + MAX_RETRIES)
        self.rtnl.refuse_routes.clear()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_sweep_timer(self) -> None:
        """Every cleanup_interval the stale peers go."""
        self.start(make_config(cleanup_interval=100, peer_timeout=50))
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.wg.handshake("wg-welt", KEY_A, self.reactor.seconds())
        self.reactor.advance(99)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.reactor.advance(1)
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))

    def test_connectivity_check_binds_each_domain(self) -> None:
        """The check listens on each domain's link-local address, scoped to wg-<D>, port 80."""
        self.start()
        self.assertEqual(
            self.listening(),
            {("fe80::1", self.kernel.indexes["wg-welt"], 80), ("fe80::2", self.kernel.indexes["wg-ost"], 80)},
        )

    def test_connectivity_check_rebinds(self) -> None:
        """A recreated interface (new index) or a new address gets a new listener; the old one closes."""
        self.start()
        self.kernel.delete("wg-welt")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertEqual(self.listening(), {("fe80::2", self.kernel.indexes["wg-ost"], 80)})
        self.kernel.add_domain("welt", address="fe80::9")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertIn(("fe80::9", self.kernel.indexes["wg-welt"], 80), self.listening())
        self.assertEqual(len(self.listening()), 2)

    def test_connectivity_check_retries_bind(self) -> None:
        """A failed bind is logged once and retried at every check until it works."""
        self.bind_error = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        with capturedLogs() as events:
            self.start()
            self.reactor.advance(WATCH_INTERVAL)
            self.reactor.advance(WATCH_INTERVAL)
        warnings = [e for e in events if e.get("error") == "Cannot assign requested address"]
        self.assertEqual(len(warnings), 2)  # once per domain
        self.assertEqual(self.listening(), set())
        self.bind_error = None
        self.reactor.advance(WATCH_INTERVAL)
        self.assertEqual(len(self.listening()), 2)

    def test_connectivity_check_off(self) -> None:
        """connectivity_check: false binds nothing."""
        self.start(make_config(connectivity_check=False))
        self.reactor.advance(WATCH_INTERVAL)
        self.assertEqual(self.ports, [])

    def test_stop_closes_connectivity_listeners(self) -> None:
        """Stopping closes the connectivity listeners."""
        root = self.start()
        self.successResultOf(root.stopService())
        self.assertEqual(self.listening(), set())

    def test_worker_listen_off(self) -> None:
        """worker_listen: off serves no /metrics."""
        self.start(make_config(worker_listen="off"))
        self.assertEqual(self.reactor.tcpServers, [])

    def test_worker_listen_busy_is_not_fatal(self) -> None:
        """A busy worker_listen address is logged (naming the key and the reason) and retried; keys still land."""

        class BusyReactor(ThreadedMemoryReactor):
            busy = True

            def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
                if self.busy:
                    raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
                return super().listenTCP(port, factory, backlog, interface)

        self.reactor = BusyReactor()
        self.reactor.advance(START)
        root = self.build()
        with capturedLogs() as events:
            root.privilegedStartService()  # as twistd calls it, before startService
            root.startService()
        self.addCleanup(lambda: root.running and root.stopService())
        errors = [e for e in events if e.get("log_level") == LogLevel.error and "worker_listen" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertIn("Address already in use", errors[0]["error"])
        self.assertEqual(self.reactor.tcpServers, [])
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertTrue(self.kernel.has("welt", KEY_A))
        # Still busy at the next try: not logged again.
        with capturedLogs() as again:
            self.reactor.advance(STATUS_RETRY_INTERVAL)
        self.assertEqual([e for e in again if "worker_listen" in e.get("log_format", "")], [])
        self.reactor.busy = False
        self.reactor.advance(STATUS_RETRY_INTERVAL)
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers], [(9101, "127.0.0.1")])
        self.successResultOf(root.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_worker_listen_retry_cancelled_on_stop(self) -> None:
        """Stopping while worker_listen waits for its next try leaves no timer behind."""

        class BusyReactor(ThreadedMemoryReactor):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
                raise CannotListenError(interface, port, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))

        self.reactor = BusyReactor()
        root = self.build()
        root.privilegedStartService()
        root.startService()
        self.successResultOf(root.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_malformed_worker_listen_fails_while_building(self) -> None:
        """A malformed worker_listen endpoint stops the start while building (before threads exist), not later.

        The configuration already refuses it; this pins the tree's own check for a Config built in code.
        """
        config = make_config()
        config = dataclasses.replace(config, worker=dataclasses.replace(config.worker, listen="tcp:notaport"))
        self.assertRaises(ValueError, self.build, config)

    def test_support_services_first_and_last(self) -> None:
        """Support services (logging, SIGTERM) start before everything and stop after everything."""
        from twisted.application.service import Service

        events = self.bus.events

        class Support(Service):
            def startService(self) -> None:
                super().startService()
                events.append(("support-start",))

            def stopService(self) -> None:
                super().stopService()
                events.append(("support-stop",))

        self.config = make_config()
        pool = SyncPoolService(self.backends, events)
        root = build_worker(self.config, self.reactor, bus=self.bus, pool=pool, ifindex=self.kernel.ifindex,
                            listen=self.listen, support=[Support()])
        root.startService()
        self.assertEqual(events[:2], [("support-start",), ("pool-start",)])
        self.successResultOf(root.stopService())
        self.assertEqual(events[-2:], [("pool-stop",), ("support-stop",)])

    def test_mqtt_connected_metric(self) -> None:
        """The MQTT connected gauge follows the bus."""
        self.start()
        metrics = self.root.getServiceNamed("worker").metrics
        self.bus.connect()
        self.assertEqual(metrics.registry.get_sample_value("wgkex_worker_mqtt_connected"), 1)
        self.bus.disconnect()
        self.assertEqual(metrics.registry.get_sample_value("wgkex_worker_mqtt_connected"), 0)


class StatusSiteTests(SynchronousTestCase):
    """/metrics and /healthz in memory."""

    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.kernel.add_domain("ost")
        self.backends, _, _ = backends_for(self.kernel)
        self.bus = FakeBus(connected=True)
        self.root = build_worker(make_config(), self.reactor, bus=self.bus, pool=SyncPoolService(self.backends, []),
                                 support=(), ifindex=self.kernel.ifindex, listen=lambda *a: FakePort("x", 1, 1))
        worker = self.root.getServiceNamed("worker")
        # StubTreq attaches its request methods at run time: typed as Any.
        self.treq: Any = StubTreq(status_site(worker.metrics, worker.health).resource)

    def test_metrics(self) -> None:
        """/metrics serves the Prometheus text with the worker's counters."""
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.bus.deliver("wireguard/ffmuc_welt/all", b"junk")
        response = self.successResultOf(self.treq.get("http://worker/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
        body = self.successResultOf(response.text())
        self.assertIn('wgkex_worker_keys_applied_total{domain="ffmuc_welt"} 1.0', body)
        self.assertIn('wgkex_worker_keys_invalid_total{reason="key"} 1.0', body)
        self.assertIn("wgkex_worker_apply_seconds_bucket", body)
        self.assertIn("wgkex_worker_batch_size_bucket", body)
        self.assertIn("wgkex_worker_sweep_seconds_bucket", body)

    def test_healthz(self) -> None:
        """/healthz answers 200 with a JSON body."""
        response = self.successResultOf(self.treq.get("http://worker/healthz"))
        self.assertEqual(response.code, 200)
        body = json.loads(self.successResultOf(response.text()))
        self.assertEqual(body, {"status": "ok", "mqtt_connected": True, "pending_keys": 0})

    def test_unknown_path(self) -> None:
        """Other paths are 404."""
        response = self.successResultOf(self.treq.get("http://worker/nope"))
        self.assertEqual(response.code, 404)


class ManyKeysTests(SynchronousTestCase):
    """A burst through the whole tree."""

    def test_burst_coalesced(self) -> None:
        """2,000 keys delivered while a batch is in flight cost one more batch, not 2,000 (one add_peers per chunk)."""
        kernel = FakeKernel()
        kernel.add_domain("welt")
        kernel.add_domain("ost")
        backends, wg, _ = backends_for(kernel)
        bus = FakeBus()
        events: list[tuple[Any, ...]] = []
        pool = ManualPoolService(backends, events)
        root = build_worker(make_config(worker_listen="off"), ThreadedMemoryReactor(), bus=bus, pool=pool,
                            support=(), ifindex=kernel.ifindex, listen=lambda *a: FakePort("x", 1, 1))
        root.startService()
        pool.release()
        for n in range(2000):
            bus.deliver("wireguard/ffmuc_welt/all", key(n).encode())
        self.assertEqual(pool.jobs(), ["apply_batch"])
        pool.release()
        self.assertEqual(len([c for c in wg.calls if c[0] == "add_peers"]), 1 + -(-1999 // CHUNK))
        self.assertTrue(all(kernel.has("welt", key(n)) for n in range(2000)))
        d = root.stopService()
        pool.release()
        self.successResultOf(d)
