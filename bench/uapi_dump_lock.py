"""How long does wireguard-go make a new peer wait while it answers a peer dump?

Run as root: ``.venv/bin/python bench/uapi_dump_lock.py [--peers 65530]``.

Starts the real ``wireguard-go`` in a network namespace of its own (with a
private ``/run/wireguard``, see :mod:`wgkex.lab.wggo`), adds ``--peers`` peers
through the UAPI socket (wireguard-go takes at most 65,536: the default leaves
room for the peers added during dumps), then

* times ``get=1`` dumps read with the worker's own UAPI client
  (:class:`~wgkex.worker.wg_uapi.UapiWireGuard`, which reads the whole reply
  into one buffer before parsing it);
* sends a dump request on one connection and, a few milliseconds later, a
  ``set=1`` adding one peer on a second connection (as the worker's
  housekeeping and keys lanes do), and times when each completes: the set's
  wait is what a new key waits behind a dump.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _request(conn: socket.socket, data: bytes) -> bytes:
    conn.sendall(data)
    reply = bytearray()
    while not reply.endswith(b"\n\n"):
        chunk = conn.recv(1 << 18)
        if not chunk:
            raise RuntimeError("wireguard-go closed the UAPI connection")
        reply += chunk
    if not reply.endswith(b"errno=0\n\n"):
        raise RuntimeError(f"UAPI request failed: {bytes(reply[-40:])!r}")
    return bytes(reply)


def _peer_key(n: int) -> str:
    raw = bytearray(hashlib.sha256(f"uapi-lock {n}".encode()).digest())
    raw[31] = (raw[31] & 0x3F) | 0x40
    return bytes(raw).hex()


def measure(socket_path: str, socket_dir: str, peers: int, rounds: int) -> dict[str, Any]:
    from wgkex.worker.wg_uapi import UapiWireGuard

    iface = os.path.basename(socket_path).removesuffix(".sock")
    setter = socket.socket(socket.AF_UNIX)
    setter.connect(socket_path)
    started = time.monotonic()
    for base in range(0, peers, 4096):
        lines = ["set=1\n"]
        for n in range(base, min(peers, base + 4096)):
            lines.append(f"public_key={_peer_key(n)}\nallowed_ip=fe80::{n >> 16:x}:{n & 0xFFFF:x}/128\n")
        lines.append("\n")
        _request(setter, "".join(lines).encode())
    add_seconds = time.monotonic() - started

    client = UapiWireGuard(socket_dir)
    dumps = []
    for _ in range(rounds):
        began = time.monotonic()
        count = len(client.peers(iface))
        dumps.append(time.monotonic() - began)
    assert count == peers, (count, peers)

    waits = []
    for n in range(rounds):
        done: dict[str, float] = {}
        began = time.monotonic()

        def dump() -> None:
            client.peers(iface)
            done["dump"] = time.monotonic() - began

        dumper = threading.Thread(target=dump)
        dumper.start()
        time.sleep(0.005)
        sent = time.monotonic()
        _request(setter, f"set=1\npublic_key={_peer_key(peers + n)}\nallowed_ip=fe80::1:{n:x}/128\n\n".encode())
        done["set"] = time.monotonic() - sent
        dumper.join()
        waits.append(done)
    client.close()
    setter.close()
    return {
        "daemon": "wireguard-go",
        "peers": peers,
        "add_seconds": round(add_seconds, 2),
        "dump_seconds": [round(v, 3) for v in dumps],
        "set_sent_5ms_into_a_dump": [{"set_seconds": round(w["set"], 3), "dump_seconds": round(w["dump"], 3)}
                                     for w in waits],
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=65530)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/uapi_dump_lock.py needs root (network namespaces)")
    from wgkex.lab.netns import Namespace
    from wgkex.lab.wggo import WireGuardGo, ensure_socket_dir, genkey

    ensure_socket_dir()
    ns = Namespace.create(f"wgkex-uapilock-{uuid.uuid4().hex[:8]}")
    try:
        with tempfile.TemporaryDirectory(prefix="wgkex-uapilock-") as tmp:
            wg = WireGuardGo.start(ns, "wg-lock", log_path=os.path.join(tmp, "wireguard-go.log"))
            try:
                wg.configure(genkey(), listen_port=51820)
                print(json.dumps(measure(wg.uapi_socket, wg.socket_dir, args.peers, args.rounds)), flush=True)
            finally:
                wg.stop()
    finally:
        ns.delete()


if __name__ == "__main__":
    main()
