"""The guest's stage for the kernel VM checks: constants, the bus client, the namespaces and the worker.

Runs inside the VM only, imported by :mod:`tests.kernel.guest_checks`, which
holds the checks themselves and the entry point. :class:`Guest` sets up
mosquitto, the gateway namespace (kernel ``wg-welt``, ``vx-welt``, the real
``twistd -n wgkex-worker``) and the router namespace, and stamps every line
of ``guest.log`` with the seconds since the start; :class:`Bus` is this
script's own MQTT client; :func:`poll` waits with a deadline.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from wgkex.keys import lladdr
from wgkex.lab.configs import write_config
from wgkex.lab.gateway import twistd
from wgkex.lab.mosquitto import Mosquitto
from wgkex.lab.netns import Namespace, add_address, add_veth, add_vxlan, fdb_entries, routes
from wgkex.lab.proc import Proc, run, spawn, wait_until

# The contract's test vectors.
KEY_A = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
KEY_B = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
DOMAIN = "ffmuc_welt"
WG = "wg-welt"
VX = "vx-welt"
VNI = 4242
WORKER = "kernel-vm"
EXTERNAL_NAME = "gw.example.net"
LISTEN_PORT = 51820
ROUTER_WG = "wg_mesh_vpn"
ROUTER_VX = "mesh-vpn"
GW_VX_ADDRESS = "fe80::1"
BURST = 600
CLONE_NEWNET = 0x40000000
#: Sweep settings of the worker: short enough to watch a sweep, long enough that
#: the checks before it see their keys in place.
PEER_TIMEOUT = 30.0
CLEANUP_INTERVAL = 5.0
METRICS_INTERVAL = 5.0
#: Deadline of each wait. Generous: a busy host can slow emulation down another 10x.
WAIT = 300.0


def burst_keys(count: int) -> list[str]:
    """``count`` distinct valid public keys (canonical base64 of 32 bytes, never low-order points)."""
    keys = []
    for n in range(count):
        raw = bytearray(os.urandom(32))
        raw[0:4] = n.to_bytes(4, "big")
        raw[31] = (raw[31] & 0x3F) | 0x40
        keys.append(base64.b64encode(bytes(raw)).decode())
    return keys


class Bus:
    """This script's MQTT client (paho in its own thread) keeping every message by topic."""

    def __init__(self, port: int) -> None:
        self.messages: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="kernel-vm-checks")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.loop_start()
        wait_until(self.client.is_connected, 30, "the checks' MQTT client to connect")

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.setdefault(message.topic, []).append(bytes(message.payload))

    def subscribe(self, topic_filter: str) -> None:
        self.client.subscribe(topic_filter, qos=1)

    def all(self, topic: str) -> list[str]:
        with self.lock:
            return [m.decode() for m in self.messages.get(topic, [])]

    def last(self, topic: str) -> str | None:
        got = self.all(topic)
        return got[-1] if got else None

    def publish(self, topic: str, payloads: list[str]) -> None:
        infos = [self.client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=60)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Guest:
    """Everything the checks share: namespaces, interfaces, mosquitto, the worker, the bus."""

    def __init__(self, scratch: str, started: float) -> None:
        self.scratch = scratch
        #: time.monotonic() when the script began: :meth:`note` stamps its lines from there.
        self.started = started
        self.dir = "/tmp/kernel-vm"
        os.makedirs(self.dir, exist_ok=True)
        self.worker_log = os.path.join(scratch, "worker.log")
        self.metrics_socket = os.path.join(self.dir, "metrics.sock")
        self.mqtt = Mosquitto(self.dir, unix_socket=os.path.join(self.dir, "mqtt.sock"))
        # The gateway is the guest's own namespace (so wg and the worker run without
        # `ip netns exec`, which is slow under emulation), named for `ip -n gw`.
        run(["ip", "netns", "attach", "gw", "1"])
        self.gw = Namespace("gw")
        for conf in ("all", "default"):
            with open(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad", "w") as f:
                f.write("0")
        self.rt: Namespace | None = None
        self.worker: Proc | None = None
        self.bus: Bus | None = None
        self.public_key = ""
        self.link_address = ""
        self.router_private = run(["wg", "genkey"]).strip()
        self.router_key = run(["wg", "pubkey"], input=self.router_private + "\n").strip()
        self.burst = burst_keys(BURST)
        self.stale_key = burst_keys(BURST + 1)[-1]
        self.stale_published_at = 0.0
        self.stale_seen_installed = False

    def note(self, text: str) -> None:
        """One line in the checks' output (``guest.log``), stamped with the seconds since the script began."""
        print(f"{time.monotonic() - self.started:7.1f} s  {text}", flush=True)

    # -- set-up ---------------------------------------------------------------------------
    def wg(self, *args: str, input: str | None = None) -> str:
        """``wg ARGS`` on the gateway (the guest's own namespace)."""
        return run(["wg", *args], input=input, timeout=120)

    def start(self) -> None:
        """mosquitto, the gateway's interfaces and the worker first (its start-up is the slowest
        part), then this script's MQTT client and the router's namespace while it starts."""
        self.mqtt.start(timeout=WAIT)
        self.note("mosquitto started")
        self.gw.ip("link", "add", WG, "type", "wireguard")
        self.wg("set", WG, "private-key", "/dev/stdin", "listen-port", str(LISTEN_PORT),
                input=run(["wg", "genkey"]))
        self.public_key = self.wg("show", WG, "public-key").strip()
        self.link_address = lladdr(self.public_key)
        add_address(self.gw, WG, f"{self.link_address}/64")
        add_vxlan(self.gw, VX, vni=VNI, local=self.link_address, dev=WG)
        add_address(self.gw, VX, f"{GW_VX_ADDRESS}/64")
        config = write_config(os.path.join(self.dir, "worker.yaml"), {
            "domains": [DOMAIN],
            "domain_prefixes": ["ffmuc_"],
            "worker_name": WORKER,
            "externalName": EXTERNAL_NAME,
            "mqtt": {"transport": "unix", "broker_url": self.mqtt.unix_socket, "keepalive": 60,
                     "reconnect_max_delay": 1},
            "wireguard_backend": "kernel",
            "worker_listen": f"unix:{self.metrics_socket}",
            "metrics_interval": METRICS_INTERVAL,
            "cleanup_interval": CLEANUP_INTERVAL,
            "peer_timeout": PEER_TIMEOUT,
            # Every key but the sweep check's stale one is kept, so that however slow
            # the emulation, the sweep takes nothing from under the other checks.
            "keep_keys": [KEY_A, KEY_B, self.router_key, *self.burst],
        })
        self.worker = spawn("worker", [twistd(), "-n", "--pidfile=", "wgkex-worker", "--config", config],
                            self.worker_log)
        self.note("worker spawned")
        self.bus = Bus(self.mqtt.port)
        self.bus.subscribe("wireguard-worker/#")
        self.bus.subscribe("wireguard-metrics/#")
        self.rt = Namespace.create("rt")
        add_veth(self.gw, "eth0", self.rt, "eth0")
        add_address(self.gw, "eth0", "2001:db8::1/64")
        add_address(self.rt, "eth0", "2001:db8::2/64")
        self.note("router namespace ready")

    def router(self) -> Namespace:
        """The router's namespace (made by :meth:`start`)."""
        assert self.rt is not None
        return self.rt

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=60)
        if self.bus is not None:
            self.bus.close()
        self.mqtt.stop()
        if self.rt is not None:
            self.rt.delete()

    # -- observing ------------------------------------------------------------------------
    def peers(self, ns: Namespace | None = None, iface: str = WG) -> dict[str, dict[str, Any]]:
        """``wg show IFACE dump`` (in ``ns``, default the gateway) by public key: allowed IPs, latest handshake."""
        argv = ["wg", "show", iface, "dump"]
        text = ns.run(argv, timeout=120) if ns is not None else run(argv, timeout=120)
        out: dict[str, dict[str, Any]] = {}
        for line in text.splitlines()[1:]:
            f = line.split("\t")
            out[f[0]] = {"allowed_ips": [] if f[3] == "(none)" else f[3].split(","),
                         "latest_handshake": int(f[4])}
        return out

    def peer_count(self) -> int:
        return len(self.wg("show", WG, "peers").split())

    def routes(self) -> list[str]:
        return sorted(str(ipaddress.IPv6Network(r)) for r in routes(self.gw, WG))

    def fdb(self) -> list[dict[str, str]]:
        """The all-zero FDB entries of ``vx-welt``: destination (compressed) and device they go via."""
        return sorted(({"dst": str(ipaddress.IPv6Address(e["dst"])), "via": e.get("viaIf", "")}
                       for e in fdb_entries(self.gw, VX) if e.get("mac") == "00:00:00:00:00:00" and "dst" in e),
                      key=lambda e: e["dst"])

    def state_of(self, keys: list[str]) -> dict[str, Any]:
        """Peer allowed IPs, route and FDB entries for ``keys`` (by key), plus totals."""
        peers, route_set, fdb = self.peers(), set(self.routes()), self.fdb()
        fdb_by_dst: dict[str, list[str]] = {}
        for e in fdb:
            fdb_by_dst.setdefault(e["dst"], []).append(e["via"])
        return {
            "keys": {k: {"allowed_ips": peers[k]["allowed_ips"] if k in peers else None,
                         "route": f"{lladdr(k)}/128" in route_set,
                         "fdb_via": fdb_by_dst.get(lladdr(k), [])} for k in keys},
            "peer_count": len(peers),
            "route_count": len(route_set),
            "fdb_count": len(fdb),
        }

    def installed(self, keys: list[str]) -> bool:
        state = self.state_of(keys)["keys"]
        return all(s["allowed_ips"] and s["route"] and s["fdb_via"] for s in state.values())

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics (over its unix socket), samples by name with labels."""
        conn = http.client.HTTPConnection("localhost", timeout=30)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(30)
        sock.connect(self.metrics_socket)
        conn.sock = sock
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def metric_topic(self) -> str:
        return f"wireguard-metrics/{DOMAIN}/{WORKER}/connected_peers"


def poll(predicate: Callable[[], Any], what: str, timeout: float = WAIT, interval: float = 1.0) -> Any:
    """Wait for ``predicate`` (every ``interval`` s: each look costs the emulated guest dearly)."""
    return wait_until(predicate, timeout, what, interval)


# -- the checks (each returns what it observed) -------------------------------------------------
