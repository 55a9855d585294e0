"""The base case of the broker's HTTP API unit tests: a :class:`~tests.support.broker_fakes.Broker` and requests to it.

:class:`ApiCase` sends requests through StubTreq (``request``, ``post``, which acknowledges
the publish unless told not to) and checks JSON errors (``assertJsonError``); ``body`` and
``gluon_body`` build request bodies, the latter exactly as Gluon's checkuplink does.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_fakes import GLUON_HEADERS, KEY, Broker


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
