"""The picture of the workers built from bus messages, and what it does with malformed ones."""

from __future__ import annotations

import copy
import json

from twisted.internet.task import Clock
from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.broker_fakes import GW_KEY, Broker, endpoint_data
from tests.unit.test_contract import data_with as contract_data_with
from wgkex import contract
from wgkex.broker.workers import Endpoint, Refused, WorkerPicture, WorkerTracker

GOOD_DATA = {"ExternalAddress": "gw1.example.net", "Port": 51820, "PublicKey": GW_KEY, "LinkAddress": "fe80::1"}


def data_with(**changes: object) -> bytes:
    return contract_data_with(GOOD_DATA, **changes)


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

    def test_refused_topics_change_nothing(self) -> None:
        """Reports refused for their topic (shape, worker name, unknown domain) leave the picture as it was."""
        self.feed_worker()
        before = copy.deepcopy(self.picture.workers)
        bad = [
            ("wireguard-worker/gw1/ffmuc_other/data", data_with(), "domain"),
            ("wireguard-metrics/ffmuc_other/gw1/connected_peers", b"3", "domain"),
            ("wireguard-metrics/ffmuc_other/gw1/connected_peers", b"many", "domain"),
            ("wireguard-metrics//gw1/connected_peers", b"3", "domain"),
            ("wireguard-worker//status", b"1", "worker_name"),
            ("wireguard-worker//ffmuc_welt/data", data_with(), "worker_name"),
            ("wireguard-metrics/ffmuc_welt//connected_peers", b"3", "worker_name"),
            ("wireguard-worker/$(reboot)/status", b"1", "worker_name"),
            ("wireguard-worker/gw\u202e1/status", b"1", "worker_name"),
            ("wireguard-worker/gw1/extra/status", b"1", "topic"),
            ("something/else", b"1", "topic"),
        ]
        for topic, payload, reason in bad:
            with self.assertRaises(Refused, msg=f"{topic} {payload[:40]!r}") as raised:
                self.picture.handle(topic, payload)
            self.assertEqual(raised.exception.reason, reason, topic)
        self.assertEqual(self.picture.workers, before)

    def test_refused_payloads_clear_what_the_topic_said(self) -> None:
        """An invalid report on a worker's own topic replaces the last valid one: ineligible until valid again."""
        bad = [
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"many", "syntax"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"1.5", "syntax"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"-2", "range"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"10000001", "range"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"\xff", "syntax"),
            ("wireguard-metrics/ffmuc_welt/gw1/connected_peers", b"9" * 309, "too_large"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"{not json", "syntax"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"\xff\xfe", "encoding"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"[1, 2]", "value"),
            ("wireguard-worker/gw1/ffmuc_welt/data", b"[" * 4000, "syntax"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port="51820"), "port"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port=True), "port"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(Port=70000), "port"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="$(reboot)"), "address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="<script>"), "address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="gw1\x00.net"), "address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="\u202egw1.net"), "address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="http://evil/"), "address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress=42), "address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(PublicKey="not-a-key"), "public_key"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(LinkAddress="fe80::1%x y"), "link_address"),
            ("wireguard-worker/gw1/ffmuc_welt/data", data_with(LinkAddress="10.0.0.1"), "link_address"),
            ("wireguard-worker/gw1/status", b"2", "value"),
            ("wireguard-worker/gw1/status", b"online", "value"),
        ]
        for topic, payload, reason in bad:
            self.feed_worker()
            self.assertTrue(self.picture.workers["gw1"].eligible("ffmuc_welt"))
            with self.assertRaises(Refused, msg=f"{topic} {payload[:40]!r}") as raised:
                self.picture.handle(topic, payload)
            self.assertEqual(raised.exception.reason, reason, f"{topic} {payload[:40]!r}")
            self.assertFalse(self.picture.workers["gw1"].eligible("ffmuc_welt"), f"{topic} {payload[:40]!r}")
            self.assertIsNone(self.picture.next_choice("ffmuc_welt"))

    def test_invalid_data_keeps_the_last_valid_one_out(self) -> None:
        """After invalid data the old endpoint is never handed out; the next valid data brings the worker back."""
        self.feed_worker()
        self.assertRaises(Refused, self.picture.handle, "wireguard-worker/gw1/ffmuc_welt/data",
                          data_with(ExternalAddress="$(reboot)"))
        self.assertNotIn("ffmuc_welt", self.picture.workers["gw1"].data)
        self.assertIsNone(self.picture.choose("ffmuc_welt"))
        self.picture.handle("wireguard-worker/gw1/ffmuc_welt/data", data_with(ExternalAddress="gw1.example.org"))
        choice = self.picture.choose("ffmuc_welt")
        assert choice is not None
        self.assertEqual(choice[1].address, "gw1.example.org")

    def test_invalid_reports_of_unknown_workers_create_nothing(self) -> None:
        """A refused report about a worker never seen adds no worker."""
        for topic, payload in [("wireguard-worker/new/status", b"2"),
                               ("wireguard-worker/new/ffmuc_welt/data", b"{}"),
                               ("wireguard-metrics/ffmuc_welt/new/connected_peers", b"9" * 40)]:
            self.assertRaises(Refused, self.picture.handle, topic, payload)
        self.assertEqual(self.picture.workers, {})

    def test_worker_limit(self) -> None:
        """Beyond the worker limit new names are refused; known ones still update."""
        picture = WorkerPicture(("ffmuc_welt",), lambda n: 1, self.clock, max_workers=2)
        picture.handle("wireguard-worker/a/status", b"1")
        picture.handle("wireguard-worker/b/status", b"1")
        with self.assertRaises(Refused) as raised:
            picture.handle("wireguard-worker/c/status", b"1")
        self.assertEqual(raised.exception.reason, "too_many_workers")
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
        self.invalid: list[Refused] = []
        self.tracker = WorkerTracker(self.picture, self.clock, on_invalid=self.invalid.append, log_interval=60)
        self.bus = FakeBus(connected=True)
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
            sorted((f, 1) for f in contract.REPORT_FILTERS),
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
        self.assertEqual([(r.kind, r.reason) for r in self.invalid], [("metric", "syntax")])
        self.assertEqual(self.picture.invalid, {("metric", "syntax"): 1})
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("connected_peers must be a decimal integer", self.warnings()[0]["reason"])

    def test_log_lines_quote_bus_text_safely(self) -> None:
        """A hostile topic is logged ASCII-escaped: no control characters or direction overrides reach the log."""
        self.bus.deliver("wireguard-worker/gw\u202e\x1b[31m/status", "1")
        [event] = self.warnings()
        self.assertTrue(event["topic"].isascii() and event["topic"].isprintable(), event["topic"])
        self.assertTrue(event["reason"].isascii() and event["reason"].isprintable(), event["reason"])

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


class HostileBusPagesTests(SynchronousTestCase):
    """What the bus says can never break a page or reach a router (the broker's HTTP side, in memory)."""

    def setUp(self) -> None:
        self.b = Broker()

    def get(self, path: str) -> tuple[int, bytes]:
        response = self.successResultOf(self.b.treq.get("http://broker.test" + path))
        return response.code, self.successResultOf(self.b.treq.content(response))

    def v2(self) -> tuple[int, bytes]:
        body = json.dumps({"domain": "ffmuc_welt", "public_key": GW_KEY}).encode()
        posted = self.b.treq.post("http://broker.test/api/v2/wg/key/exchange", data=body)
        self.b.bus.ack()
        self.b.treq.flush()
        response = self.successResultOf(posted)
        return response.code, self.successResultOf(self.b.treq.content(response))

    def test_huge_connected_peers_never_break_a_page(self) -> None:
        """A 309-digit (or out-of-range) count is refused and counted; every page still answers 200."""
        self.b.worker("gw-a", peers=5)
        for payload in ("9" * 309, "10000001", "99999999999999999999"):
            self.b.worker("gw-b", peers=0)
            self.b.bus.deliver("wireguard-metrics/ffmuc_welt/gw-b/connected_peers", payload)
            for path in ("/", "/api/v1/status", "/metrics"):
                self.assertEqual(self.get(path)[0], 200, f"{path} after {payload[:20]}")
            self.assertEqual(self.b.picture.next_choice("ffmuc_welt"), "gw-a")
        text = self.b.metrics.render().decode()  # /metrics may serve a copy up to a second old
        self.assertIn('wgkex_broker_bus_messages_invalid_total{kind="metric",reason="too_large"} 1.0', text)
        self.assertIn('wgkex_broker_bus_messages_invalid_total{kind="metric",reason="range"} 2.0', text)

    def test_hostile_endpoint_data_never_reaches_a_router(self) -> None:
        """Data with `$(reboot)`, markup or a zoned link address is refused: v2 sends routers elsewhere or 503."""
        hostile = [
            ("$(reboot)", "fe80::1"),
            ("<script>alert(1)</script>", "fe80::1"),
            ("http://evil/", "fe80::1"),
            ("gw\u202e.example.net", "fe80::1"),
            ("gw-evil.example.net", "fe80::1%x y"),
        ]
        for address, link in hostile:
            self.b.worker("gw-evil", address=address, link=link)
            code, body = self.v2()
            self.assertEqual(code, 503, body)
            self.assertNotIn(b"reboot", body)
        self.b.worker("gw-a")
        code, body = self.v2()
        self.assertEqual(code, 200)
        self.assertEqual(json.loads(body)["Endpoint"]["Address"], "gw-a.example.net")
        text = self.b.metrics.render().decode()
        self.assertIn('wgkex_broker_bus_messages_invalid_total{kind="data",reason="address"} 4.0', text)
        self.assertIn('wgkex_broker_bus_messages_invalid_total{kind="data",reason="link_address"} 1.0', text)

    def test_names_from_the_bus_are_never_labels(self) -> None:
        """Reports under hostile worker names are refused before they reach /metrics or the status page."""
        for name in ("$(reboot)", "gw\u202e", 'x"} 1\nfake_metric{a="', "x" * 300):
            self.b.worker(name)
        for path in ("/", "/api/v1/status", "/metrics"):
            code, body = self.get(path)
            self.assertEqual(code, 200)
            self.assertNotIn(b"reboot", body)
            self.assertNotIn(b"fake_metric", body)
        self.assertEqual(self.b.picture.workers, {})
