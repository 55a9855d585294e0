"""Key validation and the link-local derivation pinned against docs/protocol.md and Gluon's shell recipe."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from wgkex.keys import (
    InvalidKey,
    check_public_key,
    hex_to_key,
    is_valid_public_key,
    key_problem,
    key_to_hex,
    lladdr,
    mac_address,
)

VECTORS = [
    ("o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg=", "fe80::2a6:8fff:fe21:5465"),
    ("gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w=", "fe80::25b:c1ff:fe61:e5bd"),
]

LOW_ORDER_HEX = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]

valid_keys = st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode()).filter(
    lambda k: bytes.fromhex(key_to_hex(k))[:31] + bytes([bytes.fromhex(key_to_hex(k))[31] & 0x7F])
    not in {bytes.fromhex(h) for h in LOW_ORDER_HEX}
)


def shell_recipe(key: str) -> str:
    """Gluon's recipe, step by step as the shell does it: md5sum of ``echo $key``, then EUI-64 text."""
    digest = hashlib.md5((key + "\n").encode()).hexdigest()
    return f"fe80::02{digest[0:2]}:{digest[2:4]}ff:fe{digest[4:6]}:{digest[6:8]}{digest[8:10]}"


class LinkLocalTests(SynchronousTestCase):
    def test_contract_vectors(self) -> None:
        """Both test vectors of docs/protocol.md give exactly the documented address."""
        for key, address in VECTORS:
            self.assertEqual(lladdr(key), address)

    def test_mac(self) -> None:
        """The MAC is 02 followed by the first five md5 bytes."""
        self.assertEqual(mac_address(VECTORS[0][0]), "02:a6:8f:21:54:65")

    @settings(max_examples=300, deadline=None)
    @given(valid_keys)
    def test_matches_shell_recipe(self, key: str) -> None:
        """Every valid key yields a fe80::/64 address equal to the shell recipe's after normalisation."""
        address = ipaddress.IPv6Address(lladdr(key))
        self.assertIn(address, ipaddress.IPv6Network("fe80::/64"))
        self.assertEqual(address, ipaddress.IPv6Address(shell_recipe(key)))


class ValidationTests(SynchronousTestCase):
    def test_random_keys_accepted(self) -> None:
        """1,000 random 32-byte keys in canonical base64 are all accepted."""
        accepted = 0
        for _ in range(1000):
            raw = os.urandom(32)
            if raw[:31] + bytes([raw[31] & 0x7F]) in {bytes.fromhex(h) for h in LOW_ORDER_HEX}:
                continue  # pragma: no cover - 2**-250 chance
            key = base64.b64encode(raw).decode()
            self.assertIsNone(key_problem(key), key)
            accepted += 1
        self.assertEqual(accepted, 1000)

    def test_low_order_points_refused(self) -> None:
        """The all-zero key and every other X25519 low-order point is refused, with or without the top bit."""
        for h in LOW_ORDER_HEX:
            for top in (0, 0x80):
                raw = bytearray(bytes.fromhex(h))
                raw[31] |= top
                key = base64.b64encode(bytes(raw)).decode()
                problem = key_problem(key)
                self.assertIsNotNone(problem, key)
                self.assertIn("low-order", problem or "")

    def test_refusal_classes(self) -> None:
        """Each class of malformed input is refused with a reason."""
        good = VECTORS[0][0]
        bad = {
            "not a string": 12345,
            "none": None,
            "bytes": good.encode(),
            "empty": "",
            "too short": good[:-2] + "=",
            "too long": "A" + good,
            "no padding": good[:-1] + "A",
            "double padding": base64.b64encode(b"x" * 31).decode() + "==",
            "url-safe alphabet": good.replace("+", "-").replace("/", "_"),
            "whitespace": " " + good[1:],
            "non-ascii": "\u00e9" + good[1:],
            "non-canonical last char": good[:42] + "h=",
            "newline": good[:43] + "\n",
            "hex": "a" * 44,
        }
        for name, value in bad.items():
            self.assertFalse(is_valid_public_key(value), name)
            self.assertIsNotNone(key_problem(value), name)

    def test_check_raises_with_reason(self) -> None:
        """check_public_key returns a valid key and raises InvalidKey naming the problem otherwise."""
        self.assertEqual(check_public_key(VECTORS[1][0]), VECTORS[1][0])
        exc = self.assertRaises(InvalidKey, check_public_key, "nope")
        self.assertIn("44 characters", str(exc))

    def test_hex_round_trip(self) -> None:
        """UAPI hex form converts back to the same base64 key."""
        for key, _ in VECTORS:
            self.assertEqual(hex_to_key(key_to_hex(key)), key)
            self.assertEqual(len(key_to_hex(key)), 64)
