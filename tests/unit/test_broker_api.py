"""The broker's HTTP API in memory (StubTreq): every row and failure class of docs/protocol.md's table."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_fakes import GLUON_HEADERS, GW_KEY, GW_KEY2, KEY, KEY2, QUEUE_LIMIT, Broker
from wgkex.broker.keylists import KeyLists, parse_key_list

BASE = "http://broker.example"
V1 = BASE + "/api/v1/wg/key/exchange"
V2 = BASE + "/api/v2/wg/key/exchange"


def body(domain: object = "ffmuc_welt", key: object = KEY) -> bytes:
    return json.dumps({"domain": domain, "public_key": key}).encode()


def gluon_body(domain: str = "ffmuc_welt", key: str = KEY) -> bytes:
    """Exactly how checkuplink formats it."""
    return ('{"domain": "' + domain + '","public_key": "' + key + '"}').encode()


class ApiCase(SynchronousTestCase):
    broker_kwargs: dict[str, Any] = {}

    def setUp(self) -> None:
        self.b = Broker(**self.broker_kwargs)

    def request(self, method: str, url: str, data: bytes | None = None,
                headers: dict[bytes, list[bytes]] | None = None) -> tuple[int, dict[str, list[str]], bytes]:
        d = self.b.treq.request(method, url, data=data, headers=headers or {})
        response = self.successResultOf(d)
        content = self.successResultOf(self.b.treq.content(response))
        headers_out = {k.decode().lower(): [v.decode() for v in vs] for k, vs in response.headers.getAllRawHeaders()}
        return response.code, headers_out, content

    def post(self, url: str, data: bytes, headers: dict[bytes, list[bytes]] | None = None,
             ack: bool = True) -> tuple[int, dict[str, list[str]], bytes]:
        d = self.b.treq.post(url, data=data, headers=headers or GLUON_HEADERS)
        if ack:
            self.b.bus.ack()
            self.b.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.b.treq.content(response))
        headers_out = {k.decode().lower(): [v.decode() for v in vs] for k, vs in response.headers.getAllRawHeaders()}
        return response.code, headers_out, content

    def assertJsonError(self, result: tuple[int, dict[str, list[str]], bytes], code: int, fragment: str) -> None:
        status, headers, content = result
        self.assertEqual(status, code, content)
        self.assertEqual(headers["content-type"], ["application/json"])
        message = json.loads(content)["error"]["message"]
        self.assertIsInstance(message, str)
        self.assertIn(fragment, message)
        self.assertNotIn("Traceback", content.decode())


class V1Tests(ApiCase):
    def test_gluon_request_publishes_exact_key(self) -> None:
        """A Gluon-shaped request (form content type, Gluon headers) publishes the key, QoS 1, not retained."""
        status, headers, content = self.post(V1, gluon_body())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertEqual(json.loads(content), {"Message": "OK"})
        [p] = self.b.bus.published
        self.assertEqual((p.topic, p.payload, p.qos, p.retain), ("wireguard/ffmuc_welt/all", KEY.encode(), 1, False))

    def test_reply_waits_for_acknowledgement(self) -> None:
        """While connected, the 200 comes only once the MQTT server acknowledged the key."""
        d = self.b.treq.post(V1, data=body(), headers=GLUON_HEADERS)
        self.b.treq.flush()
        self.assertNoResult(d)
        self.b.bus.ack()
        self.b.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_reply_after_publish_timeout(self) -> None:
        """Without an acknowledgement the reply is still 200 after publish_timeout (the key is queued)."""
        d = self.b.treq.post(V1, data=body(), headers=GLUON_HEADERS)
        self.b.clock.advance(self.b.config.broker.publish_timeout - 0.1)
        self.b.treq.flush()
        self.assertNoResult(d)
        self.b.clock.advance(0.2)
        self.b.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertEqual(len(self.b.bus.published), 1)

    def test_publish_failure_is_503(self) -> None:
        """A publish whose Deferred fails (bus stopped) is answered 503, not 200."""
        d = self.b.treq.post(V1, data=body(), headers=GLUON_HEADERS)
        self.b.bus.deferreds[0].errback(RuntimeError("stopped"))
        self.b.treq.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 503)
        self.flushLoggedErrors(RuntimeError)

    def test_json_content_type_too(self) -> None:
        """A client that does say application/json is served the same."""
        status, _, _ = self.post(V1, body(), headers={b"Content-Type": [b"application/json"]})
        self.assertEqual(status, 200)

    def test_no_content_type(self) -> None:
        """No Content-Type at all works as well."""
        status, _, _ = self.post(V1, body(), headers={})
        self.assertEqual(status, 200)

    def test_form_body_not_eaten(self) -> None:
        """A body that also parses as a form is still read as JSON."""
        status, _, _ = self.post(V1, gluon_body() + b"&x=1", headers=GLUON_HEADERS)
        self.assertEqual(status, 400)  # trailing garbage after the JSON object
        status, _, _ = self.post(V1, gluon_body(), headers=GLUON_HEADERS)
        self.assertEqual(status, 200)

    def test_whitespace_and_extra_fields(self) -> None:
        """Whitespace around the JSON and extra fields are accepted."""
        data = b'\n  {"public_key": "%s", "domain": "ffmuc_welt", "extra": [1, {"a": null}]}\n' % KEY.encode()
        status, _, _ = self.post(V1, data)
        self.assertEqual(status, 200)

    def test_other_domain(self) -> None:
        """The domain picks the topic."""
        self.post(V1, body(domain="ffmuc_muc", key=KEY2))
        self.assertEqual(self.b.bus.keys(), [("wireguard/ffmuc_muc/all", KEY2.encode())])


class FailureTests(ApiCase):
    def assertNothingPublished(self) -> None:
        self.assertEqual(self.b.bus.published, [])

    def test_not_json(self) -> None:
        """A body that is not JSON: 400 saying so."""
        self.assertJsonError(self.post(V1, b"domain=ffmuc_welt&public_key=x"), 400, "not JSON")
        self.assertNothingPublished()

    def test_empty_body(self) -> None:
        """An empty body: 400."""
        self.assertJsonError(self.post(V1, b""), 400, "empty")
        self.assertNothingPublished()

    def test_non_utf8(self) -> None:
        """Bytes that are not UTF-8: 400."""
        self.assertJsonError(self.post(V1, b'{"domain": "\xff\xfe"}'), 400, "UTF-8")
        self.assertNothingPublished()

    def test_json_array(self) -> None:
        """A JSON array is not an object: 400."""
        self.assertJsonError(self.post(V1, json.dumps(["ffmuc_welt", KEY]).encode()), 400, "array")
        self.assertNothingPublished()

    def test_json_scalars(self) -> None:
        """A JSON string, number or null is not an object: 400."""
        for data in (b'"hello"', b"42", b"null", b"true"):
            self.assertJsonError(self.post(V1, data), 400, "must be a JSON object")
        self.assertNothingPublished()

    def test_nested_objects(self) -> None:
        """Objects where strings belong: 400 naming the field."""
        self.assertJsonError(self.post(V1, body(domain={"name": "ffmuc_welt"})), 400, "domain must be a string")
        self.assertJsonError(self.post(V1, body(key={"k": KEY})), 400, "public_key must be a string")
        self.assertNothingPublished()

    def test_deeply_nested(self) -> None:
        """JSON nested deeper than Python's recursion limit is a 400, not a crash."""
        self.assertJsonError(self.post(V1, b"[" * 4000), 400, "not JSON")
        self.assertJsonError(self.post(V1, b'[{"":' * 580 + b"1" + b"}]" * 580), 400, "not JSON")
        self.assertNothingPublished()

    def test_numbers_where_strings_belong(self) -> None:
        """Numbers, booleans, arrays or null as domain or key: 400."""
        for value in (42, 1.5, True, None, [KEY]):
            self.assertJsonError(self.post(V1, body(key=value)), 400, "public_key must be a string")
            self.assertJsonError(self.post(V1, body(domain=value)), 400, "domain must be a string")
        self.assertNothingPublished()

    def test_missing_fields(self) -> None:
        """domain or public_key missing: 400 naming it."""
        self.assertJsonError(self.post(V1, json.dumps({"public_key": KEY}).encode()), 400, "domain is missing")
        self.assertJsonError(self.post(V1, json.dumps({"domain": "ffmuc_welt"}).encode()), 400,
                             "public_key is missing")
        self.assertNothingPublished()

    def test_invalid_keys(self) -> None:
        """Keys that are not valid WireGuard public keys: 400 saying what is wrong."""
        bad = {
            "short": "44 characters",
            KEY[:-2] + "==": "44 characters",
            "A" * 43 + "=": None,  # all-zero key
            KEY[:42] + "B=": "canonical",
            KEY[:10] + "!" + KEY[11:]: "base64",
            KEY[:10] + "é" + KEY[11:]: "ASCII",
            "": "44 characters",
        }
        for key, fragment in bad.items():
            result = self.post(V1, body(key=key))
            self.assertJsonError(result, 400, fragment or "low-order")
        self.assertNothingPublished()

    def test_unconfigured_domain(self) -> None:
        """A domain not in the configuration: 400 naming it."""
        self.assertJsonError(self.post(V1, body(domain="ffmuc_nowhere")), 400, "ffmuc_nowhere")
        self.assertJsonError(self.post(V1, body(domain="")), 400, "not configured")
        self.assertNothingPublished()

    def test_body_over_limit(self) -> None:
        """A 1 MB body: 413 (the app checks too, behind the site's own limit)."""
        data = b'{"domain": "ffmuc_welt", "public_key": "' + KEY.encode() + b'", "pad": "' + b"x" * 1_000_000 + b'"}'
        self.assertJsonError(self.post(V1, data), 413, "larger than 4096 bytes")
        self.assertNothingPublished()

    def test_unknown_path(self) -> None:
        """An unknown path: JSON 404."""
        self.assertJsonError(self.request("GET", BASE + "/nope"), 404, "no such path")
        self.assertJsonError(self.request("POST", BASE + "/api/v3/wg/key/exchange", body()), 404, "no such path")

    def test_wrong_method(self) -> None:
        """GET on the key exchange or POST on a page: JSON 405 with Allow."""
        result = self.request("GET", V1)
        self.assertJsonError(result, 405, "not allowed")
        self.assertEqual(result[1]["allow"], ["POST"])
        self.assertJsonError(self.request("PUT", V2, body()), 405, "not allowed")
        self.assertJsonError(self.request("POST", BASE + "/healthz", body()), 405, "not allowed")

    def test_non_utf8_url(self) -> None:
        """A URL that is not UTF-8 once unquoted: JSON 400, not Klein's HTML."""
        self.assertJsonError(self.request("GET", BASE + "/%ff"), 400, "cannot be parsed")

    def test_error_counted_in_metrics(self) -> None:
        """Refusals are counted by endpoint, status and reason."""
        self.post(V1, b"nope")
        text = self.b.metrics.render().decode()
        self.assertIn('wgkex_broker_requests_total{endpoint="v1",status="400"} 1.0', text)
        self.assertIn('wgkex_broker_refused_total{reason="bad_request"} 1.0', text)


class LostKeyLogTests(ApiCase):
    """A key the MQTT service gives up on (it was stopped) is an expected event, logged as one line."""

    def setUp(self) -> None:
        super().setUp()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def api_events(self) -> list[LogEvent]:
        return [e for e in self.events if e.get("log_namespace", "").endswith("KeyExchange")]

    def assertOneWarning(self) -> None:
        [event] = self.api_events()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertNotIn("log_failure", event)
        text = formatEvent(event)
        for fragment in (KEY, "ffmuc_welt", "service stopped"):
            self.assertIn(fragment, text)

    def test_failed_publish_logged_without_traceback(self) -> None:
        """A publish that fails while the reply waits is a warning naming key, domain and reason, no traceback."""
        d = self.b.treq.post(V1, data=body(), headers=GLUON_HEADERS)
        self.b.bus.deferreds[0].errback(RuntimeError("MQTT service stopped before the server acked"))
        self.b.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 503)
        self.assertOneWarning()

    def test_lost_queued_key_logged_without_traceback(self) -> None:
        """A key queued while MQTT was down and dropped at stop is a warning naming it, no traceback."""
        self.b.bus.connected = False
        self.assertEqual(self.post(V1, body(), ack=False)[0], 200)
        self.b.bus.deferreds[0].errback(RuntimeError("MQTT service stopped before the server acked"))
        self.assertOneWarning()


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


def gluon_reads(content: bytes) -> tuple[str, str, str, str]:
    """What checkuplink takes from a v2 reply (jsonfilter -e @.Endpoint.Address etc.)."""
    data = json.loads(content)
    endpoint = data["Endpoint"]
    port = endpoint["Port"]
    return endpoint["Address"], str(port), endpoint["PublicKey"], endpoint["AllowedIPs"][0]


class V2Tests(ApiCase):
    def test_reply_gluon_parses(self) -> None:
        """v2 returns the chosen worker's endpoint for the domain, in the shape Gluon reads."""
        self.b.worker("gw-a", peers=0, address="gw-a.ffmuc.net", key=GW_KEY, port=40000, link="fe80::27c:16ff:fec0:6c74")
        status, headers, content = self.post(V2, gluon_body())
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], ["application/json"])
        self.assertEqual(gluon_reads(content), ("gw-a.ffmuc.net", "40000", GW_KEY, "fe80::27c:16ff:fec0:6c74"))
        self.assertIsInstance(json.loads(content)["Endpoint"]["Port"], str)
        self.assertEqual(self.b.bus.keys(), [("wireguard/ffmuc_welt/all", KEY.encode())])

    def test_no_worker_503(self) -> None:
        """No worker online for the domain: 503 JSON error, nothing published."""
        self.b.worker("gw-a", domain="ffmuc_muc")
        self.assertJsonError(self.post(V2, body()), 503, "no gateway is online for domain ffmuc_welt")
        self.assertEqual(self.b.bus.published, [])

    def test_offline_worker_not_returned(self) -> None:
        """A worker whose last will said 0 is no longer returned."""
        self.b.worker("gw-a", peers=0)
        self.b.worker("gw-b", peers=100, key=GW_KEY2)
        self.b.bus.deliver("wireguard-worker/gw-a/status", "0")
        status, _, content = self.post(V2, body())
        self.assertEqual(status, 200)
        self.assertEqual(gluon_reads(content)[2], GW_KEY2)

    def test_burst_of_40_spreads_3_to_1(self) -> None:
        """40 v2 calls over two empty workers weighted 3:1 spread 30:10 (within one)."""
        self.b.worker("gw-a", peers=0, key=GW_KEY)
        self.b.worker("gw-b", peers=0, key=GW_KEY2)
        seen: Counter[str] = Counter()
        for _ in range(40):
            status, _, content = self.post(V2, body())
            self.assertEqual(status, 200)
            seen[gluon_reads(content)[2]] += 1
        self.assertLessEqual(abs(seen[GW_KEY] - 30), 1)
        self.assertLessEqual(abs(seen[GW_KEY2] - 10), 1)
        text = self.b.metrics.render().decode()
        self.assertIn('wgkex_broker_v2_choices_total{domain="ffmuc_welt",worker="gw-a"}', text)

    def test_concurrent_burst_spreads_too(self) -> None:
        """Requests in flight at once (acks pending) already spread by weight."""
        self.b.worker("gw-a", peers=0, key=GW_KEY)
        self.b.worker("gw-b", peers=0, key=GW_KEY2)
        pending = [self.b.treq.post(V2, data=body(), headers=GLUON_HEADERS) for _ in range(8)]
        self.b.bus.ack()
        self.b.treq.flush()
        keys = Counter(gluon_reads(self.successResultOf(self.b.treq.content(self.successResultOf(d))))[2]
                       for d in pending)
        self.assertEqual(keys, Counter({GW_KEY: 6, GW_KEY2: 2}))

    def test_v2_validation_same_as_v1(self) -> None:
        """v2 refuses bad input exactly like v1."""
        self.b.worker("gw-a")
        self.assertJsonError(self.post(V2, b"[]"), 400, "array")
        self.assertJsonError(self.post(V2, body(domain="x")), 400, "not configured")
        self.assertEqual(self.b.bus.published, [])


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
