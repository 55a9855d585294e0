"""A wgkex gateway in a namespace: wg-<D> (wireguard-go), vx-<D> on top, and the real worker.

Layout inside namespace ``wgkex-<lab>-<name>``::

    eth0      2001:db8::<n>/64, 192.0.2.<n>/24   (veth to the lab's bridge)
    wg-welt   wireguard-go, listen port 51820, lladdr(public key)/64
    vx-welt   VXLAN id <vni>, dstport 8472, local = that lladdr, dev wg-welt, fe80::1/64

The worker runs as ``twistd -n wgkex-worker`` through ``nsenter -t <wireguard-go
pid> -m -n``, so it sees the daemon's private ``/run/wireguard`` and the
namespace's links; it reaches mosquitto over the unix socket. Everything the
gateway makes is recorded in the lab's :class:`~wgkex.lab.state.Ledger`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from typing import Any

from wgkex.keys import lladdr
from wgkex.lab.configs import worker_config, write_config
from wgkex.lab.netns import Namespace, add_address, add_veth, add_vxlan, fdb_entries, routes
from wgkex.lab.proc import LabError, Proc, spawn
from wgkex.lab.state import Ledger
from wgkex.lab.wggo import WgPeer, WireGuardGo, genkey

#: The gateway's WireGuard port (each gateway has its own namespace, so all can use it).
LISTEN_PORT = 51820
#: Address of the gateway's VXLAN link (the same on every gateway, as on Freifunk gateways).
VX_ADDRESS = "fe80::1/64"
#: Name of the bridge in the lab's LAN namespace.
BRIDGE = "br0"


def twistd() -> str:
    """The twistd of the Python running the lab (the venv's), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(here):
        return here
    found = shutil.which("twistd")
    if found is None:
        raise LabError("twistd not found: install wgkex (make venv) or run with the venv's python")
    return found


def gateway_address(index: int) -> tuple[str, str]:
    """(IPv6, IPv4) of gateway number ``index`` (1-based) on the lab LAN."""
    return f"2001:db8::{index:x}", f"192.0.2.{index}"


class Gateway:
    """One gateway of a lab; build with :meth:`create`."""

    def __init__(self, name: str, ns: Namespace, wg: WireGuardGo, public_key: str, *,
                 domain: str, wg_iface: str, vx_iface: str, address: str, directory: str,
                 ledger: Ledger, worker_argv: list[str]) -> None:
        self.name = name
        self.ns = ns
        self.wg = wg
        self.public_key = public_key
        self.link_address = lladdr(public_key)
        self.domain = domain
        self.wg_iface = wg_iface
        self.vx_iface = vx_iface
        self.address = address
        self.directory = directory
        self.ledger = ledger
        self.worker_argv = worker_argv
        self.worker: Proc | None = None

    @classmethod
    def create(
        cls,
        *,
        ledger: Ledger,
        lab_id: str,
        name: str,
        index: int,
        lan: Namespace,
        domain: str,
        prefixes: list[str],
        mqtt_socket: str,
        vni: int,
        keepalive: int = 5,
        metrics_interval: float = 60.0,
        directory: str,
        mqtt: Mapping[str, Any] | None = None,
    ) -> Gateway:
        """Namespace, veth, wireguard-go, VXLAN and the worker's config (the worker is not started).

        ``mqtt`` replaces the worker's ``mqtt`` section (default: the lab's unix socket).
        """
        short = next(domain[len(p):] for p in prefixes if domain.startswith(p))
        wg_iface, vx_iface = f"wg-{short}", f"vx-{short}"
        os.makedirs(directory, exist_ok=True)
        ns = ledger.add_netns(Namespace.create(f"wgkex-{lab_id}-{name}"))
        v6, v4 = gateway_address(index)
        add_veth(lan, f"p-{name}", ns, "eth0", bridge=BRIDGE)
        add_address(ns, "eth0", f"{v6}/64")
        add_address(ns, "eth0", f"{v4}/24")
        wg = WireGuardGo.start(ns, wg_iface, os.path.join(directory, "wireguard-go.log"))
        ledger.add_proc(wg.proc)
        public = wg.configure(genkey(), listen_port=LISTEN_PORT)
        add_vxlan(ns, vx_iface, vni=vni, local=lladdr(public), dev=wg_iface)
        add_address(ns, vx_iface, VX_ADDRESS)
        config = write_config(
            os.path.join(directory, "worker.yaml"),
            worker_config(
                name=name, external_name=v6, domains=[domain], prefixes=prefixes,
                mqtt_socket=mqtt_socket, keepalive=keepalive, metrics_interval=metrics_interval, mqtt=mqtt,
            ),
        )
        argv = wg.enter_argv([twistd(), "-n", "--pidfile=", "wgkex-worker", "--config", config])
        gw = cls(name, ns, wg, public, domain=domain, wg_iface=wg_iface, vx_iface=vx_iface,
                 address=v6, directory=directory, ledger=ledger, worker_argv=argv)
        return gw

    # -- the worker process ----------------------------------------------------------------

    def start_worker(self) -> Proc:
        """Start ``twistd -n wgkex-worker`` inside the gateway (a no-op while it runs)."""
        if self.worker is not None and self.worker.is_ours():
            return self.worker
        self.worker = self.ledger.add_proc(
            spawn(f"worker {self.name}", self.worker_argv, os.path.join(self.directory, "worker.log"))
        )
        return self.worker

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        """Stop the worker with ``sig`` (SIGKILL: no clean MQTT disconnect, so the last will fires)."""
        worker, self.worker = self.worker, None
        if worker is None:
            return
        if sig == signal.SIGKILL:
            worker.send(sig)
            worker.wait_gone(10.0)
        else:
            worker.stop(sig=sig)
        self.ledger.forget_proc(worker)

    # -- what the worker did ------------------------------------------------------------------

    def peers(self) -> dict[str, WgPeer]:
        """The WireGuard peers of wg-<D> (``wg show dump``)."""
        return self.wg.peers()

    def routes(self) -> list[str]:
        """Destinations routed over wg-<D> (the /128 of each router, plus fe80::/64)."""
        return routes(self.ns, self.wg_iface)

    def fdb(self) -> list[dict[str, Any]]:
        """The FDB of vx-<D>."""
        return fdb_entries(self.ns, self.vx_iface)

    def has_router(self, public_key: str) -> bool:
        """True when the worker installed all three things for ``public_key``: peer, route, FDB."""
        ll = ipaddress.ip_address(lladdr(public_key))
        host = ipaddress.ip_network(f"{ll}/128")
        peer = self.peers().get(public_key)
        if peer is None or host not in {ipaddress.ip_network(a) for a in peer.allowed_ips}:
            return False
        if host not in {ipaddress.ip_network(r) for r in self.routes()}:
            return False
        return any(e.get("mac") == "00:00:00:00:00:00" and ipaddress.ip_address(e.get("dst", "::")) == ll
                   for e in self.fdb())

    def info(self) -> dict[str, Any]:
        """What ``status`` and the demo show of this gateway."""
        return {
            "namespace": self.ns.name,
            "address": self.address,
            "public_key": self.public_key,
            "link_address": self.link_address,
            "wg_pid": self.wg.pid,
            "wg_iface": self.wg_iface,
            "vx_iface": self.vx_iface,
            "uapi_socket": self.wg.uapi_socket,
        }
