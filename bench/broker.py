"""Broker throughput: the real broker (twistd) against a real mosquitto, many routers at once.

Starts mosquitto and ``twistd -n wgkex-broker`` on free ports, subscribes to
``wireguard/+/all``, then fires ``--requests`` key exchanges with
``--concurrency`` clients in flight, each on a fresh TCP connection as routers
do (chunked, form content type, Gluon headers), from the epoll load generator
of ``bench/http_load.py``. Prints one JSON object per API: requests/s, latency
percentiles, statuses, CPU milliseconds per request of the broker, of
mosquitto and of this client (which also runs the MQTT subscriber), the load average, and how many
distinct keys reached the subscriber (and how long after the last reply the
last one arrived) -- answered keys are not the same as delivered keys.

``--control`` first sends the same requests to two control servers: a bare
twisted.web resource answering a constant JSON body (configured as cheaply as
the broker's site: no access log, no form parsing, the body in memory), the
same resource behind the broker's own site (its connection bounds, body limit
and deadlines), and the same answer through a Klein route. Their CPU per request is the floor under
the broker's: what lies above it is wgkex's own work.

    .venv/bin/python bench/broker.py [--requests 20000] [--concurrency 64] [--api v1|v2|both] [--control]
                                     [--profile PATH]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
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

from http_load import fire, status_of  # noqa: E402  (bench/, next to this file)

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


def control_server(port: int, kind: str) -> None:
    """A control server: answers every key exchange POST with a constant 200, nothing else.

    ``web``: a bare twisted.web resource, configured as cheaply as the broker's
    site is (no access log, no form parsing, the body kept in memory rather
    than in a temporary file) -- the floor any twisted.web broker pays per
    request. ``site``: the same resource served by the broker's own site
    (:func:`wgkex.broker.site.make_site`: connection bounds, body limit,
    deadlines). ``klein``: the same answer from a Klein route, for Klein's share.
    """
    import io

    from twisted.internet import endpoints, reactor
    from twisted.web import resource, server

    answer = b'{"Endpoint": {"Address": "gw-a.example", "Port": 51820, "AllowedIPs": ["fe80::1/128"],' \
             b' "PublicKey": "' + GW_KEY.encode() + b'"}}'

    def reply(request: Any) -> bytes:
        request.content.read()
        request.setHeader(b"Content-Type", b"application/json")
        return answer

    class Quiet(server.Site):
        def log(self, request: object) -> None:
            pass

    class InMemory(server.Request):
        def gotLength(self, length: int | None) -> None:
            self.content = io.BytesIO()

    root: Any
    site: Any = None
    if kind == "klein":
        from klein import Klein

        app = Klein()
        app.route("/api/v2/wg/key/exchange", methods=["POST"])(reply)
        app.route("/api/v1/wg/key/exchange", methods=["POST"])(reply)
        root = app.resource()
    else:
        class Answer(resource.Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                return reply(request)

        root = Answer()
    if kind == "site":
        from wgkex.broker.site import make_site

        site = make_site(root, 4096, reactor, max_per_address=256, max_connections=100_000)
    else:
        site = Quiet(root, requestFactory=InMemory, parsePOSTFormSubmission=False)
    endpoints.TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1").listen(site)
    reactor.run()


def measure(path: str, http_port: int, keys: list[str], concurrency: int, server_pid: int
            ) -> tuple[dict[str, Any], Counter[str]]:
    """Fire one request per key at ``path``; the figures common to the broker and the controls."""
    requests = [(("127.0.0.1", http_port), request_bytes(path, k, http_port)) for k in keys]
    cpu_before = cpu_seconds(server_pid)
    own_before = os.times()
    load = fire(requests, concurrency)
    own_after = os.times()
    cpu = cpu_seconds(server_pid) - cpu_before
    own = own_after.user + own_after.system - own_before.user - own_before.system
    statuses = Counter(status_of(r) for r in load.replies)
    n = len(keys)
    return {
        "requests": n,
        "concurrency": concurrency,
        "statuses": dict(statuses),
        "seconds": round(load.seconds, 3),
        "requests_per_second": round(n / load.seconds, 1),
        "latency_ms": {
            "p50": round(percentile(load.latencies, 50) * 1000, 2),
            "p99": round(percentile(load.latencies, 99) * 1000, 2),
            "max": round(max(load.latencies) * 1000, 2),
        },
        "server_cpu_ms_per_request": round(cpu * 1000 / n, 3),
        "client_cpu_ms_per_request": round(own * 1000 / n, 3),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }, statuses


def run(api: str, args: argparse.Namespace, http_port: int, sub: Subscriber, salt: int,
        broker_pid: int, mosquitto_pid: int) -> dict[str, Any]:
    keys = [key_for(i, salt) for i in range(args.requests)]
    before = sub.count()
    mosquitto_before = cpu_seconds(mosquitto_pid)
    figures, statuses = measure(f"/api/{api}/wg/key/exchange", http_port, keys, args.concurrency, broker_pid)
    figures["mosquitto_cpu_ms_per_request"] = round((cpu_seconds(mosquitto_pid) - mosquitto_before) * 1000
                                                    / args.requests, 3)
    replied = time.monotonic()
    ok = statuses.get("200", 0)
    try:
        wait_for(lambda: sub.count() - before >= ok, 30, interval=0.05, what="keys at subscriber")
    except AssertionError:
        pass
    arrived = sub.count() - before
    figures["broker_cpu_ms_per_request"] = figures.pop("server_cpu_ms_per_request")
    return {
        "api": api,
        **figures,
        "keys_arrived": arrived,
        "keys_arrived_within_ms_of_last_reply": round(max(0.0, sub.last_arrival - replied) * 1000, 1),
    }


def controls(args: argparse.Namespace) -> None:
    """The floor: the same requests against the control servers (no MQTT, no wgkex code)."""
    for kind in ("web", "site", "klein"):
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--control-server", str(port), kind])
        try:
            def ready() -> bool:
                if server.poll() is not None:
                    raise SystemExit(f"control server exited with {server.returncode}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    return False

            wait_for(ready, 15, what="control server")
            keys = [key_for(i, 200) for i in range(args.requests)]
            figures, _ = measure("/api/v2/wg/key/exchange", port, keys, args.concurrency, server.pid)
            names = {"web": "bare twisted.web", "site": "twisted.web through the broker's site (bounds, limits)",
                     "klein": "bare klein"}
            print(json.dumps({"api": f"control: {names[kind]}", **figures}), flush=True)
        finally:
            terminate(server, 15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--api", choices=["v1", "v2", "both"], default="both")
    parser.add_argument("--profile", metavar="PATH", help="run the broker under cProfile, stats saved to PATH")
    parser.add_argument("--control", action="store_true",
                        help="also measure the control servers (bare twisted.web, bare Klein) with the same client")
    parser.add_argument("--control-server", nargs=2, metavar=("PORT", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.control_server:
        return control_server(int(args.control_server[0]), args.control_server[1])
    if args.control:
        controls(args)

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
            assert mosquitto.proc is not None
            print(json.dumps(run(api, args, http_port, sub, salt, broker.pid, mosquitto.proc.pid)), flush=True)
    finally:
        if sub is not None:
            sub.close()
        if broker is not None:
            terminate(broker, 15)
        mosquitto.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
