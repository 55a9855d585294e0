"""The broker's last hour: bounded per-minute history, its JSON, its SVG charts, and what feeds it."""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_api_case import V1, V2, ApiCase, body
from tests.support.bus import FakeBus
from tests.support.memory import deep_size
from tests.support.broker_fakes import endpoint_data
from wgkex.broker.charts import nice_ceiling
from wgkex.broker.history import MINUTES, AlsoTo, History
from wgkex.broker.status import render_html, snapshot
from wgkex.broker.workers import WorkerPicture

T0 = 1_700_000_040  # the start of a minute


class HistoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.history = History(("ffmuc_welt", "ffmuc_muc"), self.clock)

    def welt(self) -> list[dict[str, Any]]:
        return self.history.snapshot()["domains"]["ffmuc_welt"]["registrations"]  # type: ignore[no-any-return]

    def test_counts_land_in_their_minute(self) -> None:
        """Accepted and refused requests are counted per minute and reason; the newest minute is last."""
        self.history.registration("ffmuc_welt")
        self.history.registration("ffmuc_welt")
        self.history.registration("ffmuc_welt", "key_list")
        self.clock.advance(60)
        self.history.registration("ffmuc_welt", "no_worker")
        minutes = self.welt()
        self.assertEqual(len(minutes), MINUTES)
        self.assertEqual(minutes[-1], {"start": T0 + 60, "ok": 0, "refused": {"no_worker": 1}})
        self.assertEqual(minutes[-2], {"start": T0, "ok": 2, "refused": {"key_list": 1}})
        self.assertEqual(minutes[0]["start"], T0 + 60 - 59 * 60)
        self.assertEqual(sum(m["ok"] for m in minutes), 2)

    def test_requests_without_domain_are_counted_apart(self) -> None:
        """Requests naming no configured domain go to no_domain, not to any domain."""
        self.history.registration(None, "bad_request")
        self.history.registration("ffmuc_elsewhere", "bad_domain")
        snap = self.history.snapshot()
        self.assertEqual(snap["no_domain"][-1]["refused"], {"bad_request": 1, "bad_domain": 1})
        for domain in snap["domains"].values():
            self.assertFalse(any(m["ok"] or m["refused"] for m in domain["registrations"]))

    def test_minutes_older_than_an_hour_are_forgotten(self) -> None:
        """A minute's counts leave the history after an hour, even when its ring slot was not reused."""
        self.history.registration("ffmuc_welt")
        self.clock.advance(59 * 60)
        self.assertEqual(self.welt()[0]["ok"], 1)
        self.clock.advance(60)
        self.assertEqual(sum(m["ok"] for m in self.welt()), 0)
        self.clock.advance(60 * 60 * 5)
        self.history.registration("ffmuc_welt")
        self.assertEqual([m["ok"] for m in self.welt()], [0] * 59 + [1])

    def test_memory_does_not_grow_with_time_or_rate(self) -> None:
        """After one hour of traffic the history holds as much memory as after three (ring slots reused)."""
        self.history.peers_reported("gw-a", "ffmuc_welt", 10)

        def run_hour(rate: int) -> None:
            for second in range(3600):
                for i in range(rate):
                    self.history.registration("ffmuc_welt", None if i % 3 else "rate_limited")
                if second % 60 == 0:
                    self.history.peers_reported("gw-a", "ffmuc_welt", second)
                self.clock.advance(1)

        run_hour(1)
        after_one = deep_size(self.history)
        run_hour(1)
        run_hour(3)
        self.assertEqual(deep_size(self.history), after_one)

    def test_peer_reports_last_value_per_minute(self) -> None:
        """Peers per gateway from metrics reports: the last report of each minute; -1 kept; bad ones skipped."""
        h = self.history
        h.on_metric("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", b"5", True)
        h.on_metric("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", b"7", False)
        h.on_metric("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", b"many", False)
        h.on_metric("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", b"", False)
        h.on_metric("wireguard-metrics/ffmuc_other/gw-a/connected_peers", b"3", False)
        self.clock.advance(60)
        h.on_metric("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", b"-1", False)
        h.on_metric("wireguard-metrics/ffmuc_muc/gw-b/connected_peers", b"2", False)
        snap = h.snapshot()["domains"]
        self.assertEqual(snap["ffmuc_welt"]["peers"], {"gw-a": [{"start": T0, "peers": 7}, {"start": T0 + 60, "peers": -1}]})
        self.assertEqual(snap["ffmuc_muc"]["peers"], {"gw-b": [{"start": T0 + 60, "peers": 2}]})
        self.assertNotIn("ffmuc_other", snap)

    def test_peer_series_are_bounded(self) -> None:
        """Beyond max_series new gateways are refused until old series go stale, then they take their place."""
        h = History(("ffmuc_welt",), self.clock, max_series=2)
        for name in ("gw-a", "gw-b", "gw-c"):
            h.peers_reported(name, "ffmuc_welt", 1)
        self.assertEqual(sorted(h.snapshot()["domains"]["ffmuc_welt"]["peers"]), ["gw-a", "gw-b"])
        self.clock.advance(MINUTES * 60)
        h.peers_reported("gw-c", "ffmuc_welt", 1)
        self.assertEqual(sorted(h.snapshot()["domains"]["ffmuc_welt"]["peers"]), ["gw-c"])

    def test_also_to_keeps_one_subscription(self) -> None:
        """The tracker's metrics subscription also feeds the history; other filters pass through untouched."""
        bus = FakeBus()
        got: list[str] = []
        tee = AlsoTo(bus, "m/+", lambda t, p, r: got.append("also " + t))
        tee.subscribe("m/+", 1, lambda t, p, r: got.append("first " + t))
        tee.subscribe("s/+", 1, lambda t, p, r: got.append("other " + t))
        self.assertEqual([f for f, _, _ in bus.subscriptions], ["m/+", "s/+"])
        bus.deliver("m/x", b"1")
        bus.deliver("s/x", b"1")
        self.assertEqual(got, ["first m/x", "also m/x", "other s/x"])


class ApiFeedsHistoryTests(ApiCase):
    def test_outcomes_per_domain_and_reason(self) -> None:
        """Accepted keys, refusals with a known domain and refusals without one each land where they belong."""
        history = self.b.api.history
        self.b.worker("gw-a", peers=1)
        self.assertEqual(self.post(V1, body())[0], 200)
        self.assertEqual(self.post(V2, body())[0], 200)
        self.assertEqual(self.post(V2, body(domain="ffmuc_muc"))[0], 503)
        self.assertEqual(self.post(V1, body(key="not a key"))[0], 400)
        self.assertEqual(self.post(V1, body(domain="nowhere"))[0], 400)
        self.assertEqual(self.post(V1, b"{")[0], 400)
        snap = history.snapshot()
        welt = snap["domains"]["ffmuc_welt"]["registrations"][-1]
        self.assertEqual((welt["ok"], welt["refused"]), (2, {"bad_key": 1}))
        self.assertEqual(snap["domains"]["ffmuc_muc"]["registrations"][-1]["refused"], {"no_worker": 1})
        self.assertEqual(snap["no_domain"][-1]["refused"], {"bad_domain": 1, "bad_request": 1})

    def test_status_json_has_history(self) -> None:
        """/api/v1/status carries the history section with the requests just made."""
        self.post(V1, body())
        status, _, content = self.request("GET", "http://broker.example/api/v1/status")
        data = json.loads(content)
        self.assertEqual(data["history"]["minutes"], MINUTES)
        self.assertEqual(data["history"]["domains"]["ffmuc_welt"]["registrations"][-1]["ok"], 1)

    def test_openapi_served(self) -> None:
        """/api/openapi.json serves the OpenAPI 3.1 document kept in the package, as JSON."""
        status, headers, content = self.request("GET", "http://broker.example/api/openapi.json")
        self.assertEqual((status, headers["content-type"]), (200, ["application/json"]))
        doc = json.loads(content)
        self.assertEqual(doc["openapi"], "3.1.0")
        self.assertIn("/api/v2/wg/key/exchange", doc["paths"])


class ChartTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        weights = {"gw-a": 3, "gw-b": 1}
        self.picture = WorkerPicture(("ffmuc_welt",), lambda n: weights.get(n, 1), self.clock)
        self.history = History(("ffmuc_welt",), self.clock)

    def worker(self, name: str, peers: int) -> None:
        topic = f"wireguard-metrics/ffmuc_welt/{name}/connected_peers"
        self.picture.handle(f"wireguard-worker/{name}/status", b"1")
        self.picture.handle(f"wireguard-worker/{name}/ffmuc_welt/data", endpoint_data("gw.example").encode())
        self.picture.handle(topic, str(peers).encode())
        self.history.on_metric(topic, str(peers).encode(), False)

    def page(self) -> str:
        return render_html(snapshot(self.picture, True, 0, 0, self.clock.seconds(), self.history)).decode()

    def test_nice_ceiling(self) -> None:
        """Chart scales end on 1, 2 or 5 times a power of ten."""
        self.assertEqual([nice_ceiling(v) for v in (0, 1, 3, 7, 10, 11, 180, 501)], [1, 1, 5, 10, 10, 20, 200, 1000])

    def test_bars_hold_the_counts(self) -> None:
        """Each minute's bar group carries its accepted and refused counts; refusals are stacked by reason."""
        for _ in range(4):
            self.history.registration("ffmuc_welt")
        self.history.registration("ffmuc_welt", "key_list")
        self.clock.advance(60)
        self.history.registration("ffmuc_welt", "rate_limited")
        page = self.page()
        groups = re.findall(r'<g class="minute" data-start="(\d+)" data-ok="(\d+)" data-refused="(\d+)">', page)
        self.assertEqual(len(groups), MINUTES)
        self.assertEqual(groups[-2:], [(str(T0), "4", "1"), (str(T0 + 60), "0", "1")])
        self.assertIn('class="key_list"', page)
        self.assertIn("4 accepted, 1 refused (key_list 1)", page)

    def test_peer_lines_and_shares(self) -> None:
        """Peers per gateway are drawn as lines over the minutes; shares are drawn against target shares."""
        self.worker("gw-a", 30)
        self.worker("gw-b", 10)
        self.clock.advance(60)
        self.worker("gw-a", 45)
        shares = dict((w, (float(s), float(t))) for w, s, t in re.findall(
            r'<g class="share" data-worker="([^"]+)" data-share="([\d.]+)" data-target="([\d.]+)">', self.page()))
        self.assertEqual(shares, {"gw-a": (round(45 / 55, 4), 0.75), "gw-b": (round(10 / 55, 4), 0.25)})
        self.worker("gw-b", -1)
        page = self.page()
        points = dict(re.findall(r'<g class="gateway" data-worker="([^"]+)" data-points="([^"]*)">', page))
        self.assertEqual(points, {"gw-a": f"{T0}:30 {T0 + 60}:45", "gw-b": f"{T0}:10 {T0 + 60}:-1"})
        self.assertEqual(page.count("<polyline"), 1)  # gw-a's two points; gw-b's -1 breaks its line
        dots = re.findall(r'data-start="(\d+)" data-peers="(-?\d+)"', page)
        self.assertEqual(sorted(dots), [(str(T0), "10"), (str(T0 + 60), "45")])  # newest of gw-a, lone gw-b
        self.assertEqual(re.findall(r'<g class="share" data-worker="([^"]+)"', page), ["gw-a"])  # gw-b: -1

    def test_chart_names_are_escaped_and_self_contained(self) -> None:
        """A gateway name with markup shows as text in the charts; the page references nothing outside."""
        evil = '"><b onmouseover="x">gw'
        # The bus refuses such names (wgkex.contract); the charts escape whatever they hold anyway.
        self.worker("gw-a", 3)
        self.history.peers_reported(evil, "ffmuc_welt", 3)
        page = self.page()
        self.assertNotIn("<b onmouseover", page)
        self.assertIn("&lt;b onmouseover=&quot;x&quot;&gt;gw", page)
        self.assertNotIn("<script", page)
        self.assertIsNone(re.search(r"(src|href)=\"(https?:)?//", page))
        self.assertEqual(page.count("<svg"), 3)
