"""The broker's service tree: built without opening anything, started on a MemoryReactor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_broker_fakes import FakeBus, make_config
from wgkex.broker.service import BrokerService, HttpListener, with_backlog
from wgkex.broker.site import make_site
from wgkex.broker.workers import DATA_TOPIC, METRICS_TOPIC, STATUS_TOPIC
from wgkex.config import MqttConfig
from wgkex.mqtt import MqttService


class FakeMqtt(Service, FakeBus):
    """FakeBus as a service, built the way BrokerService builds MqttService."""

    def __init__(self, reactor: Any, settings: MqttConfig, name: str = "mqtt") -> None:
        FakeBus.__init__(self)
        self.settings = settings
        self.setName(name)


class RefusingReactor(MemoryReactorClock):
    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


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
    def build(self, reactor: Any = None, **config: Any) -> tuple[BrokerService, MemoryReactorClock]:
        reactor = reactor or MemoryReactorClock()
        cfg = make_config(log_level="debug", **config)
        service = BrokerService(reactor, cfg, mqtt_factory=cast(Callable[..., MqttService], FakeMqtt),
                                freeze_gc=False)
        return service, reactor

    def test_building_opens_nothing(self) -> None:
        """makeService-time construction listens on nothing and subscribes only in memory."""
        service, reactor = self.build()
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(sorted(name for name in (s.name for s in service)),
                         sorted(["logging", "keylists", "mqtt", "sigterm", "http"]))
        self.assertEqual(sorted(f for f, _, _ in service.mqtt.subscriptions),  # type: ignore[attr-defined]
                         sorted([STATUS_TOPIC, DATA_TOPIC, METRICS_TOPIC]))

    def test_start_listens_with_backlog(self) -> None:
        """Starting listens on broker_listen with the configured backlog (default 1024)."""
        service, reactor = self.build()
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (5000, 1024, "127.0.0.1"))
        self.assertIs(factory, service.site)
        self.assertTrue(all(s.running for s in service))

    def test_ipv6_listen(self) -> None:
        """An IPv6 literal in broker_listen works."""
        service, reactor = self.build(broker_listen={"host": "::1", "port": 5001})
        service.startService()
        self.addCleanup(service.stopService)
        [(port, _, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (5001, "::1"))

    def test_stop_stops_listening_first(self) -> None:
        """Stopping closes the listener before the MQTT service is stopped."""
        service, reactor = self.build()
        service.startService()
        order: list[str] = []
        listener = service.getServiceNamed("http")
        mqtt = service.getServiceNamed("mqtt")
        original_http, original_mqtt = listener.stopService, mqtt.stopService

        def stop_http() -> object:
            order.append("http")
            return original_http()

        def stop_mqtt() -> object:
            order.append("mqtt")
            return original_mqtt()

        listener.stopService = stop_http
        mqtt.stopService = stop_mqtt
        service.stopService()
        self.assertEqual(order, ["http", "mqtt"])
        self.assertFalse(any(s.running for s in service))

    def test_port_in_use_is_one_line_exit(self) -> None:
        """A port that cannot be bound stops the start with a one-line SystemExit, before MQTT starts."""
        service, _ = self.build(reactor=RefusingReactor())
        with self.assertRaises(SystemExit) as cm:
            service.startService()
        message = str(cm.exception.code)
        self.assertIn("cannot listen on", message)
        self.assertIn("already in use", message)
        self.assertNotIn("\n", message)
        self.assertFalse(service.getServiceNamed("mqtt").running)

    def test_bad_description_is_one_line_exit(self) -> None:
        """An unusable endpoint description stops the start with one line naming it."""
        listener = HttpListener(MemoryReactorClock(), "nonsense:1234", make_site(Service(), 10))  # type: ignore[arg-type]
        with self.assertRaises(SystemExit) as cm:
            listener.startService()
        self.assertIn("nonsense:1234", str(cm.exception.code))

    def test_too_large_counted(self) -> None:
        """A 413 from the site is counted as a v1/v2 request refused for size."""
        service, _ = self.build()
        service._too_large(b"/api/v2/wg/key/exchange")
        text = service.metrics.render().decode()
        self.assertIn('wgkex_broker_requests_total{endpoint="v2",status="413"} 1.0', text)
        self.assertIn('wgkex_broker_refused_total{reason="too_large"} 1.0', text)

    def test_too_large_with_query_counted_by_endpoint(self) -> None:
        """A 413 on the key exchange path with a query string still counts for that endpoint (routing ignores it)."""
        service, _ = self.build()
        service._too_large(b"/api/v1/wg/key/exchange?v=1")
        text = service.metrics.render().decode()
        self.assertIn('wgkex_broker_requests_total{endpoint="v1",status="413"} 1.0', text)

    def test_bad_bus_messages_counted(self) -> None:
        """Malformed worker messages show in the metrics by kind."""
        service, _ = self.build()
        service.tracker.message("wireguard-metrics/ffmuc_welt/gw/connected_peers", b"x", True)
        self.assertIn('wgkex_broker_bus_messages_invalid_total{kind="metric"} 1.0', service.metrics.render().decode())
