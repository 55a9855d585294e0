"""Network namespaces and the links between them: veth pairs, bridges, VXLAN.

Thin wrappers over ``ip`` (iproute2), blocking and meant for the lab, tests and
benchmarks, never for the daemons. Nothing here touches the root namespace:
links are created *inside* a namespace (``ip -n NS link add ... peer ... netns
OTHER``), so two labs can run side by side with the same interface names.

Example::

    lan = Namespace.create("wgkex-x1-lan")
    gw = Namespace.create("wgkex-x1-gw1")
    add_bridge(lan, "br0")
    add_veth(lan, "p-gw1", gw, "eth0", bridge="br0")
    add_address(gw, "eth0", "2001:db8::1/64")
    ...
    gw.delete(); lan.delete()
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from typing import Any

from wgkex.lab.proc import LabError, run

#: Where ``ip netns add`` puts its handles.
NETNS_DIR = "/run/netns"

#: UDP port of VXLAN as Gluon routers use it (the kernel's ``dstport 0`` means the same).
VXLAN_PORT = 8472


class Namespace:
    """A named network namespace (``ip netns``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    @classmethod
    def create(cls, name: str) -> Namespace:
        """Create the namespace, bring ``lo`` up and switch off duplicate address detection.

        DAD is off so that addresses (and link-local addresses of new links) are
        usable at once instead of after about a second of probing.
        """
        ns = cls(name)
        if ns.exists():
            raise LabError(f"network namespace {name} already exists (remove it with: ip netns del {name})")
        run(["ip", "netns", "add", name])
        ns.ip("link", "set", "lo", "up")
        for conf in ("all", "default"):
            ns.sysctl(f"net.ipv6.conf.{conf}.accept_dad", "0")
        return ns

    def exists(self) -> bool:
        return os.path.exists(os.path.join(NETNS_DIR, self.name))

    def delete(self) -> None:
        """Remove the namespace (absent is fine). Processes inside must be stopped first."""
        if self.exists():
            run(["ip", "netns", "del", self.name], check=False)

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip -n NAME ARGS...``; returns stdout."""
        return run(["ip", "-n", self.name, *args], check=check)

    def ip_json(self, *args: str) -> Any:
        """``ip -j -n NAME ARGS...`` parsed (``[]`` for empty output)."""
        out = run(["ip", "-j", "-n", self.name, *args])
        return json.loads(out) if out.strip() else []

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside the namespace (own mount namespace, ``/sys`` remounted)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 15.0) -> str:
        """Run a short command inside the namespace; stdout."""
        return run(self.exec_argv(argv), input=input, check=check, timeout=timeout)

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl (``net.*``)."""
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(["sh", "-c", f'echo "$1" > "$2"', "sysctl", value, path])

    def link_exists(self, ifname: str) -> bool:
        return run(["ip", "-n", self.name, "link", "show", "dev", ifname], check=False).strip() != ""

    def addresses(self, ifname: str) -> list[str]:
        """The addresses on ``ifname`` as ``addr/prefixlen`` (compressed form)."""
        out = []
        for link in self.ip_json("address", "show", "dev", ifname):
            for a in link.get("addr_info", []):
                out.append(f"{ipaddress.ip_address(a['local'])}/{a['prefixlen']}")
        return out


def add_address(ns: Namespace, ifname: str, cidr: str) -> None:
    """Put ``cidr`` on ``ifname`` (no DAD, idempotent) and bring the link up."""
    extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
    ns.ip("address", "replace", cidr, "dev", ifname, *extra)
    ns.ip("link", "set", ifname, "up")


def add_bridge(ns: Namespace, name: str) -> None:
    """A bridge that forwards at once (no STP, no multicast snooping that would eat NDP)."""
    ns.ip("link", "add", name, "type", "bridge", "stp_state", "0", "mcast_snooping", "0")
    ns.ip("link", "set", name, "up")


def add_veth(ns_a: Namespace, name_a: str, ns_b: Namespace, name_b: str, *, bridge: str | None = None) -> None:
    """A veth pair ``name_a`` in ``ns_a`` <-> ``name_b`` in ``ns_b``, both up; ``name_a`` joins ``bridge``."""
    ns_a.ip("link", "add", name_a, "type", "veth", "peer", "name", name_b, "netns", ns_b.name)
    if bridge is not None:
        ns_a.ip("link", "set", name_a, "master", bridge)
    ns_a.ip("link", "set", name_a, "up")
    ns_b.ip("link", "set", name_b, "up")


def add_vxlan(
    ns: Namespace,
    name: str,
    *,
    vni: int,
    local: str,
    dev: str,
    remote: str | None = None,
    port: int = VXLAN_PORT,
) -> None:
    """A VXLAN link carried over ``dev`` (a WireGuard interface), as Gluon and wgkex gateways use it.

    ``local`` is the link-local address of ``dev``. A router gives the gateway's
    address as ``remote``; a gateway gives none: the worker adds one all-zero
    FDB entry per router instead.
    """
    args = ["link", "add", name, "type", "vxlan", "id", str(vni), "local", local, "dev", dev, "dstport", str(port)]
    if remote is not None:
        args += ["remote", remote]
    ns.ip(*args)
    ns.ip("link", "set", name, "up")


def fdb_entries(ns: Namespace, ifname: str) -> list[dict[str, Any]]:
    """The FDB of a VXLAN link as ``bridge -j fdb show`` gives it (filtered here, see STYLE.md)."""
    out = run(["bridge", "-n", ns.name, "-j", "fdb", "show", "dev", ifname])
    entries = json.loads(out) if out.strip() else []
    return [e for e in entries if e.get("ifname", ifname) == ifname]


def routes(ns: Namespace, ifname: str) -> list[str]:
    """The IPv6 destinations routed over ``ifname`` in the main table (``fe80::1/128`` form)."""
    out = []
    for r in ns.ip_json("-6", "route", "show", "dev", ifname):
        dst = r.get("dst", "")
        if dst and dst != "default":
            out.append(dst if "/" in dst else f"{dst}/128")
    return out


def namespaces(prefix: str = "") -> list[str]:
    """Names of the existing namespaces starting with ``prefix``."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []
