"""The broker's v2 key exchange in memory (StubTreq): the chosen worker's endpoint, in the shape Gluon reads."""

from __future__ import annotations

import json
from collections import Counter

from tests.support.broker_api_case import V2, ApiCase, body, gluon_body
from tests.support.broker_fakes import GLUON_HEADERS, GW_KEY, GW_KEY2, KEY


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
