"""A Gluon router in a namespace, doing what Gluon's ``checkuplink`` does.

Layout inside namespace ``wgkex-<lab>-<name>``::

    eth0          2001:db8::1:<n>/64, 192.0.2.<100+n>/24   (veth to the lab's bridge)
    wg_mesh_vpn   wireguard-go (Gluon's interface name), lladdr(own public key)/64
    mesh-vpn      VXLAN id <vni>, dstport 8472, local = own lladdr, remote = gateway's lladdr

The flow, step by step as on a router (each step a method, so the demo can
narrate and tests can time them):

1. :meth:`Router.register` -- POST ``{"domain": D,"public_key": K}`` to
   ``/api/v2/wg/key/exchange`` as ``uclient-fetch`` sends it: form-urlencoded
   content type, chunked body, ``User-Agent: gluon/...`` and ``X-Gluon-*``
   headers. The broker listens on the root namespace's 127.0.0.1, which a
   namespace cannot reach, so this one HTTP exchange runs from the root
   namespace on the router's behalf (like a relay); everything after it happens
   inside the router's namespace. The reply's ``Endpoint.Address`` is resolved
   here as the router would (``getaddrinfo``), ``Port`` may be a string.
2. :meth:`Router.connect` -- private key, own link-local address, the gateway
   as peer (endpoint, ``allowed-ips AllowedIPs[0]/128``, keepalive 25), the
   VXLAN link to ``AllowedIPs[0]``.
3. :meth:`Router.http_check` -- ``GET http://[AllowedIPs[0]%wg_mesh_vpn]/`` must
   answer 200 (served by the worker).
4. :meth:`Router.ping` -- over the tunnel and over the VXLAN link.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from wgkex.keys import lladdr
from wgkex.lab.gateway import BRIDGE
from wgkex.lab.netns import Namespace, add_address, add_veth, add_vxlan
from wgkex.lab.proc import LabError
from wgkex.lab.state import Ledger
from wgkex.lab.wggo import WireGuardGo, genkey, pubkey

WG_IFACE = "wg_mesh_vpn"
VX_IFACE = "mesh-vpn"
#: Gluon's keepalive towards the gateway.
PERSISTENT_KEEPALIVE = 25
GLUON_VERSION = "v2023.2.3"


@dataclass(frozen=True)
class Registration:
    """The broker's v2 answer, as the router reads it."""

    status: int
    body: bytes
    ms: float
    address: str
    port: int
    public_key: str
    link_address: str

    @property
    def endpoint(self) -> str:
        """``host:port`` for ``wg set ... endpoint`` (IPv6 in brackets)."""
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


@dataclass(frozen=True)
class PingResult:
    transmitted: int
    received: int
    rtts_ms: tuple[float, ...]
    output: str

    @property
    def ok(self) -> bool:
        return self.received > 0

    def summary(self) -> str:
        if not self.rtts_ms:
            return f"{self.received}/{self.transmitted} replies"
        r = self.rtts_ms
        return (f"{self.received}/{self.transmitted} replies, rtt min/avg/max "
                f"{min(r):.3f}/{sum(r) / len(r):.3f}/{max(r):.3f} ms")


def post_key(url: str, domain: str, public_key: str, *, board: str = "lab-router",
             timeout: float = 10.0) -> tuple[int, dict[str, str], bytes, float]:
    """POST a key like Gluon's ``uclient-fetch``; (status, headers, body, milliseconds)."""
    parts = urlsplit(url)
    # checkuplink builds the body by string concatenation, exactly so:
    body = ('{"domain": "' + domain + '","public_key": "' + public_key + '"}').encode()
    headers = {
        "User-Agent": f"gluon/{GLUON_VERSION} (wgkex lab; uclient-fetch)",
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Gluon-Version": GLUON_VERSION,
        "X-Board-Name": board,
        "X-Firmware-Version": f"gluon-{GLUON_VERSION}-lab",
    }
    start = time.monotonic()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        # An iterable body makes http.client send it chunked, as Gluon does.
        conn.request("POST", parts.path, body=iter([body]), headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, (time.monotonic() - start) * 1000
    finally:
        conn.close()


def parse_v2(status: int, body: bytes, ms: float) -> Registration:
    """Read ``Endpoint.Address/Port/PublicKey/AllowedIPs[0]`` from a v2 reply, as checkuplink does."""
    if status != 200:
        raise LabError(f"broker answered {status}: {body[:300].decode(errors='replace')}")
    try:
        ep = json.loads(body)["Endpoint"]
        address = str(ep["Address"])
        port = int(ep["Port"])
        gw_key = str(ep["PublicKey"])
        link = str(ep["AllowedIPs"][0])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LabError(f"v2 reply without a usable Endpoint ({exc!r}): {body[:300]!r}") from None
    # Address may be a DNS name: resolve it as the router would.
    info = socket.getaddrinfo(address, port, proto=socket.IPPROTO_UDP)
    resolved = str(info[0][4][0])
    return Registration(status, body, ms, resolved, port, gw_key, link)


class Router:
    """One Gluon-like router; build with :meth:`create`."""

    def __init__(self, name: str, ns: Namespace, wg: WireGuardGo, private_key: str, vni: int) -> None:
        self.name = name
        self.ns = ns
        self.wg = wg
        self.private_key = private_key
        self.public_key = pubkey(private_key)
        self.link_address = lladdr(self.public_key)
        self.vni = vni
        self.registration: Registration | None = None

    @classmethod
    def create(cls, *, ledger: Ledger, lab_id: str, name: str, index: int, lan: Namespace,
               vni: int, directory: str) -> Router:
        """Namespace, veth to the LAN, a wireguard-go interface and a private key (like uci's)."""
        os.makedirs(directory, exist_ok=True)
        ns = ledger.add_netns(Namespace.create(f"wgkex-{lab_id}-{name}"))
        add_veth(lan, f"p-{name}", ns, "eth0", bridge=BRIDGE)
        add_address(ns, "eth0", f"2001:db8::1:{index:x}/64")
        add_address(ns, "eth0", f"192.0.2.{100 + index}/24")
        wg = WireGuardGo.start(ns, WG_IFACE, os.path.join(directory, "wireguard-go.log"))
        ledger.add_proc(wg.proc)
        return cls(name, ns, wg, genkey(), vni)

    # 1 ------------------------------------------------------------------------------------
    def register(self, broker_url: str, domain: str) -> Registration:
        """POST our key to v2 and read the gateway to use; raises :class:`LabError` unless 200."""
        status, _, body, ms = post_key(
            broker_url.rstrip("/") + "/api/v2/wg/key/exchange", domain, self.public_key, board=self.name
        )
        self.registration = parse_v2(status, body, ms)
        return self.registration

    # 2 ------------------------------------------------------------------------------------
    def connect(self, reg: Registration | None = None) -> None:
        """Configure the tunnel and the VXLAN link towards the gateway of ``reg``."""
        reg = reg or self.registration
        if reg is None:
            raise LabError(f"router {self.name}: register before connect")
        if self.ns.link_exists(VX_IFACE):  # checkuplink deletes and recreates on reconnect
            self.ns.ip("link", "del", VX_IFACE)
        for old in self.wg.peers():
            self.wg.wg("set", WG_IFACE, "peer", old, "remove")
        self.wg.configure(self.private_key)
        self.wg.add_peer(reg.public_key, [f"{reg.link_address}/128"], endpoint=reg.endpoint,
                         persistent_keepalive=PERSISTENT_KEEPALIVE)
        add_vxlan(self.ns, VX_IFACE, vni=self.vni, local=self.link_address, dev=WG_IFACE,
                  remote=reg.link_address)

    # 3 ------------------------------------------------------------------------------------
    def http_check(self, timeout: float = 10.0) -> dict[str, Any]:
        """Gluon's connectivity check, retried until 200 or ``timeout``; the probe's last result."""
        if self.registration is None:
            raise LabError(f"router {self.name}: register before the HTTP check")
        url = f"http://[{self.registration.link_address}%{WG_IFACE}]/"
        deadline = time.monotonic() + timeout
        while True:
            left = max(1.0, deadline - time.monotonic())
            out = self.ns.run([sys.executable, "-m", "wgkex.lab.probe", url, f"{min(left, 5.0):.1f}"],
                              check=False, timeout=left + 10)
            try:
                result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                result = {"error": f"probe printed {out!r}"}
            result["url"] = url
            if result.get("status") == 200 or time.monotonic() > deadline:
                return result
            time.sleep(0.1)

    # 4 ------------------------------------------------------------------------------------
    def ping(self, target: str, iface: str, count: int = 3, interval: float = 0.2) -> PingResult:
        """``ping -6 -c COUNT TARGET%IFACE`` from inside the router."""
        out = self.ns.run(["ping", "-6", "-n", "-c", str(count), "-i", str(interval), "-W", "2",
                           f"{target}%{iface}"], check=False, timeout=count * interval + 15)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        rtts = tuple(float(x) for x in re.findall(r"time=([\d.]+) ms", out))
        if not m:
            return PingResult(count, 0, (), out)
        return PingResult(int(m.group(1)), int(m.group(2)), rtts, out)

    def ping_wireguard(self, count: int = 3) -> PingResult:
        """Ping the gateway's link-local address through the WireGuard tunnel."""
        if self.registration is None:
            raise LabError(f"router {self.name}: not registered")
        return self.ping(self.registration.link_address, WG_IFACE, count)

    def ping_vxlan(self, target: str = "fe80::1", count: int = 3) -> PingResult:
        """Ping the gateway's VXLAN address over VXLAN over WireGuard."""
        return self.ping(target, VX_IFACE, count)

    def handshake_age(self) -> float | None:
        """Seconds since our last handshake with the gateway (None: never)."""
        if self.registration is None:
            return None
        return self.wg.handshake_age(self.registration.public_key)

    def info(self) -> dict[str, Any]:
        return {
            "namespace": self.ns.name,
            "public_key": self.public_key,
            "link_address": self.link_address,
            "wg_pid": self.wg.pid,
            "gateway": self.registration.public_key if self.registration else None,
        }


