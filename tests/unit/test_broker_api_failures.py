"""The broker's HTTP API in memory (StubTreq): every failure class of docs/protocol.md's table, and the lost-key log."""

from __future__ import annotations

import json
from typing import cast

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher

from tests.support.broker_api_case import BASE, V1, V2, ApiCase, body
from tests.support.broker_fakes import GLUON_HEADERS, KEY


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
