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

Prints one JSON line: p50/p99/max of the latency (of all keys, and of the
keys published while a sweep ran, from the sweeps the worker's
``/api/v1/status`` reports), keys that never arrived, how many sweeps ran and
for what share of the time a sweep was running; where a key's time went (to
the daemon, waiting there for the device, from its peer to its route and FDB
entry, from the fake daemon's request log) and how many keys arrived while a
dump held the device. ``machine_pauses`` lists the moments a probe process
(this file with ``--pause-probe``, a 10 ms sleep in a loop) woke 100 ms or more
late, and ``daemon_gc_pauses`` the fake daemon's garbage collections of 50 ms or
more: a key that waited at such a moment waited for the machine or the fake,
not for the worker.

The worker paces whole dumps, the sweep's and the peer count's alike
(``wgkex.worker.dumps.MAX_DUMP_SHARE``): at 100,000 peers one every one to three
minutes, however short ``cleanup_interval`` is,
so ``--duration`` should span a few minutes.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import errno
import hashlib
import ipaddress
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from worker_reactor import DOMAIN, STATUS_PORT, Bench  # noqa: E402

from tests.support.measure import percentile  # noqa: E402

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


def pause_probe(late: float = 0.1) -> None:
    """Print ``STARTED SECONDS`` whenever a 10 ms sleep ends ``late`` seconds or more late.

    A process of its own with next to no heap: when it pauses at the same moment as the
    worker's keys lane, the machine paused, not wgkex.
    """
    print("ready", flush=True)
    while True:
        before = time.time()
        time.sleep(0.01)
        overslept = time.time() - before - 0.01
        if overslept >= late:
            print(f"{before:.4f} {overslept:.4f}", flush=True)


class Sweeps(threading.Thread):
    """Polls the worker's /api/v1/status: (start, seconds) of every sweep that finished meanwhile."""

    def __init__(self, netns: str, port: int) -> None:
        super().__init__(name="sweeps", daemon=True)
        from tests.support.worker_probe import StatusClient

        self.client = StatusClient(netns, port)
        self.seen: dict[float, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                status = json.loads(self.client.get("/api/v1/status"))
            except (OSError, RuntimeError, ValueError):
                continue
            for domain in status.get("domains", {}).values():
                last = domain.get("last_sweep")
                if last:
                    self.seen[float(last["at"])] = float(last["seconds"])

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.join(10)
        self.client.close()
        return sorted((at, at + seconds) for at, seconds in self.seen.items())


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
    probe = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--pause-probe"],
                             stdout=subprocess.PIPE, text=True)
    watcher = Sweeps(bench.ns.name, STATUS_PORT)
    watcher.start()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sweep-latency-{bench.id}")
    client.connect("127.0.0.1", bench.mqtt.port)
    client.loop_start()
    try:
        if not installed.ready.wait(30):
            raise RuntimeError("the netlink monitor did not start")
        before = bench.status.metrics()
        rng = random.Random(bench.seed)
        published: list[tuple[str, float, str]] = []
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < args.duration:
            time.sleep(rng.uniform(0, 2 * args.gap))
            key = new_key(bench.seed, n)
            n += 1
            published.append((str(ipaddress.ip_address(lladdr(key))), time.time(), key))
            client.publish(key_topic(DOMAIN), key.encode(), qos=1)
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline and any(installed.at(a) is None for a, _, _ in published):
            time.sleep(0.1)
        after = bench.status.metrics()
    finally:
        client.loop_stop()
        client.disconnect()
        proc.terminate()
        proc.wait(10)
        probe.terminate()
        probe_lines, _ = probe.communicate(timeout=10)
        windows = watcher.stop()
    # The fake daemon's request log: "get|set ARRIVED WAITED HELD FIRST" (see worker_reactor.FakeDaemon).
    gets: list[tuple[float, float]] = []  # (start, end) of every dump with the device held
    daemon_gc: list[list[float]] = []  # [start, ms] of the fake daemon's collections of 50 ms or more
    machine_pauses = [[round(float(a), 2), round(float(b) * 1000, 1)]
                      for a, b in (line.split() for line in probe_lines.splitlines() if line != "ready")]
    sets: dict[str, tuple[float, float, float]] = {}  # first key's hex prefix -> (arrived, waited, held)
    with open(os.path.join(bench.dir, "fake-uapi.log")) as log:
        for line in log:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "gc":
                daemon_gc.append([round(float(parts[1]), 2), round(float(parts[2]) * 1000, 1)])
            if len(parts) != 5:
                continue
            kind, arrived, waited, held, first = parts[0], float(parts[1]), float(parts[2]), float(parts[3]), parts[4]
            if kind == "get":
                gets.append((arrived + waited, arrived + waited + held))
            elif kind == "set":
                sets.setdefault(first, (arrived, waited, held))
    # When the keys lane (one batch at a time: peers, then routes and FDB entries) sent the
    # sets of the published keys; a later batch's set means this one's route and FDB were in.
    lane_sets = sorted(entry[0] for entry in (sets.get(base64.b64decode(key).hex()[:16])
                                              for _, _, key in published) if entry is not None)
    stamped_late = 0  # keys whose route or FDB event the monitor read after the lane had moved on
    latencies = []
    during_sweep = []  # keys published while a sweep ran (from its dump to its last removal)
    quiet = []  # keys whose set did not arrive while a dump held the device
    to_daemon, daemon_wait, after_peer = [], [], []
    behind_dump = 0
    missing = 0
    keyed: list[dict[str, Any]] = []  # every installed key, for the slowest ones
    for address, when, key in published:
        at = installed.at(address)
        if at is None:
            missing += 1
            continue
        latencies.append((at - when) * 1000)
        in_sweep = any(start <= when <= end for start, end in windows)
        if in_sweep:
            during_sweep.append(latencies[-1])
        entry = sets.get(base64.b64decode(key).hex()[:16])
        keyed.append({"published": round(when, 2), "ms": round(latencies[-1], 1), "in_sweep": in_sweep})
        if entry is None:
            continue
        arrived, waited, held = entry
        peer_done = arrived + waited + held
        keyed[-1].update(to_daemon_ms=round((arrived - when) * 1000, 1), daemon_wait_ms=round(waited * 1000, 1),
                         peer_to_installed_ms=round((at - peer_done) * 1000, 1),
                         # which of the two came late, when a key stalls after its peer
                         peer_to_route_ms=round((installed.route[address] - peer_done) * 1000, 1),
                         peer_to_fdb_ms=round((installed.fdb[address] - peer_done) * 1000, 1))
        following = bisect.bisect_right(lane_sets, arrived)
        if following < len(lane_sets) and lane_sets[following] < at - 0.05:
            # The lane had started a later batch 50 ms or more before the monitor's stamp:
            # this key was installed by then, and the monitor read the event late.
            keyed[-1]["monitor_late_ms"] = round((at - lane_sets[following]) * 1000, 1)
            stamped_late += 1
        to_daemon.append((arrived - when) * 1000)
        daemon_wait.append(waited * 1000)
        after_peer.append((at - peer_done) * 1000)
        if any(start <= arrived < end for start, end in gets):
            behind_dump += 1
        else:
            quiet.append(latencies[-1])
    holds = [(end - start) * 1000 for start, end in gets
             if published and published[0][1] <= end and start <= published[-1][1]]

    def spread(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        return {"p50": round(percentile(values, 50), 1), "p99": round(percentile(values, 99), 1),
                "max": round(max(values), 1)}
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
        "slowest_keys": sorted(keyed, key=lambda k: -k["ms"])[:8],
        "sweep_windows": [[round(a, 2), round(b, 2)] for a, b in windows],
        "dump_windows": [[round(a, 2), round(b, 2)] for a, b in gets
                         if published and published[0][1] <= b and a <= published[-1][1]],
        "sweeps": int(sweeps),
        "mean_sweep_seconds": round(sweep_time / sweeps, 3) if sweeps else None,
        "share_of_time_sweeping": round(sweep_time / elapsed, 2),
        "duration_seconds": round(elapsed, 1),
        # The fake daemon builds a dump with its device lock held (so does wireguard-go): keys
        # added meanwhile wait for it.
        "uapi_dumps": len(holds),
        "uapi_dump_lock_ms": spread(holds),
        # Where a key's time went: publish -> its set reaches the daemon (bus, reactor, keys lane),
        # waiting there for the device, then from the end of its set to its route and FDB entry.
        "parts_ms": {"to_daemon": spread(to_daemon), "daemon_wait": spread(daemon_wait),
                     "peer_to_installed": spread(after_peer)},
        "keys_arriving_during_a_dump": behind_dump,
        # The latencies above are from the monitor's stamps; these keys' stamps came 50 ms or more
        # after the keys lane had already moved on to a later batch (see monitor_late_ms per key).
        "keys_stamped_late_by_the_monitor": stamped_late,
        "keys_published_during_a_sweep": len(during_sweep),
        "latency_ms_during_sweeps": spread(during_sweep),
        "latency_ms_other_keys": spread(quiet),
        "dump_lock": (f"per {args.dump_chunk} peers of a dump (the kernel's way)"
                      if args.dump_chunk else "whole dump (wireguard-go's way)"),
        # Moments something outside the worker stood still: a probe process's 10 ms sleeps that
        # ended 100 ms or more late (the machine), the fake daemon's long collections.
        "machine_pauses": machine_pauses,
        "daemon_gc_pauses": daemon_gc,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--fdb", type=int, default=None, help="FDB entries to install (default: one per peer)")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of publishing keys")
    parser.add_argument("--gap", type=float, default=0.25, help="mean seconds between two keys")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the last keys")
    parser.add_argument("--stale-fraction", type=float, default=0.01)
    parser.add_argument("--dump-chunk", type=int, default=0, metavar="PEERS",
                        help="the fake daemon locks its device per PEERS peers of a dump, as the kernel's "
                             "WireGuard does per netlink message (default 0: for the whole dump, as wireguard-go)")
    parser.add_argument("--baseline", action="store_true",
                        help="no sweeps while measuring (cleanup_interval 3600 s): the same keys without a sweep")
    parser.add_argument("--keep-logs", metavar="DIR", default=None,
                        help="copy the worker's log and the fake daemon's request log into DIR")
    parser.add_argument("--monitor", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pause-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.monitor:
        monitor()
        return
    if args.pause_probe:
        pause_probe()
        return
    if os.geteuid() != 0:
        sys.exit("bench/sweep_latency.py needs root (network namespaces)")
    if args.fdb is None:
        args.fdb = args.peers
    # Back-to-back sweeps (or none); counts at the default interval. See Bench for the other settings.
    args.interval = 3600.0 if args.baseline else 0.05
    args.metrics_interval = 60.0
    with Bench(args) as bench:
        try:
            print(json.dumps(measure(bench, args)), flush=True)
        finally:
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                for name in ("worker.log", "fake-uapi.log"):
                    shutil.copy(os.path.join(bench.dir, name), args.keep_logs)


if __name__ == "__main__":
    main()
