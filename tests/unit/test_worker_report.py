"""Status, data and connected-peer payloads the worker publishes for the broker."""

from __future__ import annotations

import gc
import json

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.worker_fakes import (
    GATEWAY_KEY,
    KEY_A,
    KEY_B,
    ManualPool,
    FakeKernel,
    SyncPool,
    backends_for,
    key,
    make_config,
)
from wgkex.broker.workers import WorkerPicture
from wgkex.config import parse_config
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.report import Reporter, count_peers

START = 1_700_000_000.0
STATUS = "wireguard-worker/gw1/status"
DATA_WELT = "wireguard-worker/gw1/ffmuc_welt/data"
DATA_OST = "wireguard-worker/gw1/ffmuc_ost/data"
METRIC_WELT = "wireguard-metrics/ffmuc_welt/gw1/connected_peers"
METRIC_OST = "wireguard-metrics/ffmuc_ost/gw1/connected_peers"


class ReporterTests(SynchronousTestCase):
    """Reporter with a fake bus, fake backends and a synchronous pool."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt", port=51820, address="fe80::27c:16ff:fec0:6c74")
        self.kernel.add_domain("ost", port=51821, address="fe80::1")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.bus = FakeBus()
        self.config = make_config()
        self.metrics = WorkerMetrics(self.config.domains)
        self.reporter = Reporter(self.config, self.bus, SyncPool(self.backends), self.metrics, self.clock)

    def test_connect_publishes_status_data_counts(self) -> None:
        """After a connect: status 1, then data per domain, then counts; all QoS 1 retained."""
        self.bus.connect()  # the service wires the callback; here on_connect is called directly
        self.successResultOf(self.reporter.on_connect())
        topics = [t for t, _, _, _ in self.bus.published]
        self.assertEqual(topics, [STATUS, DATA_WELT, DATA_OST, METRIC_WELT, METRIC_OST])
        self.assertTrue(all(qos == 1 and retain for _, _, qos, retain in self.bus.published))
        self.assertEqual(self.bus.last(STATUS), b"1")
        self.assertEqual(
            json.loads(self.bus.last(DATA_WELT) or b""),
            {
                "ExternalAddress": "gw1.example.net",
                "Port": 51820,
                "PublicKey": GATEWAY_KEY,
                "LinkAddress": "fe80::27c:16ff:fec0:6c74",
            },
        )
        self.assertEqual(json.loads(self.bus.last(DATA_OST) or b"")["Port"], 51821)
        self.assertEqual(self.bus.last(METRIC_WELT), b"0")

    def test_reannounce_repeats_status_and_data(self) -> None:
        """reannounce publishes status 1 and each domain's data again, byte for byte, QoS 1 retained."""
        self.bus.connect()
        self.successResultOf(self.reporter.on_connect())
        first = {t: p for t, p, _, _ in self.bus.published}
        self.bus.published.clear()
        self.reporter.reannounce()
        self.assertEqual(
            self.bus.published,
            [(STATUS, b"1", 1, True), (DATA_WELT, first[DATA_WELT], 1, True), (DATA_OST, first[DATA_OST], 1, True)],
        )

    def test_reannounce_gives_a_late_broker_the_whole_picture(self) -> None:
        """A broker that got none of the retained messages sees the worker eligible after one report."""
        self.bus.connect()
        self.successResultOf(self.reporter.on_connect())
        self.bus.published.clear()  # what a broker on another RabbitMQ node never received
        picture = WorkerPicture(("ffmuc_welt", "ffmuc_ost"), lambda n: 1, self.clock)
        self.reporter.reannounce()
        self.successResultOf(self.reporter.publish_counts())
        for topic, payload, _, _ in self.bus.published:
            picture.handle(topic, payload)
        self.assertEqual([w.name for w in picture.eligible("ffmuc_welt")], ["gw1"])
        self.assertEqual([w.name for w in picture.eligible("ffmuc_ost")], ["gw1"])

    def test_reannounce_skips_missing_interface_and_disconnected_bus(self) -> None:
        """No data is repeated for a domain whose interface went away, and nothing while disconnected."""
        self.bus.connect()
        self.successResultOf(self.reporter.on_connect())
        self.kernel.delete("wg-ost")
        self.successResultOf(self.reporter.publish_counts())
        self.bus.published.clear()
        self.reporter.reannounce()
        self.assertEqual([t for t, _, _, _ in self.bus.published], [STATUS, DATA_WELT])
        self.bus.disconnect()
        self.bus.published.clear()
        self.reporter.reannounce()
        self.assertEqual(self.bus.published, [])

    def test_data_brokers_would_refuse_is_not_published(self) -> None:
        """An externalName defaulting to a host name that is no DNS name: no data published, the reason logged."""
        config = parse_config({"domains": ["ffmuc_welt"], "domain_prefixes": ["ffmuc_"], "worker_name": "gw1"},
                              "test.yaml", hostname=lambda: "gw_1")
        reporter = Reporter(config, self.bus, SyncPool(self.backends), self.metrics, self.clock)
        self.bus.connect()
        with capturedLogs() as events:
            self.successResultOf(reporter.on_connect())
        self.assertEqual([t for t, _, _, _ in self.bus.published], [STATUS, METRIC_WELT])
        [warning] = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertIn("ExternalAddress", warning["problem"])
        self.assertIn("gw_1", warning["problem"])

    def test_connected_peer_count(self) -> None:
        """Only peers with a handshake within 180 s count as connected."""
        self.wg.add_peers("wg-welt", [(k, "fe80::9/128") for k in (KEY_A, KEY_B, key(1), key(2))])
        now = self.clock.seconds()
        self.wg.handshake("wg-welt", KEY_A, now - 5)
        self.wg.handshake("wg-welt", KEY_B, now - 180)
        self.wg.handshake("wg-welt", key(1), now - 181)
        self.bus.connect()
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.bus.last(METRIC_WELT), b"2")
        self.assertEqual(self.bus.last(METRIC_OST), b"0")
        self.assertEqual(
            self.metrics.registry.get_sample_value("wgkex_worker_peers", {"domain": "ffmuc_welt"}), 4
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value("wgkex_worker_connected_peers", {"domain": "ffmuc_welt"}), 2
        )

    def test_missing_interface_skipped_then_retried(self) -> None:
        """A missing interface: its data is skipped (logged once), its metric is -1; published once it is back."""
        self.kernel.delete("wg-ost")
        self.bus.connect()
        with capturedLogs() as events:
            self.successResultOf(self.reporter.on_connect())
            self.successResultOf(self.reporter.publish_counts())
        self.assertIsNone(self.bus.last(DATA_OST))
        self.assertIsNotNone(self.bus.last(DATA_WELT))
        self.assertEqual(self.bus.last(METRIC_OST), b"-1")
        warnings = [e for e in events if e["log_level"] == LogLevel.warn and e.get("domain") == "ffmuc_ost"]
        self.assertEqual(len(warnings), 1)
        self.assertIn("wg-ost", warnings[0]["problem"])
        self.kernel.add_domain("ost", port=51899)
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(json.loads(self.bus.last(DATA_OST) or b"")["Port"], 51899)
        self.assertEqual(self.bus.last(METRIC_OST), b"0")

    def test_no_link_local_address(self) -> None:
        """An interface without a link-local address gets no data message."""
        del self.kernel.link_local["wg-welt"]
        self.bus.connect()
        self.successResultOf(self.reporter.on_connect())
        self.assertIsNone(self.bus.last(DATA_WELT))

    def test_counts_not_published_while_disconnected(self) -> None:
        """While disconnected the counts update the gauges only; the next connect publishes afresh."""
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.bus.published, [])
        self.assertEqual(
            self.metrics.registry.get_sample_value("wgkex_worker_connected_peers", {"domain": "ffmuc_welt"}), 0
        )

    def test_goodbye(self) -> None:
        """goodbye publishes -1 for every domain, then status 0, retained QoS 1."""
        self.bus.connect()
        self.reporter.goodbye()
        self.assertEqual(
            self.bus.published,
            [(METRIC_WELT, b"-1", 1, True), (METRIC_OST, b"-1", 1, True), (STATUS, b"0", 1, True)],
        )

    def test_late_count_does_not_overwrite_goodbye(self) -> None:
        """A count still in the pool at shutdown is not published after the retained -1 and 0."""
        pool = ManualPool(self.backends)
        reporter = Reporter(self.config, self.bus, pool, self.metrics, self.clock)
        self.bus.connect()
        counting = reporter.publish_counts()
        reporter.goodbye()
        pool.release()
        self.successResultOf(counting)
        self.assertEqual(self.bus.last(METRIC_WELT), b"-1")
        self.assertEqual(self.bus.last(STATUS), b"0")

    def test_publish_refused(self) -> None:
        """A publish refused synchronously (queue full) is logged, not raised."""
        self.bus.queue_limit = 0
        with capturedLogs() as events:
            self.reporter.goodbye()
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 3)

    def test_count_reads_the_dump_with_gc_paused(self) -> None:
        """Counting holds a whole dump: the cyclic garbage collector is off meanwhile and back on after."""
        self.assertTrue(gc.isenabled())
        counts = count_peers(self.backends, {"ffmuc_welt": "wg-welt", "ffmuc_ost": "wg-ost"}, START)
        self.assertEqual(set(counts), {"ffmuc_welt", "ffmuc_ost"})
        self.assertEqual(self.wg.gc_during_dump, [False, False])
        self.assertTrue(gc.isenabled())
