"""How fast the worker's kernel side installs keys: peer + route + FDB entry, per stage.

Run as root: ``.venv/bin/python bench/apply.py [--keys 2000,10000]``. For each
count N it makes a fresh network namespace with a real wireguard-go ``wg-b``
(in a private mount namespace, as the lab runs it: :mod:`wgkex.lab.wggo`)
and a VXLAN ``vx-b`` on top, then does what the worker's pool does with one
batch of N new keys: ``add_peers`` (one UAPI transaction), ``replace_routes``
and ``append_fdb`` (batched rtnetlink), timing each stage. It then repeats the
batch (everything exists: the idempotent path), dumps the peers, and removes
everything again. Prints one JSON document; everything it made is removed.

For comparison it also times pyroute2's own ``IPRoute.route("replace")``, one
message per call on a reused socket, on a sample of the same addresses.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wgkex.keys import lladdr  # noqa: E402
from wgkex.lab.netns import Namespace, add_vxlan, fdb_entries, routes  # noqa: E402
from wgkex.lab.wggo import WireGuardGo, genkey  # noqa: E402
from wgkex.worker.rtnl import PyrouteRtnl  # noqa: E402
from wgkex.worker.wg_uapi import UapiWireGuard  # noqa: E402

WG, VX = "wg-b", "vx-b"


def run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


class Lab:
    """One namespace with wireguard-go's wg-b and vx-b on top, built from the lab's parts (wgkex.lab)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgkex-bench-")
        self.ns: Namespace | None = None
        self.wg: WireGuardGo | None = None

    @property
    def netns(self) -> str:
        assert self.ns is not None
        return self.ns.name

    @property
    def socket_dir(self) -> str:
        """wireguard-go's private socket directory, as this process reaches it."""
        assert self.wg is not None
        return self.wg.socket_dir

    def __enter__(self) -> Lab:
        try:
            self.ns = Namespace.create(f"wgkx-bench-{uuid.uuid4().hex[:8]}")
            self.wg = WireGuardGo.start(self.ns, WG, os.path.join(self.dir, "wireguard-go.log"))
            public_key = self.wg.configure(genkey(), listen_port=51820)
            add_vxlan(self.ns, VX, vni=1, local=lladdr(public_key), dev=WG)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.wg is not None:
            self.wg.stop()
        if self.ns is not None:
            self.ns.delete()
        shutil.rmtree(self.dir, ignore_errors=True)


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def stage(seconds: float, count: int) -> dict[str, float]:
    return {"seconds": round(seconds, 4), "per_second": round(count / seconds) if seconds else 0.0}


def bench(count: int) -> dict[str, Any]:
    keys = [base64.b64encode(hashlib.sha256(b"wgkex-bench %d" % i).digest()).decode() for i in range(count)]
    with Lab() as lab:
        wireguard = UapiWireGuard(lab.socket_dir)
        rtnl = PyrouteRtnl(netns=lab.netns)
        try:
            rtnl.link_local_address(WG)  # open the netlink socket outside the measurement
            wireguard.interface(WG)  # and the UAPI connection
            out: dict[str, Any] = {"keys": count}

            t_lladdr, addresses = timed(lambda: [lladdr(k) for k in keys])
            peers = [(k, a + "/128") for k, a in zip(keys, addresses)]
            t_peers, _ = timed(lambda: wireguard.add_peers(WG, peers))
            t_routes, route_failures = timed(lambda: rtnl.replace_routes(WG, addresses))
            t_fdb, fdb_failures = timed(lambda: rtnl.append_fdb(VX, WG, addresses))
            total = t_lladdr + t_peers + t_routes + t_fdb
            assert not route_failures and not fdb_failures, (route_failures, fdb_failures)
            out["new"] = {
                "lladdr": stage(t_lladdr, count),
                "wireguard_peers_uapi": stage(t_peers, count),
                "routes": stage(t_routes, count),
                "fdb": stage(t_fdb, count),
                "total": stage(total, count),
            }

            t_peers2, _ = timed(lambda: wireguard.add_peers(WG, peers))
            t_routes2, _ = timed(lambda: rtnl.replace_routes(WG, addresses))
            t_fdb2, _ = timed(lambda: rtnl.append_fdb(VX, WG, addresses))
            out["repeat"] = {
                "wireguard_peers_uapi": stage(t_peers2, count),
                "routes": stage(t_routes2, count),
                "fdb": stage(t_fdb2, count),
                "total": stage(t_lladdr + t_peers2 + t_routes2 + t_fdb2, count),
            }

            t_dump, dumped = timed(lambda: wireguard.peers(WG))
            assert len(dumped) == count, len(dumped)
            out["peer_dump_uapi"] = stage(t_dump, count)
            assert lab.ns is not None
            routes_seen = sum(1 for dst in routes(lab.ns, WG) if dst.endswith("/128"))
            fdb_seen = sum(1 for entry in fdb_entries(lab.ns, VX) if "dst" in entry)
            assert routes_seen == count and fdb_seen == count, (routes_seen, fdb_seen)

            t_rm_peers, _ = timed(lambda: wireguard.remove_peers(WG, keys))
            t_rm_routes, _ = timed(lambda: rtnl.delete_routes(WG, addresses))
            t_rm_fdb, _ = timed(lambda: rtnl.delete_fdb(VX, addresses))
            out["remove"] = {
                "wireguard_peers_uapi": stage(t_rm_peers, count),
                "routes": stage(t_rm_routes, count),
                "fdb_dump_and_delete": stage(t_rm_fdb, count),
                "total": stage(t_rm_peers + t_rm_routes + t_rm_fdb, count),
            }
            out["resends_after_lost_acks"] = rtnl.resends
            out["reference_pyroute2_one_route_per_call"] = reference_pyroute2(lab.netns, addresses[:1000])
        finally:
            rtnl.close()
            wireguard.close()
    return out


def reference_pyroute2(netns: str, addresses: list[str]) -> dict[str, float]:
    """pyroute2's own API: one ``route("replace")`` per call on one reused socket."""
    from pyroute2 import IPRoute

    ipr = IPRoute(netns=netns, flags=0)
    try:
        index = ipr.link("get", ifname=WG)[0]["index"]
        seconds, _ = timed(lambda: [ipr.route("replace", dst=f"{a}/128", oif=index) for a in addresses])
    finally:
        ipr.close()
    return stage(seconds, len(addresses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", default="2000,10000", help="comma-separated batch sizes (default 2000,10000)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/apply.py needs root (network namespaces, wireguard-go)")
    results = {
        "what": "one batch of new keys: WireGuard peer (UAPI, wireguard-go) + /128 route + VXLAN FDB entry",
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "wireguard_go": run("wireguard-go", "--version").splitlines()[0]},
        "runs": [bench(int(n)) for n in args.keys.split(",")],
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
