"""The broker's pages in memory (StubTreq): /healthz, /readyz, /status.json, the index, /metrics, their cache."""

from __future__ import annotations

import json
from collections import Counter

from tests.support.broker_api_case import BASE, V1, ApiCase, body
from tests.support.broker_fakes import GW_KEY2


class PageTests(ApiCase):
    def test_healthz(self) -> None:
        """/healthz answers 200 JSON."""
        status, headers, content = self.request("GET", BASE + "/healthz")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertEqual(json.loads(content), {"status": "ok"})

    def test_readyz_follows_mqtt(self) -> None:
        """/readyz is 200 while MQTT is connected and 503 (JSON error) while it is not."""
        self.assertEqual(self.request("GET", BASE + "/readyz")[0], 200)
        self.b.bus.connected = False
        self.assertJsonError(self.request("GET", BASE + "/readyz"), 503, "not connected")

    def test_status_json(self) -> None:
        """/api/v1/status gives MQTT state and per domain the workers with weight, share, next choice."""
        self.b.worker("gw-a", peers=30)
        self.b.worker("gw-b", peers=2, key=GW_KEY2)
        status, headers, content = self.request("GET", BASE + "/api/v1/status")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["application/json"])
        data = json.loads(content)
        self.assertEqual(data["mqtt"], {"connected": True, "reconnects": 0, "pending": 0})
        welt = data["domains"]["ffmuc_welt"]
        self.assertEqual(welt["next"], "gw-b")
        rows = {r["name"]: r for r in welt["workers"]}
        self.assertEqual(rows["gw-a"]["weight"], 3)
        self.assertEqual(rows["gw-a"]["target_share"], 0.75)
        self.assertEqual(rows["gw-b"]["peers"], 2)
        self.assertTrue(rows["gw-b"]["next"])
        self.assertTrue(rows["gw-a"]["online"])
        self.assertEqual(rows["gw-a"]["last_seen_seconds_ago"], 0)
        self.assertEqual(data["domains"]["ffmuc_muc"]["workers"], [])

    def test_index_html(self) -> None:
        """/ is an HTML page that refreshes itself and names the workers."""
        self.b.worker("gw-a", peers=30)
        status, headers, content = self.request("GET", BASE + "/")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["text/html; charset=utf-8"])
        page = content.decode()
        self.assertIn('http-equiv="refresh"', page)
        self.assertIn("gw-a", page)
        self.assertIn("ffmuc_welt", page)

    def test_metrics(self) -> None:
        """/metrics is Prometheus text with the broker's metrics."""
        self.b.worker("gw-a", peers=30)
        self.post(V1, body())
        status, headers, content = self.request("GET", BASE + "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"][0].startswith("text/plain"))
        text = content.decode()
        for line in (
            'wgkex_broker_requests_total{endpoint="v1",status="200"} 1.0',
            'wgkex_broker_keys_published_total{domain="ffmuc_welt"} 1.0',
            "wgkex_broker_mqtt_connected 1.0",
            "wgkex_broker_mqtt_reconnects_total 0.0",
            'wgkex_broker_workers_online{domain="ffmuc_welt"} 1.0',
            'wgkex_broker_worker_peers{domain="ffmuc_welt",worker="gw-a"} 30.0',
            'wgkex_broker_request_seconds_count{endpoint="v1"} 1.0',
            "wgkex_broker_rate_limited_total 0.0",
        ):
            self.assertIn(line, text)


class CachedPagesTests(ApiCase):
    def test_expensive_pages_rendered_once_a_second(self) -> None:
        """/metrics, /api/v1/status and / are rendered at most once a second: a flood costs one render."""
        renders: Counter[str] = Counter()
        original = self.b.metrics.render

        def counting_render() -> bytes:
            renders["metrics"] += 1
            return original()

        self.b.metrics.render = counting_render  # type: ignore[method-assign]
        first = [self.request("GET", BASE + path)[2] for path in ("/metrics", "/api/v1/status", "/")]
        self.b.worker("gw-a", peers=30)
        for _ in range(50):
            again = [self.request("GET", BASE + path)[2] for path in ("/metrics", "/api/v1/status", "/")]
        self.assertEqual(again, first)
        self.assertEqual(renders["metrics"], 1)
        self.b.clock.advance(1)
        fresh = [self.request("GET", BASE + path)[2] for path in ("/metrics", "/api/v1/status", "/")]
        self.assertEqual(renders["metrics"], 2)
        self.assertIn(b'worker="gw-a"', fresh[0])
        self.assertIn(b"gw-a", fresh[1])
        self.assertIn(b"gw-a", fresh[2])
