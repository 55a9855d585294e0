"""Property: whatever a client sends, the broker never answers 5xx and never publishes an invalid key."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_fakes import GW_KEY, GW_KEY2, KEY, KEY2, Broker
from wgkex.keys import is_valid_public_key

PATHS = ["/api/v1/wg/key/exchange", "/api/v2/wg/key/exchange"]
DOMAINS = ["ffmuc_welt", "ffmuc_muc"]

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=50),
    st.sampled_from([KEY, KEY2, *DOMAINS, "ffmuc_", KEY[:-1], KEY + "=", KEY.lower()]),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)


@st.composite
def key_bodies(draw: st.DrawFn) -> bytes:
    """Bodies that look like key exchanges, with any values in the fields."""
    obj: dict[str, Any] = {}
    if draw(st.booleans()):
        obj["domain"] = draw(st.one_of(st.sampled_from(DOMAINS), json_value))
    if draw(st.booleans()):
        obj["public_key"] = draw(st.one_of(st.sampled_from([KEY, KEY2]), json_value))
    obj.update(draw(st.dictionaries(st.text(max_size=8), json_value, max_size=3)))
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8")


bodies = st.one_of(
    st.binary(max_size=5000),
    key_bodies(),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
)

header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789", min_size=1, max_size=20)
header_values = st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip())
headers = st.dictionaries(
    st.one_of(header_names, st.sampled_from(["Content-Type", "X-Forwarded-For", "Expect", "Cookie", "Host"])),
    header_values,
    max_size=6,
)


class NeverFailsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.b = Broker(broker={"rate_burst": 10**9, "trusted_proxies": ["127.0.0.1"]})
        for domain in DOMAINS:
            self.b.worker("gw-a", domain=domain, key=GW_KEY)
            self.b.worker("gw-b", domain=domain, key=GW_KEY2)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(path=st.sampled_from(PATHS), body=bodies, extra=headers, method=st.sampled_from(["POST", "POST", "GET"]))
    def test_no_5xx_no_invalid_key(self, path: str, body: bytes, extra: dict[str, bytes], method: str) -> None:
        """Arbitrary bodies and headers get a 2xx/4xx JSON reply; only valid keys of configured domains go out."""
        hdrs = {name.encode("ascii"): [value] for name, value in extra.items()}
        before = len(self.b.bus.published)
        d = self.b.treq.request(method, "http://broker.example" + path, data=body, headers=hdrs)
        self.b.bus.ack()
        self.b.treq.flush()
        response = self.successResultOf(d)
        content = self.successResultOf(self.b.treq.content(response))
        self.assertLess(response.code, 500, content)
        self.assertEqual(response.headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        json.loads(content)
        new = self.b.bus.published[before:]
        self.assertLessEqual(len(new), 1)
        for p in new:
            self.assertEqual(response.code, 200)
            key = p.payload.decode("ascii")
            self.assertTrue(is_valid_public_key(key), key)
            self.assertIn(p.topic, [f"wireguard/{d}/all" for d in DOMAINS])
            self.assertEqual((p.qos, p.retain), (1, False))
        if response.code == 200 and method == "POST":
            self.assertEqual(len(new), 1)


request_heads = st.sampled_from([
    b"GET / HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /api/v1/status HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /readyz HTTP/1.1\r\n\r\n",
    b"DELETE /api/v1/wg/key/exchange HTTP/1.1\r\nHost: b\r\n\r\n",
    b"GET /%ff%fe HTTP/1.1\r\nHost: \xff\r\n\r\n",
    b"\r\n",
])


@st.composite
def posts(draw: st.DrawFn) -> bytes:
    """A key exchange POST with any body, framed by Content-Length or (as Gluon) chunked."""
    path = draw(st.sampled_from(PATHS)).encode()
    payload = draw(bodies)
    if draw(st.booleans()):
        framed = b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    else:
        framed = b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    return b"POST " + path + b" HTTP/1.1\r\nHost: b\r\nContent-Type: application/x-www-form-urlencoded\r\n" + framed


streams = st.lists(st.one_of(request_heads, posts(), st.binary(max_size=60)), min_size=1, max_size=6)


class RawConnectionTests(SynchronousTestCase):
    """The same property one level down: raw bytes on one connection, pipelined and split anywhere."""

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(parts=streams, cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=20),
           half_close=st.booleans())
    def test_no_5xx_no_invalid_key_on_the_wire(self, parts: list[bytes], cuts: list[int], half_close: bool) -> None:
        """Any byte stream, split anywhere and maybe half-closed: every reply is below 500 and only valid keys go out."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        from wgkex.broker.site import make_site

        b = Broker(broker={"rate_burst": 10**9})
        for domain in DOMAINS:
            b.worker("gw-a", domain=domain, key=GW_KEY)
        site = make_site(b.api.resource(), b.config.broker.max_body_size, b.clock)
        addr = IPv4Address("TCP", "192.0.2.1", 4000)
        channel = site.buildProtocol(addr)
        assert channel is not None
        transport = StringTransport(peerAddress=addr)
        channel.makeConnection(transport)
        data = b"".join(parts)
        at = 0
        for cut in cuts:
            if at >= len(data) or transport.disconnecting:
                break
            channel.dataReceived(data[at:at + cut])
            b.bus.ack()
            at += cut
        if at < len(data) and not transport.disconnecting:
            channel.dataReceived(data[at:])
        for _ in range(len(parts) + 1):
            b.bus.ack()
        if half_close and not transport.disconnecting:
            channel.readConnectionLost()
        out = transport.value()
        statuses = [int(line[9:12]) for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
        self.assertTrue(all(status < 500 for status in statuses), (statuses, out[:300]))
        for p in b.bus.published:
            self.assertTrue(is_valid_public_key(p.payload.decode("ascii")), p.payload)
            self.assertIn(p.topic, [f"wireguard/{d}/all" for d in DOMAINS])
        channel.connectionLost(None)
