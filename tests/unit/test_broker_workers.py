"""The picture of the workers built from bus messages, and what it does with malformed ones."""

from __future__ import annotations

import copy
import json

from twisted.internet.task import Clock
from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_broker_fakes import GW_KEY, FakeBus, endpoint_data
from wgkex.broker.workers import (
    DATA_TOPIC,
    METRICS_TOPIC,
    STATUS_TOPIC,
    BadMessage,
    Endpoint,
    WorkerPicture,
    WorkerTracker,
)

GOOD_DATA = {"ExternalAddress": "gw1.example.net", "Port": 51820, "PublicKey": GW_KEY, "LinkAddress": "fe80::1"}


def data_with(**changes: object) -> bytes:
    d: dict[str, object] = dict(GOOD_DATA)
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d).encode()


class PictureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.picture = WorkerPicture(("ffmuc_welt", "ffmuc_muc"), lambda n: 1, self.clock)

    def feed_worker(self, name: str = "gw1") -> None:
        self.picture.handle(f"wireguard-worker/{name}/status", b"1")
        self.picture.handle(f"wireguard-worker/{name}/ffmuc_welt/data", data_with())
        self.picture.handle(f"wireguard-metrics/ffmuc_welt/{name}/connected_peers", b"12")

    def test_worker_from_three_messages(self) -> None:
        """Status, data and metric make a worker eligible with its endpoint and peer count."""
        self.feed_worker()
        w = self.picture.workers["gw1"]
        self.assertTrue(w.online)
        self.assertTrue(w.eligible("ffmuc_welt"))
        self.assertFalse(w.eligible("ffmuc_muc"))
        self.assertEqual(w.peers, {"ffmuc_welt": 12})
        self.assertEqual(w.data["ffmuc_welt"], Endpoint("gw1.example.net", 51820, GW_KEY, "fe80::1"))
        self.assertEqual(w.last_seen, 1000)

    def test_order_does_not_matter(self) -> None:
        """Retained messages arrive in any order; the result is the same."""
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"12")
        self.picture.handle("wireguard-worker/gw1/ffmuc_welt/data", data_with())
        self.assertFalse(self.picture.workers["gw1"].eligible("ffmuc_welt"))
        self.picture.handle("wireguard-worker/gw1/status", b"1")
        self.assertTrue(self.picture.workers["gw1"].eligible("ffmuc_welt"))

    def test_last_will_marks_offline(self) -> None:
        """Status 0 (the last will) takes the worker out of the candidates, keeping its data."""
        self.feed_worker()
        self.picture.handle("wireguard-worker/gw1/status", b"0")
        self.assertFalse(self.picture.workers["gw1"].eligible("ffmuc_welt"))
        self.assertIn("ffmuc_welt", self.picture.workers["gw1"].data)
        self.assertIsNone(self.picture.next_choice("ffmuc_welt"))

    def test_metric_minus_one(self) -> None:
        """A metric of -1 makes the worker ineligible for that domain."""
        self.feed_worker()
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"-1")
        self.assertFalse(self.picture.workers["gw1"].eligible("ffmuc_welt"))
        self.assertEqual(self.picture.workers["gw1"].total_peers(), 0)

    def test_status_with_whitespace(self) -> None:
        """A status of ``1\\n`` (as a shell might publish it) is online."""
        self.picture.handle("wireguard-worker/gw1/status", b"1\n")
        self.assertTrue(self.picture.workers["gw1"].online)

    def test_empty_payload_clears(self) -> None:
        """An empty retained payload (deletion) clears status, data or metric; with all gone the worker is forgotten."""
        self.feed_worker()
        self.picture.handle("wireguard-worker/gw1/status", b"")
        self.assertFalse(self.picture.workers["gw1"].online)
        self.assertIn("ffmuc_welt", self.picture.workers["gw1"].data)
        self.picture.handle("wireguard-worker/gw1/ffmuc_welt/data", b"")
        self.assertNotIn("ffmuc_welt", self.picture.workers["gw1"].data)
        self.assertEqual(self.picture.workers["gw1"].peers, {"ffmuc_welt": 12})
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"")
        self.assertNotIn("gw1", self.picture.workers)

    def test_clearing_unknown_worker_creates_nothing(self) -> None:
        """Deleting retained messages of a worker never seen (a decommissioned one) adds nothing and is not an error."""
        self.picture.handle("wireguard-worker/old/status", b"")
        self.picture.handle("wireguard-worker/old/ffmuc_welt/data", b"")
        self.picture.handle("wireguard-metrics/ffmuc_welt/old/connected_peers", b"")
        self.picture.handle("wireguard-worker/old/ffmuc_gone/data", b"")
        self.picture.handle("wireguard-metrics/ffmuc_gone/old/connected_peers", b"")
        self.assertEqual(self.picture.workers, {})
        self.assertEqual(self.picture.invalid, {})

    def test_retained_status_keeps_worker_known(self) -> None:
        """A worker whose status is still retained stays known when its data and metric are deleted (as on restart)."""
        self.feed_worker()
        self.picture.handle("wireguard-worker/gw1/status", b"0")
        self.picture.handle("wireguard-worker/gw1/ffmuc_welt/data", b"")
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"")
        self.assertFalse(self.picture.workers["gw1"].online)
        self.picture.handle("wireguard-worker/gw1/status", b"")
        self.assertNotIn("gw1", self.picture.workers)

    def test_last_seen_follows_clock(self) -> None:
        """Every message updates when the worker was last heard from."""
        self.feed_worker()
        self.clock.advance(30)
        self.picture.handle("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"3")
        self.assertEqual(self.picture.workers["gw1"].last_seen, 1030)

    def test_malformed_never_change_the_picture(self) -> None:
        """Each malformed message raises BadMessage and leaves the picture exactly as it was."""
        self.feed_worker()
        before = copy.deepcopy(self.picture.workers)
        bad = [
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"many"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"1.5"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"-2"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"\xff"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"9" * 5000),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"{not json"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"\xff\xfe"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"[1, 2]"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"[" * 10000),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port="51820")),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port=True)),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port=0)),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port=70000)),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress=42)),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="")),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="a b")),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(PublicKey="not-a-key")),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(PublicKey=KeyError)),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(LinkAddress=["fe80::1"])),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(LinkAddress="10.0.0.1")),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(LinkAddress=KeyError)),
            ("wireguard-worker/gw1/status", b"2"),
            ("wireguard-worker/gw1/status", b"online"),
            ("wireguard-worker/gw1/ffmuc_other/data", data_with()),
            ("wireguard-metrics/ffmuc_other/gw1/connected_peers", b"3"),
            ("wireguard-metrics//gw1/connected_peers", b"3"),
            ("wireguard-worker//status", b"1"),
            ("wireguard-worker//ffmuc_welt/data", data_with()),
            ("wireguard-metrics/ffmuc_welt//connected_peers", b"3"),
            ("wireguard-worker/gw1/extra/status", b"1"),
            ("something/else", b"1"),
        ]
        for topic, payload in bad:
            with self.assertRaises(BadMessage, msg=f"{topic} {payload[:40]!r}"):
                self.picture.handle(topic, payload)
        self.assertEqual(self.picture.workers, before)

    def test_worker_limit(self) -> None:
        """Beyond the worker limit new names are refused; known ones still update."""
        picture = WorkerPicture(("ffmuc_welt",), lambda n: 1, self.clock, max_workers=2)
        picture.handle("wireguard-worker/a/status", b"1")
        picture.handle("wireguard-worker/b/status", b"1")
        with self.assertRaises(BadMessage):
            picture.handle("wireguard-worker/c/status", b"1")
        picture.handle("wireguard-worker/a/status", b"0")
        self.assertEqual(sorted(picture.workers), ["a", "b"])
        self.assertFalse(picture.workers["a"].online)

    def test_endpoint_reply_shape(self) -> None:
        """The v2 reply carries Port as a string and the link address as AllowedIPs[0]."""
        e = Endpoint("gw1.example.net", 51820, GW_KEY, "fe80::1")
        self.assertEqual(
            e.reply(),
            {"Endpoint": {"Address": "gw1.example.net", "Port": "51820", "AllowedIPs": ["fe80::1"],
                          "PublicKey": GW_KEY}},
        )


class TrackerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.picture = WorkerPicture(("ffmuc_welt",), lambda n: 1, self.clock)
        self.invalid: list[str] = []
        self.tracker = WorkerTracker(self.picture, self.clock, on_invalid=self.invalid.append, log_interval=60)
        self.bus = FakeBus()
        self.tracker.subscribe(self.bus)
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def warnings(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace", "").endswith("WorkerTracker")]

    def test_subscribes_the_three_topics_at_qos1(self) -> None:
        """The tracker subscribes status, data and metrics topics at QoS 1."""
        self.assertEqual(
            sorted((f, q) for f, q, _ in self.bus.subscriptions),
            sorted([(STATUS_TOPIC, 1), (DATA_TOPIC, 1), (METRICS_TOPIC, 1)]),
        )

    def test_messages_reach_the_picture(self) -> None:
        """Messages delivered on the bus build the picture."""
        self.bus.deliver("wireguard-worker/gw1/status", "1")
        self.bus.deliver("wireguard-worker/gw1/ffmuc_welt/data", endpoint_data("gw1"))
        self.bus.deliver("wireguard-metrics/ffmuc_welt/gw1/connected_peers", "3")
        self.assertEqual(self.picture.next_choice("ffmuc_welt"), "gw1")

    def test_malformed_counted_and_logged_not_raised(self) -> None:
        """A bad message is counted per kind and logged, and the callback does not raise."""
        self.bus.deliver("wireguard-metrics/ffmuc_welt/gw1/connected_peers", "lots")
        self.assertEqual(self.invalid, ["metric"])
        self.assertEqual(self.picture.invalid, {"metric": 1})
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("connected_peers must be an integer", self.warnings()[0]["reason"])

    def test_logging_is_rate_limited(self) -> None:
        """A flood of bad messages logs one line per kind and interval, then says how many were skipped."""
        for _ in range(100):
            self.bus.deliver("wireguard-metrics/ffmuc_welt/gw1/connected_peers", "lots")
        self.assertEqual(len(self.warnings()), 1)
        self.assertEqual(len(self.invalid), 100)
        self.clock.advance(61)
        self.bus.deliver("wireguard-metrics/ffmuc_welt/gw1/connected_peers", "lots")
        self.assertEqual(len(self.warnings()), 2)
        self.assertEqual(self.warnings()[1]["suppressed"], 99)
