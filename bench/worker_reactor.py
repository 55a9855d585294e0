"""Does the worker's reactor stay responsive while it counts and sweeps 100,000 peers?

Run as root: ``.venv/bin/python bench/worker_reactor.py [--peers 100000] [--duration 30]``.

wireguard-go refuses more than 65,536 peers per interface (``MaxPeers``: the
65,537th ``set=1`` fails and it drops the connection), so the WireGuard side is
a **fake UAPI daemon in a separate process** (:mod:`tests.support.fake_uapi`): it answers ``get=1`` exactly as wireguard-go formats it
(``private_key``, ``listen_port``, then per peer ``public_key``,
``preshared_key``, ``protocol_version``, ``endpoint``, handshake seconds and
nanoseconds, byte counters, keepalive, ``allowed_ip``: about 390 bytes per
peer, 39 MB for 100,000) and applies ``set=1`` removals. The worker's real
parsing code does all the work. Handshake ages are realistic: 70 % within the
last 3 minutes (connected), 24 % between 3 minutes and 3 hours, 5 % never, 1 %
older than 3 hours (stale). Every removal of stale peers is balanced by as many
new peers and as many peers turning stale, so every sweep finds about 1,000
stale peers to remove again and the count stays at 100,000.

The kernel side is real: a network namespace with a TUN link ``wg-x`` (the
kernel has no WireGuard; the name and its link-local address are all the worker
needs of it), ``vx-x`` on top, and a /128 route and an all-zero FDB entry for
every initial peer (installed with the worker's own rtnetlink code; the kernel
appends FDB destinations in quadratic time, about a minute for 100,000, see
``--fdb``), so each sweep really deletes routes and dumps the whole FDB.

The real ``twistd -n wgkex-worker`` runs in the namespace with
``metrics_interval`` and ``cleanup_interval`` of ``--interval`` seconds (default
1), so a count and a sweep of 100,000 peers are always running or due. Another
process in the namespace (this file with ``--poll``) requests ``/healthz`` on
``worker_listen`` over a fresh TCP connection every 10 ms for ``--duration``
seconds. Prints one JSON line: latency p50/p99/max, how many requests took
longer than 50 ms, how many counts and sweeps ran meanwhile and how long they
took, the worker's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support import fake_uapi  # noqa: E402
from tests.support.fake_uapi import peer_key  # noqa: E402
from tests.support.measure import cpu_seconds, percentile  # noqa: E402
from tests.support.processes import terminate  # noqa: E402
from tests.support.worker_probe import StatusClient, file_tail  # noqa: E402

DOMAIN = "ffbench_x"
WG, VX = "wg-x", "vx-x"
STATUS_PORT = 9101


# -- the /healthz poller (a process of its own, inside the namespace) --------------------------------


def poll(address: str, duration: float, every: float) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    latencies: list[float] = []
    slow: list[tuple[float, float]] = []  # (wall clock, ms) of requests over 20 ms
    errors = 0
    start = time.monotonic()
    next_at = start
    while time.monotonic() - start < duration:
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
        next_at = max(next_at + every, time.monotonic())
        began = time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(request)
                reply = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
            if not reply.startswith(b"HTTP/1.1 200"):
                errors += 1
                continue
        except OSError:
            errors += 1
            latencies.append(5000.0)
            continue
        latencies.append((time.monotonic() - began) * 1000)
        if latencies[-1] > 20:
            slow.append((round(time.time() - latencies[-1] / 1000, 3), round(latencies[-1], 1)))
    return {"latencies_ms": latencies, "errors": errors, "slow": slow}


# -- the bench ---------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from wgkex.lab.mosquitto import Mosquitto

        self.args = args
        self.id = uuid.uuid4().hex[:8]
        self.name = f"wreact{self.id}"
        self.seed = f"reactor {self.id}"
        self.dir = tempfile.mkdtemp(prefix="wgkex-wreact-")
        self.mqtt = Mosquitto(self.dir, unix_socket=os.path.join(self.dir, "mqtt.sock"), persistence=False)
        self.ns: Any = None
        self.daemon: subprocess.Popen[bytes] | None = None
        self.worker: Any = None
        self.status: StatusClient | None = None
        self.counter: MetricCounter | None = None

    def __enter__(self) -> Bench:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        from wgkex.keys import lladdr
        from wgkex.lab.configs import write_config
        from wgkex.lab.gateway import twistd
        from wgkex.lab.netns import Namespace, add_vxlan
        from wgkex.lab.proc import spawn, wait_until
        from wgkex.worker.rtnl import PyrouteRtnl

        args = self.args
        self.mqtt.start()
        self.ns = Namespace.create(f"wgkex-wreact-{self.id}")
        ns = self.ns
        ns.ip("tuntap", "add", WG, "mode", "tun")
        ns.ip("link", "set", "dev", WG, "addrgenmode", "none")
        ns.ip("address", "add", "fe80::1/64", "dev", WG, "nodad")
        ns.ip("link", "set", WG, "up")
        add_vxlan(ns, VX, vni=4242, local="fe80::1", dev=WG)

        socket_path = os.path.join(self.dir, f"{WG}.sock")
        self.daemon = subprocess.Popen(
            [sys.executable, fake_uapi.__file__, socket_path, "--seed", self.seed,
             "--peers", str(args.peers), "--stale-fraction", str(args.stale_fraction),
             "--dump-chunk", str(getattr(args, "dump_chunk", 0))],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "fake-uapi.log"), "wb"),
        )
        # Routes and FDB entries of the initial peers, as the worker would have installed them.
        started = time.monotonic()
        addresses = [lladdr(peer_key(self.seed, n)) for n in range(args.peers)]
        rtnl = PyrouteRtnl(netns=ns.name)
        try:
            for i in range(0, len(addresses), 10000):
                assert not rtnl.replace_routes(WG, addresses[i : i + 10000])
            for i in range(0, min(args.fdb, len(addresses)), 10000):
                assert not rtnl.append_fdb(VX, WG, addresses[i : min(i + 10000, args.fdb)])
        finally:
            rtnl.close()
        self.setup_seconds = time.monotonic() - started
        wait_until(lambda: os.path.exists(socket_path), 120, "the fake UAPI daemon's socket")

        data = {
            "domains": [DOMAIN],
            "domain_prefixes": ["ffbench_"],
            "worker_name": self.name,
            "externalName": "gw.example.net",
            "mqtt": {"transport": "unix", "broker_url": self.mqtt.unix_socket, "keepalive": 30},
            "wireguard_backend": "uapi",
            "uapi_socket_dir": self.dir,
            "worker_listen": f"127.0.0.1:{STATUS_PORT}",
            "metrics_interval": getattr(args, "metrics_interval", args.interval),
            "cleanup_interval": args.interval,
            "log_level": "info",
        }
        config = write_config(os.path.join(self.dir, "worker.yaml"), data)
        argv = ns.exec_argv([twistd(), "-n", "--pidfile=", "wgkex-worker", "--config", config])
        self.worker = spawn(f"worker {self.name}", argv, os.path.join(self.dir, "worker.log"))
        self.status = StatusClient(ns.name, STATUS_PORT)
        status = self.status

        def counted() -> bool:
            if not self.worker.is_ours():
                raise RuntimeError(f"the worker exited:\n{self.log_tail()}")
            try:
                m = status.metrics()
            except OSError:
                return False
            swept = m.get("wgkex_worker_sweep_seconds_count", 0.0) >= 1 or args.interval >= 3600
            return m.get(f'wgkex_worker_peers{{domain="{DOMAIN}"}}', 0.0) >= args.peers * 0.9 and swept

        wait_until(counted, 300, f"the worker's first count and sweep\n{self.log_tail()}", interval=0.2)
        self.counter = MetricCounter(
            self.mqtt.port, f"counter-{self.id}", f"wireguard-metrics/{DOMAIN}/{self.name}/connected_peers"
        )

    def __exit__(self, *exc: object) -> None:
        if self.counter is not None:
            self.counter.close()
        if self.status is not None:
            self.status.close()
        if self.worker is not None:
            self.worker.stop(timeout=20)
        if self.daemon is not None:
            terminate(self.daemon, 10)
        if self.ns is not None:
            self.ns.delete()
        self.mqtt.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(os.path.join(self.dir, "worker.log"), lines)

    def measure(self) -> dict[str, Any]:
        assert self.status is not None and self.ns is not None and self.counter is not None
        args = self.args
        before = self.status.metrics()
        cpu_before = cpu_seconds(self.worker.pid)
        counted_before = self.counter.count
        poller = self.ns.run(
            [sys.executable, os.path.abspath(__file__), "--poll", f"127.0.0.1:{STATUS_PORT}",
             "--duration", str(args.duration)],
            timeout=args.duration + 60,
        )
        cpu = cpu_seconds(self.worker.pid) - cpu_before
        after = self.status.metrics()
        polled = json.loads(poller)
        latencies: list[float] = polled["latencies_ms"]
        sweeps = after.get("wgkex_worker_sweep_seconds_count", 0) - before.get("wgkex_worker_sweep_seconds_count", 0)
        sweep_time = after.get("wgkex_worker_sweep_seconds_sum", 0) - before.get("wgkex_worker_sweep_seconds_sum", 0)
        swept = (after.get(f'wgkex_worker_swept_peers_total{{domain="{DOMAIN}"}}', 0)
                 - before.get(f'wgkex_worker_swept_peers_total{{domain="{DOMAIN}"}}', 0))
        counts = self.counter.count - counted_before
        return {
            "peers": args.peers,
            "fdb_entries": min(args.fdb, args.peers),
            "wireguard": "fake UAPI daemon process (wireguard-go caps at 65,536 peers), real worker parsing",
            "interval_seconds": args.interval,
            "duration_seconds": args.duration,
            "requests": len(latencies),
            "errors": polled["errors"],
            "p50_ms": round(percentile(latencies, 50), 2),
            "p99_ms": round(percentile(latencies, 99), 2),
            "max_ms": round(max(latencies), 2),
            "over_50ms": sum(1 for v in latencies if v > 50),
            "slowest_ms": sorted((round(v, 1) for v in latencies), reverse=True)[:5],
            "over_20ms_at": polled["slow"][:20],
            "sweeps": int(sweeps),
            "mean_sweep_seconds": round(sweep_time / sweeps, 3) if sweeps else None,
            "swept_peers": int(swept),
            "counts": counts,
            "connected_peers": after.get(f'wgkex_worker_connected_peers{{domain="{DOMAIN}"}}'),
            "worker_cpu_seconds": round(cpu, 2),
            "setup_seconds": round(self.setup_seconds, 1),
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        }



class MetricCounter:
    """Counts the worker's connected_peers publishes on the bus: one per peer count."""

    def __init__(self, port: int, client_id: str, topic: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.count = 0
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            if not message.retain:
                self.count += 1

        self.client.on_message = on_message
        self.client.on_connect = lambda client, *a: client.subscribe(topic, 1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("the bench's MQTT client could not subscribe")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100_000)
    parser.add_argument("--fdb", type=int, default=None,
                        help="FDB entries to install (default: one per peer; the kernel needs about a minute for 100,000)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of /healthz polling")
    parser.add_argument("--interval", type=float, default=1.0, help="metrics_interval and cleanup_interval, seconds")
    parser.add_argument("--stale-fraction", type=float, default=0.01)
    parser.add_argument("--poll", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        print(json.dumps(poll(args.poll, args.duration, 0.01)))
        return
    if os.geteuid() != 0:
        sys.exit("bench/worker_reactor.py needs root (network namespaces)")
    if args.fdb is None:
        args.fdb = args.peers
    with Bench(args) as bench:
        print(json.dumps(bench.measure()), flush=True)


if __name__ == "__main__":
    main()
