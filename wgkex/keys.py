"""WireGuard public key rules and the link-local address derived from a key.

Pure functions, no I/O. Both the broker (before it publishes a key) and the
worker (before a key from the bus reaches the kernel) validate with
:func:`is_valid_public_key`; both sides of a tunnel derive the same IPv6
link-local address with :func:`lladdr`, exactly as Gluon's shell recipe
``echo $key | md5sum`` does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress

#: A canonical base64 encoding of 32 bytes leaves the 4 low bits of the last
#: character unused (they must be zero), so only these 16 characters may come
#: right before the ``=`` padding.
_CANONICAL_LAST = frozenset("AEIMQUYcgkosw480")

#: X25519 points of small order (and their non-canonical encodings), as
#: libsodium refuses them. A peer with such a public key makes every shared
#: secret predictable. Compared with the top bit of the last byte cleared,
#: because X25519 ignores that bit.
_LOW_ORDER_POINTS = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


class InvalidKey(ValueError):
    """A string is not an acceptable WireGuard public key; the message says why."""


def key_problem(key: object) -> str | None:
    """Say what is wrong with ``key`` as a WireGuard public key, or None if it is valid."""
    if not isinstance(key, str):
        return "public_key must be a string"
    if len(key) != 44 or not key.endswith("=") or key.endswith("=="):
        return "public_key must be 44 characters of base64 ending in a single '='"
    if not key.isascii():
        return "public_key must be base64 (ASCII only)"
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        return "public_key is not valid base64"
    if len(raw) != 32:  # pragma: no cover - implied by the length checks above
        return "public_key must decode to 32 bytes"
    if key[42] not in _CANONICAL_LAST:
        return "public_key is not canonical base64 (unused low bits are set)"
    if raw[:31] + bytes([raw[31] & 0x7F]) in _LOW_ORDER_POINTS:
        return "public_key is a low-order (weak) X25519 point"
    return None


def is_valid_public_key(key: object) -> bool:
    """True when ``key`` is a canonical base64 WireGuard public key of a usable point."""
    return key_problem(key) is None


def check_public_key(key: object) -> str:
    """Return ``key`` if it is valid, else raise :class:`InvalidKey` saying why."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidKey(problem)
    assert isinstance(key, str)
    return key


def lladdr(key: str) -> str:
    """The IPv6 link-local address of the peer with public key ``key``.

    ``h = md5(key + "\\n")``; the MAC is ``02:h0:h1:h2:h3:h4`` and the address
    its EUI-64 form *without* flipping the U/L bit:
    ``fe80::02h0:h1ff:feh2:h3h4``. Returned in compressed text form.
    """
    h = hashlib.md5((key + "\n").encode("ascii"), usedforsecurity=False).digest()
    packed = bytes([0xFE, 0x80, 0, 0, 0, 0, 0, 0, 0x02, h[0], h[1], 0xFF, 0xFE, h[2], h[3], h[4]])
    return str(ipaddress.IPv6Address(packed))


def mac_address(key: str) -> str:
    """The MAC address Gluon derives from ``key`` (``02:`` plus the first five md5 bytes)."""
    h = hashlib.md5((key + "\n").encode("ascii"), usedforsecurity=False).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *h[:5]))


def key_to_hex(key: str) -> str:
    """The hex form of a base64 key, as WireGuard's UAPI wants it."""
    return base64.b64decode(key).hex()


def hex_to_key(hexkey: str) -> str:
    """The base64 form of a hex key from WireGuard's UAPI."""
    return base64.b64encode(bytes.fromhex(hexkey)).decode("ascii")
