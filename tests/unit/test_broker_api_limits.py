"""The broker's HTTP API in memory (StubTreq): the publish queue, the rate limit, proxies, key lists."""

from __future__ import annotations

import json

from tests.support.broker_api_case import BASE, V1, V2, ApiCase, body
from tests.support.broker_fakes import GLUON_HEADERS, KEY, KEY2, QUEUE_LIMIT, Broker
from wgkex.broker.keylists import KeyLists, parse_key_list


class QueueTests(ApiCase):
    broker_kwargs = {"connected": False}

    def test_disconnected_answers_at_once(self) -> None:
        """While MQTT is down the key is queued and the reply is 200 without waiting."""
        status, _, content = self.post(V1, body(), ack=False)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(content), {"Message": "OK"})
        self.assertEqual(self.b.bus.keys(), [("wireguard/ffmuc_welt/all", KEY.encode())])
        self.assertIn('wgkex_broker_keys_queued_total{domain="ffmuc_welt"} 1.0', self.b.metrics.render().decode())

    def test_queue_full_is_503(self) -> None:
        """When the pending queue is full: 503 saying so."""
        for _ in range(QUEUE_LIMIT):
            self.assertEqual(self.post(V1, body(), ack=False)[0], 200)
        self.assertJsonError(self.post(V1, body(), ack=False), 503, "queue of pending keys is full")
        self.assertEqual(len(self.b.bus.published), QUEUE_LIMIT)

    def test_v2_queue_full_takes_choice_back(self) -> None:
        """A v2 request refused for a full queue does not count a peer for the chosen worker."""
        self.b.worker("gw-a", peers=5)
        self.b.bus.queue_limit = 0
        self.assertJsonError(self.post(V2, body(), ack=False), 503, "queue")
        self.assertEqual(self.b.picture.workers["gw-a"].peers["ffmuc_welt"], 5)


class RateLimitTests(ApiCase):
    broker_kwargs = {"broker": {"rate_limit": 1, "rate_burst": 3}}

    def test_429_with_retry_after(self) -> None:
        """Past the burst: 429 with an integer Retry-After >= 1, and nothing published."""
        for _ in range(3):
            self.assertEqual(self.post(V1, body())[0], 200)
        result = self.post(V1, body())
        self.assertJsonError(result, 429, "too many requests")
        retry = int(result[1]["retry-after"][0])
        self.assertGreaterEqual(retry, 1)
        self.assertEqual(len(self.b.bus.published), 3)
        self.b.clock.advance(retry)
        self.assertEqual(self.post(V1, body())[0], 200)

    def test_rate_limit_applies_to_bad_requests_too(self) -> None:
        """Garbage costs tokens as well (a flood of 400s is still a flood)."""
        for _ in range(3):
            self.post(V1, b"x")
        self.assertEqual(self.post(V1, body())[0], 429)

    def test_pages_not_limited(self) -> None:
        """Health checks and status pages are not rate limited."""
        for _ in range(10):
            self.assertEqual(self.request("GET", BASE + "/healthz")[0], 200)


class TrustedProxyTests(ApiCase):
    broker_kwargs = {"broker": {"rate_limit": 1, "rate_burst": 1, "trusted_proxies": ["127.0.0.1"]}}

    def test_forwarded_for_from_trusted_proxy(self) -> None:
        """Behind a trusted proxy each X-Forwarded-For client has its own bucket."""
        h1 = {**GLUON_HEADERS, b"X-Forwarded-For": [b"192.0.2.1"]}
        h2 = {**GLUON_HEADERS, b"X-Forwarded-For": [b"192.0.2.2"]}
        self.assertEqual(self.post(V1, body(), headers=h1)[0], 200)
        self.assertEqual(self.post(V1, body(), headers=h2)[0], 200)
        self.assertEqual(self.post(V1, body(), headers=h1)[0], 429)


class UntrustedProxyTests(ApiCase):
    broker_kwargs = {"broker": {"rate_limit": 1, "rate_burst": 1}}

    def test_forwarded_for_ignored(self) -> None:
        """Without trusted proxies X-Forwarded-For changes nothing."""
        h1 = {**GLUON_HEADERS, b"X-Forwarded-For": [b"192.0.2.1"]}
        h2 = {**GLUON_HEADERS, b"X-Forwarded-For": [b"192.0.2.2"]}
        self.assertEqual(self.post(V1, body(), headers=h1)[0], 200)
        self.assertEqual(self.post(V1, body(), headers=h2)[0], 429)


class KeyListApiTests(ApiCase):
    def setUp(self) -> None:
        lists = KeyLists("block", "allow", reader=lambda path, log: parse_key_list(
            {"block": KEY2, "allow": f"{KEY}\n{KEY2}"}[path], path))
        lists.load()
        self.b = Broker(lists=lists)

    def test_blocked_key_403(self) -> None:
        """A blocked key: 403 and nothing published."""
        self.assertJsonError(self.post(V1, body(key=KEY2)), 403, "block list")
        self.assertEqual(self.b.bus.published, [])

    def test_not_allowed_key_403(self) -> None:
        """A key missing from the allow list: 403 and nothing published."""
        other = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
        self.assertJsonError(self.post(V2, body(key=other)), 403, "allow list")
        self.assertEqual(self.b.bus.published, [])

    def test_allowed_key_passes(self) -> None:
        """A key on the allow list and not blocked is published."""
        self.assertEqual(self.post(V1, body(key=KEY))[0], 200)
        self.assertEqual(len(self.b.bus.published), 1)
