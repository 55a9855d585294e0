"""The status snapshot and its HTML page: content, escaping, self-containment."""

from __future__ import annotations

import re

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_fakes import endpoint_data
from wgkex.broker.status import render_html, snapshot
from wgkex.broker.workers import WorkerPicture


class StatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        weights = {"gw30": 30, "gw20": 20}
        self.picture = WorkerPicture(("ffmuc_welt", "ffmuc_muc"), lambda n: weights.get(n, 1), self.clock)

    def worker(self, name: str, peers: int, status: bytes = b"1") -> None:
        self.picture.handle(f"wireguard-worker/{name}/status", status)
        self.picture.handle(f"wireguard-worker/{name}/ffmuc_welt/data", endpoint_data(name).encode())
        self.picture.handle(f"wireguard-metrics/ffmuc_welt/{name}/connected_peers", str(peers).encode())

    def test_snapshot_rows(self) -> None:
        """Per domain: each reporting worker with online, peers, weight, share, last seen, next."""
        self.worker("gw30", 80)
        self.worker("gw20", 20)
        self.worker("gwoff", 0, status=b"0")
        self.clock.advance(12)
        snap = snapshot(self.picture, True, 2, 0, self.clock.seconds())
        self.assertEqual(snap["mqtt"], {"connected": True, "reconnects": 2, "pending": 0})
        welt = snap["domains"]["ffmuc_welt"]
        self.assertEqual(welt["next"], "gw20")
        self.assertEqual(welt["online"], 2)
        rows = {r["name"]: r for r in welt["workers"]}
        self.assertEqual(rows["gw30"]["target_share"], 0.6)
        self.assertEqual(rows["gw20"]["target_share"], 0.4)
        self.assertIsNone(rows["gwoff"]["target_share"])
        self.assertFalse(rows["gwoff"]["online"])
        self.assertEqual(rows["gw30"]["last_seen_seconds_ago"], 12)
        self.assertEqual(rows["gw20"]["endpoint"]["Address"], "gw20")
        self.assertEqual([r["next"] for r in welt["workers"]].count(True), 1)

    def test_page_refreshes_and_is_self_contained(self) -> None:
        """The page refreshes itself and loads nothing from elsewhere (no scripts, no external URLs)."""
        self.worker("gw30", 80)
        page = render_html(snapshot(self.picture, False, 0, 5, self.clock.seconds())).decode()
        self.assertRegex(page, r'<meta http-equiv="refresh" content="\d+">')
        self.assertNotIn("<script", page)
        self.assertIsNone(re.search(r"(src|href)=\"(https?:)?//", page))
        self.assertIn("disconnected", page)
        self.assertIn("keys pending: 5", page)
        self.assertIn("No worker has reported for this domain", page)

    def test_names_are_escaped(self) -> None:
        """Text in the snapshot is shown as text, not HTML (the contract refuses such names before, too)."""
        evil = "<img src=x onerror=alert(1)>"
        self.worker("gw30", 3)
        status = snapshot(self.picture, True, 0, 0, self.clock.seconds())
        status["domains"]["ffmuc_welt"]["workers"][0]["name"] = evil
        status["domains"]["ffmuc_welt"]["next"] = evil
        page = render_html(status).decode()
        self.assertNotIn(evil, page)
        self.assertIn("&lt;img src=x onerror=alert(1)&gt;", page)

    def test_no_worker_says_503(self) -> None:
        """A domain without eligible worker says that v2 answers 503."""
        page = render_html(snapshot(self.picture, True, 0, 0, self.clock.seconds())).decode()
        self.assertIn("v2 answers 503", page)
