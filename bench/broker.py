"""Broker throughput: the real broker (twistd) against a real mosquitto, many routers at once.

Starts mosquitto and ``twistd -n wgkex-broker`` on free ports, subscribes to
``wireguard/+/all``, then fires ``--requests`` key exchanges with
``--concurrency`` clients in flight, each on a fresh TCP connection as routers
do (chunked, form content type, Gluon headers). Prints one JSON object per API:
requests/s, latency percentiles, statuses, and how many distinct keys reached
the subscriber (and how long after the last reply the last one arrived) --
answered keys are not the same as delivered keys.

    .venv/bin/python bench/broker.py [--requests 20000] [--concurrency 64] [--api v1|v2|both]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from tests.support.measure import cpu_seconds, percentile  # noqa: E402
from tests.support.mosquitto import Mosquitto, free_port, wait_for  # noqa: E402
from tests.support.processes import terminate  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
GW_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GW_KEY2 = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="


def key_for(i: int, salt: int) -> str:
    """A distinct valid public key per (i, salt); the last byte keeps the encoding canonical."""
    raw = bytes([salt & 0xFF, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF] + [(i * 31 + j) & 0xFF for j in range(27)]
                + [0x40])
    return base64.b64encode(raw).decode()


def request_bytes(path: str, key: str, port: int) -> bytes:
    body = ('{"domain": "ffmuc_welt","public_key": "' + key + '"}').encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: gluon/2023.2.3\r\n"
        "X-Gluon-Version: v2023.2.3\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


class Subscriber:
    def __init__(self, port: int) -> None:
        self.keys: set[bytes] = set()
        self.last_arrival = 0.0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe("wireguard/+/all", qos=1)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._message
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(self.ready.is_set, 10, what="subscription")

    def _message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.keys.add(bytes(msg.payload))
            self.last_arrival = time.monotonic()

    def count(self) -> int:
        with self.lock:
            return len(self.keys)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def one(port: int, data: bytes, latencies: list[float], statuses: Counter[str]) -> None:
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        reply = await reader.read()  # Connection: close -> until EOF
        writer.close()
        status = reply[9:12].decode() if reply.startswith(b"HTTP/1.1 ") else "bad"
    except OSError as exc:
        status = type(exc).__name__
    latencies.append(time.perf_counter() - start)
    statuses[status] += 1


async def burst(port: int, requests: list[bytes], concurrency: int) -> tuple[list[float], Counter[str], float]:
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    queue = iter(requests)

    async def client() -> None:
        for data in queue:
            await one(port, data, latencies, statuses)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - start


def run(api: str, args: argparse.Namespace, http_port: int, sub: Subscriber, salt: int,
        broker_pid: int) -> dict[str, Any]:
    path = f"/api/{api}/wg/key/exchange"
    keys = [key_for(i, salt) for i in range(args.requests)]
    before = sub.count()
    requests = [request_bytes(path, k, http_port) for k in keys]
    cpu_before = cpu_seconds(broker_pid)
    latencies, statuses, seconds = asyncio.run(burst(http_port, requests, args.concurrency))
    cpu = cpu_seconds(broker_pid) - cpu_before
    replied = time.monotonic()
    ok = statuses.get("200", 0)
    try:
        wait_for(lambda: sub.count() - before >= ok, 30, interval=0.05, what="keys at subscriber")
    except AssertionError:
        pass
    arrived = sub.count() - before
    return {
        "api": api,
        "requests": args.requests,
        "concurrency": args.concurrency,
        "statuses": dict(statuses),
        "seconds": round(seconds, 3),
        "requests_per_second": round(args.requests / seconds, 1),
        "latency_ms": {
            "p50": round(percentile(latencies, 50) * 1000, 2),
            "p99": round(percentile(latencies, 99) * 1000, 2),
            "max": round(max(latencies) * 1000, 2),
        },
        "broker_cpu_ms_per_request": round(cpu * 1000 / args.requests, 3),
        "keys_arrived": arrived,
        "keys_arrived_within_ms_of_last_reply": round(max(0.0, sub.last_arrival - replied) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--api", choices=["v1", "v2", "both"], default="both")
    parser.add_argument("--profile", metavar="PATH", help="run the broker under cProfile, stats saved to PATH")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="wgkex-bench-")
    mosquitto = Mosquitto(persistence=False)
    mosquitto.start()
    broker: subprocess.Popen[bytes] | None = None
    sub: Subscriber | None = None
    try:
        http_port = free_port()
        config = os.path.join(workdir, "wgkex.yaml")
        with open(config, "w") as f:
            f.write(
                "domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\n"
                "workers: {gw-a: {weight: 3}, gw-b: {weight: 1}}\n"
                f"mqtt: {{broker_url: 127.0.0.1, broker_port: {mosquitto.port}}}\n"
                f"broker_listen: {{host: 127.0.0.1, port: {http_port}}}\n"
                # One benchmark client address sends everything: lift its rate limit.
                f"broker: {{rate_limit: 1000000, rate_burst: 1000000, state_dir: {workdir}/state}}\n"
                "log_level: warn\n"
            )
        log = open(os.path.join(workdir, "broker.log"), "wb")
        profile = ["--profile", os.path.abspath(args.profile), "--profiler=cprofile", "--savestats"] \
            if args.profile else []
        broker = subprocess.Popen([TWISTD, "-n", "--pidfile=", *profile, "wgkex-broker", "--config", config],
                                  cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        sub = Subscriber(mosquitto.port)
        # Two fake workers so v2 has a choice to make.
        pub = paho.Client(CallbackAPIVersion.VERSION2)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        for name, key in (("gw-a", GW_KEY), ("gw-b", GW_KEY2)):
            data = json.dumps({"ExternalAddress": f"{name}.example", "Port": 51820, "PublicKey": key,
                               "LinkAddress": "fe80::1"})
            for topic, payload in ((f"wireguard-worker/{name}/status", "1"),
                                   (f"wireguard-worker/{name}/ffmuc_welt/data", data),
                                   (f"wireguard-metrics/ffmuc_welt/{name}/connected_peers", "0")):
                pub.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
        pub.disconnect()
        pub.loop_stop()

        def ready() -> bool:
            if broker is not None and broker.poll() is not None:
                raise SystemExit(f"broker exited with {broker.returncode}")
            import urllib.request
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/status", timeout=1) as r:
                    status = json.loads(r.read())
                return bool(status["mqtt"]["connected"] and status["domains"]["ffmuc_welt"]["online"] == 2)
            except OSError:
                return False

        wait_for(ready, 15, what="broker ready")
        apis = ["v1", "v2"] if args.api == "both" else [args.api]
        for salt, api in enumerate(apis):
            print(json.dumps(run(api, args, http_port, sub, salt, broker.pid)), flush=True)
    finally:
        if sub is not None:
            sub.close()
        if broker is not None:
            terminate(broker, 15)
        mosquitto.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
