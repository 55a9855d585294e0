"""``make demo``: a real broker, gateway and Gluon router on this machine, narrated.

Brings a lab up (mosquitto, ``twistd -n wgkex-broker``, a gateway namespace with
wireguard-go and ``twistd -n wgkex-worker``), lets a router register the way
Gluon's ``checkuplink`` does, shows what the worker put into the gateway's
kernel, runs the connectivity check and pings through the tunnel and the VXLAN
on top, shows the broker's status, then tears everything down (or keeps it
running with ``KEEP=1``). The exit status is 0 only if the tunnel carried
traffic both ways.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from wgkex.lab.gateway import LISTEN_PORT
from wgkex.lab.lab import Lab
from wgkex.lab.proc import LabError
from wgkex.lab.router import PERSISTENT_KEEPALIVE, VX_IFACE, WG_IFACE


class Narrator:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.step = 0
        self.t0 = time.monotonic()

    def head(self, text: str) -> None:
        self.step += 1
        self.out.write(f"\n[{self.step}] {text}\n")
        self.out.flush()

    def line(self, text: str = "", indent: int = 4) -> None:
        for part in text.splitlines() or [""]:
            self.out.write(" " * indent + part + "\n")
        self.out.flush()


def _json_block(value: Any, limit: int = 40) -> str:
    lines = json.dumps(value, indent=2).splitlines()
    if len(lines) > limit:
        lines = lines[:limit] + [f"... ({len(lines) - limit} more lines)"]
    return "\n".join(lines)


def run_demo(keep: bool, out: TextIO = sys.stdout, lab_id: str = "demo") -> int:
    """The demo; returns the process exit status."""
    n = Narrator(out)
    lab = Lab(lab_id)
    out.write("wgkex demo: broker, gateway and a Gluon router on this machine, each in its own\n"
              f"network namespace (lab '{lab_id}', state in {lab.directory}).\n")
    if lab.ledger.exists:
        n.line(f"(a lab '{lab_id}' from an earlier run is there: removing it first)", 0)
    ok = False
    try:
        n.head("Start the deployment")
        t = time.monotonic()
        lab.up()
        assert lab.mosquitto is not None and lab.broker is not None
        gw = lab.gateways["gw1"]
        n.line(f"mosquitto       127.0.0.1:{lab.mosquitto.port} and unix socket {lab.mqtt_socket} "
               f"(pid {lab.mosquitto.proc.pid if lab.mosquitto.proc else '?'})")
        n.line(f"broker          twistd -n wgkex-broker on {lab.broker_url} (pid {lab.broker.pid})")
        n.line(f"gateway gw1     namespace {gw.ns.name}, external address {gw.address}")
        n.line(f"  {gw.wg_iface:<13} wireguard-go (pid {gw.wg.pid}), port {LISTEN_PORT}, key {gw.public_key}")
        n.line(f"  {'':<13} link-local {gw.link_address} (derived from the key)")
        n.line(f"  {gw.vx_iface:<13} VXLAN id {lab.vni}, UDP 8472, local {gw.link_address} dev {gw.wg_iface}, fe80::1/64")
        n.line(f"  worker        twistd -n wgkex-worker (pid {gw.worker.pid if gw.worker else '?'}), "
               "MQTT through the unix socket")
        n.line(f"the broker sees gw1 online and eligible {time.monotonic() - t:.2f} s after the start")

        n.head("A router registers its key, as Gluon's checkuplink does")
        router = lab.add_router("node1")
        n.line(f"router node1    namespace {router.ns.name}, address 2001:db8::1:1, "
               f"{WG_IFACE} (wireguard-go pid {router.wg.pid})")
        n.line(f"its key         {router.public_key} -> link-local {router.link_address}")
        n.line(f"POST {lab.broker_url}/api/v2/wg/key/exchange")
        n.line("  Content-Type: application/x-www-form-urlencoded, Transfer-Encoding: chunked, "
               "User-Agent: gluon/..., X-Gluon-Version, X-Board-Name")
        n.line(f'  {{"domain": "{lab.domain}","public_key": "{router.public_key}"}}')
        t_post = time.monotonic()
        reg = router.register(lab.broker_url, lab.domain)
        n.line(f"<- {reg.status} in {reg.ms:.1f} ms: {reg.body.decode()}")
        chosen = lab.gateway_for(reg)
        n.line(f"the broker chose {chosen.name}: endpoint {reg.endpoint}, allowed IP {reg.link_address}")

        n.head(f"The worker on {chosen.name} put the router into the kernel")
        lab.wait_installed(chosen, router.public_key)
        n.line(f"(peer, route and FDB entry present {1000 * (time.monotonic() - t_post):.0f} ms after the POST)")
        peer = chosen.peers()[router.public_key]
        n.line(f"peer   {router.public_key} on {chosen.wg_iface}, allowed ips {', '.join(peer.allowed_ips)}")
        for r in chosen.routes():
            if r.endswith("/128"):
                n.line(f"route  {r} dev {chosen.wg_iface}")
        for e in chosen.fdb():
            if e.get("mac") == "00:00:00:00:00:00":
                n.line(f"fdb    00:00:00:00:00:00 dst {e.get('dst')} via {e.get('viaIf', chosen.wg_iface)} "
                       f"dev {chosen.vx_iface}")

        n.head("The router brings up its tunnel and checks it like Gluon")
        router.connect(reg)
        n.line(f"wg set {WG_IFACE} peer {reg.public_key} endpoint {reg.endpoint} "
               f"allowed-ips {reg.link_address}/128 persistent-keepalive {PERSISTENT_KEEPALIVE}")
        n.line(f"ip link add {VX_IFACE} type vxlan id {lab.vni} local {router.link_address} "
               f"remote {reg.link_address} dstport 8472 dev {WG_IFACE}")
        check = router.http_check()
        n.line(f"GET {check['url']} -> {check.get('status', check.get('error'))} ({check.get('ms')} ms)")
        gw_age = chosen.wg.handshake_age(router.public_key)
        r_age = router.handshake_age()
        n.line(f"handshake       router: {_age(r_age)}, gateway: {_age(gw_age)}")
        p_wg = router.ping_wireguard(count=3)
        n.line(f"ping {reg.link_address}%{WG_IFACE} (WireGuard): {p_wg.summary()}")
        p_vx = router.ping_vxlan(count=3)
        n.line(f"ping fe80::1%{VX_IFACE} (VXLAN over WireGuard): {p_vx.summary()}")
        peer = chosen.peers()[router.public_key]
        n.line(f"gateway counters for the router: {peer.rx_bytes} bytes received, {peer.tx_bytes} bytes sent")
        ok = (check.get("status") == 200 and p_wg.ok and p_vx.ok and gw_age is not None and r_age is not None)

        n.head("What the broker shows")
        n.line(f"status page     {lab.broker_url}/")
        n.line(f"JSON            {lab.broker_url}/api/v1/status :")
        n.line(_json_block(lab.broker_status()), indent=6)
    except LabError as exc:
        out.write(f"\nFAILED: {exc}\n")
        for proc in lab.ledger.procs():
            tail = proc.log_tail(8)
            if tail.strip():
                out.write(f"\n--- last lines of {proc.name} ({proc.log}):\n{tail}")
    except KeyboardInterrupt:
        out.write("\ninterrupted\n")
        keep = False
    finally:
        if keep and not lab.ledger.exists:
            out.write("\nNothing of the lab is left running (it could not start), so KEEP=1 keeps nothing.\n")
        elif keep:
            out.write("\nThe lab keeps running (KEEP=1). Look around, for example:\n"
                      f"    ip netns exec wgkex-{lab_id}-node1 ping fe80::1%{VX_IFACE}\n"
                      f"    nsenter -t {lab.gateways['gw1'].wg.pid if 'gw1' in lab.gateways else '<pid>'}"
                      f" -m -n wg show\n"
                      "    make lab-status\n"
                      "Stop it with: make lab-down\n")
        else:
            out.write("\nTearing down ... ")
            out.flush()
            problems = lab.down()
            out.write("done: every namespace, process and file of the lab is gone.\n" if not problems
                      else "left behind:\n  " + "\n  ".join(problems) + "\n")
    out.write("\nRESULT: " + ("the tunnel carried traffic both ways (exit 0).\n" if ok
                              else "the tunnel did NOT carry traffic (exit 1).\n"))
    return 0 if ok else 1


def _age(seconds: float | None) -> str:
    return "none yet" if seconds is None else f"{seconds:.0f} s ago"
