"""MqttService against a real mosquitto on the real reactor: failover, restarts, wills, sessions, transports, keepalive.

Each test starts its own mosquitto on a free 127.0.0.1 port. Where a test must
cut one client's connection without touching the server, the service talks to
mosquitto through :class:`~tests.support.mqtt_live.CuttableProxy`; independent
observers are plain paho clients (:class:`~tests.support.mqtt_live.PahoWatcher`).
Waiting is by polling with deadlines, never sleeps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support.mosquitto import Mosquitto, free_port, start_mosquitto
from tests.support.mqtt_fakes import observe_logs
from tests.support.mqtt_live import CuttableProxy, PahoWatcher, deferred_test, unique, until
from tests.support.skips import need_mosquitto
from wgkex.config import MqttConfig
from wgkex.mqtt import MqttService, Will


reactor: Any = _reactor


class _WebsocketMosquitto(Mosquitto):
    """mosquitto with an extra websockets listener on ``ws_port``."""

    def __init__(self) -> None:
        super().__init__()
        self.ws_port = free_port()

    def write_config(self) -> str:
        path = super().write_config()
        with open(path, "a") as f:
            f.write(f"listener {self.ws_port} 127.0.0.1\nprotocol websockets\n")
        return path


class MqttServiceIntegrationTests(TestCase):
    skip = need_mosquitto()
    timeout = 20

    def setUp(self) -> None:
        self.broker = start_mosquitto(cast(Any, self))

    def service(self, port: int | None = None, settings: MqttConfig | None = None, **kwargs: Any) -> MqttService:
        """A started service (stopped at cleanup) with a short reconnect cap."""
        settings = settings or MqttConfig(
            broker_url="127.0.0.1", broker_port=port or self.broker.port, keepalive=5, reconnect_max_delay=0.5
        )
        service = MqttService(reactor, settings, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @deferred_test
    async def test_fails_over_to_the_next_server(self) -> None:
        """With mqtt.servers, a client whose server is killed (SIGKILL) moves to the next and delivers there."""
        second = start_mosquitto(cast(Any, self))
        service = self.service(settings=MqttConfig(
            servers=(("127.0.0.1", self.broker.port), ("127.0.0.1", second.port)), keepalive=2, reconnect_max_delay=0.5,
        ))
        first_watcher = PahoWatcher(self, self.broker.port, "wgkex-test/failover")
        second_watcher = PahoWatcher(self, second.port, "wgkex-test/failover")
        await until(lambda: service.connected and first_watcher.subscribed.is_set()
                    and second_watcher.subscribed.is_set(), "all clients connected")
        self.assertEqual(service.server, f"127.0.0.1:{self.broker.port}")
        await service.publish("wgkex-test/failover", b"one", qos=1)
        await until(lambda: first_watcher.payloads() == [b"one"], "the message on the first server")
        self.broker.stop(kill=True)
        await until(lambda: not service.connected, "the loss to be noticed")
        await until(lambda: service.connected, "a connection to the second server")
        self.assertEqual(service.server, f"127.0.0.1:{second.port}")
        await service.publish("wgkex-test/failover", b"two", qos=1)
        await until(lambda: second_watcher.payloads() == [b"two"], "the message on the second server")

    @deferred_test
    async def test_round_trip(self) -> None:
        """A publish reaches the service's own subscription and an independent client; retained is flagged."""
        service = self.service()
        got: list[tuple[str, bytes, bool]] = []
        service.subscribe("wgkex-test/rt/+", 1, lambda t, p, r: got.append((t, p, r)))
        watcher = PahoWatcher(self, self.broker.port, "wgkex-test/rt/+")
        await until(lambda: service.connected and watcher.subscribed.is_set(), "both clients connected")
        await gatherResults([
            service.publish("wgkex-test/rt/a", b"one", qos=1),
            service.publish("wgkex-test/rt/b", "two", qos=0),
        ])
        expected = [("wgkex-test/rt/a", b"one", False), ("wgkex-test/rt/b", b"two", False)]
        await until(lambda: len(got) == 2 and len(watcher.messages) == 2, "two messages at both subscribers")
        self.assertEqual(got, expected)
        self.assertEqual(watcher.messages, expected)

        await service.publish("wgkex-test/rt/status", b"1", qos=1, retain=True)
        late = self.service()
        retained: list[tuple[str, bytes, bool]] = []
        late.subscribe("wgkex-test/rt/status", 1, lambda t, p, r: retained.append((t, p, r)))
        await until(lambda: retained, "the retained message at a later subscriber")
        self.assertEqual(retained, [("wgkex-test/rt/status", b"1", True)])

    @deferred_test
    async def test_mosquitto_restart(self) -> None:
        """After mosquitto is killed and restarted, the service reconnects, resubscribes and delivers its queue in order."""
        service = self.service()
        got: list[bytes] = []
        service.subscribe("wgkex-test/q/+", 1, lambda t, p, r: got.append(p))
        await until(lambda: service.connected, "the first connect")
        await service.publish("wgkex-test/q/x", b"before", qos=1)
        await until(lambda: got == [b"before"], "the first message")

        self.broker.stop(kill=True)
        await until(lambda: not service.connected, "the service to notice the loss")
        queued = [service.publish("wgkex-test/q/x", f"m{i}", qos=1) for i in range(200)]
        self.assertEqual(service.pending, 200)
        await deferToThread(self.broker.start)
        await gatherResults(queued)
        await until(lambda: len(got) >= 201, "the queued messages")
        # Messages the service published itself, received through the subscription it renewed.
        self.assertEqual(got, [b"before"] + [f"m{i}".encode() for i in range(200)])
        self.assertEqual(service.reconnects, 1)
        self.assertEqual(service.pending, 0)

    @deferred_test
    async def test_last_will_when_connection_cut(self) -> None:
        """Cutting the client's connection (no DISCONNECT) makes mosquitto publish its last will."""
        proxy = CuttableProxy(self, self.broker.port)
        will_topic = unique("wgkex-test/will")
        watcher = PahoWatcher(self, self.broker.port, will_topic)
        service = self.service(port=proxy.port, will=Will(will_topic, b"0", qos=1, retain=True))
        await until(lambda: service.connected and watcher.subscribed.is_set(), "both clients connected")
        self.assertEqual(watcher.messages, [])
        self.assertEqual(proxy.cut(), 1)
        await until(lambda: watcher.messages, "the last will")
        self.assertEqual(watcher.messages, [(will_topic, b"0", False)])
        await until(lambda: service.connected, "the service to reconnect")
        self.assertEqual(service.reconnects, 1)

    @deferred_test
    async def test_callback_exception_does_not_stop_next_message(self) -> None:
        """A message callback raising is logged and the following messages are still delivered."""
        service = self.service()
        got: list[bytes] = []

        def callback(topic: str, payload: bytes, retained: bool) -> None:
            got.append(payload)
            if payload.startswith(b"bad"):
                raise RuntimeError(f"callback failure for {payload!r}, on purpose")

        service.subscribe("wgkex-test/cb", 1, callback)
        await until(lambda: service.connected, "connect")
        payloads = [b"bad1", b"good1", b"bad2", b"good2"]
        await gatherResults([service.publish("wgkex-test/cb", p, qos=1) for p in payloads])
        await until(lambda: len(got) == 4, "all four messages")
        self.assertEqual(got, payloads)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(service.connected)

    @deferred_test
    async def test_persistent_session_across_connection_loss(self) -> None:
        """With a fixed client id and clean session off, QoS 1 messages sent while cut off arrive afterwards."""
        proxy = CuttableProxy(self, self.broker.port)
        subscriber = self.service(port=proxy.port, client_id=unique("wgkex-test-worker"), clean_session=False)
        got: list[bytes] = []
        subscriber.subscribe("wgkex-test/keys/+", 1, lambda t, p, r: got.append(p))
        publisher = self.service()
        await until(lambda: subscriber.connected and publisher.connected, "both connected")
        await publisher.publish("wgkex-test/keys/welt", b"first", qos=1)
        await until(lambda: got == [b"first"], "the first key")

        await proxy.close()
        await until(lambda: not subscriber.connected, "the subscriber to be cut off")
        await gatherResults([publisher.publish("wgkex-test/keys/welt", f"k{i}", qos=1) for i in range(20)])
        proxy.resume()
        await until(lambda: len([p for p in got if p != b"first"]) >= 20, "the keys sent while away")
        # QoS 1 is at least once: when the cut beats the PUBACK for "first" (a loaded machine),
        # the server rightly sends "first" again. The keys sent while away come once, in order.
        self.assertEqual(got[0], b"first")
        self.assertEqual([p for p in got if p != b"first"], [f"k{i}".encode() for i in range(20)])
        self.assertEqual(subscriber.reconnects, 1)

    @deferred_test
    async def test_persistent_session_across_restart(self) -> None:
        """A worker restarted with the same client id gets the QoS 1 messages sent while it was stopped."""
        client_id = unique("wgkex-test-worker")
        first = MqttService(reactor, self._settings(), client_id=client_id, clean_session=False)
        first.subscribe("wgkex-test/keys/+", 1, lambda t, p, r: None)
        first.startService()
        await until(lambda: first.connected, "the first run to connect")
        await first.publish("wgkex-test/sync", b"", qos=1)  # SUBSCRIBE went before this, on the same connection
        await first.stopService()

        publisher = self.service()
        await until(lambda: publisher.connected, "the publisher")
        await gatherResults([publisher.publish("wgkex-test/keys/welt", f"k{i}", qos=1) for i in range(10)])

        second = self.service(client_id=client_id, clean_session=False)
        got: list[bytes] = []
        second.subscribe("wgkex-test/keys/+", 1, lambda t, p, r: got.append(p))
        await until(lambda: len(got) >= 10, "the keys sent while stopped")
        self.assertEqual(got, [f"k{i}".encode() for i in range(10)])

    @deferred_test
    async def test_inflight_publishes_survive_cut_connection(self) -> None:
        """Publishes in flight when the connection is cut are all delivered, first arrivals in order."""
        proxy = CuttableProxy(self, self.broker.port)
        service = self.service(port=proxy.port)
        watcher = PahoWatcher(self, self.broker.port, "wgkex-test/burst")
        await until(lambda: service.connected and watcher.subscribed.is_set(), "both clients connected")
        count = 3000
        published = [service.publish("wgkex-test/burst", str(i), qos=1) for i in range(count)]
        await published[100]
        self.assertFalse(all(d.called for d in published), "the cut must catch publishes in flight")
        self.assertEqual(proxy.cut(), 1)
        await gatherResults(published)
        expected = [str(i).encode() for i in range(count)]
        await until(lambda: len(set(watcher.payloads())) == count, f"{count} distinct messages at the watcher")
        first_seen = list(dict.fromkeys(watcher.payloads()))
        self.assertEqual(first_seen, expected)
        self.assertEqual(service.reconnects, 1)

    @deferred_test
    async def test_unix_socket_transport(self) -> None:
        """transport: unix reaches mosquitto through its unix socket (broker_url is the path)."""
        directory = tempfile.mkdtemp(prefix="wgkex-mq-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "mqtt.sock")
        broker = start_mosquitto(cast(Any, self), unix_socket=path)
        service = self.service(settings=MqttConfig(broker_url=path, transport="unix", reconnect_max_delay=0.5))
        got: list[bytes] = []
        service.subscribe("wgkex-test/unix", 1, lambda t, p, r: got.append(p))
        watcher = PahoWatcher(self, broker.port, "wgkex-test/unix")
        await until(lambda: service.connected and watcher.subscribed.is_set(), "both connected")
        await service.publish("wgkex-test/unix", b"via unix", qos=1)
        await until(lambda: got and watcher.messages, "the message at both subscribers")
        self.assertEqual(got, [b"via unix"])
        self.assertEqual(watcher.payloads(), [b"via unix"])

    @deferred_test
    async def test_silent_connection_detected_by_keepalive(self) -> None:
        """A connection that goes silent without closing is given up after the keepalive, then re-made."""
        proxy = CuttableProxy(self, self.broker.port)
        events: list[dict[str, Any]] = []
        service = MqttService(
            reactor,
            MqttConfig(broker_url="127.0.0.1", broker_port=proxy.port, keepalive=1, reconnect_max_delay=0.5),
        )
        observe_logs(service, events.append)
        got: list[bytes] = []
        service.subscribe("wgkex-test/ka", 1, lambda t, p, r: got.append(p))
        service.startService()
        self.addCleanup(service.stopService)
        await until(lambda: service.connected, "connect")
        proxy.freeze()
        frozen_at = reactor.seconds()
        await until(lambda: not service.connected, "the keepalive to notice the silence", timeout=6)
        noticed = reactor.seconds() - frozen_at
        lost = [e for e in events if "lost" in str(e.get("what"))]
        self.assertIn("within the keepalive of 1 s", str(lost[0]["what"]))
        await until(lambda: service.connected, "a new connection")
        await service.publish("wgkex-test/ka", b"alive", qos=1)
        await until(lambda: got == [b"alive"], "a message over the new connection")
        self.assertLess(noticed, 4.0)

    @deferred_test
    async def test_websockets_transport(self) -> None:
        """transport: websockets reaches mosquitto's websockets listener."""
        broker = _WebsocketMosquitto()
        self.addCleanup(broker.cleanup)
        broker.start()
        service = self.service(settings=MqttConfig(
            broker_url="127.0.0.1", broker_port=broker.ws_port, transport="websockets", reconnect_max_delay=0.5))
        got: list[bytes] = []
        service.subscribe("wgkex-test/ws", 1, lambda t, p, r: got.append(p))
        watcher = PahoWatcher(self, broker.port, "wgkex-test/ws")
        await until(lambda: service.connected and watcher.subscribed.is_set(), "both connected")
        await gatherResults([service.publish("wgkex-test/ws", str(i), qos=1) for i in range(500)])
        await until(lambda: len(got) >= 500 and len(watcher.messages) >= 500, "500 messages at both subscribers")
        self.assertEqual(got, [str(i).encode() for i in range(500)])
        self.assertEqual(watcher.payloads(), got)

    def _settings(self, **kwargs: Any) -> MqttConfig:
        return MqttConfig(
            broker_url="127.0.0.1", broker_port=self.broker.port, keepalive=5, reconnect_max_delay=0.5, **kwargs
        )
