"""The status page in a real browser: after a burst over two gateways the charts hold the right points.

A real ``twistd -n wgkex-broker`` on a real mosquitto; two gateways' retained
status, data and peer reports; a burst of Gluon-shaped v2 registrations and a
few refusals; new peer reports. Then Debian's headless Chromium loads ``/`` and
the test reads the rendered DOM back: the bars per minute, the gateways' peer
points and their shares against their target shares. A screenshot is taken
too (``WGKEX_SCREENSHOT=path`` keeps it: that is how ``docs/status-page.png`` is
made).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_process import (
    GW_KEY, GW_KEY2, BrokerProcess, fresh_key, publish_retained, v1_body, worker_messages,
)
from tests.support.browser import Element, dump_dom, need_chromium, parse_dom, screenshot
from tests.support.mosquitto import start_mosquitto, wait_for
from tests.support.skips import need_mosquitto

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BURST = 40
V2 = "/api/v2/wg/key/exchange"


def section(dom: Element, cls: str, domain: str | None = None) -> Element:
    found = [s for s in dom.find_all("section", cls) if domain is None or s.attrs.get("data-domain") == domain]
    assert len(found) == 1, f"expected one section {cls} {domain}, found {len(found)}"
    return found[0]


def refused(part: Element, reason: str) -> int:
    return sum(int(r.attrs["data-count"]) for r in part.find_all("rect", reason))


class StatusPageBrowserTests(SynchronousTestCase):
    skip = need_mosquitto() or need_chromium()

    def test_charts_after_a_burst_over_two_gateways(self) -> None:
        """The rendered page shows the burst's accepted and refused requests, each gateway's peers and shares."""
        started = time.monotonic()
        mosquitto = start_mosquitto(self)  # type: ignore[arg-type]
        broker = BrokerProcess(self, mosquitto.port)  # gw-a weighs 3, gw-b 1
        publish_retained(mosquitto.port, worker_messages("gw-a", "gw-a.example.net", GW_KEY, peers=30, port=40001)
                         + worker_messages("gw-b", "gw-b.example.net", GW_KEY2, peers=10, port=40002))
        wait_for(lambda: broker.status()["domains"]["ffmuc_welt"]["online"] == 2, 15, what="both gateways online")

        chosen = []
        for i in range(BURST):
            code, _, body = broker.post(V2, v1_body(fresh_key(i)))
            self.assertEqual(code, 200, body)
            chosen.append(body)
        for i in range(3):
            self.assertEqual(broker.post(V2, v1_body("not a key"))[0], 400)
        for i in range(2):
            self.assertEqual(broker.post(V2, v1_body(fresh_key(100 + i), domain="ffmuc_muc"))[0], 503)
            self.assertEqual(broker.post(V2, v1_body(fresh_key(200 + i), domain="ffmuc_nowhere"))[0], 400)
        publish_retained(mosquitto.port, [
            ("wireguard-metrics/ffmuc_welt/gw-a/connected_peers", "58"),
            ("wireguard-metrics/ffmuc_welt/gw-b/connected_peers", "22"),
        ])
        wait_for(lambda: {w["name"]: w["domain_peers"] for w in broker.status()["domains"]["ffmuc_welt"]["workers"]}
                 == {"gw-a": 58, "gw-b": 22}, 15, what="the new peer reports")
        status = broker.status()

        browser_started = time.monotonic()
        dom = parse_dom(dump_dom(f"http://127.0.0.1:{broker.port}/"))
        browser_seconds = time.monotonic() - browser_started

        welt = section(dom, "domain", "ffmuc_welt")
        minutes = welt.find_all("g", "minute")
        self.assertEqual(len(minutes), 60)
        self.assertEqual(sum(int(m.attrs["data-ok"]) for m in minutes), BURST)
        self.assertEqual(refused(welt, "bad_key"), 3)
        self.assertEqual(sum(int(m.attrs["data-refused"]) for m in minutes), 3)
        self.assertEqual(refused(section(dom, "domain", "ffmuc_muc"), "no_worker"), 2)
        self.assertEqual(refused(section(dom, "no-domain"), "bad_domain"), 2)

        lines = {g.attrs["data-worker"]: g for g in welt.find_all("g", "gateway")}
        self.assertEqual(sorted(lines), ["gw-a", "gw-b"])
        for name, last in (("gw-a", 58), ("gw-b", 22)):
            points = lines[name].find_all("circle")
            self.assertEqual(int(points[-1].attrs["data-peers"]), last, name)
            self.assertEqual(points[-1].attrs["data-start"],
                             str(status["history"]["domains"]["ffmuc_welt"]["peers"][name][-1]["start"]))

        rows = {w["name"]: w for w in status["domains"]["ffmuc_welt"]["workers"]}
        shares = {g.attrs["data-worker"]: g for g in welt.find_all("g", "share")}
        self.assertEqual(sorted(shares), ["gw-a", "gw-b"])
        for name, g in shares.items():
            self.assertAlmostEqual(float(g.attrs["data-share"]), rows[name]["share"], places=4)
            self.assertAlmostEqual(float(g.attrs["data-target"]), rows[name]["target_share"], places=4)
        self.assertEqual((rows["gw-a"]["target_share"], rows["gw-b"]["target_share"]), (0.75, 0.25))
        self.assertAlmostEqual(rows["gw-a"]["share"], 58 / 80, places=4)
        self.assertEqual(dom.find_all("script"), [])

        scratch = tempfile.mkdtemp(prefix="wgkex-shot-")
        self.addCleanup(shutil.rmtree, scratch, True)
        shot = os.path.join(scratch, "status.png")
        screenshot(f"http://127.0.0.1:{broker.port}/", shot, 1000, 1850)
        with open(shot, "rb") as f:
            png = f.read()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 20_000)  # charts and text, not a blank page
        keep = os.environ.get("WGKEX_SCREENSHOT")
        if keep:
            # Relative to the repository (trial runs tests in _trial_temp).
            shutil.copyfile(shot, os.path.join(ROOT, keep))
        print(f"\nbrowser test: {time.monotonic() - started:.1f} s in all, chromium --dump-dom {browser_seconds:.1f} s")
