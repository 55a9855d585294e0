"""The MQTT wire contract: topics and payloads as the original wgkex writes them, and every refusal."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from twisted.trial.unittest import SynchronousTestCase

from wgkex import contract
from wgkex.contract import Endpoint, Refused

KEY = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
KEY2 = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
GOOD = {"ExternalAddress": "gw1.example.net", "Port": 51820, "PublicKey": KEY, "LinkAddress": "fe80::1"}
DOMAINS = frozenset({"ffmuc_welt", "ffmuc_ost"})


def data_with(base: Mapping[str, object] = GOOD, **changes: object) -> bytes:
    """The ``base`` data message with fields replaced (or removed, given ``KeyError``)."""
    d: dict[str, object] = dict(base)
    for name, value in changes.items():
        if value is KeyError:
            del d[name]
        else:
            d[name] = value
    return json.dumps(d).encode()


def assert_refusals(
    test: SynchronousTestCase, decode: Callable[[bytes], object], kind: str, cases: Mapping[bytes, str]
) -> None:
    """``decode`` refuses each payload of ``cases`` with ``kind`` and the reason given, saying why in ASCII."""
    for payload, reason in cases.items():
        with test.assertRaises(Refused, msg=repr(payload[:40])) as raised:
            decode(payload)
        test.assertEqual((raised.exception.kind, raised.exception.reason), (kind, reason), repr(payload[:40]))
        test.assertTrue(str(raised.exception).isascii())


class TopicTests(SynchronousTestCase):
    def test_topics_are_the_original_ones(self) -> None:
        """Every topic has exactly the original's levels (data: worker/domain, metrics: domain/worker)."""
        self.assertEqual(contract.key_topic("ffmuc_welt"), "wireguard/ffmuc_welt/all")
        self.assertEqual(contract.key_filter("ffmuc_welt"), "wireguard/ffmuc_welt/+")
        self.assertEqual(contract.status_topic("gw1"), "wireguard-worker/gw1/status")
        self.assertEqual(contract.data_topic("gw1", "ffmuc_welt"), "wireguard-worker/gw1/ffmuc_welt/data")
        self.assertEqual(
            contract.metric_topic("gw1", "ffmuc_welt"), "wireguard-metrics/ffmuc_welt/gw1/connected_peers"
        )

    def test_published_key_domain(self) -> None:
        """The domain comes back from a key topic; other topics (and other last levels) give None."""
        self.assertEqual(contract.published_key_domain(contract.key_topic("ffmuc_welt")), "ffmuc_welt")
        for topic in ("wireguard/ffmuc_welt/other", "wireguard/ffmuc_welt/all/x", "wireguard//all",
                      "wireguard-worker/gw1/status", contract.data_topic("gw1", "ffmuc_welt")):
            self.assertIsNone(contract.published_key_domain(topic), topic)
        self.assertEqual(
            contract.REPORT_FILTERS,
            ("wireguard-worker/+/status", "wireguard-worker/+/+/data", "wireguard-metrics/+/+/connected_peers"),
        )

    def test_report_topics_round_trip(self) -> None:
        """What the topic builders write, report_topic reads back as kind, worker and domain."""
        self.assertEqual(contract.report_topic(contract.status_topic("gw1")), contract.ReportTopic("status", "gw1", None))
        self.assertEqual(
            contract.report_topic(contract.data_topic("gw-1.a_b", "ffmuc_welt")),
            contract.ReportTopic("data", "gw-1.a_b", "ffmuc_welt"),
        )
        self.assertEqual(
            contract.report_topic(contract.metric_topic("gw1", "ffmuc_welt")),
            contract.ReportTopic("metric", "gw1", "ffmuc_welt"),
        )

    def test_report_topic_shapes_refused(self) -> None:
        """Extra or missing levels and foreign roots are refused as kind and reason ``topic``."""
        for topic in (
            "wireguard-worker/gw1/extra/status",
            "wireguard-worker/status",
            "wireguard-worker/gw1/ffmuc_welt/extra/data",
            "wireguard-metrics/ffmuc_welt/gw1/connected_peers/x",
            "wireguard-metrics/ffmuc_welt/gw1/peers",
            "something/else",
            "",
        ):
            with self.assertRaises(Refused, msg=topic) as raised:
                contract.report_topic(topic)
            self.assertEqual((raised.exception.kind, raised.exception.reason), ("topic", "topic"))

    def test_worker_names(self) -> None:
        """Worker names are 1-253 of A-Z a-z 0-9 . _ -; anything else is refused before it becomes a label."""
        self.assertEqual(contract.report_topic(contract.status_topic("a" * 253)).worker, "a" * 253)
        for name in ("", "a" * 254, "gw 1", "$(reboot)", "gw\u202e1", "gw\x001", "gw\u00e41", "<b>", "gw\n"):
            for topic in (contract.status_topic(name), contract.data_topic(name, "ffmuc_welt"),
                          contract.metric_topic(name, "ffmuc_welt")):
                with self.assertRaises(Refused, msg=repr(topic)) as raised:
                    contract.report_topic(topic)
                self.assertEqual(raised.exception.reason, "worker_name")
                self.assertTrue(str(raised.exception).isascii())

    def test_check_domain(self) -> None:
        """A report about a domain not served here is refused as ``domain``; status has no domain."""
        contract.check_domain(contract.report_topic("wireguard-worker/gw1/status"), DOMAINS)
        contract.check_domain(contract.report_topic("wireguard-worker/gw1/ffmuc_welt/data"), DOMAINS)
        with self.assertRaises(Refused) as raised:
            contract.check_domain(contract.report_topic("wireguard-metrics/ffmuc_nord/gw1/connected_peers"), DOMAINS)
        self.assertEqual((raised.exception.kind, raised.exception.reason), ("metric", "domain"))

    def test_shown_is_safe_for_logs(self) -> None:
        """Text from the bus is logged ASCII-escaped and cut: no control characters or direction overrides."""
        text = contract.shown("evil\u202e\x00\n" + "x" * 200, 20)
        self.assertTrue(text.isascii() and text.isprintable())
        self.assertLess(len(text), 100)


class KeyTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """A key published by the broker is read back unchanged by the worker."""
        payload = contract.encode_key(KEY)
        self.assertEqual(payload, KEY.encode("ascii"))
        self.assertEqual(
            contract.decode_key_message(contract.key_topic("ffmuc_welt"), payload, DOMAINS), ("ffmuc_welt", KEY)
        )

    def test_any_last_level_and_newline(self) -> None:
        """The last topic level is free and a trailing newline (mosquitto_pub -l) is not part of the key."""
        self.assertEqual(
            contract.decode_key_message("wireguard/ffmuc_ost/x", KEY2.encode() + b"\n", DOMAINS), ("ffmuc_ost", KEY2)
        )

    def test_topic_refusals(self) -> None:
        """Wrong topic shapes are refused as ``topic``, domains not served here as ``domain``."""
        cases = {
            "wireguard/ffmuc_welt": "topic",
            "wireguard/ffmuc_welt/a/b": "topic",
            "other/ffmuc_welt/all": "topic",
            "wireguard/ffmuc_nord/all": "domain",
            "wireguard//all": "domain",
        }
        for topic, reason in cases.items():
            with self.assertRaises(Refused, msg=topic) as raised:
                contract.decode_key_message(topic, KEY.encode(), DOMAINS)
            self.assertEqual((raised.exception.kind, raised.exception.reason), ("key", reason))

    def test_payload_refusals(self) -> None:
        """Oversized or non-ASCII payloads are ``payload``; everything that is not a valid key is ``key``."""
        cases = {
            b"\xff\xfe": "payload",
            b"x" * 10_000: "payload",
            b"": "key",
            b"not a key": "key",
            KEY[:-2].encode() + b"==": "key",
            (KEY[:42] + "B=").encode(): "key",  # non-canonical last character
            b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=": "key",  # the all-zero (low-order) point
            KEY.encode() + b" " + KEY2.encode(): "payload",
        }
        assert_refusals(self, lambda p: contract.decode_key_message("wireguard/ffmuc_welt/all", p, DOMAINS), "key", cases)

    def test_encoder_refuses_invalid_keys(self) -> None:
        """The broker cannot publish a key the workers would refuse."""
        for key in ("", "not a key", KEY[:-1], "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="):
            with self.assertRaises(ValueError):
                contract.encode_key(key)


class StatusTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """Status is the ASCII digit 1 or 0, as paho writes the original's integers."""
        self.assertEqual((contract.encode_status(True), contract.encode_status(False)), (b"1", b"0"))
        self.assertIs(contract.decode_status(contract.encode_status(True)), True)
        self.assertIs(contract.decode_status(contract.encode_status(False)), False)
        self.assertIs(contract.decode_status(b" 1\n"), True)

    def test_refusals(self) -> None:
        """Anything but 1 or 0 is refused: other values as ``value``, long payloads as ``too_large``."""
        cases = {b"2": "value", b"online": "value", b"\xff": "value", b"-1": "value",
                 b"1" * 17: "too_large", b"": "value", b"1 0": "value"}
        assert_refusals(self, contract.decode_status, "status", cases)


class ConnectedPeersTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """-1, 0 and the bounds survive encode and decode."""
        for value in (-1, 0, 1, 42, 9_999_999, 10_000_000):
            payload = contract.encode_connected_peers(value)
            self.assertEqual(payload, str(value).encode())
            self.assertEqual(contract.decode_connected_peers(payload), value)
        self.assertEqual(contract.decode_connected_peers(b"  12\n"), 12)
        self.assertEqual(contract.decode_connected_peers(b"0007"), 7)

    def test_refusals(self) -> None:
        """Out of range, not decimal, or huge: refused, and a 309-digit number is never converted."""
        cases = {
            b"10000001": "range",
            b"99999999999999999999": "range",
            b"-2": "range",
            b"-0": "range",
            b"9" * 309: "too_large",
            b"1.5": "syntax",
            b"1e3": "syntax",
            b"+5": "syntax",
            b"1_000": "syntax",
            "\u0663".encode(): "syntax",  # an Arabic-Indic digit: int() would take it
            b"\xff": "syntax",
            b"": "syntax",
            b"many": "syntax",
        }
        assert_refusals(self, contract.decode_connected_peers, "metric", cases)

    def test_encoder_bounds(self) -> None:
        """The worker cannot publish a count the broker would refuse."""
        for value in (-2, 10_000_001, 10**400):
            with self.assertRaises(ValueError):
                contract.encode_connected_peers(value)
        with self.assertRaises(ValueError):
            contract.encode_connected_peers(True)


class DataTests(SynchronousTestCase):
    def test_round_trip_and_original_shape(self) -> None:
        """The data message is the original's json.dumps object; decoding gives the same endpoint back."""
        endpoint = Endpoint("gw1.example.net", 51820, KEY, "fe80::1")
        payload = contract.encode_data(endpoint)
        self.assertEqual(payload, json.dumps(GOOD).encode())
        self.assertEqual(contract.decode_data(payload), endpoint)

    def test_accepted_variants(self) -> None:
        """IP literals, single-label names, 63-character labels and extra fields are accepted."""
        for address in ("192.0.2.1", "2001:db8::1", "localhost", "a" * 63 + ".example", "gw-1.ext.ffmuc.net",
                        ".".join(["a" * 63] * 3) + "." + "b" * 61):
            self.assertEqual(contract.decode_data(data_with(ExternalAddress=address)).address, address)
        self.assertEqual(contract.decode_data(data_with(Extra=[1, 2])).port, 51820)
        self.assertEqual(contract.decode_data(data_with(LinkAddress="fe80::2a6:8fff:fe21:5465")).link_address,
                         "fe80::2a6:8fff:fe21:5465")

    def test_hostile_external_addresses(self) -> None:
        """Shell, markup, URLs, NUL, direction overrides, zones and bad labels never reach a router."""
        for address in ("$(reboot)", "<script>alert(1)</script>", "http://evil/", "gw1\x00.example.net",
                        "\u202egw1.example.net", "gw1.example.net ", "a b", "", "a" * 254, "-gw.example",
                        "gw-.example", "gw..example", "gw.example.", "a" * 64 + ".example", "1.2.3.256",
                        "fe80::1%eth0", "[2001:db8::1]", "g\u00fc.example", 42, None, ["gw1"]):
            with self.assertRaises(Refused, msg=repr(address)) as raised:
                contract.decode_data(data_with(ExternalAddress=address))
            self.assertEqual((raised.exception.kind, raised.exception.reason), ("data", "address"))
            self.assertTrue(str(raised.exception).isascii())

    def test_field_refusals(self) -> None:
        """Port, PublicKey and LinkAddress are each checked, and the reason names the field."""
        cases = {
            data_with(Port="51820"): "port",
            data_with(Port=True): "port",
            data_with(Port=0): "port",
            data_with(Port=65536): "port",
            data_with(Port=51820.0): "port",
            data_with(Port=KeyError): "port",
            data_with(PublicKey="not-a-key"): "public_key",
            data_with(PublicKey=KeyError): "public_key",
            data_with(LinkAddress="fe80::1%x y"): "link_address",
            data_with(LinkAddress="fe80::1%wg-welt"): "link_address",
            data_with(LinkAddress="2001:db8::1"): "link_address",
            data_with(LinkAddress="10.0.0.1"): "link_address",
            data_with(LinkAddress=["fe80::1"]): "link_address",
            data_with(LinkAddress=KeyError): "link_address",
        }
        assert_refusals(self, contract.decode_data, "data", cases)

    def test_payload_refusals(self) -> None:
        """Oversized, non-UTF-8, non-JSON, deeply nested or non-object payloads are refused by reason."""
        cases = {
            b" " * 4097: "too_large",
            b"\xff\xfe": "encoding",
            b"{not json": "syntax",
            b"[" * 4000: "syntax",
            b"[1, 2]": "value",
            b'"gw1"': "value",
            b"": "syntax",
        }
        assert_refusals(self, contract.decode_data, "data", cases)

    def test_encoder_refuses_what_readers_refuse(self) -> None:
        """A worker with a bad externalName or link address cannot publish its data."""
        for endpoint in (Endpoint("$(reboot)", 51820, KEY, "fe80::1"), Endpoint("gw1", 0, KEY, "fe80::1"),
                         Endpoint("gw1", 51820, "x", "fe80::1"), Endpoint("gw1", 51820, KEY, "fe80::1%wg-welt")):
            with self.assertRaises(ValueError):
                contract.encode_data(endpoint)

    def test_v2_reply(self) -> None:
        """The v2 reply carries Port as a string and the link address as AllowedIPs[0]."""
        self.assertEqual(
            Endpoint("gw1.example.net", 51820, KEY, "fe80::1").reply(),
            {"Endpoint": {"Address": "gw1.example.net", "Port": "51820", "AllowedIPs": ["fe80::1"],
                          "PublicKey": KEY}},
        )
