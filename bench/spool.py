"""What the broker's spool costs the reactor: microseconds per key, on this machine's disk.

Appends ``--keys`` key records to a :class:`wgkex.mqtt.spool.Spool` in a
temporary directory (what the broker does per accepted key, on the reactor
thread), acknowledges them in order (one small append each, and an unlink per
drained segment), and replays a spool a killed process left behind (what a
start does once). Prints one JSON object: per-key CPU and wall time of each
(wall time includes waiting for a busy machine's CPUs: see the load average),
the worst single call, and the spool's size on disk per waiting key.

    .venv/bin/python bench/spool.py [--keys 20000] [--dir /var/lib/wgkex-bench]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import tempfile
import time

from wgkex.mqtt.spool import Spool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=20000)
    parser.add_argument("--dir", default=None, help="parent directory (default: the system's temporary one)")
    args = parser.parse_args()
    parent = tempfile.mkdtemp(prefix="wgkex-spool-bench-", dir=args.dir)
    try:
        keys = [base64.b64encode(os.urandom(32)).decode() for _ in range(args.keys)]
        spool = Spool(os.path.join(parent, "state"))
        spool.open()
        worst_append = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        for key in keys:
            t0 = time.perf_counter()
            spool.append("wireguard/ffmuc_welt/all", key.encode(), 1, False)
            worst_append = max(worst_append, time.perf_counter() - t0)
        append_s, append_cpu = time.perf_counter() - start, time.process_time() - cpu
        size = sum(os.path.getsize(os.path.join(parent, "state", n)) for n in os.listdir(os.path.join(parent, "state")))

        # A killed process: its descriptors close, its records stay. Replay them.
        for segment in spool._segments.values():
            os.close(segment.fd)
        spool._segments.clear()
        start, cpu = time.perf_counter(), time.process_time()
        replayer = Spool(os.path.join(parent, "state"))
        records = replayer.open()
        replay_s, replay_cpu = time.perf_counter() - start, time.process_time() - cpu
        assert len(records) == args.keys, len(records)

        worst_release = 0.0
        start, cpu = time.perf_counter(), time.process_time()
        for record in records:
            t0 = time.perf_counter()
            replayer.release(record.ticket)
            worst_release = max(worst_release, time.perf_counter() - t0)
        release_s, release_cpu = time.perf_counter() - start, time.process_time() - cpu
        left = os.listdir(os.path.join(parent, "state"))
        replayer.close()
        print(json.dumps({
            "keys": args.keys,
            "load_average_1m": os.getloadavg()[0],
            "append_cpu_us_per_key": round(append_cpu / args.keys * 1e6, 2),
            "append_wall_us_per_key": round(append_s / args.keys * 1e6, 2),
            "append_worst_wall_ms": round(worst_append * 1e3, 3),
            "ack_cpu_us_per_key": round(release_cpu / args.keys * 1e6, 2),
            "ack_wall_us_per_key": round(release_s / args.keys * 1e6, 2),
            "ack_worst_wall_ms": round(worst_release * 1e3, 3),
            "replay_cpu_ms": round(replay_cpu * 1e3, 1),
            "replay_wall_ms": round(replay_s * 1e3, 1),
            "bytes_per_waiting_key": round(size / args.keys, 1),
            "files_left_after_all_acked": len(left),
        }))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
    main()
