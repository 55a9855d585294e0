"""MQTT 3.1.1 wire encoding for tests and benchmarks that speak the protocol by hand."""

from __future__ import annotations


def remaining_length(n: int) -> bytes:
    """The variable-length "remaining length" field of a fixed header."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def str16(text: str | bytes) -> bytes:
    """A length-prefixed (two bytes, big endian) UTF-8 string."""
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data
