"""The status page's history after a day of traffic, in compressed time (``task.Clock``).

Feeds a :class:`wgkex.broker.history.History` (and the worker picture) as a
broker would see a day: ``--rate`` key exchanges per second spread over the
configured domains (one in ten refused, by several reasons; a few naming no
configured domain), and every gateway reporting its peers on every domain once
a minute. Then measures what the operator's page costs: the memory the history
holds (after one hour and after the whole run: the rings must not grow), the
size of ``/`` and ``/api/v1/status``, and how long one render takes. Prints one
JSON object.

    .venv/bin/python bench/status_history.py [--hours 24] [--rate 10] [--gateways 2] [--domains 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tracemalloc

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])

from twisted.internet.task import Clock  # noqa: E402

from tests.support.memory import deep_size  # noqa: E402
from wgkex.broker.history import REASONS, History  # noqa: E402
from wgkex.broker.status import render_html, snapshot  # noqa: E402
from wgkex.broker.workers import WorkerPicture  # noqa: E402

GW_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=24)
    parser.add_argument("--rate", type=int, default=10, help="key exchanges per second")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--domains", type=int, default=2)
    args = parser.parse_args()

    domains = [f"ffmuc_d{i}" for i in range(args.domains)]
    gateways = [f"gw{i}" for i in range(args.gateways)]
    clock = Clock()
    clock.advance(1_700_000_000)
    history = History(domains, clock)
    picture = WorkerPicture(domains, lambda name: 1, clock)
    data = json.dumps({"ExternalAddress": "gw.example.net", "Port": 51820, "PublicKey": GW_KEY,
                       "LinkAddress": "fe80::1"}).encode()
    for gw in gateways:
        picture.handle(f"wireguard-worker/{gw}/status", b"1")
        for domain in domains:
            picture.handle(f"wireguard-worker/{gw}/{domain}/data", data)

    seconds = int(args.hours * 3600)
    outcomes = [None] * 9 + list(REASONS)  # mostly accepted; every reason now and then
    started = time.process_time()
    count = 0
    size_after_hour = None
    for second in range(seconds):
        for i in range(args.rate):
            count += 1
            reason = outcomes[count % len(outcomes)]
            registered = None if reason == "bad_domain" else domains[count % len(domains)]
            history.registration(registered, reason)
        if second % 60 == 0:
            for g, gw in enumerate(gateways):
                for domain in domains:
                    topic = f"wireguard-metrics/{domain}/{gw}/connected_peers"
                    payload = str(100 * (g + 1) + second // 3600).encode()
                    picture.handle(topic, payload)
                    history.on_metric(topic, payload, False)
        if second == 3600:
            size_after_hour = deep_size(history)
        clock.advance(1)
    feeding = time.process_time() - started

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    status = snapshot(picture, True, 0, 0, clock.seconds(), history)
    page = render_html(status)
    body = json.dumps(status).encode()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del before
    render_started = time.perf_counter()
    for _ in range(20):
        render_html(snapshot(picture, True, 0, 0, clock.seconds(), history))
    render_ms = (time.perf_counter() - render_started) / 20 * 1000

    print(json.dumps({
        "simulated_hours": args.hours,
        "registrations": count,
        "rate_per_second": args.rate,
        "domains": args.domains,
        "gateways": args.gateways,
        "history_bytes_after_1h": size_after_hour,
        "history_bytes_at_end": deep_size(history),
        "page_bytes": len(page),
        "status_json_bytes": len(body),
        "render_peak_bytes": peak,
        "render_ms": round(render_ms, 2),
        "feeding_cpu_seconds": round(feeding, 2),
        "record_us_per_registration": round(feeding / count * 1e6, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
