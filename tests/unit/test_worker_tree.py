"""The whole worker tree with fakes at the boundaries: start and stop order, subscriptions, publishes, metrics."""

from __future__ import annotations

import json

from tests.support.worker_fakes import KEY_A, KEY_B, make_config
from tests.support.worker_tree import (
    DATA_WELT, METRIC_OST, METRIC_WELT, STATUS, SyncPoolService, WorkerTreeCase,
)
from wgkex.worker.service import build_worker


class WorkerTreeTests(WorkerTreeCase):
    """build_worker + WorkerRoot with a fake bus, kernel and pool."""

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
