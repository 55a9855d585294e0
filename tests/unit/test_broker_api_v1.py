"""The broker's v1 key exchange in memory (StubTreq): what Gluon sends is published and answered (docs/protocol.md)."""

from __future__ import annotations

import json

from tests.support.broker_api_case import V1, ApiCase, body, gluon_body
from tests.support.broker_fakes import GLUON_HEADERS, KEY, KEY2


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
