"""How long does a new key wait while the worker sweeps 100,000 peers?

Run as root: ``.venv/bin/python bench/sweep_latency.py [--peers 100000] [--duration 40]``.

The gateway is the one of ``bench/worker_reactor.py`` (a fake UAPI daemon
process with ``--peers`` peers of realistic handshake ages, a real namespace
with ``wg-x``/``vx-x``, one /128 route and one FDB entry per peer, the real
``twistd -n wgkex-worker``), but with ``cleanup_interval`` so short that the
worker sweeps back to back: each sweep dumps every peer, removes the stale
ones (about 1 %; the fake daemon turns as many peers stale again) with their
routes and FDB entries. ``metrics_interval`` stays at its default of 60 s.

Meanwhile this process publishes single new keys on ``wireguard/{domain}/all``
(QoS 1, a random gap of ``--gap`` seconds on average between two keys) and a
netlink monitor inside the namespace (this file with ``--monitor``) stamps
when the key's /128 route and its FDB entry appear. A key's latency is from
its publish to the later of the two (the worker adds the peer before either).

Prints one JSON line: p50/p99/max of the latency, keys that never arrived,
how many sweeps ran and for what share of the time a sweep was running.
"""

from __future__ import annotations

import argparse
import base64
import errno
import hashlib
import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from worker_reactor import DOMAIN, Bench, percentile  # noqa: E402

_ROUTE_PREFIX = 128
_NETLINK_ROUTE = 0
_SO_RCVBUFFORCE = 33
_RTMGRP_NEIGH = 0x4
_RTMGRP_IPV6_ROUTE = 0x400
_RTM_NEWROUTE = 24
_RTM_NEWNEIGH = 28


def monitor() -> None:
    """Print ``TIME route|fdb ADDRESS`` for every new /128 route and FDB destination (runs in the namespace).

    A raw rtnetlink socket with a large receive buffer: a sweep deletes about
    a thousand routes at once, and a slower reader would lose events (ENOBUFS).
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
    sock.bind((0, _RTMGRP_NEIGH | _RTMGRP_IPV6_ROUTE))
    print("ready", flush=True)
    while True:
        try:
            data = sock.recv(1 << 20)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                print("0 overflow -", flush=True)
                continue
            raise
        now = time.time()
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == _RTM_NEWROUTE and data[offset + 17] == _ROUTE_PREFIX:
                dst = _attr(data, offset + 16 + 12, offset + length, 1)
                if dst is not None:
                    print(f"{now:.6f} route {ipaddress.ip_address(dst)}", flush=True)
            elif kind == _RTM_NEWNEIGH:
                dst = _attr(data, offset + 16 + 12, offset + length, 1)
                if dst is not None and len(dst) in (4, 16):
                    print(f"{now:.6f} fdb {ipaddress.ip_address(dst)}", flush=True)
            offset += (length + 3) & ~3


def _attr(data: bytes, start: int, end: int, wanted: int) -> bytes | None:
    """The payload of the first rtattr of type ``wanted`` between ``start`` and ``end``."""
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            return None
        if kind == wanted:
            return data[start + 4 : start + length]
        start += (length + 3) & ~3
    return None


class Installed:
    """Reads the monitor's lines: first time each address got its route and its FDB entry."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.route: dict[str, float] = {}
        self.fdb: dict[str, float] = {}
        self.ready = threading.Event()
        self.overflows = 0
        self.thread = threading.Thread(target=self._read, name="monitor", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready.set()
                continue
            stamp, kind, address = line.split()
            if kind == "overflow":
                self.overflows += 1
                continue
            table = self.route if kind == "route" else self.fdb
            table.setdefault(str(ipaddress.ip_address(address)), float(stamp))

    def at(self, address: str) -> float | None:
        route, fdb = self.route.get(address), self.fdb.get(address)
        if route is None or fdb is None:
            return None
        return max(route, fdb)


def new_key(seed: str, n: int) -> str:
    return base64.b64encode(hashlib.sha256(f"{seed} new {n}".encode()).digest()).decode()


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from wgkex.keys import lladdr
    from wgkex.contract import key_topic

    assert bench.ns is not None and bench.status is not None
    proc = subprocess.Popen(
        bench.ns.exec_argv([sys.executable, os.path.abspath(__file__), "--monitor"]),
        stdout=subprocess.PIPE, text=True,
    )
    installed = Installed(proc)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sweep-latency-{bench.id}")
    client.connect("127.0.0.1", bench.mqtt.port)
    client.loop_start()
    try:
        if not installed.ready.wait(30):
            raise RuntimeError("the netlink monitor did not start")
        before = bench.status.metrics()
        rng = random.Random(bench.seed)
        published: list[tuple[str, float]] = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < args.duration:
            time.sleep(rng.uniform(0, 2 * args.gap))
            key = new_key(bench.seed, n)
            n += 1
            published.append((str(ipaddress.ip_address(lladdr(key))), time.time()))
            client.publish(key_topic(DOMAIN), key.encode(), qos=1)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and any(installed.at(a) is None for a, _ in published):
            time.sleep(0.1)
        after = bench.status.metrics()
    finally:
        client.loop_stop()
        client.disconnect()
        proc.terminate()
        proc.wait(10)
    latencies = []
    missing = 0
    for address, when in published:
        at = installed.at(address)
        if at is None:
            missing += 1
        else:
            latencies.append((at - when) * 1000)
    holds = []
    with open(os.path.join(bench.dir, "fake-uapi.log")) as log:
        for line in log:
            if line.startswith("get "):
                _, at, seconds = line.split()
                if published and published[0][1] <= float(at) <= published[-1][1]:
                    holds.append(float(seconds) * 1000)
    sweeps = after.get("wgkex_worker_sweep_seconds_count", 0) - before.get("wgkex_worker_sweep_seconds_count", 0)
    sweep_time = after.get("wgkex_worker_sweep_seconds_sum", 0) - before.get("wgkex_worker_sweep_seconds_sum", 0)
    return {
        "peers": args.peers,
        "keys": len(published),
        "not_installed": missing,
        "monitor_overflows": installed.overflows,
        "p50_ms": round(percentile(latencies, 50), 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "max_ms": round(max(latencies), 1) if latencies else None,
        "slowest_ms": sorted((round(v, 1) for v in latencies), reverse=True)[:5],
        "sweeps": int(sweeps),
        "mean_sweep_seconds": round(sweep_time / sweeps, 3) if sweeps else None,
        "share_of_time_sweeping": round(sweep_time / elapsed, 2),
        "duration_seconds": round(elapsed, 1),
        # The fake daemon builds a dump with its device lock held (so does wireguard-go): keys
        # added meanwhile wait for it.
        "uapi_dumps": len(holds),
        "uapi_dump_lock_ms_max": round(max(holds), 1) if holds else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--fdb", type=int, default=None, help="FDB entries to install (default: one per peer)")
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of publishing keys")
    parser.add_argument("--gap", type=float, default=0.25, help="mean seconds between two keys")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the last keys")
    parser.add_argument("--stale-fraction", type=float, default=0.01)
    parser.add_argument("--baseline", action="store_true",
                        help="no sweeps while measuring (cleanup_interval 3600 s): the same keys without a sweep")
    parser.add_argument("--monitor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monitor:
        monitor()
        return
    if os.geteuid() != 0:
        sys.exit("bench/sweep_latency.py needs root (network namespaces)")
    if args.fdb is None:
        args.fdb = args.peers
    # Back-to-back sweeps (or none); counts at the default interval. See Bench for the other settings.
    args.interval = 3600.0 if args.baseline else 0.05
    args.metrics_interval = 60.0
    with Bench(args) as bench:
        print(json.dumps(measure(bench, args)), flush=True)


if __name__ == "__main__":
    main()
