"""A fake userspace WireGuard daemon: wireguard-go's UAPI for one interface with many peers.

wireguard-go refuses more than 65,536 peers per interface, so a benchmark of
100,000 runs this instead, as a process of its own::

    python tests/support/fake_uapi.py SOCKET --seed SEED --peers N --stale-fraction F [--dump-chunk P]

It answers ``get=1`` exactly as wireguard-go formats it and applies ``set=1``
removals; every removal of stale peers is balanced by as many new peers and as
many peers turning stale (see :meth:`FakeDaemon.set`). The peers' keys are
:func:`peer_key` ``(seed, n)``, so the benchmark knows them without asking. Each
request logs ``get|set ARRIVED WAITED HELD FIRST`` to stderr: unix time it
arrived, seconds it waited for the device and held it, the start of the first
public key it names (``-`` for none); a garbage collection of 50 ms or more logs
``gc STARTED SECONDS``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import random
import socket
import sys
import threading
import time
from collections.abc import Callable

from wgkex.gcwatch import SlowCollections

HOUR = 3600.0


def peer_key(seed: str, n: int) -> str:
    """The public key of the ``n``-th peer the daemon made from ``seed``."""
    return base64.b64encode(hashlib.sha256(f"{seed} {n}".encode()).digest()).decode()


class FakeDaemon:
    """A userspace WireGuard daemon's UAPI for one interface with many peers, answering like wireguard-go."""

    def __init__(self, seed: str, peers: int, stale_fraction: float) -> None:
        from wgkex.keys import lladdr

        self.lladdr = lladdr
        self.seed = seed
        self.rng = random.Random(seed)
        self.private_key = hashlib.sha256(f"{seed} private".encode()).hexdigest()
        #: Sets waiting for the device (chunked dumps let them go first), and its own lock.
        self.sets_waiting = 0
        self._waiting_lock = threading.Lock()
        # hex key -> (endpoint, allowed_ip, handshake age in seconds or None for never, tx, rx)
        self.peers: dict[str, tuple[str, str, float | None, int, int]] = {}
        self.next = 0
        self.started = time.time()
        for _ in range(peers):
            self._add(self._age(stale_fraction))

    def _age(self, stale_fraction: float) -> float | None:
        x = self.rng.random()
        if x < stale_fraction:
            return self.rng.uniform(3 * HOUR + 60, 72 * HOUR)
        if x < stale_fraction + 0.05:
            return None
        if x < stale_fraction + 0.05 + 0.24:
            return self.rng.uniform(180, 3 * HOUR - 60)
        return self.rng.uniform(0, 170)

    def _add(self, age: float | None) -> None:
        n = self.next
        self.next += 1
        key = peer_key(self.seed, n)
        hexkey = base64.b64decode(key).hex()
        endpoint = f"[2001:db8:{n >> 16:x}:{n & 0xFFFF:x}::1]:{1024 + n % 60000}"
        tx = self.rng.randrange(1 << 30) if age is not None else 0
        rx = self.rng.randrange(1 << 30) if age is not None else 0
        self.peers[hexkey] = (endpoint, f"{self.lladdr(key)}/128", age, tx, rx)

    def dump(self) -> bytes:
        """The whole reply to ``get=1``, built at once (wireguard-go holds its device meanwhile)."""
        now = time.time()
        parts = [self._header()]
        parts += [self._peer_text(hexkey, peer, now) for hexkey, peer in self.peers.items()]
        parts.append("errno=0\n\n")
        return "".join(parts).encode()

    def dump_in_chunks(self, lock: threading.Lock, chunk: int) -> bytes:
        """The reply to ``get=1`` built ``chunk`` peers at a time, ``lock`` taken for each chunk only.

        This is how the kernel's WireGuard answers a dump: each netlink message of the
        dump (a few dozen to a few hundred peers) is filled with the device's lock held,
        and a change waits for one message at most, not for the whole dump.
        """
        now = time.time()
        with lock:
            keys = list(self.peers)
            parts = [self._header()]
        for start in range(0, len(keys), chunk):
            # Python's lock is not fair: released and taken again at once, it would starve a
            # waiting set as the kernel's mutex does not. Between two chunks waiting sets go first.
            while self.sets_waiting:
                time.sleep(0.0001)
            with lock:
                for hexkey in keys[start : start + chunk]:
                    peer = self.peers.get(hexkey)
                    if peer is not None:  # removed since the dump began
                        parts.append(self._peer_text(hexkey, peer, now))
        parts.append("errno=0\n\n")
        return "".join(parts).encode()

    def _count_waiting(self, change: int) -> None:
        with self._waiting_lock:
            self.sets_waiting += change

    def _header(self) -> str:
        return f"private_key={self.private_key}\nlisten_port=51820\n"

    @staticmethod
    def _peer_text(hexkey: str, peer: tuple[str, str, float | None, int, int], now: float) -> str:
        endpoint, allowed, age, tx, rx = peer
        if age is None:
            sec, nsec, ep = 0, 0, ""
        else:
            when = now - age
            sec, nsec, ep = int(when), int((when % 1) * 1e9), f"endpoint={endpoint}\n"
        return (
            f"public_key={hexkey}\npreshared_key={'0' * 64}\nprotocol_version=1\n{ep}"
            f"last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}\n"
            f"tx_bytes={tx}\nrx_bytes={rx}\npersistent_keepalive_interval=0\nallowed_ip={allowed}\n"
        )

    def set(self, lines: list[str]) -> bytes:
        removed = 0
        current: str | None = None
        for line in lines:
            name, _, value = line.partition("=")
            if name == "public_key":
                current = value
            elif name == "remove" and value == "true" and current is not None:
                if self.peers.pop(current, None) is not None:
                    removed += 1
        if not removed:
            return b"errno=0\n\n"
        # Steady state: as many routers leave (turn stale) as new ones come. (Only when peers
        # went: a scan of every peer per set would cost each new key a pass over 100,000
        # peers with the device held, which wireguard-go's set of one peer never does.)
        idle = list(itertools.islice(
            (k for k, p in self.peers.items() if p[2] is not None and 180 <= p[2] < 3 * HOUR), removed))
        for hexkey in idle:
            endpoint, allowed, _, tx, rx = self.peers[hexkey]
            self.peers[hexkey] = (endpoint, allowed, 4 * HOUR, tx, rx)
        for _ in range(removed):
            self._add(self.rng.uniform(0, 170))
        return b"errno=0\n\n"

    def serve(self, path: str, dump_chunk: int = 0) -> None:
        """Answer requests on the unix socket ``path`` until killed; ``dump_chunk`` > 0: dumps lock per chunk."""
        if dump_chunk > 0:
            # The dump's thread would keep the GIL for 5 ms at a time: a set would wait for
            # that rather than for one chunk, which is this fake's cost, not the kernel's.
            sys.setswitchinterval(0.0002)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(16)
        lock = threading.Lock()

        def handle(conn: socket.socket) -> None:
            buffer = b""
            with conn:
                while True:
                    while b"\n\n" not in buffer:
                        chunk = conn.recv(1 << 16)
                        if not chunk:
                            return
                        buffer += chunk
                    request, _, buffer = buffer.partition(b"\n\n")
                    lines = request.decode().split("\n")
                    arrived = time.time()
                    if dump_chunk > 0 and lines[0] == "get=1":
                        # Logged as held from the first chunk to the last, though a set waits one chunk at most.
                        began = time.time()
                        reply = self.dump_in_chunks(lock, dump_chunk)
                        _log_request(lines, arrived, began)
                        conn.sendall(reply)
                        continue
                    is_set = lines[0] == "set=1"
                    self._count_waiting(is_set)
                    with lock:
                        self._count_waiting(-is_set)
                        began = time.time()
                        if lines[0] == "get=1":
                            reply = self.dump()
                        elif lines[0] == "set=1":
                            reply = self.set(lines[1:])
                        else:
                            reply = b"errno=-22\n\n"
                        _log_request(lines, arrived, began)
                    conn.sendall(reply)

        while True:
            conn, _ = server.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()


class _AtOnce:
    """Stands in for the reactor thread :class:`~wgkex.gcwatch.SlowCollections` hands its
    reports to: this process has no reactor, so a report runs at once."""

    @staticmethod
    def callFromThread(report: Callable[..., object], *args: object) -> None:
        report(*args)


class _SlowCollectionLines(SlowCollections):
    """wgkex's own timer of garbage collections, reporting each of ``threshold`` seconds or
    more as ``gc STARTED SECONDS`` on stderr: with 100,000 peers this process's heap is
    large, and a long collection would look like a late request."""

    def _report(self, seconds: float, generation: int, collected: int) -> None:
        print(f"gc {time.time() - seconds:.4f} {seconds:.4f}", file=sys.stderr, flush=True)


def _log_request(lines: list[str], arrived: float, began: float) -> None:
    """``get|set ARRIVED WAITED HELD FIRST`` on stderr: when a request arrived, how long it
    waited for the device and held it (a set waits for a dump being built, as in wireguard-go),
    and the start of the first public key it names (``-`` for none)."""
    first = lines[1].partition("=")[2][:16] if len(lines) > 1 else ""
    print(f"{lines[0][:3]} {arrived:.4f} {began - arrived:.4f} {time.time() - began:.4f} {first or '-'}",
          file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="where to listen (a unix socket path)")
    parser.add_argument("--seed", required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--stale-fraction", type=float, required=True)
    parser.add_argument("--dump-chunk", type=int, default=0, metavar="PEERS",
                        help="lock the device per PEERS peers of a dump, as the kernel does (default: "
                             "for the whole dump, as wireguard-go does)")
    args = parser.parse_args()
    _SlowCollectionLines(_AtOnce(), threshold=0.05).install()  # type: ignore[arg-type]
    FakeDaemon(args.seed, args.peers, args.stale_fraction).serve(args.socket, args.dump_chunk)


if __name__ == "__main__":
    main()
