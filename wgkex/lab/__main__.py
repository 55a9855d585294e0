"""``python -m wgkex.lab [--id ID] up|down|status|demo`` (root only).

- ``up``: start the lab (mosquitto, broker, gateway gw1 with its worker, router
  node1 connected through it) and leave it running; a no-op if it runs already.
- ``down``: remove everything the lab made (only its own processes, by PID).
- ``status``: what runs, and the broker's ``/api/v1/status``.
- ``demo [--keep]``: the narrated demo (``KEEP=1`` in the environment = ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from wgkex.lab.lab import Lab, leftover_namespaces
from wgkex.lab.proc import LabError


def _need_root() -> str | None:
    if os.geteuid() != 0:
        return "the lab creates network namespaces: run it as root (e.g. sudo make demo)"
    return None


def cmd_up(lab: Lab) -> int:
    if lab.is_up():
        print(f"lab '{lab.id}' is already up (nothing changed); make lab-status shows it")
        return 0
    lab.up()
    try:
        router = lab.add_router("node1")
        reg = lab.connect_router(router)
    except BaseException:
        lab.down()
        raise
    lab.ledger.set_info("routers", {"node1": {**router.info(), "gateway_endpoint": reg.endpoint}})
    gw = lab.gateway_for(reg)
    print(f"lab '{lab.id}' is up (state in {lab.directory})")
    print(f"  broker      {lab.broker_url}/   (JSON: /api/v1/status)")
    print(f"  gateway     {gw.name}: ip netns exec {gw.ns.name} ...   wg: nsenter -t {gw.wg.pid} -m -n wg show")
    print(f"  router      node1: ip netns exec {router.ns.name} ping fe80::1%mesh-vpn")
    print("  stop it     make lab-down")
    return 0


def cmd_down(lab: Lab) -> int:
    if not lab.ledger.exists:
        left = leftover_namespaces(lab.id)
        print(f"lab '{lab.id}' is not up" + (f"; namespaces named like it (not ours to remove): {left}" if left else ""))
        return 0
    problems = lab.down()
    if problems:
        print("could not remove:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print(f"lab '{lab.id}' is down: its processes, namespaces and files are gone")
    return 0


def cmd_status(lab: Lab, as_json: bool) -> int:
    st = lab.status()
    if as_json:
        print(json.dumps(st, indent=2))
        return 0 if st["up"] or not lab.ledger.exists else 1
    if not lab.ledger.exists:
        print(f"lab '{lab.id}' is not up (make lab-up or make demo KEEP=1 starts it)")
        return 0
    print(f"lab '{lab.id}': {'up' if st['up'] else 'BROKEN (make lab-down cleans up)'}, state in {st['state_dir']}")
    for p in st["processes"]:
        print(f"  {'running' if p['running'] else 'GONE   '}  pid {p['pid']:<7} {p['name']}")
    for ns in st["namespaces"]:
        print(f"  {'exists ' if ns['exists'] else 'MISSING'}  netns {ns['name']}")
    info = st["info"]
    if "broker_url" in info:
        print(f"  broker {info['broker_url']}/")
    bs = st.get("broker_status")
    if bs:
        for domain, d in bs.get("domains", {}).items():
            for row in d.get("workers", []):
                print(f"  {domain}: worker {row.get('name')} online={row.get('online')} "
                      f"peers={row.get('peers')} weight={row.get('weight')}")
    return 0 if st["up"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wgkex.lab", description=__doc__.splitlines()[0])
    parser.add_argument("--id", default="demo", help="lab id (namespaces are named wgkex-<id>-...)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start the lab and leave it running")
    sub.add_parser("down", help="remove everything the lab made")
    st = sub.add_parser("status", help="show what runs")
    st.add_argument("--json", action="store_true")
    demo = sub.add_parser("demo", help="the narrated demo")
    demo.add_argument("--keep", action="store_true", help="leave the lab running (also KEEP=1)")
    args = parser.parse_args(argv)

    problem = _need_root()
    if problem:
        print(f"wgkex.lab: {problem}", file=sys.stderr)
        return 2
    try:
        lab = Lab(args.id)
        if args.command == "up":
            return cmd_up(lab)
        if args.command == "down":
            return cmd_down(lab)
        if args.command == "status":
            return cmd_status(lab, args.json)
        from wgkex.lab.demo import run_demo

        keep = args.keep or os.environ.get("KEEP", "") not in ("", "0")
        return run_demo(keep, lab_id=args.id)
    except LabError as exc:
        print(f"wgkex.lab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
