"""A burst of keys through the real worker: time until every key is peer + route + FDB entry.

Run as root: ``.venv/bin/python bench/worker_burst.py [2000 10000 20000]``
(``--mosquitto-inflight N`` sets mosquitto's ``max_inflight_messages``;
its default, 20, is what the gateways run unless configured otherwise).

For each count N a fresh gateway is built with the lab primitives of
:mod:`wgkex.lab`: a network namespace, wireguard-go ``wg-x`` in a private mount
namespace, ``vx-x`` on top, mosquitto with a unix socket for the worker and a
127.0.0.1 port for the publisher, and the real ``twistd -n wgkex-worker``
entered into the daemon's mount and network namespace. Once the worker is
connected to MQTT and has finished its start-up reads (``--settle``, 1 s; a
burst right at start-up waits about 0.1 s more behind them), N fresh keys are published on ``wireguard/<domain>/all`` at QoS 1 as
fast as one TCP connection takes them (a minimal MQTT client written here, so
that publishing costs next to no CPU on this two-core machine), and the
worker's ``/metrics`` (keys applied) is polled every 20 ms over a keep-alive
connection made inside the namespace. When it reaches N the kernel is counted
(UAPI ``get=1`` peers, ``ip -6 route`` host routes, ``bridge fdb`` entries) to
cross-check. Prints one JSON line per N; everything it made is removed.

``keys_per_second`` is N over the time from the first publish to the last key
applied; ``steady_keys_per_second`` the rate between 10 % and 90 % of the keys
(leaves out start-up and the tail). ``cpu_seconds`` are the CPU times of the
worker, wireguard-go and mosquitto during the burst. ``--timeline`` adds every
sample; ``--profile PREFIX`` records the worker with py-spy (not a dependency
of wgkex; ``pip install py-spy``), ``--keep-log PATH`` keeps its log.

``--rate R`` trickles the keys instead, evenly at R keys/s, as a gateway sees
them when routers register one by one (the herd: ~300 keys/s per gateway):
``cpu_ms_per_key`` is each program's CPU per key at that rate, ``latency_ms``
the publish-to-installed percentiles, from each key's write to mosquitto to the
kernel's notice of its FDB entry (``bridge monitor fdb``; the worker adds it
last), so the worker is not polled meanwhile.

The kernel's FDB append is linear in the number of destinations already on the
all-zero entry (the vxlan driver walks its list for duplicates), so the rate
falls as a burst goes on (20,000 appends take about 1.7 s of kernel time here,
100,000 about a minute).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.fdb_watch import FdbWatch  # noqa: E402
from tests.support.measure import context_switches, cpu_seconds, percentile, thread_cpu_seconds  # noqa: E402
from tests.support.mqtt_wire import RawPublisher  # noqa: E402
from tests.support.worker_probe import StatusClient, file_tail  # noqa: E402
from wgkex.keys import lladdr  # noqa: E402
from wgkex.lab.configs import write_config  # noqa: E402
from wgkex.lab.gateway import twistd  # noqa: E402
from wgkex.lab.mosquitto import Mosquitto  # noqa: E402
from wgkex.lab.netns import Namespace, add_vxlan, fdb_entries, routes  # noqa: E402
from wgkex.lab.proc import Proc, spawn, wait_until  # noqa: E402
from wgkex.lab.wggo import WireGuardGo, genkey  # noqa: E402

DOMAIN = "ffbench_x"
WG, VX = "wg-x", "vx-x"
STATUS_PORT = 9101


def bench_keys(count: int, seed: str) -> list[str]:
    """``count`` distinct valid public keys (canonical base64 of 32 bytes)."""
    return [base64.b64encode(hashlib.sha256(f"{seed} {i}".encode()).digest()).decode() for i in range(count)]


# -- the gateway --------------------------------------------------------------------------------


class BenchGateway:
    """Namespace + wireguard-go wg-x + vx-x + mosquitto + the real worker; a context manager."""

    def __init__(self, mosquitto_inflight: int | None = None, keep_log: str | None = None, **config: Any) -> None:
        self.keep_log = keep_log
        self.id = uuid.uuid4().hex[:8]
        self.name = f"wbench{self.id}"
        self.dir = tempfile.mkdtemp(prefix="wgkex-wbench-")
        self.mosquitto_inflight = mosquitto_inflight
        self.extra_config = config
        self.mqtt: Mosquitto | None = None
        self.ns: Namespace | None = None
        self.wg: WireGuardGo | None = None
        self.worker: Proc | None = None
        self.status: StatusClient | None = None

    def __enter__(self) -> BenchGateway:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        self.mqtt = Mosquitto(self.dir, unix_socket=os.path.join(self.dir, "mqtt.sock"), persistence=False)
        if self.mosquitto_inflight is not None:
            write = self.mqtt.write_config
            inflight = self.mosquitto_inflight

            def write_config_with_inflight() -> str:
                path = write()
                with open(path, "a") as f:
                    f.write(f"max_inflight_messages {inflight}\n")
                return path

            self.mqtt.write_config = write_config_with_inflight  # type: ignore[method-assign]
        self.mqtt.start()
        self.ns = Namespace.create(f"wgkex-wbench-{self.id}")
        self.wg = WireGuardGo.start(self.ns, WG, os.path.join(self.dir, "wireguard-go.log"))
        public_key = self.wg.configure(genkey(), listen_port=51820)
        add_vxlan(self.ns, VX, vni=4242, local=lladdr(public_key), dev=WG)
        data: dict[str, Any] = {
            "domains": [DOMAIN],
            "domain_prefixes": ["ffbench_"],
            "worker_name": self.name,
            "externalName": "gw.example.net",
            "mqtt": {"transport": "unix", "broker_url": self.mqtt.unix_socket, "keepalive": 30,
                     "reconnect_max_delay": 1},
            "wireguard_backend": "uapi",
            "worker_listen": f"127.0.0.1:{STATUS_PORT}",
            "log_level": "info",
        }
        data.update(self.extra_config)
        config = write_config(os.path.join(self.dir, "worker.yaml"), data)
        argv = self.wg.enter_argv([twistd(), "-n", "--pidfile=", "wgkex-worker", "--config", config])
        self.worker = spawn(f"worker {self.name}", argv, os.path.join(self.dir, "worker.log"))
        self.status = StatusClient(self.ns.name, STATUS_PORT)
        status = self.status

        def online() -> bool:
            assert self.worker is not None
            if not self.worker.is_ours():
                raise RuntimeError(f"the worker exited:\n{self.log_tail()}")
            try:
                return status.metrics().get("wgkex_worker_mqtt_connected") == 1.0
            except OSError:
                return False

        wait_until(online, 20, f"the worker connected to MQTT\n{self.log_tail()}", interval=0.05)

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.close()
        if self.worker is not None:
            self.worker.stop(timeout=15)
        if self.wg is not None:
            self.wg.stop()
        if self.ns is not None:
            self.ns.delete()
        if self.mqtt is not None:
            self.mqtt.stop()
        if self.keep_log:
            shutil.copy(os.path.join(self.dir, "worker.log"), self.keep_log)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        return file_tail(os.path.join(self.dir, "worker.log"), lines)

    def kernel_counts(self) -> dict[str, int]:
        """Peers (UAPI get=1), /128 routes on wg-x and FDB destinations on vx-x, counted in the kernel."""
        assert self.wg is not None and self.ns is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.wg.uapi_socket)
            s.sendall(b"get=1\n\n")
            reply = bytearray()
            while not reply.endswith(b"\n\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                reply += chunk
        peers = reply.count(b"\npublic_key=")
        host_routes = sum(1 for dst in routes(self.ns, WG) if dst.endswith("/128"))
        fdb = sum(1 for e in fdb_entries(self.ns, VX) if e.get("mac") == "00:00:00:00:00:00" and "dst" in e)
        return {"peers": peers, "routes": host_routes, "fdb": fdb}

    def pids(self) -> dict[str, int]:
        assert self.worker is not None and self.wg is not None and self.mqtt is not None
        assert self.mqtt.proc is not None
        return {"worker": self.worker.pid, "wireguard_go": self.wg.pid, "mosquitto": self.mqtt.proc.pid}


def applied_total(m: dict[str, float]) -> float:
    return m.get(f'wgkex_worker_keys_applied_total{{domain="{DOMAIN}"}}', 0.0)


def failed_total(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("wgkex_worker_keys_failed_total{"))


def rate_between(samples: list[tuple[float, float]], low: float, high: float) -> float | None:
    """Keys per second between the first samples at or above ``low`` and ``high`` keys."""
    t_low = next((t for t, n in samples if n >= low), None)
    t_high = next((t for t, n in samples if n >= high), None)
    n_low = next((n for t, n in samples if n >= low), None)
    n_high = next((n for t, n in samples if n >= high), None)
    if t_low is None or t_high is None or n_low is None or n_high is None or t_high <= t_low:
        return None
    return (n_high - n_low) / (t_high - t_low)


def start_profiler(out: str, pid: int) -> subprocess.Popen[bytes]:
    """py-spy (not a dependency of wgkex: pip install py-spy) sampling ``pid`` into ``out``."""
    profiler = subprocess.Popen(
        ["py-spy", "record", "--threads", "--idle", "--format", "raw", "--rate", "200", "--nonblocking",
         "--pid", str(pid), "--output", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return profiler


def trickle(count: int, rate: float, timeout: float, profile: str | None = None, settle: float = 1.0,
            keep_log: str | None = None) -> dict[str, Any]:
    """``count`` keys published evenly at ``rate`` per second: CPU per key and publish-to-installed latency."""
    keys = bench_keys(count, uuid.uuid4().hex)
    addresses = [str(ipaddress.ip_address(lladdr(k))) for k in keys]
    with BenchGateway(None, keep_log) as gw:
        assert gw.mqtt is not None and gw.ns is not None and gw.status is not None
        pids = gw.pids()
        watch = FdbWatch(gw.ns.name, VX)
        time.sleep(settle)
        publisher = RawPublisher("127.0.0.1", gw.mqtt.port, f"bench-{gw.id}")
        profiler: subprocess.Popen[bytes] | None = None
        try:
            if profile is not None:
                profiler = start_profiler(f"{profile}-{count}-rate{rate:g}.txt", pids["worker"])
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            threads_before, switches_before = thread_cpu_seconds(pids["worker"]), context_switches(pids["worker"])
            sent_at = publisher.publish_paced(f"wireguard/{DOMAIN}/all", [k.encode() for k in keys], rate)
            if not watch.wait_for(set(addresses), timeout):
                raise RuntimeError(f"{count} keys: only {len(watch.seen)} FDB entries after {timeout:g} s\n"
                                   f"{gw.log_tail()}")
            cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
            threads = {k: round(v - threads_before[k], 2) for k, v in thread_cpu_seconds(pids["worker"]).items()}
            switches = {k: round((v - switches_before[k]) / count, 2) for k, v in context_switches(pids["worker"]).items()}
            publisher.all_acked.wait(5)
            seconds = max(watch.seen.values()) - sent_at[0]
        finally:
            publisher.close()
            watch.close()
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
        latencies = [(watch.seen[a] - t) * 1000 for a, t in zip(addresses, sent_at)]
        final = gw.status.metrics()
        batches = final.get("wgkex_worker_batch_size_count", 0.0)
        return {
            "keys": count,
            "rate": rate,
            "seconds": round(seconds, 3),
            "cpu_seconds": {name: round(v, 2) for name, v in cpu.items()},
            "cpu_ms_per_key": {name: round(1000 * v / count, 3) for name, v in cpu.items()},
            "worker_cpu_seconds_by_thread": threads,
            "worker_sleeps_per_key": switches,
            "latency_ms": {f"p{p}": round(percentile(latencies, p), 1) for p in (50, 90, 99)}
            | {"max": round(max(latencies), 1)},
            "applied": int(applied_total(final)),
            "failed": int(failed_total(final)),
            "kernel": gw.kernel_counts(),
            "batches": int(batches),
            "mean_batch": round(final.get("wgkex_worker_batch_size_sum", 0.0) / batches, 2) if batches else None,
            "load_average": os.getloadavg(),
        }


def burst(
    count: int,
    mosquitto_inflight: int | None,
    timeout: float,
    profile: str | None = None,
    timeline_wanted: bool = False,
    settle: float = 1.0,
    keep_log: str | None = None,
) -> dict[str, Any]:
    keys = bench_keys(count, uuid.uuid4().hex)
    with BenchGateway(mosquitto_inflight, keep_log) as gw:
        assert gw.mqtt is not None and gw.status is not None
        status = gw.status
        pids = gw.pids()
        # The worker reads its interfaces and counts peers right after it connects (pool jobs of
        # ~100 ms here); a burst arriving meanwhile waits behind them.
        time.sleep(settle)
        publisher = RawPublisher("127.0.0.1", gw.mqtt.port, f"bench-{gw.id}")
        profiler: subprocess.Popen[bytes] | None = None
        try:
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            if profile is not None:
                profiler = start_profiler(f"{profile}-{count}.txt", pids["worker"])
            started = publisher.publish_all(f"wireguard/{DOMAIN}/all", [k.encode() for k in keys])
            written = time.monotonic() - started
            samples: list[tuple[float, float]] = [(0.0, 0.0)]
            timeline: list[tuple[float, int, int, int]] = []
            acked_at: float | None = None
            received_at: float | None = None
            deadline = started + timeout
            failed = 0.0
            while True:
                m = status.metrics()
                now = time.monotonic() - started
                applied = applied_total(m)
                failed = failed_total(m)
                samples.append((now, applied))
                timeline.append((round(now, 3), int(m.get("wgkex_worker_keys_received_total", 0.0)), int(applied),
                                 int(m.get("wgkex_worker_batch_size_count", 0.0))))
                if acked_at is None and publisher.all_acked.is_set():
                    acked_at = now
                if received_at is None and m.get("wgkex_worker_keys_received_total", 0.0) >= count:
                    received_at = now
                if applied + failed >= count:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{count} keys: only {applied:.0f} applied ({failed:.0f} failed) after {timeout:g} s\n"
                        f"{gw.log_tail()}"
                    )
                time.sleep(0.02)
            done = samples[-1][0]
            cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
        finally:
            publisher.close()
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
        kernel = gw.kernel_counts()
        final = status.metrics()
        batches = final.get("wgkex_worker_batch_size_count", 0.0)
        result: dict[str, Any] = {
            "keys": count,
            "seconds": round(done, 3),
            "keys_per_second": round(count / done),
            "steady_keys_per_second": round(rate_between(samples, 0.1 * count, 0.9 * count) or 0),
            "publish_written_seconds": round(written, 3),
            "publish_acked_seconds": round(acked_at, 3) if acked_at is not None else None,
            "worker_received_all_seconds": round(received_at, 3) if received_at is not None else None,
            "applied": int(applied_total(final)),
            "failed": int(failed),
            "kernel": kernel,
            "all_installed": kernel == {"peers": count, "routes": count, "fdb": count},
            "batches": int(batches),
            "mean_batch": round(final.get("wgkex_worker_batch_size_sum", 0.0) / batches) if batches else None,
            "pool_apply_seconds": round(final.get("wgkex_worker_apply_seconds_sum", 0.0), 3),
            "keys_received": int(final.get("wgkex_worker_keys_received_total", 0.0)),
            "duplicates": int(final.get("wgkex_worker_keys_duplicate_total", 0.0)),
            "cpu_seconds": cpu,
            "mosquitto_max_inflight": mosquitto_inflight if mosquitto_inflight is not None else "default (20)",
        }
        result["settle_seconds"] = settle
        if timeline_wanted:
            result["timeline_t_received_applied_batches"] = timeline
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="*", type=int, default=[2000, 10000, 20000],
                        help="key counts, one burst (and one fresh gateway) each (default 2000 10000 20000)")
    parser.add_argument("--mosquitto-inflight", type=int, default=None,
                        help="mosquitto max_inflight_messages (default: mosquitto's own, 20)")
    parser.add_argument("--profile", metavar="PREFIX", default=None,
                        help="record the worker with py-spy (must be on PATH) into PREFIX-<count>.txt (raw format)")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds between the worker coming online and the burst (default 1: its start-up reads done)")
    parser.add_argument("--keep-log", metavar="PATH", help="copy the worker's log to PATH")
    parser.add_argument("--timeline", action="store_true",
                        help="add every /metrics sample (seconds, keys received, keys applied, batches) to the output")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on a burst after this many seconds")
    parser.add_argument("--rate", type=float, default=None, metavar="KEYS_PER_S",
                        help="publish the keys evenly at this rate instead of all at once")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/worker_burst.py needs root (network namespaces, wireguard-go)")
    for count in args.counts:
        if args.rate is not None:
            result = trickle(count, args.rate, args.timeout, args.profile, args.settle, args.keep_log)
        else:
            result = burst(count, args.mosquitto_inflight, args.timeout, args.profile, args.timeline, args.settle,
                           args.keep_log)
            result["load_average"] = os.getloadavg()
        result["machine"] = {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
