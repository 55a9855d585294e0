"""The bad day after an outage: N routers re-register through v2 at once, fresh connection each.

Run as root::

    .venv/bin/python bench/herd.py [--routers 10000] [--gateways 2] [--concurrency 256]
                                   [--server mosquitto|cluster|both]

``mosquitto``: the lab (:class:`wgkex.lab.lab.Lab`): one mosquitto, one broker,
G gateways (wireguard-go ``wg-welt`` + VXLAN + the real worker in namespaces).
``cluster``: :class:`tests.support.cluster_lab.ClusterLab`: three RabbitMQ
nodes with the MQTT plugin, clustered, sessions mirrored; two brokers (the
routers split between them) and G gateways, each pointed at another node first.
Rate limits are lifted (every router here comes from 127.0.0.1).

Once the lab is up, N fresh keys are POSTed to v2 (chunked, Gluon's headers,
``Connection: close``) with ``--concurrency`` requests in flight, and every
gateway's WireGuard peers are read (``wg show dump``) every 0.25 s until each
key answered 200 is a peer on the gateway the answer named. Prints one JSON
object per server: requests/s over the HTTP phase, latency percentiles,
statuses, the spread by gateway, and ``seconds_until_all_peers`` from the
first request until the last key became a peer; then the kernel is counted
(peer, /128 route and FDB entry) to cross-check. Everything it made is removed.
Virtual machines of one kind differ in speed from day to day, so each run also
gives ``speed_probe_seconds`` (a fixed Python loop: 0.08-0.13 s on a quick day here)
and the CPU seconds the hypervisor took away during the run.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.cluster_lab import ClusterLab, installed_keys  # noqa: E402
from tests.support.measure import percentile  # noqa: E402
from wgkex.lab.gateway import Gateway  # noqa: E402
from wgkex.lab.lab import DOMAIN, Lab  # noqa: E402

from http_load import body_of, fire, status_of  # noqa: E402  (bench/, next to this file)

NO_RATE_LIMIT = {"rate_limit": 1_000_000, "rate_burst": 1_000_000}


def herd_keys(count: int, seed: str) -> list[str]:
    """``count`` distinct valid public keys."""
    return [base64.b64encode(hashlib.sha256(f"{seed} {i}".encode()).digest()).decode() for i in range(count)]


def request_bytes(port: int, key: str) -> bytes:
    """A v2 request as Gluon's uclient-fetch sends it (chunked, form content type)."""
    body = ('{"domain": "' + DOMAIN + '","public_key": "' + key + '"}').encode()
    return (
        f"POST /api/v2/wg/key/exchange HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: gluon/2023.2.3\r\n"
        "X-Gluon-Version: v2023.2.3\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def herd(ports: list[int], keys: list[str], concurrency: int) -> tuple[dict[str, tuple[str, str | None]], list[float]]:
    """Every router once, on a fresh connection, ``concurrency`` at a time (round robin over ``ports``).

    Returns, by key, the status and the gateway key the answer named, and each request's latency.
    The load generator is :func:`http_load.fire` (a bare epoll loop, about a quarter of the CPU
    asyncio's streams took; see its docstring).
    """
    requests = [(("127.0.0.1", ports[i % len(ports)]), request_bytes(ports[i % len(ports)], key))
                for i, key in enumerate(keys)]
    load = fire(requests, concurrency, timeout=120.0)
    gateways: dict[bytes, str | None] = {}  # reply body -> gateway key: every body names one of G gateways
    answers: dict[str, tuple[str, str | None]] = {}
    for key, reply in zip(keys, load.replies):
        status = status_of(reply)
        gateway = None
        if status == "200":
            content = body_of(reply)
            if content not in gateways:
                gateways[content] = json.loads(content)["Endpoint"]["PublicKey"]
            gateway = gateways[content]
        answers[key] = (status, gateway)
    return answers, load.latencies


def cpu_by_program() -> dict[str, float]:
    """CPU seconds (user + system) used so far by this process and each of its descendants, by program name.

    This process itself is the load generator (``client``); the rest are the lab's
    brokers, workers, mosquitto / RabbitMQ and wireguard-go.
    """
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, str, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        words = [a.decode(errors="replace") for a in argv if a]
        name = next((w for w in words if w.startswith("wgkex-")), None) or (
            os.path.basename(words[0]) if words else raw.split("(", 1)[1].rsplit(")", 1)[0])
        stats[int(entry)] = (int(fields[1]), name, (int(fields[11]) + int(fields[12])) / tick)
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _, _) in stats.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    used: dict[str, float] = {}
    for pid in mine - {os.getpid()}:
        _, name, seconds = stats[pid]
        used[name] = used.get(name, 0.0) + seconds
    own = os.times()
    used["client"] = own.user + own.system
    return used


def steal_seconds() -> float:
    """CPU time the hypervisor gave to others while this virtual machine wanted it (all cores, ``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def speed_probe() -> float:
    """Seconds of CPU a fixed pure-Python loop takes: how fast this machine is right now.

    Virtual machines of the same kind differ (and one machine varies with its host's load)
    by half again or more; this figure lets runs on different days be compared.
    """
    began = time.process_time()
    total = 0
    for i in range(5_000_000):
        total += i
    return time.process_time() - began


def run_herd(name: str, ports: list[int], gateways: dict[str, Gateway], args: argparse.Namespace) -> dict[str, Any]:
    """The herd against brokers on ``ports``; waits for the gateways; returns the figures."""
    keys = herd_keys(args.routers, f"{name} {time.time()}")
    by_key = {gw.public_key: n for n, gw in gateways.items()}
    load_before = os.getloadavg()
    probe = speed_probe()
    cpu_before = cpu_by_program()
    steal_before = steal_seconds()
    first = time.monotonic()
    answers, latencies = herd(ports, keys, args.concurrency)
    http_seconds = time.monotonic() - first
    want: dict[str, set[str]] = {n: set() for n in gateways}
    for key, (status, gw_key) in answers.items():
        if status == "200" and gw_key is not None:
            want[by_key.get(gw_key, "unknown")].add(key)
    pending = {n: set(keys_) for n, keys_ in want.items() if n in gateways}
    deadline = first + args.timeout
    while any(pending.values()) and time.monotonic() < deadline:
        for n in list(pending):
            if pending[n]:
                pending[n] -= set(gateways[n].peers())
        if any(pending.values()):
            time.sleep(0.25)
    all_peers = time.monotonic() - first if not any(pending.values()) else None
    cpu_after = cpu_by_program()
    stolen = steal_seconds() - steal_before
    cpu = {n: round(cpu_after[n] - cpu_before.get(n, 0.0), 2) for n in sorted(cpu_after)
           if cpu_after[n] - cpu_before.get(n, 0.0) >= 0.05}
    installed = {n: len(want[n] & installed_keys(gateways[n])) for n in gateways}
    return {
        "server": name,
        "routers": args.routers,
        "gateways": len(gateways),
        "brokers": len(ports),
        "concurrency": args.concurrency,
        "http_seconds": round(http_seconds, 2),
        "requests_per_second": round(len(answers) / http_seconds, 1),
        "latency_ms": {p: round(percentile(latencies, q) * 1000, 1) for p, q in (("p50", 50), ("p99", 99), ("max", 100))},
        "statuses": dict(Counter(s for s, _ in answers.values())),
        "spread": {n: len(k) for n, k in want.items()},
        "seconds_until_all_peers": round(all_peers, 2) if all_peers is not None else None,
        "not_peers_at_timeout": {n: len(p) for n, p in pending.items() if p},
        "installed_peer_route_fdb": installed,
        "cpu_seconds_by_program": cpu,
        "cpu_seconds_total": round(sum(cpu.values()), 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "speed_probe_seconds": round(probe, 3),
        "cpu_seconds_stolen_by_the_host": round(stolen, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus {platform.release()}",
    }


def on_mosquitto(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab.for_test(gateways={f"gw{i + 1}": 1 for i in range(args.gateways)}, keepalive=5,
                       broker_settings=NO_RATE_LIMIT)
    try:
        lab.up(timeout=120)
        return run_herd("mosquitto", [lab.broker_port], lab.gateways, args)
    finally:
        lab.down()


def on_cluster(args: argparse.Namespace) -> dict[str, Any]:
    lab = ClusterLab(gateways=[f"gw{i + 1}" for i in range(args.gateways)], brokers=2, nodes=args.nodes,
                     metrics_interval=15.0)
    try:
        lab.up(timeout=600)
        return run_herd(f"rabbitmq cluster of {args.nodes}", [b.port for b in lab.brokers], lab.gateways, args)
    finally:
        lab.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routers", type=int, default=10_000)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--server", choices=("mosquitto", "cluster", "both"), default="both")
    parser.add_argument("--nodes", type=int, default=3, help="RabbitMQ nodes (cluster)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the gateways")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/herd.py needs root (network namespaces)")
    if args.server in ("mosquitto", "both"):
        print(json.dumps(on_mosquitto(args)), flush=True)
    if args.server in ("cluster", "both"):
        print(json.dumps(on_cluster(args)), flush=True)


if __name__ == "__main__":
    main()
