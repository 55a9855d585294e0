"""Properties of the wire contract: decoders refuse (never crash) on any input; valid messages round-trip."""

from __future__ import annotations

import ipaddress
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_fakes import Broker
from wgkex import contract
from wgkex.contract import Endpoint, Refused
from wgkex.keys import key_problem

KEYS = ["o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg=", "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="]
DOMAINS = frozenset({"ffmuc_welt", "ffmuc_ost"})

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=60),
    st.sampled_from([*KEYS, "fe80::1", "gw1.example.net", 51820, "51820", "fe80::1%wg"]),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)


@st.composite
def data_like(draw: st.DrawFn) -> bytes:
    """JSON objects with the data fields holding anything."""
    obj: dict[str, object] = {}
    for name in ("ExternalAddress", "Port", "PublicKey", "LinkAddress"):
        if draw(st.integers(0, 4)):
            obj[name] = draw(json_value)
    return json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()


payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(min_size=1, max_size=64).map(lambda b: (b * (5000 // len(b) + 1))[:5000]),
    st.text(max_size=80).map(lambda t: t.encode("utf-8")),
    st.integers().map(lambda n: str(n).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    data_like(),
)

levels = st.one_of(st.sampled_from(["ffmuc_welt", "gw1", "", "+", "#", "all", "status", "data"]), st.text(max_size=20))
topics = st.one_of(
    st.lists(levels, min_size=1, max_size=6).map("/".join),
    st.tuples(st.sampled_from(["wireguard", "wireguard-worker", "wireguard-metrics"]), st.lists(levels, max_size=4),
              st.sampled_from(["status", "data", "connected_peers", "all"])).map(
        lambda t: "/".join([t[0], *t[1], t[2]])),
)


def refused_properly(test: SynchronousTestCase, refused: Refused, kinds: tuple[str, ...], reasons: tuple[str, ...]) -> None:
    test.assertIn(refused.kind, kinds)
    test.assertIn(refused.reason, reasons)
    test.assertTrue(str(refused).isascii(), str(refused))


class DecoderProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(payloads)
    def test_report_decoders_return_valid_values_or_refuse(self, payload: bytes) -> None:
        """Any payload decodes to a value within the rules, or raises Refused with a known kind and reason."""
        try:
            self.assertIsInstance(contract.decode_status(payload), bool)
        except Refused as refused:
            refused_properly(self, refused, ("status",), contract.REPORT_REASONS)
        try:
            count = contract.decode_connected_peers(payload)
            self.assertTrue(count == -1 or 0 <= count <= contract.MAX_CONNECTED_PEERS)
        except Refused as refused:
            refused_properly(self, refused, ("metric",), contract.REPORT_REASONS)
        try:
            endpoint = contract.decode_data(payload)
            self.assertIsNone(endpoint.problem())
            self.assertIsNone(key_problem(endpoint.public_key))
            self.assertTrue(ipaddress.IPv6Address(endpoint.link_address).is_link_local)
        except Refused as refused:
            refused_properly(self, refused, ("data",), contract.REPORT_REASONS)

    @settings(max_examples=200, deadline=None)
    @given(topics, payloads)
    def test_key_decoder_returns_valid_keys_or_refuses(self, topic: str, payload: bytes) -> None:
        """Any key message gives a configured domain and a valid key, or Refused with a worker reason."""
        try:
            domain, key = contract.decode_key_message(topic, payload, DOMAINS)
            self.assertIn(domain, DOMAINS)
            self.assertIsNone(key_problem(key))
        except Refused as refused:
            refused_properly(self, refused, ("key",), contract.KEY_REASONS)

    @settings(max_examples=200, deadline=None)
    @given(topics)
    def test_report_topics_parse_or_refuse(self, topic: str) -> None:
        """Any topic parses to a valid worker name, or is refused with a report kind and reason."""
        try:
            where = contract.report_topic(topic)
            self.assertIsNone(contract.worker_name_problem(where.worker))
            contract.check_domain(where, DOMAINS)
            self.assertTrue(where.domain is None or where.domain in DOMAINS)
        except Refused as refused:
            refused_properly(self, refused, contract.REPORT_KINDS, contract.REPORT_REASONS)


_label = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")
host_names = st.lists(_label, min_size=1, max_size=4).map(".".join).filter(
    lambda h: not h.rsplit(".", 1)[-1].isdigit())
addresses = st.one_of(
    host_names,
    st.ip_addresses().map(str),
)
link_addresses = st.integers(0, 2**64 - 1).map(lambda low: str(ipaddress.IPv6Address((0xFE80 << 112) | low)))


class RoundTripProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(addresses, st.integers(1, 65535), st.sampled_from(KEYS), link_addresses)
    def test_data_round_trip(self, address: str, port: int, key: str, link: str) -> None:
        """Every valid endpoint survives encode and decode unchanged."""
        endpoint = Endpoint(address, port, key, link)
        self.assertEqual(contract.decode_data(contract.encode_data(endpoint)), endpoint)

    @settings(max_examples=200, deadline=None)
    @given(st.one_of(st.just(-1), st.integers(0, contract.MAX_CONNECTED_PEERS)))
    def test_connected_peers_round_trip(self, count: int) -> None:
        """Every count in the contract's range survives encode and decode unchanged."""
        self.assertEqual(contract.decode_connected_peers(contract.encode_connected_peers(count)), count)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"\A[A-Za-z0-9._-]{1,60}\Z"), st.sampled_from(sorted(DOMAINS)))
    def test_topics_round_trip(self, worker: str, domain: str) -> None:
        """Every topic a valid worker writes is read back as its kind, name and domain."""
        self.assertEqual(contract.report_topic(contract.status_topic(worker)),
                         contract.ReportTopic("status", worker, None))
        self.assertEqual(contract.report_topic(contract.data_topic(worker, domain)),
                         contract.ReportTopic("data", worker, domain))
        self.assertEqual(contract.report_topic(contract.metric_topic(worker, domain)),
                         contract.ReportTopic("metric", worker, domain))


report_topics = st.tuples(
    st.sampled_from(["status", "data", "metric"]),
    st.one_of(st.sampled_from(["gw-a", "gw-b", "gw-c"]), st.text(max_size=8)),
    st.sampled_from(["ffmuc_welt", "ffmuc_muc", "ffmuc_x"]),
).map(lambda t: {"status": f"wireguard-worker/{t[1]}/status", "data": f"wireguard-worker/{t[1]}/{t[2]}/data",
                 "metric": f"wireguard-metrics/{t[2]}/{t[1]}/connected_peers"}[t[0]])
report_payloads = st.one_of(
    payloads,
    st.sampled_from([b"1", b"0", b"-1", b"", b"9" * 309, b"10000000", b"10000001"]),
    st.tuples(addresses, st.integers(-5, 70000), st.sampled_from(KEYS), link_addresses).map(
        lambda t: json.dumps({"ExternalAddress": t[0], "Port": t[1], "PublicKey": t[2], "LinkAddress": t[3]}).encode()),
)


class BrokerPagesProperty(SynchronousTestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(report_topics, report_payloads), max_size=25))
    def test_no_bus_content_breaks_a_page(self, messages: list[tuple[str, bytes]]) -> None:
        """Whatever reports arrive, /, /api/v1/status, /metrics and v2 answer below 500 and v2 names a valid endpoint."""
        b = Broker()
        for topic, payload in messages:
            b.bus.deliver(topic, payload)
        for path in ("/", "/api/v1/status", "/metrics"):
            response = self.successResultOf(b.treq.get("http://broker.test" + path))
            self.assertEqual(response.code, 200, path)
        posted = b.treq.post("http://broker.test/api/v2/wg/key/exchange",
                             data=json.dumps({"domain": "ffmuc_welt", "public_key": KEYS[0]}).encode())
        b.bus.ack()
        b.treq.flush()
        response = self.successResultOf(posted)
        self.assertIn(response.code, (200, 503))
        if response.code == 200:
            reply = json.loads(self.successResultOf(b.treq.content(response)))["Endpoint"]
            endpoint = Endpoint(reply["Address"], int(reply["Port"]), reply["PublicKey"], reply["AllowedIPs"][0])
            self.assertIsNone(endpoint.problem())
