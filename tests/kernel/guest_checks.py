"""Guest side of the kernel VM test: the real worker against the in-kernel WireGuard, observed.

Runs inside the VM of :mod:`tests.support.kernelvm` (as
``python -m tests.kernel.guest_checks SCRATCH``), never on the host. It sets up

* mosquitto (the lab's, on a unix socket that every namespace reaches, plus
  127.0.0.1 for this script's MQTT client);
* a gateway namespace ``gw`` with kernel WireGuard ``wg-welt`` (listen port
  51820, its link-local address), VXLAN ``vx-welt`` on top (``fe80::1/64``) and
  the real ``twistd -n wgkex-worker`` with ``wireguard_backend: kernel``;
* a router namespace ``rt`` joined to ``gw`` by a veth (2001:db8::/64) with
  kernel WireGuard ``wg_mesh_vpn`` and VXLAN ``mesh-vpn``, as Gluon sets them up;

(all of that is :mod:`tests.kernel.guest_setup`), then runs the checks of
:data:`CHECKS` one after another. A check only
*observes* (what ``wg``, ``ip``, ``bridge``, the bus and the worker show, after
polling with a deadline for the state it expects); the host's test module
judges the observations. Results go to ``SCRATCH/results.json`` (rewritten
after every check, so a VM that dies half-way still reports what it saw), the
worker's log to ``SCRATCH/worker.log``.

One worker serves every check, since starting Python under emulation takes
long. Its sweep runs every :data:`CLEANUP_INTERVAL` seconds with a short
:data:`PEER_TIMEOUT`, and every key but the sweep check's own is on
``keep_keys``, so the sweep never races the other checks. The burst comes
late: with 600 peers every dump is slow under emulation.

Every line of the checks' output (``SCRATCH/guest.log``) is stamped with the
seconds since the script began (:meth:`Guest.note`), so a slow run shows
where its time went. Measured on the 2-core host (load 3-4): boot 11 s,
Python start 12 s, the worker's start-up 32 s, the sweep check 27 s (the
stale key ages :data:`PEER_TIMEOUT`), the burst 38 s; ``trial tests.kernel``
168 s in all (the VM image cached).
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from wgkex.keys import lladdr
from wgkex.lab.netns import Namespace, add_address, add_vxlan

from tests.kernel.guest_setup import (
    BURST,
    CLEANUP_INTERVAL,
    CLONE_NEWNET,
    DOMAIN,
    EXTERNAL_NAME,
    GW_VX_ADDRESS,
    Guest,
    KEY_A,
    KEY_B,
    LISTEN_PORT,
    PEER_TIMEOUT,
    ROUTER_VX,
    ROUTER_WG,
    VNI,
    WAIT,
    WG,
    WORKER,
    poll,
)


def check_online(g: Guest) -> dict[str, Any]:
    """The worker starts on the kernel backend and says status 1."""
    assert g.bus is not None
    start = time.monotonic()
    poll(lambda: g.bus is not None and g.bus.last(f"wireguard-worker/{WORKER}/status") == "1",
         "the worker's status 1")
    return {"status": g.bus.last(f"wireguard-worker/{WORKER}/status"), "seconds": time.monotonic() - start}


def check_data(g: Guest) -> dict[str, Any]:
    """The data message next to what ``wg show`` and ``ip address`` say of wg-welt."""
    assert g.bus is not None
    topic = f"wireguard-worker/{WORKER}/{DOMAIN}/data"
    poll(lambda: g.bus is not None and g.bus.last(topic), "the data message")
    return {
        "data": json.loads(g.bus.last(topic) or "null"),
        "wg_public_key": g.wg("show", WG, "public-key").strip(),
        "wg_listen_port": int(g.wg("show", WG, "listen-port").strip()),
        "addresses": g.gw.addresses(WG),
        "external_name": EXTERNAL_NAME,
    }


def check_vectors(g: Guest) -> dict[str, Any]:
    """The contract's two test vectors published; peers, routes and FDB once both are in."""
    assert g.bus is not None
    g.bus.publish(f"wireguard/{DOMAIN}/all", [KEY_A, KEY_B])
    poll(lambda: g.installed([KEY_A, KEY_B]), "both test vectors installed")
    g.note("test vectors installed")
    observed = {"peers": {k: v["allowed_ips"] for k, v in g.peers().items()},
                "routes": g.routes(), "fdb": g.fdb()}
    # The sweep check's key, to age while the checks in between run (few peers then,
    # so sweeps are quick even under emulation; the burst comes after the sweep).
    g.stale_published_at = time.monotonic()  # before the worker can know it: the sweep's clock
    g.bus.publish(f"wireguard/{DOMAIN}/all", [g.stale_key])
    try:
        poll(lambda: g.installed([g.stale_key]), "the stale-to-be key installed", PEER_TIMEOUT - 10)
        g.stale_seen_installed = True
    except Exception:
        pass  # the sweep check says so
    return observed


def check_burst(g: Guest) -> dict[str, Any]:
    """BURST keys at once: all in the kernel, and the worker's own (chunked) dump counts them all."""
    assert g.bus is not None
    keys = g.burst
    start = time.monotonic()
    g.bus.publish(f"wireguard/{DOMAIN}/all", keys)
    g.note(f"{BURST} keys published")
    try:
        # Counting peers is cheap; the full look (wg, ip, bridge) only once they are all there.
        poll(lambda: g.peer_count() >= BURST + 2 and g.installed(keys), f"{BURST} keys installed", interval=2.0)
    except Exception:
        pass  # what is missing is reported below
    seconds = time.monotonic() - start
    g.note(f"{BURST} keys installed ({seconds:.1f} s)")
    state = g.state_of(keys)
    missing = [k for k, s in state["keys"].items() if not (s["allowed_ips"] and s["route"] and s["fdb_via"])]
    wrong = [k for k, s in state["keys"].items()
             if s["allowed_ips"] is not None and s["allowed_ips"] != [f"{lladdr(k)}/128"]]
    gauge = f'wgkex_worker_peers{{domain="{DOMAIN}"}}'
    counts: dict[str, Any] = {}

    def gauge_matches() -> bool:
        counts["worker_peer_gauge"] = g.metrics().get(gauge)
        counts["wg_peer_count_then"] = g.peer_count()
        return bool(counts["worker_peer_gauge"] == counts["wg_peer_count_then"])

    try:
        poll(gauge_matches, "the worker's peer gauge (from its own dump) to match wg show", interval=2.0)
    except Exception:
        pass
    g.note("peer gauge read")
    return {"published": len(keys), "missing": missing[:5], "missing_count": len(missing),
            "wrong_allowed_ips": wrong[:5], "seconds": seconds, "wg_peer_count": state["peer_count"],
            "route_count": state["route_count"], "fdb_count": state["fdb_count"], **counts}


def check_handshake(g: Guest) -> dict[str, Any]:
    """A router in its own namespace registers and shakes hands; the connected-peer count follows."""
    assert g.bus is not None
    topic = g.metric_topic()
    poll(lambda: g.bus is not None and g.bus.last(topic) is not None, "a connected-peers metric")
    before = g.bus.last(topic)
    g.bus.publish(f"wireguard/{DOMAIN}/all", [g.router_key])
    # As Gluon: own key and link-local /64, the gateway as peer with its link-local
    # /128 and keepalive 25, then the VXLAN link to the gateway.
    g.router().ip("link", "add", ROUTER_WG, "type", "wireguard")
    g.router().run(["wg", "set", ROUTER_WG, "private-key", "/dev/stdin",
              "peer", g.public_key, "allowed-ips", f"{g.link_address}/128",
              "endpoint", f"[2001:db8::1]:{LISTEN_PORT}", "persistent-keepalive", "25"],
             input=g.router_private + "\n", timeout=120)
    add_address(g.router(), ROUTER_WG, f"{lladdr(g.router_key)}/64")
    add_vxlan(g.router(), ROUTER_VX, vni=VNI, local=lladdr(g.router_key), dev=ROUTER_WG, remote=g.link_address)
    add_address(g.router(), ROUTER_VX, "fe80::2/64")
    poll(lambda: g.installed([g.router_key]), "the router's key installed")
    g.note("router's key installed")
    count_start = len(g.bus.all(topic))
    # The keepalive's first handshake may have gone out before the gateway knew the
    # key; traffic makes the router try again at once.
    g.router().run(["ping", "-6", "-n", "-c", "1", "-W", "5", f"{g.link_address}%{ROUTER_WG}"], check=False, timeout=120)
    try:
        poll(lambda: g.peers().get(g.router_key, {}).get("latest_handshake"), "a handshake")
        g.note("handshake seen")
        poll(lambda: g.bus is not None and "1" in g.bus.all(topic)[count_start:], "connected peers 1")
    except Exception:
        pass  # reported below
    return {"before": before, "after": g.bus.all(topic)[count_start:],
            "gateway_handshake": g.peers().get(g.router_key, {}).get("latest_handshake", 0),
            "router_handshake": g.peers(g.router(), ROUTER_WG).get(g.public_key, {}).get("latest_handshake", 0)}


def http_get_in(ns: Namespace, host: str, scope: str, port: int, timeout: float) -> dict[str, Any]:
    """GET / from inside ``ns`` (``[host%scope]:port``): its status, or the error.

    A thread enters the namespace (``setns`` acts on the calling thread only) and
    makes the socket there, which saves starting another Python under emulation.
    """
    result: dict[str, Any] = {}

    def get() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                result["error"] = f"setns: {os.strerror(ctypes.get_errno())}"
                return
        finally:
            os.close(fd)
        conn = http.client.HTTPConnection(f"{host}%{scope}", port, timeout=timeout)
        try:
            conn.request("GET", "/", headers={"User-Agent": "Wget"})
            response = conn.getresponse()
            response.read()
            result["status"] = response.status
        except OSError as exc:
            result["error"] = str(exc) or type(exc).__name__
        finally:
            conn.close()

    thread = threading.Thread(target=get)
    thread.start()
    thread.join()
    return result


def check_connectivity(g: Guest) -> dict[str, Any]:
    """Gluon's connectivity check from the router: GET http://[LinkAddress%wg_mesh_vpn]/."""
    last: dict[str, Any] = {}

    def probe() -> bool:
        nonlocal last
        last = http_get_in(g.router(), g.link_address, ROUTER_WG, 80, 30)
        return last.get("status") == 200

    try:
        poll(probe, "the connectivity check")
    except Exception:
        pass
    return {"url": f"http://[{g.link_address}%{ROUTER_WG}]/", "result": last}


def check_vxlan(g: Guest) -> dict[str, Any]:
    """The router pings the gateway's VXLAN address over VXLAN over WireGuard."""
    out = g.router().run(["ping", "-6", "-n", "-c", "3", "-i", "0.5", "-W", "5", f"{GW_VX_ADDRESS}%{ROUTER_VX}"],
                   check=False, timeout=120)
    return {"output": out}


def check_sweep(g: Guest) -> dict[str, Any]:
    """A key that never shook hands goes after peer_timeout with its route and FDB entry; kept keys stay."""
    key = g.stale_key
    published_at = g.stale_published_at
    left = max(30.0, published_at + PEER_TIMEOUT + CLEANUP_INTERVAL + WAIT - time.monotonic())
    try:
        poll(lambda: not any(s["allowed_ips"] or s["route"] or s["fdb_via"]
                             for s in [g.state_of([key])["keys"][key]]), "the stale key swept", left, 2.0)
    except Exception:
        pass
    gone_after = time.monotonic() - published_at
    swept = f'wgkex_worker_swept_peers_total{{domain="{DOMAIN}"}}'
    return {"seen_installed": g.stale_seen_installed, "stale": g.state_of([key])["keys"][key], "kept": g.state_of([KEY_B])["keys"][KEY_B],
            "gone_after": gone_after, "peer_timeout": PEER_TIMEOUT, "swept_total": g.metrics().get(swept)}


def check_sigterm(g: Guest) -> dict[str, Any]:
    """SIGTERM: the worker exits 0 after publishing metrics -1 and status 0."""
    assert g.worker is not None and g.bus is not None
    worker, g.worker = g.worker, None
    start = time.monotonic()
    worker.send(signal.SIGTERM)
    exited = worker.wait_gone(120)
    status_topic = f"wireguard-worker/{WORKER}/status"
    try:
        poll(lambda: g.bus is not None and g.bus.last(status_topic) == "0", "status 0")
    except Exception:
        pass
    return {"exited": exited, "exit_status": worker.exit_status(), "seconds": time.monotonic() - start,
            "last_metric": g.bus.last(g.metric_topic()), "last_status": g.bus.last(status_topic)}


CHECKS: list[tuple[str, Callable[[Guest], dict[str, Any]]]] = [
    ("online", check_online),
    ("data", check_data),
    ("vectors", check_vectors),
    ("handshake", check_handshake),
    ("connectivity", check_connectivity),
    ("vxlan", check_vxlan),
    ("sweep", check_sweep),
    # Late: with 600 peers every dump (metrics, sweeps) is slow under emulation.
    ("burst", check_burst),
    ("sigterm", check_sigterm),
]


def main(scratch: str) -> int:
    results: dict[str, Any] = {}
    path = os.path.join(scratch, "results.json")

    def record(name: str, value: dict[str, Any]) -> None:
        results[name] = value
        with open(path + ".new", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".new", path)

    start = time.monotonic()
    g = Guest(scratch, start)
    with open("/proc/uptime") as f:
        g.note(f"started (guest up {f.read().split()[0]} s)")
    try:
        try:
            g.start()
        except Exception:
            record("setup", {"error": traceback.format_exc()})
            return 1
        record("setup", {"seconds": time.monotonic() - start})
        g.note("setup done")
        for name, check in CHECKS:
            t = time.monotonic()
            try:
                observed = check(g)
            except Exception:
                record(name, {"error": traceback.format_exc(), "seconds": time.monotonic() - t})
            else:
                record(name, {"observed": observed, "seconds": time.monotonic() - t})
            g.note(f"check {name}: {time.monotonic() - t:.1f} s")
    finally:
        g.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
