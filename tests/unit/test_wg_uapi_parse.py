"""The UAPI dump parser: a real wireguard-go dump, and random dumps against a line-by-line reference."""

from __future__ import annotations

import base64
import random

from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.backend import PeerInfo
from wgkex.worker.wg_uapi import parse_peers


#: ``wg-x`` of wireguard-go v0.0.20220316 with two peers, as its get=1 answered (errno line cut off).
WIREGUARD_GO_DUMP = b"""private_key=f8a7e1fc5bc0e182bd7bdb31f5abed8f0d2f35bc641fe5ca2b4302b872b4ae72
listen_port=51820
public_key=6ee90bbc2f11f8832495c85b15f1d729814e6863acd9b4e2a6f880b05bb20733
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
allowed_ip=fe80::2/128
public_key=23e4dadd1ba237a3d5988d8d8d361a58ded9132c75c25062ee98642c82d44d77
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=[2001:db8::2]:51820
last_handshake_time_sec=1764160000
last_handshake_time_nsec=250000000
tx_bytes=92
rx_bytes=148
persistent_keepalive_interval=0
allowed_ip=fe80::1/128
"""


def reference_parse(dump: bytes) -> list[PeerInfo]:
    """The obvious line-by-line reading of a dump, to check parse_peers against."""
    result: list[PeerInfo] = []
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is not None:
            sec, nsec = int(str(current["sec"])), int(str(current["nsec"]))
            handshake = None if sec == 0 and nsec == 0 else sec + nsec / 1e9
            result.append(PeerInfo(str(current["key"]), handshake, tuple(current["allowed"])))  # type: ignore[arg-type]

    for line in dump.decode().split("\n"):
        name, _, value = line.partition("=")
        if name == "public_key":
            finish()
            current = {"key": base64.b64encode(bytes.fromhex(value)).decode(), "sec": 0, "nsec": 0, "allowed": []}
        elif current is None:
            continue
        elif name == "last_handshake_time_sec":
            current["sec"] = value
        elif name == "last_handshake_time_nsec":
            current["nsec"] = value
        elif name == "allowed_ip":
            current["allowed"].append(value)  # type: ignore[attr-defined]
    finish()
    return result


def random_dump(rng: random.Random) -> bytes:
    """A dump with a random device part and peers whose lines come in a random order."""
    lines: list[str] = []
    if rng.random() < 0.7:
        lines += ["private_key=" + "11" * 32, "listen_port=51820"]
    if rng.random() < 0.2:
        lines.append("fwmark=7")
    for _ in range(rng.randrange(0, 6)):
        fields = [f"preshared_key={'00' * 32}", "protocol_version=1", "tx_bytes=5", "rx_bytes=9",
                  "persistent_keepalive_interval=25"]
        if rng.random() < 0.5:
            fields.append(f"endpoint=[2001:db8::{rng.randrange(1, 999)}]:51820")
        if rng.random() < 0.8:
            fields.append(f"last_handshake_time_sec={rng.choice([0, 1764160000 + rng.randrange(1000)])}")
        if rng.random() < 0.8:
            fields.append(f"last_handshake_time_nsec={rng.choice([0, rng.randrange(10**9)])}")
        fields += [f"allowed_ip=fe80::{rng.randrange(1, 0xFFFF):x}/128" for _ in range(rng.randrange(0, 4))]
        rng.shuffle(fields)
        lines += [f"public_key={rng.randbytes(32).hex()}", *fields]
    return "".join(line + "\n" for line in lines).encode()


class ParsePeersTests(SynchronousTestCase):
    def test_wireguard_go_dump(self) -> None:
        """A real wireguard-go dump: keys in base64, 'never' as None, seconds plus nanoseconds, allowed IPs."""
        self.assertEqual(
            parse_peers(WIREGUARD_GO_DUMP),
            [
                PeerInfo(base64.b64encode(bytes.fromhex("6ee90bbc2f11f8832495c85b15f1d729814e6863acd9b4e2a6f880b05bb20733")).decode(),
                         None, ("fe80::2/128",)),
                PeerInfo(base64.b64encode(bytes.fromhex("23e4dadd1ba237a3d5988d8d8d361a58ded9132c75c25062ee98642c82d44d77")).decode(),
                         1764160000.25, ("fe80::1/128",)),
            ],
        )

    def test_same_as_reading_line_by_line(self) -> None:
        """On 500 random dumps (any field order, several or no allowed IPs, no device lines) it agrees with a line reader."""
        rng = random.Random(4)
        for _ in range(500):
            dump = random_dump(rng)
            self.assertEqual(parse_peers(dump), reference_parse(dump), dump.decode())
            self.assertEqual(parse_peers(bytearray(dump)), reference_parse(dump))

    def test_no_peers(self) -> None:
        """Device lines only, or nothing at all: no peers."""
        self.assertEqual(parse_peers(b"private_key=" + b"11" * 32 + b"\nlisten_port=1\n"), [])
        self.assertEqual(parse_peers(b""), [])

    def test_malformed_key_raises(self) -> None:
        """A public_key that is not 32 bytes of hex is a ValueError (peers() makes it a BackendError)."""
        with self.assertRaises(ValueError):
            parse_peers(b"public_key=abc\n")
        with self.assertRaises(ValueError):
            parse_peers(b"public_key=" + b"zz" * 32 + b"\n")
