"""The real worker (``twistd -n wgkex-worker``) in a network namespace with real wireguard-go and mosquitto.

Each test builds its own little gateway with the lab primitives of
:mod:`wgkex.lab`: a namespace, wireguard-go serving ``wg-x`` in a private mount
namespace (so its UAPI socket is the worker's alone), ``vx-x`` on top, and a
mosquitto listening on a free 127.0.0.1 port (for this test's MQTT client) and
on a unix socket (for the worker inside the namespace). The worker runs as a
subprocess entered into the daemon's mount and network namespace. Everything
is checked in the kernel (``wg show``, ``ip route``, ``bridge fdb``) and on
the bus; waits are polls with deadlines. Needs root.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
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
from wgkex.lab.netns import Namespace, add_address, add_veth, add_vxlan, fdb_entries, routes
from wgkex.lab.proc import Proc, spawn, wait_until
from wgkex.lab.wggo import WireGuardGo, genkey, pubkey

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


class KeysTests(WorkerTestCase):
    def test_key_lands_with_contract_vectors(self) -> None:
        """A key on the bus is a peer with lladdr/128, a route and an FDB entry within 5 s (both vectors)."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A, KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "both keys installed")
        self.assertEqual(gw.peers(), {KEY_A: (f"{LL_A}/128",), KEY_B: (f"{LL_B}/128",)})
        self.assertEqual(
            gw.routes() - {ipaddress.IPv6Network("fe80::/64")},
            {ipaddress.IPv6Network(f"{LL_A}/128"), ipaddress.IPv6Network(f"{LL_B}/128")},
        )
        self.assertEqual(gw.fdb_dsts(), {ipaddress.IPv6Address(LL_A), ipaddress.IPv6Address(LL_B)})
        self.assertTrue(all(e.get("viaIf") == "wg-x" for e in gw.fdb()))

    def test_repeated_keys_harmless(self) -> None:
        """Publishing one key many times leaves exactly one peer, one route, one FDB entry."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A] * 20)
        gw.bus.publish(TOPIC, [KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "keys installed")
        self.assertEqual(set(gw.peers()), {KEY_A, KEY_B})
        self.assertEqual(len(gw.fdb()), 2)
        self.assertEqual(len(gw.routes()), 3)  # two /128 and fe80::/64
        self.assertTrue(gw.worker is not None and gw.worker.is_ours())

    def test_sighup_is_harmless(self) -> None:
        """SIGHUP (systemctl reload, log rotation) is logged; the worker keeps running and applying keys."""
        gw = self.gateway()
        assert gw.worker is not None
        gw.worker.send(signal.SIGHUP)
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, f"key installed after SIGHUP\n{gw.log_tail()}")
        self.assertTrue(gw.worker.is_ours())
        wait_until(lambda: "Received SIGHUP" in gw.log_tail(), 5, "the SIGHUP log line")

    def test_garbage_changes_nothing(self) -> None:
        """Garbage payloads change nothing in the kernel, are counted, and a valid key afterwards lands."""
        gw = self.gateway()
        garbage: list[bytes | str] = [
            b"garbage", b"", b"\xff\xfe\x00", b"x" * 5000, KEY_A[:42] + "B=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", KEY_A + KEY_B, "../../etc/passwd",
        ]
        gw.bus.publish(TOPIC, garbage)
        gw.bus.publish(f"wireguard/{DOMAIN}/other", [b"still garbage"])
        # Same publisher, same QoS: the valid key arrives after all the garbage.
        gw.bus.publish(TOPIC, [KEY_B])
        wait_until(lambda: gw.installed(KEY_B), 5, "the valid key installed")
        self.assertEqual(set(gw.peers()), {KEY_B})
        self.assertEqual(gw.fdb_dsts(), {ipaddress.IPv6Address(LL_B)})
        self.assertEqual(gw.routes(), {ipaddress.IPv6Network(f"{LL_B}/128"), ipaddress.IPv6Network("fe80::/64")})
        invalid = sum(gw.metric(f'wgkex_worker_keys_invalid_total{{reason="{r}"}}') or 0 for r in ("key", "payload"))
        self.assertEqual(invalid, len(garbage) + 1)
        self.assertEqual(gw.metric(f'wgkex_worker_keys_applied_total{{domain="{DOMAIN}"}}'), 1)
        self.assertTrue(gw.worker is not None and gw.worker.is_ours())

    def test_restart_receives_keys_published_while_down(self) -> None:
        """Worker stopped, 50 keys published, worker restarted: all 50 land (persistent session)."""
        gw = self.gateway()
        self.assertEqual(gw.stop_worker(), 0)
        keys = distinct_keys(50, 7)
        gw.bus.publish(TOPIC, keys)
        gw.start_worker()
        wait_until(lambda: gw.all_installed(keys), 10, f"all 50 keys installed\n{gw.log_tail()}")
        self.assertEqual(len(gw.peers()), 50)

    def test_vxlan_recreated_entries_restored(self) -> None:
        """vx-x deleted and recreated (its FDB gone with it): the worker re-applies its keys without restart."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A, KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "keys installed")
        gw.ns.ip("link", "del", "vx-x")
        add_vxlan(gw.ns, "vx-x", vni=4242, local=gw.link_address, dev="wg-x")
        self.assertEqual(gw.fdb(), [])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 10,
                   f"keys re-applied on the new vx-x\n{gw.log_tail()}")

    def test_wireguard_go_restarted_keys_reapplied(self) -> None:
        """wireguard-go restarted (wg-x, vx-x and their entries gone): keys, data and the check come back, no restart."""
        gw = self.gateway()
        data_topic = f"wireguard-worker/{gw.name}/{DOMAIN}/data"
        gw.bus.subscribe(data_topic)
        gw.bus.publish(TOPIC, [KEY_A, KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "keys installed")
        wait_until(lambda: gw.bus.all(data_topic), 5, "the first data message")
        published = len(gw.bus.all(data_topic))
        gw.wg.stop()
        wait_until(lambda: not gw.ns.link_exists("vx-x"), 5, "the kernel to drop vx-x with wg-x")
        # The operator's tooling brings the interfaces back, with the same key.
        gw.wg = gw.daemon_beside_worker("wg-x")
        gw.wg.configure(gw.private_key, listen_port=51820)
        add_vxlan(gw.ns, "vx-x", vni=4242, local=gw.link_address, dev="wg-x")
        self.assertEqual(gw.peers(), {})
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 10,
                   f"keys re-applied on the new wg-x and vx-x\n{gw.log_tail()}")
        wait_until(lambda: len(gw.bus.all(data_topic)) > published, 5, "the data published again")
        data = json.loads(gw.bus.all(data_topic)[-1])
        self.assertEqual((data["PublicKey"], data["Port"]), (gw.public_key, 51820))
        self.check_answers(gw, gw.link_address)
        self.assertTrue(gw.worker is not None and gw.worker.is_ours())

    def test_domain_with_missing_interface(self) -> None:
        """Two domains, wg-y missing: x's keys land, y reports -1 and no data; once wg-y exists its keys land."""
        gw = self.gateway(domains=[DOMAIN, "ffmuc_y"])
        metric_y = f"wireguard-metrics/ffmuc_y/{gw.name}/connected_peers"
        data_y = f"wireguard-worker/{gw.name}/ffmuc_y/data"
        gw.bus.subscribe(metric_y)
        gw.bus.subscribe(data_y)
        gw.bus.publish("wireguard/ffmuc_y/all", [KEY_B])
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, "the key of the domain whose interfaces exist")
        wait_until(lambda: gw.bus.last(metric_y) == b"-1", 5, "metric -1 for the missing domain")
        self.assertEqual(gw.bus.all(data_y), [])
        wg_y = gw.daemon_beside_worker("wg-y")
        public_y = wg_y.configure(genkey(), listen_port=51821)
        add_vxlan(gw.ns, "vx-y", vni=4243, local=lladdr(public_y), dev="wg-y")
        ll_b = ipaddress.IPv6Address(LL_B)

        def landed() -> bool:
            fdb = {ipaddress.IPv6Address(e["dst"]) for e in fdb_entries(gw.ns, "vx-y") if "dst" in e}
            return (wg_y.peers().get(KEY_B) is not None and ll_b in fdb
                    and ipaddress.IPv6Network(f"{LL_B}/128") in {ipaddress.IPv6Network(r) for r in routes(gw.ns, "wg-y")})

        wait_until(landed, 10, f"the key on wg-y once it exists\n{gw.log_tail()}")
        wait_until(lambda: gw.bus.last(data_y), 10, "data for the domain once its interface exists")
        self.assertEqual(json.loads(gw.bus.last(data_y) or b"{}")["PublicKey"], public_y)
        self.assertEqual(set(gw.peers()), {KEY_A})

    def test_sigterm_during_a_large_batch(self) -> None:
        """SIGTERM while thousands of keys are being applied: goodbye, exit 0, and no key is lost."""
        gw = self.gateway()
        status_topic = f"wireguard-worker/{gw.name}/status"
        metric_topic = f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers"
        gw.bus.subscribe(metric_topic)
        keys = distinct_keys(5000, 13)
        gw.bus.publish(TOPIC, keys)
        wait_until(lambda: gw.peers(), 10, "the first peers", interval=0.01)
        self.assertEqual(gw.stop_worker(signal.SIGTERM), 0)
        wait_until(lambda: gw.bus.last(status_topic) == b"0" and gw.bus.last(metric_topic) == b"-1", 5,
                   "goodbye messages")
        with open(gw.log) as f:
            self.assertNotIn("Traceback", f.read())
        # Keys it had received were applied before it exited; the others wait in its session.
        gw.start_worker()
        wait_until(lambda: gw.all_installed(keys), 15, f"all 5,000 keys installed\n{gw.log_tail()}", interval=0.2)

    def test_burst_of_2000(self) -> None:
        """2,000 keys published at once are all installed quickly (the figure is printed)."""
        gw = self.gateway()
        keys = distinct_keys(2000, 11)
        started = time.monotonic()
        gw.bus.publish(TOPIC, keys)
        published = time.monotonic() - started

        def count() -> bool:
            return len(gw.peers()) == 2000

        wait_until(count, 15, f"2000 peers\n{gw.log_tail()}", interval=0.05)
        peers_done = time.monotonic() - started
        wait_until(lambda: gw.all_installed(keys), 10, "2000 routes and FDB entries", interval=0.05)
        done = time.monotonic() - started
        batches = gw.metric("wgkex_worker_batch_size_count")
        print(f"\n2,000-key burst: published (all PUBACKs) in {published:.2f} s, all peers in {peers_done:.2f} s, "
              f"peers+routes+FDB all installed within {done:.2f} s of the first publish, {batches:.0f} batches")
        self.assertLess(done, 15)


class ReportTests(WorkerTestCase):
    def test_runs_under_twist(self) -> None:
        """``twist wgkex-worker`` works like twistd: online, keys land, SIGTERM says goodbye and exits 0."""
        gw = self.gateway(start=False)
        gw.start_worker(runner="twist")
        gw.wait_online()
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, f"the key installed\n{gw.log_tail()}")
        self.assertEqual(gw.stop_worker(signal.SIGTERM), 0)
        wait_until(lambda: gw.bus.last(f"wireguard-worker/{gw.name}/status") == b"0", 5, "status 0")
        with open(gw.log) as f:
            self.assertNotIn("Traceback", f.read())

    def test_retained_payloads(self) -> None:
        """Retained status 1, data (Port, PublicKey, LinkAddress from the interface) and peer count."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, "key installed")
        # A fresh subscriber gets the retained messages.
        bus = BusClient(gw.mqtt.port)
        self.addCleanup(bus.close)
        bus.subscribe(f"wireguard-worker/{gw.name}/#")
        bus.subscribe(f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers")
        data_topic = f"wireguard-worker/{gw.name}/{DOMAIN}/data"
        metric_topic = f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers"
        wait_until(lambda: bus.last(data_topic) and bus.last(metric_topic)
                   and bus.last(f"wireguard-worker/{gw.name}/status"), 5, "retained messages")
        self.assertEqual(bus.last(f"wireguard-worker/{gw.name}/status"), b"1")
        data = json.loads(bus.last(data_topic) or b"")
        self.assertEqual(set(data), {"ExternalAddress", "Port", "PublicKey", "LinkAddress"})
        self.assertEqual(data["ExternalAddress"], "gw.example.net")
        self.assertEqual(data["Port"], gw.wg.listen_port())
        self.assertEqual(data["Port"], 51820)
        self.assertEqual(data["PublicKey"], gw.wg.public_key())
        self.assertEqual(data["PublicKey"], gw.public_key)
        self.assertIn(f"{ipaddress.IPv6Address(data['LinkAddress'])}/64", gw.ns.addresses("wg-x"))
        self.assertEqual(ipaddress.IPv6Address(data["LinkAddress"]), ipaddress.IPv6Address(gw.link_address))
        # Nobody shook hands: zero connected peers.
        self.assertEqual(bus.last(metric_topic), b"0")

    def test_sigterm_publishes_goodbye(self) -> None:
        """SIGTERM: metric -1 and status 0 (published by the worker, in that order), exit status 0."""
        gw = self.gateway()
        metric_topic = f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers"
        status_topic = f"wireguard-worker/{gw.name}/status"
        gw.bus.subscribe(metric_topic)
        wait_until(lambda: gw.bus.last(metric_topic) == b"0", 5, "a first count")
        self.assertEqual(gw.stop_worker(signal.SIGTERM), 0)
        wait_until(lambda: gw.bus.last(status_topic) == b"0" and gw.bus.last(metric_topic) == b"-1", 5,
                   "goodbye messages")
        with open(gw.log) as f:
            log = f.read()
        self.assertIn("MQTT disconnected", log)
        self.assertNotIn("Traceback", log)
        # Retained for whoever comes next.
        bus = BusClient(gw.mqtt.port)
        self.addCleanup(bus.close)
        bus.subscribe(status_topic)
        bus.subscribe(metric_topic)
        wait_until(lambda: bus.last(status_topic) == b"0" and bus.last(metric_topic) == b"-1", 5,
                   "retained goodbye")

    def test_connectivity_check(self) -> None:
        """Inside the namespace, GET http://[LinkAddress%wg-x]/ answers 200."""
        gw = self.gateway()
        self.check_answers(gw, gw.link_address)

    def test_new_link_address_rebinds_and_republishes(self) -> None:
        """A new link-local address on wg-x: the check moves there and the data says so, without restart."""
        gw = self.gateway()
        self.check_answers(gw, gw.link_address)
        data_topic = f"wireguard-worker/{gw.name}/{DOMAIN}/data"
        gw.bus.subscribe(data_topic)
        new = "fe80::1234"
        gw.ns.ip("address", "del", f"{gw.link_address}/64", "dev", "wg-x")
        add_address(gw.ns, "wg-x", f"{new}/64")
        wait_until(lambda: json.loads(gw.bus.last(data_topic) or b"{}").get("LinkAddress") == new, 10,
                   f"data with the new LinkAddress\n{gw.log_tail()}")
        self.check_answers(gw, new)


class SweepTests(WorkerTestCase):
    def test_sweep_removes_peer_with_old_handshake(self) -> None:
        """A peer whose handshake is older than peer_timeout loses peer, route and FDB entry; keep_keys stay."""
        gw = self.gateway(cleanup_interval=1, peer_timeout=4, keep_keys=[KEY_B])
        # A router in a namespace of its own, joined to the gateway by a veth.
        router_ns = Namespace.create(f"wgkex-wr-{gw.id}")
        self.addCleanup(router_ns.delete)
        add_veth(gw.ns, "eth0", router_ns, "eth0")
        add_address(gw.ns, "eth0", "2001:db8::1/64")
        add_address(router_ns, "eth0", "2001:db8::2/64")
        router = gw._daemon(router_ns, "wg-r")
        router_private = genkey()
        router_key = pubkey(router_private)
        router.configure(router_private)
        gw.bus.publish(TOPIC, [router_key, KEY_B])
        wait_until(lambda: gw.installed(router_key) and gw.installed(KEY_B), 5, "router key installed")
        router.add_peer(gw.public_key, [f"{gw.link_address}/128"], endpoint="[2001:db8::1]:51820",
                        persistent_keepalive=1)
        wait_until(lambda: gw.wg.handshake_age(router_key) is not None, 10, "a handshake")
        router.stop()  # no more handshakes from now on
        wait_until(lambda: router_key not in gw.peers(), 10, f"the stale peer swept\n{gw.log_tail()}")
        ll = lladdr(router_key)
        self.assertNotIn(ipaddress.IPv6Network(f"{ll}/128"), gw.routes())
        self.assertNotIn(ipaddress.IPv6Address(ll), gw.fdb_dsts())
        # The never-handshaked key on the keep list survives sweeps past peer_timeout.
        self.assertTrue(gw.installed(KEY_B))
        with open(gw.log) as f:
            self.assertIn("Stale-peer sweep removed 1 peer(s)", f.read())
