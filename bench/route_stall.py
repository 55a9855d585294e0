"""Does the kernel alone make a /128 route add wait for seconds at 100,000 routes?

Run as root: ``.venv/bin/python bench/route_stall.py [--routes 100000] [--duration 300]``.

``bench/sweep_latency.py`` sees a few dozen keys now and then wait 1.7-3 s
between their peer and their /128 route, outside any sweep, with no slow
garbage collection in the worker (``wgkex.gcwatch``) and no wait at the
WireGuard daemon. This takes the worker out: a namespace of its own with a
``tun`` interface (as wireguard-go's) and ``--routes`` /128 routes in fe80::/64 (as the worker
installs them), then one route added every ``--gap`` seconds through
:class:`~wgkex.worker.rtnl.PyrouteRtnl` (the worker's own code) and timed;
every ``--churn-every`` seconds 1,000 routes are deleted and 1,000 others
added, as a sweep and new routers do. Prints one JSON line: add latency
p50/p99/max, the adds over 200 ms with when they happened (seconds from the
start) and ``/proc/net/rt6_stats`` then.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.measure import percentile  # noqa: E402
from wgkex.lab.netns import Namespace, add_vxlan  # noqa: E402
from wgkex.worker.rtnl import PyrouteRtnl  # noqa: E402

IFACE = "rs0"
VXLAN = "rsvx0"


def address(n: int) -> str:
    return str(ipaddress.IPv6Address(0xFE80 << 112 | 0x100000000 + n))


def rt6_stats(ns: Namespace) -> str:
    """The namespace's IPv6 FIB counters (fib nodes, route nodes, ..., dst entries, in hex)."""
    return subprocess.run(ns.exec_argv(["cat", "/proc/net/rt6_stats"]), capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--gap", type=float, default=0.02)
    parser.add_argument("--churn-every", type=float, default=60.0)
    parser.add_argument("--fdb", action="store_true",
                        help="also a VXLAN on the interface with one FDB entry per route, appended with each add")
    args = parser.parse_args()

    ns = Namespace.create(f"wgkex-rstall-{uuid.uuid4().hex[:8]}")
    rtnl = None
    try:
        ns.ip("tuntap", "add", IFACE, "mode", "tun")
        ns.ip("address", "add", "fe80::1/64", "dev", IFACE, "nodad")
        ns.ip("link", "set", IFACE, "up")
        if args.fdb:
            add_vxlan(ns, VXLAN, vni=4242, local="fe80::1", dev=IFACE)
        rtnl = PyrouteRtnl(netns=ns.name)
        for i in range(0, args.routes, 10_000):
            chunk = [address(n) for n in range(i, min(i + 10_000, args.routes))]
            assert not rtnl.replace_routes(IFACE, chunk)
            if args.fdb:
                assert not rtnl.append_fdb(VXLAN, IFACE, chunk)
        next_n, oldest = args.routes, 0
        latencies: list[float] = []
        slow: list[dict[str, object]] = []
        started = time.monotonic()
        next_churn = started + args.churn_every
        while time.monotonic() - started < args.duration:
            t0 = time.monotonic()
            rtnl.replace_routes(IFACE, [address(next_n)])
            if args.fdb:
                rtnl.append_fdb(VXLAN, IFACE, [address(next_n)])
            ms = (time.monotonic() - t0) * 1000
            next_n += 1
            latencies.append(ms)
            if ms > 200:
                slow.append({"at_s": round(t0 - started, 1), "ms": round(ms, 1), "rt6_stats": rt6_stats(ns)})
            if time.monotonic() >= next_churn:
                gone = [address(n) for n in range(oldest, oldest + 1000)]
                rtnl.delete_routes(IFACE, gone)
                if args.fdb:
                    rtnl.delete_fdb(VXLAN, gone, IFACE)
                oldest += 1000
                new = [address(n) for n in range(next_n, next_n + 1000)]
                rtnl.replace_routes(IFACE, new)
                if args.fdb:
                    rtnl.append_fdb(VXLAN, IFACE, new)
                next_n += 1000
                next_churn += args.churn_every
            time.sleep(args.gap)
        print(json.dumps({
            "routes": args.routes, "fdb": args.fdb, "adds": len(latencies),
            "p50_ms": round(percentile(latencies, 50), 2), "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies), 1), "over_200ms": slow[:20], "over_200ms_count": len(slow),
            "kernel": os.uname().release, "load_average": [round(v, 2) for v in os.getloadavg()],
        }))
    finally:
        if rtnl is not None:
            rtnl.close()
        ns.delete()


if __name__ == "__main__":
    main()
