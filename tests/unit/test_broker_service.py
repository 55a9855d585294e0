"""The broker's service tree: built without opening anything, started on a MemoryReactor."""

from __future__ import annotations

import errno
import io
import sys
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.reactors import ThreadedMemoryReactor
from tests.support.broker_fakes import QUEUE_LIMIT, make_config
from wgkex import listen as listen_module
from wgkex.broker.service import Broker, build_broker, too_large_counter, with_backlog
from wgkex.listen import ListenService
from wgkex.contract import REPORT_FILTERS
from wgkex.config import MqttConfig
from wgkex.mqtt import MqttService


class FakeMqtt(FakeBus):
    """The shared FakeBus, built the way build_broker builds MqttService."""

    def __init__(self, reactor: Any, settings: MqttConfig, name: str = "mqtt", spool: Any = None) -> None:
        super().__init__(connected=True, acks=False, queue_limit=QUEUE_LIMIT, name=name)
        self.settings = settings
        self.spool = spool


class RefusingReactor(ThreadedMemoryReactor):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class StoppableReactor(ThreadedMemoryReactor):
    """Records the shutdown trigger and the stop that an asynchronous listen failure asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.shutdown_triggers: list[tuple[object, ...]] = []
        self.stopped = False
        self.running = True

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., object], *args: object, **kw: object
    ) -> None:
        self.shutdown_triggers.append((phase, eventType, *args))

    def stop(self) -> None:
        self.stopped = True


class LaterEndpoint:
    """An endpoint whose listen() result arrives later, as a non-TCP endpoint's may."""

    def __init__(self, result: Deferred[Any]) -> None:
        self.result = result

    def listen(self, factory: Any) -> Deferred[Any]:
        return self.result


class BacklogTests(SynchronousTestCase):
    def test_added_to_tcp(self) -> None:
        """tcp/tcp6/ssl/unix descriptions get backlog=N when they have none."""
        self.assertEqual(with_backlog("tcp:5000:interface=127.0.0.1", 1024),
                         "tcp:5000:interface=127.0.0.1:backlog=1024")
        self.assertEqual(with_backlog("tcp6:5000", 2048), "tcp6:5000:backlog=2048")
        self.assertEqual(with_backlog("ssl:443:privateKey=k.pem", 1024), "ssl:443:privateKey=k.pem:backlog=1024")
        self.assertEqual(with_backlog("unix:/run/wgkex.sock", 1024), "unix:/run/wgkex.sock:backlog=1024")

    def test_kept_when_given_or_unsupported(self) -> None:
        """An explicit backlog and kinds without one are left alone."""
        self.assertEqual(with_backlog("tcp:5000:backlog=10", 1024), "tcp:5000:backlog=10")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 1024), "systemd:domain=INET:index=0")


class TreeTests(SynchronousTestCase):
    def build(self, reactor: ThreadedMemoryReactor | None = None, **config: Any) -> tuple[Broker, ThreadedMemoryReactor]:
        reactor = reactor or ThreadedMemoryReactor()
        cfg = make_config(log_level="debug", **config)
        broker = build_broker(cfg, reactor, mqtt_factory=cast(Callable[..., MqttService], FakeMqtt))
        return broker, reactor

    def start(self, broker: Broker) -> None:
        """Start the tree as twistd does: privilegedStartService on everything, then startService."""
        broker.service.privilegedStartService()
        broker.service.startService()
        self.addCleanup(broker.service.stopService)

    def test_building_opens_nothing(self) -> None:
        """makeService-time construction listens on nothing and subscribes only in memory."""
        broker, reactor = self.build()
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual([s.name for s in broker.service], ["logging", "keylists", "mqtt", "sigterm", "http"])
        self.assertEqual(sorted(f for f, _, _ in broker.mqtt.subscriptions),  # type: ignore[attr-defined]
                         sorted(REPORT_FILTERS))

    def test_start_listens_with_backlog(self) -> None:
        """Starting listens on broker_listen with the configured backlog (default 1024)."""
        broker, reactor = self.build()
        self.start(broker)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (5000, 1024, "127.0.0.1"))
        self.assertIs(factory, broker.site)
        self.assertTrue(all(s.running for s in broker.service))

    def test_ipv6_listen(self) -> None:
        """An IPv6 literal in broker_listen works."""
        broker, reactor = self.build(broker_listen={"host": "::1", "port": 5001})
        self.start(broker)
        [(port, _, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (5001, "::1"))

    def started_with_stops_recorded(self, closing: Deferred[None] | None = None) -> tuple[Broker, list[str]]:
        """A started broker whose listener and MQTT service note in a list when they are told to stop.

        With ``closing``, the listener's stop returns that Deferred instead of stopping.
        """
        broker, _ = self.build()
        broker.service.privilegedStartService()
        broker.service.startService()
        order: list[str] = []
        listener = broker.service.getServiceNamed("http")
        mqtt = broker.service.getServiceNamed("mqtt")
        original_http, original_mqtt = listener.stopService, mqtt.stopService

        def stop_http() -> object:
            order.append("http")
            return original_http() if closing is None else closing

        def stop_mqtt() -> object:
            order.append("mqtt")
            return original_mqtt()

        listener.stopService = stop_http
        mqtt.stopService = stop_mqtt
        return broker, order

    def test_stop_stops_listening_first(self) -> None:
        """Stopping closes the listener before the MQTT service is stopped."""
        broker, order = self.started_with_stops_recorded()
        broker.service.stopService()
        self.assertEqual(order, ["http", "mqtt"])
        self.assertFalse(any(s.running for s in broker.service))

    def test_mqtt_stops_only_after_the_listener_has_stopped(self) -> None:
        """While the listener is still closing, MQTT is not yet told to stop (the tree stops one child after another)."""
        closing: Deferred[None] = Deferred()
        broker, order = self.started_with_stops_recorded(closing)
        stopped = broker.service.stopService()
        self.assertEqual(order, ["http"])
        closing.callback(None)
        self.assertEqual(order, ["http", "mqtt"])
        self.successResultOf(stopped)

    def test_port_in_use_is_one_line_exit(self) -> None:
        """A port that cannot be bound ends the start with exit 1 and one line naming file and key, before MQTT starts."""
        broker, _ = self.build(reactor=RefusingReactor())
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        with self.assertRaises(SystemExit) as cm:
            broker.service.privilegedStartService()
        self.assertEqual(cm.exception.code, 1)
        line = stderr.getvalue()
        self.assertEqual(len(line.splitlines()), 1, line)
        self.assertIn("wgkex: configuration error: test.yaml: broker_listen: cannot listen on 127.0.0.1:5000", line)
        self.assertIn("another process already listens there", line)
        self.assertFalse(broker.service.getServiceNamed("mqtt").running)

    def test_asynchronous_listen_failure_stops_the_process(self) -> None:
        """An endpoint that fails after start-up (not synchronously) still ends the process with status 1 and one line."""
        reactor = StoppableReactor()
        later: Deferred[Any] = Deferred()
        listener = ListenService(reactor, "tcp:5000", Factory(), "/etc/w.yaml", "broker_listen")
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        self.patch(listen_module, "serverFromString", lambda r, d: LaterEndpoint(later))
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual(reactor.shutdown_triggers, [])
        later.errback(CannotListenError("127.0.0.1", 5000, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")))
        self.assertEqual(stderr.getvalue(),
                         "wgkex: configuration error: /etc/w.yaml: broker_listen: cannot listen on 127.0.0.1:5000: "
                         "Cannot assign requested address (the address is not on this machine)\n")
        self.assertEqual(reactor.shutdown_triggers, [("after", "shutdown", 1)])
        self.assertTrue(reactor.stopped)
        stopped = listener.stopService()
        self.assertIsNone(self.successResultOf(stopped if stopped is not None else succeed(None)))

    def test_bad_description_is_one_line_exit(self) -> None:
        """An unusable endpoint description ends the start with one line naming it."""
        listener = ListenService(ThreadedMemoryReactor(), "nonsense:1234", Factory(), "/etc/w.yaml", "broker_listen")
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        with self.assertRaises(SystemExit):
            listener.privilegedStartService()
        self.assertIn("/etc/w.yaml: broker_listen: is not a usable endpoint description", stderr.getvalue())
        self.assertIn("nonsense:1234", stderr.getvalue())

    def test_too_large_counted(self) -> None:
        """A 413 from the site is counted as a v1/v2 request refused for size."""
        broker, _ = self.build()
        too_large_counter(broker.metrics, broker.history)(b"/api/v2/wg/key/exchange")
        text = broker.metrics.render().decode()
        self.assertIn('wgkex_broker_requests_total{endpoint="v2",status="413"} 1.0', text)
        self.assertIn('wgkex_broker_refused_total{reason="too_large"} 1.0', text)

    def test_too_large_with_query_counted_by_endpoint(self) -> None:
        """A 413 on the key exchange path with a query string still counts for that endpoint (routing ignores it)."""
        broker, _ = self.build()
        too_large_counter(broker.metrics, broker.history)(b"/api/v1/wg/key/exchange?v=1")
        text = broker.metrics.render().decode()
        self.assertIn('wgkex_broker_requests_total{endpoint="v1",status="413"} 1.0', text)

    def test_bad_bus_messages_counted(self) -> None:
        """Malformed worker messages show in the metrics by kind."""
        broker, _ = self.build()
        broker.tracker.message("wireguard-metrics/ffmuc_welt/gw/connected_peers", b"x", True)
        self.assertIn('wgkex_broker_bus_messages_invalid_total{kind="metric",reason="syntax"} 1.0', broker.metrics.render().decode())


class TapTests(SynchronousTestCase):
    def test_running_reactor_freezes_start_up_objects(self) -> None:
        """Once the reactor runs, start-up objects leave the collector's generations and young ones are collected less often."""
        import gc

        from wgkex.broker.tap import YOUNG_THRESHOLD, makeService
        from wgkex.options import Options

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        reactor = ThreadedMemoryReactor()
        options = Options()
        options.config = make_config()
        makeService(options, reactor)
        self.assertEqual(gc.get_threshold(), before)
        callbacks = list(gc.callbacks)
        self.addCleanup(gc.callbacks.__setitem__, slice(None), callbacks)
        for hook in reactor.whenRunningHooks:
            hook[0](*hook[1], **hook[2])
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, before[1], before[2]))
        # and slow collections are logged from then on (wgkex.gcwatch)
        self.assertEqual([type(cb).__name__ for cb in gc.callbacks[len(callbacks):]], ["SlowCollections"])

    def test_make_service_builds_the_tree(self) -> None:
        """makeService(options, reactor) returns the tree without listening; gc.freeze waits for the reactor to run."""
        from wgkex.broker.tap import makeService
        from wgkex.options import Options

        reactor = ThreadedMemoryReactor()
        options = Options()
        options.config = make_config()
        service = makeService(options, reactor)
        self.assertEqual([s.name for s in service], ["logging", "keylists", "mqtt", "sigterm", "http"])  # type: ignore[attr-defined]
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(len(reactor.whenRunningHooks), 2)  # the freeze and the slow-collection log
