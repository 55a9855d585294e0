"""The OpenAPI document: valid OpenAPI 3.1, served as kept, and true of a running broker.

The document in the package is checked with ``openapi-spec-validator``. Then
every (path, method, status) it documents is provoked on real
``twistd -n wgkex-broker`` processes (one connected to a real mosquitto, one
whose MQTT server is down) and the reply is checked: status, media type,
documented headers, and the body against the documented schema (``jsonschema``).
A documented status without a way to provoke it here fails the test, so the
document and this test cannot drift apart.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_process import (
    GW_KEY, KEY2, BrokerProcess, fresh_key, publish_retained, v1_body, worker_messages,
)
from tests.support.mosquitto import free_port, start_mosquitto, wait_for
from tests.support.skips import need_mosquitto

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC_PATH = os.path.join(ROOT, "wgkex", "broker", "openapi.json")

Reply = tuple[int, dict[str, str], bytes]


def load_doc() -> dict[str, Any]:
    with open(DOC_PATH) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


class DocumentTests(SynchronousTestCase):
    def test_valid_openapi_31(self) -> None:
        """The kept document is valid OpenAPI 3.1 by the reference validator."""
        doc = load_doc()
        self.assertEqual(doc["openapi"], "3.1.0")
        validate(doc)

    def test_documents_the_whole_api(self) -> None:
        """Both key exchange versions with Gluon's request shape and every error status are documented."""
        paths = load_doc()["paths"]
        for version in ("v1", "v2"):
            post = paths[f"/api/{version}/wg/key/exchange"]["post"]
            self.assertEqual(sorted(post["responses"]), ["200", "400", "403", "413", "429", "503"])
            self.assertIn("application/x-www-form-urlencoded", post["requestBody"]["content"])
        for path in ("/", "/api/v1/status", "/metrics", "/healthz", "/readyz", "/api/openapi.json"):
            self.assertIn("get", paths[path])


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


class LiveResponseTests(SynchronousTestCase):
    skip = need_mosquitto()

    def setUp(self) -> None:
        self.doc = load_doc()
        mosquitto = start_mosquitto(self)  # type: ignore[arg-type]
        blocklist = os.path.abspath(self.mktemp())
        with open(blocklist, "w") as f:
            f.write(KEY2 + "\n")
        # Rate limits are per client address: this proxy's X-Forwarded-For gives each request
        # its own address (documentation range; never contacted), except for the 429 recipe.
        self.up = BrokerProcess(self, mosquitto.port, (
            f"broker: {{key_blocklist: {blocklist}, trusted_proxies: [127.0.0.1], rate_limit: 0.01, rate_burst: 1}}\n"))
        publish_retained(mosquitto.port, worker_messages("gw-a", "gw-a.example.net", GW_KEY, peers=3,
                                                         link="fe80::27c:16ff:fec0:6c74"))
        wait_for(lambda: self.up.get("/readyz")[0] == 200, 10, what="broker connected to MQTT")
        wait_for(lambda: self.up.status()["domains"]["ffmuc_welt"]["next"] == "gw-a", 10, what="gw-a known")
        self._addresses = (f"192.0.2.{i}" for i in itertools.count(1))

    def gluon(self, broker: BrokerProcess, path: str, body: bytes, address: str | None = None,
              chunked: bool = True) -> Reply:
        """Gluon's POST through the trusted proxy, from ``address`` (else an address of its own)."""
        return broker.post(path, body, chunked, {"X-Forwarded-For": address or next(self._addresses)})

    def recipes(self) -> dict[tuple[str, str, str], Callable[[], Reply]]:
        up = self.up
        down: list[BrokerProcess] = []

        def down_broker() -> BrokerProcess:
            # A broker whose MQTT server is not there, with room for one queued key.
            if not down:
                down.append(BrokerProcess(self, free_port(), mqtt_extra=", queue_limit: 1"))
            return down[0]

        def queue_full(version: str) -> Callable[[], Reply]:
            def run() -> Reply:
                broker = down_broker()
                self.gluon(broker, f"/api/{version}/wg/key/exchange", v1_body(fresh_key(1)))
                return self.gluon(broker, f"/api/{version}/wg/key/exchange", v1_body(fresh_key(2)))
            return run

        def rate_limited(version: str) -> Callable[[], Reply]:
            def run() -> Reply:
                address = next(self._addresses)
                self.gluon(up, f"/api/{version}/wg/key/exchange", b"{", address)
                return self.gluon(up, f"/api/{version}/wg/key/exchange", v1_body(), address)
            return run

        def too_large(version: str) -> Callable[[], Reply]:
            return lambda: self.gluon(up, f"/api/{version}/wg/key/exchange", b" " * 5000 + v1_body(), chunked=False)

        recipes: dict[tuple[str, str, str], Callable[[], Reply]] = {}
        for version in ("v1", "v2"):
            path = f"/api/{version}/wg/key/exchange"
            recipes[(path, "post", "200")] = partial(self.gluon, up, path, v1_body())
            recipes[(path, "post", "400")] = partial(self.gluon, up, path, v1_body("not a key"))
            recipes[(path, "post", "403")] = partial(self.gluon, up, path, v1_body(KEY2))
            recipes[(path, "post", "413")] = too_large(version)
            recipes[(path, "post", "429")] = rate_limited(version)
            recipes[(path, "get", "405")] = partial(request, up.port, "GET", path)
        recipes[("/api/v1/wg/key/exchange", "post", "503")] = queue_full("v1")
        recipes[("/api/v2/wg/key/exchange", "post", "503")] = lambda: self.gluon(
            up, "/api/v2/wg/key/exchange", v1_body(domain="ffmuc_muc"))
        for path in ("/", "/api/v1/status", "/api/openapi.json", "/metrics", "/healthz", "/readyz"):
            recipes[(path, "get", "200")] = partial(request, up.port, "GET", path)
        recipes[("/readyz", "get", "503")] = lambda: request(down_broker().port, "GET", "/readyz")
        recipes[("/{path}", "get", "404")] = lambda: request(up.port, "GET", "/nothing-here")
        return recipes

    def test_every_documented_status_is_true(self) -> None:
        """Every documented status of every operation is provoked for real and its reply matches the schema."""
        recipes = self.recipes()
        documented = [
            (path, method, status, response)
            for path, item in self.doc["paths"].items()
            for method, operation in item.items()
            for status, response in operation["responses"].items()
        ]
        missing = [(p, m, s) for p, m, s, _ in documented if (p, m, s) not in recipes]
        self.assertEqual(missing, [], "documented statuses this test cannot provoke")
        for path, method, status, response in documented:
            where = f"{method.upper()} {path} -> {status}"
            code, headers, body = recipes[(path, method, status)]()
            self.assertEqual(code, int(status), f"{where}: {body[:300]!r}")
            (media, content), = response["content"].items()
            self.assertEqual(headers["content-type"].split(";")[0].strip(), media, where)
            for name in response.get("headers", {}):
                self.assertIn(name.lower(), headers, where)
            value: Any = json.loads(body) if media == "application/json" else body.decode("utf-8")
            schema = {**content["schema"], "components": self.doc["components"]}
            errors = [e.message for e in Draft202012Validator(schema).iter_errors(value)]
            self.assertEqual(errors, [], where)
        served = json.loads(request(self.up.port, "GET", "/api/openapi.json")[2])
        self.assertEqual(served, self.doc)
