"""Where a normal client's latency spikes come from during a pipelining flood: the broker or the machine?

Starts mosquitto, ``twistd -n wgkex-broker`` and, as a control, a bare
twisted.web server answering every GET with 200 (same backlog, no wgkex code).
Two probe processes each ask one of them ``GET /healthz`` on a fresh
connection every 20 ms for ``--seconds``; a second in, ``--flood`` connections
from 127.0.0.2 each pipeline 5,000 ``GET /metrics`` at the broker and never
read (the hostile-HTTP test's attack). Prints one JSON object: per server the
latency median, p95, p99 and max, the probes over 20 ms (seconds after the
flood started), and the CPU seconds each process spent meanwhile. When the
control server spikes as high as the broker at the same moments, the spikes
are the machine's (scheduling on shared cores), not the broker's work.

    .venv/bin/python bench/hostile_latency.py [--seconds 8] [--flood 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.measure import cpu_seconds, percentile  # noqa: E402
from tests.support.mosquitto import Mosquitto, free_port, wait_for  # noqa: E402
from tests.support.processes import terminate  # noqa: E402

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PIPELINED = 5000


def control_server(port: int) -> None:
    """The control: twisted.web answering 200 to every GET, nothing else."""
    from twisted.internet import endpoints, reactor
    from twisted.web import resource, server

    class Ok(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            return b"ok"

    endpoints.TCP4ServerEndpoint(reactor, port, backlog=1024, interface="127.0.0.1").listen(server.Site(Ok()))
    reactor.run()


def probe(port: int, seconds: float) -> None:
    """GET /healthz on a fresh connection every 20 ms; prints [[unix time, ms or -1], ...]."""
    samples: list[tuple[float, float]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
            samples.append((time.time(), (time.monotonic() - start) * 1000))
        except OSError:
            samples.append((time.time(), -1.0))
        time.sleep(0.02)
    print(json.dumps(samples))


def summary(samples: list[list[float]], flood_at: float, cpu: float) -> dict[str, Any]:
    ms = [s[1] for s in samples if s[1] >= 0]
    return {
        "samples": len(ms),
        "failures": len(samples) - len(ms),
        "median_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms, default=0.0), 1),
        "over_20ms": [[round(t - flood_at, 2), round(v, 1)] for t, v in samples if v > 20 or v < 0],
        "cpu_seconds": round(cpu, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--flood", type=int, default=10, help="flooding connections (0: none, a baseline)")
    parser.add_argument("--control-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--probe", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.control_server:
        return control_server(args.control_server)
    if args.probe:
        return probe(args.probe, args.seconds)

    workdir = tempfile.mkdtemp(prefix="wgkex-bench-")
    mosquitto = Mosquitto(persistence=False)
    mosquitto.start()
    procs: list[subprocess.Popen[bytes]] = []
    flooders: list[socket.socket] = []
    try:
        http_port, control_port = free_port(), free_port()
        config = os.path.join(workdir, "wgkex.yaml")
        with open(config, "w") as f:
            f.write(
                "domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\n"
                f"mqtt: {{broker_url: 127.0.0.1, broker_port: {mosquitto.port}}}\n"
                f"broker_listen: {{host: 127.0.0.1, port: {http_port}}}\n"
                f"broker: {{state_dir: {workdir}/state}}\nlog_level: warn\n"
            )
        with open(os.path.join(workdir, "broker.log"), "wb") as log:
            broker = subprocess.Popen([TWISTD, "-n", "--pidfile=", "wgkex-broker", "--config", config],
                                      cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        procs.append(broker)
        control = subprocess.Popen([sys.executable, __file__, "--control-server", str(control_port)])
        procs.append(control)

        def answers(port: int) -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /readyz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                    return s.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

        wait_for(lambda: answers(http_port) and answers(control_port), 60, what="broker and control server")
        probes = [subprocess.Popen([sys.executable, __file__, "--seconds", str(args.seconds), "--probe", str(port)],
                                   stdout=subprocess.PIPE) for port in (http_port, control_port)]
        time.sleep(1)
        cpu_before = [cpu_seconds(p.pid) for p in (broker, control)]
        flood_at = time.time()
        flood = b"GET /metrics HTTP/1.1\r\nHost: broker\r\n\r\n" * PIPELINED
        for _ in range(args.flood):
            s = socket.create_connection(("127.0.0.1", http_port), timeout=10, source_address=("127.0.0.2", 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            flooders.append(s)
            threading.Thread(target=lambda s=s: _send_quietly(s, flood), daemon=True).start()
        results = [json.loads(p.communicate()[0]) for p in probes]
        cpu = [cpu_seconds(p.pid) - before for p, before in zip((broker, control), cpu_before)]
        print(json.dumps({
            "flood_connections": args.flood,
            "pipelined_per_connection": PIPELINED,
            "seconds": args.seconds,
            "load_average": os.getloadavg()[0],
            "broker": summary(results[0], flood_at, cpu[0]),
            "control": summary(results[1], flood_at, cpu[1]),
        }))
    finally:
        for s in flooders:
            s.close()
        for p in procs:
            terminate(p, 15)
        mosquitto.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _send_quietly(s: socket.socket, data: bytes) -> None:
    try:
        s.sendall(data)
    except OSError:
        pass  # the broker stopped reading, as it should


if __name__ == "__main__":
    main()
