"""A little gateway for the real worker's integration tests: namespace, wireguard-go, mosquitto, the worker.

:class:`Gateway` builds it with the lab primitives of :mod:`wgkex.lab`: a
namespace, wireguard-go serving ``wg-x`` in a private mount namespace (so its
UAPI socket is the worker's alone), ``vx-x`` on top, and a mosquitto listening
on a free 127.0.0.1 port (for the test's MQTT client, :class:`BusClient`) and on
a unix socket (for the worker inside the namespace). The worker (``twistd -n
wgkex-worker``) runs as a subprocess entered into the daemon's mount and network
namespace. It reads the kernel (``wg show``, ``ip route``, ``bridge fdb``);
:class:`WorkerTestCase` gives each test one and cleans it up.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.trial.unittest import SynchronousTestCase

from tests.support.skips import need_root_lab
from wgkex.keys import lladdr
from wgkex.lab.configs import write_config
from wgkex.lab.gateway import twistd
from wgkex.lab.mosquitto import Mosquitto
from wgkex.lab.netns import Namespace, add_vxlan, fdb_entries, routes
from wgkex.lab.proc import Proc, spawn, wait_until
from wgkex.lab.wggo import WireGuardGo, genkey


KEY_A = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
LL_A = "fe80::2a6:8fff:fe21:5465"
KEY_B = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
LL_B = "fe80::25b:c1ff:fe61:e5bd"

DOMAIN = "ffmuc_x"
TOPIC = f"wireguard/{DOMAIN}/all"
_counter = itertools.count()


def distinct_keys(count: int, seed: int) -> list[str]:
    """``count`` valid public keys, distinct per ``seed`` (canonical base64 of 32 bytes)."""
    import base64

    keys = []
    for n in range(count):
        raw = bytearray(os.urandom(32))
        raw[0:4] = seed.to_bytes(4, "big")
        raw[4:8] = n.to_bytes(4, "big")
        raw[31] |= 0x40
        keys.append(base64.b64encode(bytes(raw)).decode())
    return keys


class BusClient:
    """This test's own MQTT client on 127.0.0.1 (paho in its own thread)."""

    def __init__(self, port: int) -> None:
        self.messages: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{os.getpid()}-{next(_counter)}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5, "the test's MQTT client to connect")

    def _on_message(self, client: Any, userdata: Any, message: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.setdefault(message.topic, []).append(bytes(message.payload))

    def subscribe(self, topic_filter: str) -> None:
        result, _ = self.client.subscribe(topic_filter, qos=1)
        assert result == paho.MQTT_ERR_SUCCESS

    def last(self, topic: str) -> bytes | None:
        with self.lock:
            got = self.messages.get(topic)
            return got[-1] if got else None

    def all(self, topic: str) -> list[bytes]:
        with self.lock:
            return list(self.messages.get(topic, []))

    def publish(self, topic: str, payloads: Sequence[bytes | str]) -> None:
        """Publish at QoS 1 and wait until the server acknowledged every message."""
        infos = [self.client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(timeout=10)
            assert info.is_published(), "mosquitto did not acknowledge a publish"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Gateway:
    """A namespace with wireguard-go ``wg-x``, ``vx-x`` and (when started) the worker."""

    def __init__(self, testcase: SynchronousTestCase, **config: Any) -> None:
        self.id = f"{os.getpid()}-{next(_counter)}"
        self.name = f"wt{self.id.replace('-', 'n')}"
        self.dir = tempfile.mkdtemp(prefix="wgkex-wt-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        self.mqtt = Mosquitto(self.dir, unix_socket=os.path.join(self.dir, "mqtt.sock"))
        self.mqtt.start()
        testcase.addCleanup(self.mqtt.stop)
        self.ns = Namespace.create(f"wgkex-wt-{self.id}")
        testcase.addCleanup(self.ns.delete)
        self.daemons: list[WireGuardGo] = []
        self.wg = self._daemon(self.ns, "wg-x")
        self.private_key = genkey()
        self.public_key = self.wg.configure(self.private_key, listen_port=51820)
        self.link_address = lladdr(self.public_key)
        add_vxlan(self.ns, "vx-x", vni=4242, local=self.link_address, dev="wg-x")
        self.worker: Proc | None = None
        testcase.addCleanup(self.stop_worker)
        data = {
            "domains": [DOMAIN],
            "domain_prefixes": ["ffmuc_"],
            "worker_name": self.name,
            "externalName": "gw.example.net",
            "mqtt": {"transport": "unix", "broker_url": self.mqtt.unix_socket, "keepalive": 5,
                     "reconnect_max_delay": 1},
            "wireguard_backend": "uapi",
            "worker_listen": "127.0.0.1:9101",
            "metrics_interval": 2,
        }
        data.update(config)
        self.config = write_config(os.path.join(self.dir, "worker.yaml"), data)
        self.log = os.path.join(self.dir, "worker.log")
        self.bus = BusClient(self.mqtt.port)
        testcase.addCleanup(self.bus.close)

    def _daemon(self, ns: Namespace, iface: str) -> WireGuardGo:
        daemon = WireGuardGo.start(ns, iface, os.path.join(self.dir, f"{ns.name}-{iface}.log"))
        self.daemons.append(daemon)
        return daemon

    def cleanup_daemons(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()

    def daemon_beside_worker(self, iface: str) -> WireGuardGo:
        """A new wireguard-go for ``iface`` in the worker's mount and network namespace (where it looks)."""
        assert self.worker is not None
        argv = ["nsenter", "-t", str(self.worker.pid), "-m", "-n", "--", "wireguard-go", "-f", iface]
        proc = spawn(f"wireguard-go {iface}", argv, os.path.join(self.dir, f"{iface}-again.log"))
        daemon = WireGuardGo(self.ns, iface, proc)
        self.daemons.append(daemon)
        wait_until(lambda: os.path.exists(daemon.uapi_socket) and self.ns.link_exists(iface), 10,
                   f"wireguard-go {iface} beside the worker")
        return daemon

    # -- the worker ----------------------------------------------------------------------------

    def start_worker(self, runner: str = "twistd") -> Proc:
        """Start ``twistd -n wgkex-worker`` (or, with ``runner="twist"``, ``twist wgkex-worker``)."""
        if runner == "twist":
            command = [os.path.join(os.path.dirname(twistd()), "twist"), "wgkex-worker"]
        else:
            command = [twistd(), "-n", "--pidfile=", "wgkex-worker"]
        self.worker = spawn(f"worker {self.name}", self.wg.enter_argv([*command, "--config", self.config]), self.log)
        return self.worker

    def wait_online(self) -> None:
        """Until the worker said status 1 (it is subscribed by then)."""
        self.bus.subscribe(f"wireguard-worker/{self.name}/status")
        wait_until(lambda: self.bus.last(f"wireguard-worker/{self.name}/status") == b"1", 10,
                   f"worker {self.name} online\n{self.log_tail()}")

    def stop_worker(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the worker; its exit status."""
        worker, self.worker = self.worker, None
        if worker is None:
            return None
        worker.stop(timeout=15, sig=sig)
        return worker.exit_status()

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return "".join(f.readlines()[-30:])
        except OSError:
            return ""

    # -- the kernel ----------------------------------------------------------------------------

    def peers(self) -> dict[str, tuple[str, ...]]:
        return {k: p.allowed_ips for k, p in self.wg.peers().items()}

    def routes(self) -> set[ipaddress.IPv6Network]:
        return {ipaddress.IPv6Network(r) for r in routes(self.ns, "wg-x")}

    def fdb(self) -> list[dict[str, Any]]:
        return [e for e in fdb_entries(self.ns, "vx-x") if e.get("mac") == "00:00:00:00:00:00"]

    def fdb_dsts(self) -> set[ipaddress.IPv6Address]:
        return {ipaddress.IPv6Address(e["dst"]) for e in self.fdb()}

    def installed(self, key: str) -> bool:
        """Peer with allowed-ips lladdr/128, the /128 route and the FDB entry via wg-x are all there."""
        ll = lladdr(key)
        if self.peers().get(key) != (f"{ll}/128",):
            return False
        if ipaddress.IPv6Network(f"{ll}/128") not in self.routes():
            return False
        return any(ipaddress.IPv6Address(e["dst"]) == ipaddress.IPv6Address(ll) and e.get("viaIf") == "wg-x"
                   for e in self.fdb())

    def all_installed(self, keys: list[str]) -> bool:
        peers = self.peers()
        if any(peers.get(k) != (f"{lladdr(k)}/128",) for k in keys):
            return False
        wanted = {ipaddress.IPv6Address(lladdr(k)) for k in keys}
        return wanted <= {n.network_address for n in self.routes()} and wanted <= self.fdb_dsts()

    def in_ns(self, code: str) -> str:
        """Run Python ``code`` inside the namespace; its stdout."""
        return self.ns.run([sys.executable, "-c", code], timeout=10)

    def metric(self, line_start: str) -> float | None:
        text = self.in_ns("import urllib.request;"
                          "print(urllib.request.urlopen('http://127.0.0.1:9101/metrics', timeout=5).read().decode())")
        for line in text.splitlines():
            if line.startswith(line_start + " "):
                return float(line.split()[-1])
        return None


class WorkerTestCase(SynchronousTestCase):
    skip = need_root_lab()

    def gateway(self, start: bool = True, **config: Any) -> Gateway:
        gw = Gateway(self, **config)
        self.addCleanup(gw.cleanup_daemons)
        if start:
            gw.start_worker()
            gw.wait_online()
        return gw


    def check_answers(self, gw: Gateway, address: str) -> None:
        """Until GET http://[address%wg-x]/ from inside the namespace answers 200."""
        code = (
            "import socket,sys\n"
            f"s = socket.create_connection(('{address}%wg-x', 80), timeout=3)\n"
            "s.sendall(b'GET / HTTP/1.0\\r\\nHost: gw\\r\\n\\r\\n')\n"
            "print(s.recv(100).split(b'\\r\\n')[0].decode())\n"
        )

        def answered() -> str | None:
            try:
                return gw.in_ns(code).strip()
            except Exception:
                return None

        status_line = wait_until(answered, 10, f"the connectivity check on {address}")
        self.assertEqual(status_line.split()[1:], ["200", "OK"])
