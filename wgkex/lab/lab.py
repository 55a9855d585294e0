"""A whole wgkex deployment on one machine: mosquitto, the broker, gateways and routers.

::

    root namespace   mosquitto 127.0.0.1:<port> + <state>/mqtt.sock
                     twistd -n wgkex-broker   127.0.0.1:<port>
    wgkex-<id>-lan   bridge br0 joining every gateway and router (veth pairs)
    wgkex-<id>-gw1   wg-welt, vx-welt, twistd -n wgkex-worker   2001:db8::1
    wgkex-<id>-node1 wg_mesh_vpn, mesh-vpn (a Gluon router)      2001:db8::1:1

Everything is recorded in ``<base>/<id>/state.json`` as it is made (see
:mod:`wgkex.lab.state`), so :meth:`Lab.down` -- or ``python -m wgkex.lab down``
from another process -- removes exactly that. Lab ids keep parallel labs
apart (``Lab.for_test()`` picks a random one); the CLI and the demo use
``demo``.

Typical use in a test::

    lab = Lab.for_test(gateways={"gw1": 2, "gw2": 1})
    self.addCleanup(lab.down)
    lab.up()
    router = lab.add_router()
    reg = lab.connect_router(router)      # register, wait for the worker, connect, HTTP check
    router.ping_vxlan().ok
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

from wgkex.lab.configs import broker_config, write_config
from wgkex.lab.gateway import BRIDGE, Gateway, twistd
from wgkex.lab.mosquitto import Mosquitto, free_port
from wgkex.lab.netns import Namespace, add_bridge, namespaces
from wgkex.lab.proc import LabError, Proc, spawn, wait_until
from wgkex.lab.router import Registration, Router
from wgkex.lab.state import Ledger
from wgkex.lab.wggo import ensure_socket_dir

DOMAIN = "ffmuc_welt"
PREFIXES = ["ffmuc_"]
#: Gluon derives the VXLAN id from the domain seed (3 bytes); the lab fixes one for both ends.
VNI = 0x2A1B3C
BASE_DIR_ENV = "WGKEX_LAB_DIR"
DEFAULT_BASE = "/run/wgkex-lab"


def base_dir() -> str:
    """Where labs keep their state: ``$WGKEX_LAB_DIR``, else /run/wgkex-lab."""
    return os.environ.get(BASE_DIR_ENV, DEFAULT_BASE)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, ValueError):
        return 0, b""


def broker_status(broker_url: str) -> dict[str, Any]:
    """``GET /api/v1/status`` of the broker at ``broker_url`` ({} when it does not answer)."""
    status, body = http_get(broker_url + "/api/v1/status")
    if status != 200:
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def worker_rows(status: Mapping[str, Any], domain: str) -> dict[str, dict[str, Any]]:
    """The rows of ``domain`` in a broker status, by worker name."""
    rows = status.get("domains", {}).get(domain, {}).get("workers", [])
    return {row["name"]: row for row in rows if isinstance(row, dict) and "name" in row}


class Lab:
    """One lab; nothing happens until :meth:`up`."""

    def __init__(
        self,
        lab_id: str = "demo",
        *,
        gateways: Mapping[str, int] | None = None,
        domain: str = DOMAIN,
        prefixes: list[str] | None = None,
        vni: int = VNI,
        keepalive: int = 5,
        metrics_interval: float = 60.0,
        base: str | None = None,
        broker_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not lab_id.replace("-", "").isalnum() or len(lab_id) > 12:
            raise LabError(f"lab id {lab_id!r} must be at most 12 letters, digits or '-'")
        self.id = lab_id
        self.weights = dict(gateways or {"gw1": 1})
        self.domain = domain
        self.prefixes = list(prefixes or PREFIXES)
        self.vni = vni
        self.keepalive = keepalive
        self.metrics_interval = metrics_interval
        #: The broker config's ``broker`` section (e.g. rate limits lifted for a benchmark).
        self.broker_settings = dict(broker_settings or {})
        self.directory = os.path.join(base or base_dir(), lab_id)
        self.ledger = Ledger(self.directory)
        self.lan: Namespace | None = None
        self.mosquitto: Mosquitto | None = None
        self.broker: Proc | None = None
        self.broker_port = 0
        self.broker_argv: list[str] = []
        self.gateways: dict[str, Gateway] = {}
        self.routers: dict[str, Router] = {}

    @classmethod
    def for_test(cls, **kwargs: Any) -> Lab:
        """A lab with a random id, so tests run in parallel with each other and the demo."""
        return cls("t" + secrets.token_hex(3), **kwargs)

    @property
    def broker_url(self) -> str:
        return f"http://127.0.0.1:{self.broker_port}"

    @property
    def mqtt_socket(self) -> str:
        return os.path.join(self.directory, "mqtt.sock")

    # -- up ----------------------------------------------------------------------------------

    def is_up(self) -> bool:
        """True when a recorded lab with this id runs completely (every process, every namespace)."""
        if not self.ledger.exists or not self.ledger.info.get("complete"):
            return False
        return all(p.is_ours() for p in self.ledger.procs()) and all(n.exists() for n in self.ledger.namespaces())

    def up(self, timeout: float = 30.0) -> None:
        """Start everything and wait until the broker sees every gateway eligible for the domain.

        A broken leftover of the same id is removed first. Call on a fresh
        object; to keep a running lab, check :meth:`is_up` first (the CLI does).
        """
        if self.ledger.exists:
            self.down()
        os.makedirs(self.directory, exist_ok=True)
        self.ledger.save()
        try:
            self._up(timeout)
        except BaseException:
            self.down()
            raise

    def _up(self, timeout: float) -> None:
        # /run/wireguard is only a mount point here (each daemon mounts a private
        # tmpfs on it). It is left in place on down: removing a directory that is a
        # mount point in another mount namespace would detach that daemon's sockets.
        ensure_socket_dir()
        self.lan = self.ledger.add_netns(Namespace.create(f"wgkex-{self.id}-lan"))
        add_bridge(self.lan, BRIDGE)

        # Saved every second, as a default mosquitto with persistence saves now and then (see
        # wgkex.lab.mosquitto): what a SIGKILL loses since, the broker publishes again for the
        # worker (broker.replay_window); the fault tests SIGKILL it.
        self.mosquitto = Mosquitto(os.path.join(self.directory, "mqtt"), unix_socket=self.mqtt_socket)
        self.ledger.add_proc(self.mosquitto.start())

        self.broker_port = free_port()
        settings = broker_config(domains=[self.domain], prefixes=self.prefixes, weights=self.weights,
                                 mqtt_port=self.mosquitto.port, listen_port=self.broker_port,
                                 keepalive=self.keepalive)
        # The lab's own spool directory, so that no other broker replays its keys (or it theirs).
        settings["broker"] = {"state_dir": os.path.join(self.directory, "broker-state"), **self.broker_settings}
        config = write_config(os.path.join(self.directory, "broker.yaml"), settings)
        self.broker_argv = [twistd(), "-n", "--pidfile=", "wgkex-broker", "--config", config]
        self.start_broker()

        for index, name in enumerate(self.weights, start=1):
            gw = Gateway.create(
                ledger=self.ledger, lab_id=self.id, name=name, index=index, lan=self.lan,
                domain=self.domain, prefixes=self.prefixes, mqtt_socket=self.mqtt_socket,
                vni=self.vni, keepalive=self.keepalive, metrics_interval=self.metrics_interval,
                directory=os.path.join(self.directory, name),
            )
            self.gateways[name] = gw
            gw.start_worker()

        self.wait_broker_ready(timeout)
        self.wait_eligible(list(self.gateways), timeout)
        self.ledger.set_info("broker_url", self.broker_url)
        self.ledger.set_info("mqtt", {"port": self.mosquitto.port, "socket": self.mqtt_socket})
        self.ledger.set_info("domain", self.domain)
        self.ledger.set_info("gateways", {n: {**g.info(), "weight": self.weights[n]} for n, g in self.gateways.items()})
        self.ledger.set_info("complete", True)

    def start_broker(self) -> Proc:
        """Start ``twistd -n wgkex-broker`` in the root namespace (no-op while it runs)."""
        if self.broker is not None and self.broker.is_ours():
            return self.broker
        self.broker = self.ledger.add_proc(
            spawn("broker", self.broker_argv, os.path.join(self.directory, "broker.log"))
        )
        return self.broker

    def stop_broker(self, sig: int = signal.SIGTERM) -> None:
        broker, self.broker = self.broker, None
        if broker is not None:
            broker.stop(sig=sig)
            self.ledger.forget_proc(broker)

    def restart_mosquitto(self) -> None:
        """Stop mosquitto (SIGTERM) and start it again on the same port and socket."""
        if self.mosquitto is None:
            raise LabError("the lab is not up")
        old = self.mosquitto.proc
        self.mosquitto.stop()
        if old is not None:
            self.ledger.forget_proc(old)
        self.ledger.add_proc(self.mosquitto.start())

    def mqtt_logins(self, client_id: str) -> int:
        """How often ``client_id`` logged in to mosquitto since the lab started (from its log)."""
        if self.mosquitto is None:
            return 0
        try:
            with open(self.mosquitto.log_path, errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return 0
        return sum(1 for m in re.finditer(r"New client connected from \S+ as (\S+) \(", text)
                   if m.group(1) == client_id)

    # -- routers -------------------------------------------------------------------------------

    def add_router(self, name: str | None = None) -> Router:
        """A new router namespace on the LAN (not yet registered)."""
        if self.lan is None:
            raise LabError("the lab is not up")
        index = len(self.routers) + 1
        name = name or f"node{index}"
        router = Router.create(ledger=self.ledger, lab_id=self.id, name=name, index=index, lan=self.lan,
                               vni=self.vni, directory=os.path.join(self.directory, name))
        self.routers[name] = router
        return router

    def gateway_for(self, reg: Registration) -> Gateway:
        """The gateway whose public key the broker handed out."""
        for gw in self.gateways.values():
            if gw.public_key == reg.public_key:
                return gw
        raise LabError(f"the broker named gateway key {reg.public_key}, which is none of this lab's")

    def wait_installed(self, gw: Gateway, public_key: str, timeout: float = 10.0) -> float:
        """Wait until ``gw``'s worker installed peer, route and FDB entry for ``public_key``; seconds."""
        start = time.monotonic()
        wait_until(lambda: gw.has_router(public_key), timeout,
                   f"worker {gw.name} to install peer, route and FDB entry for {public_key}", interval=0.05)
        return time.monotonic() - start

    def connect_router(self, router: Router, timeout: float = 10.0) -> Registration:
        """The whole router flow: register, wait for the gateway, connect, HTTP check 200."""
        reg = router.register(self.broker_url, self.domain)
        self.wait_installed(self.gateway_for(reg), router.public_key, timeout)
        router.connect(reg)
        result = router.http_check(timeout)
        if result.get("status") != 200:
            raise LabError(f"router {router.name}: connectivity check {result}")
        return reg

    # -- the broker's view ----------------------------------------------------------------

    def broker_status(self) -> dict[str, Any]:
        """``GET /api/v1/status`` of the broker ({} when it does not answer)."""
        return broker_status(self.broker_url)

    def worker_rows(self) -> dict[str, dict[str, Any]]:
        """The broker's rows for the lab's domain, by worker name."""
        return worker_rows(self.broker_status(), self.domain)

    def wait_broker_ready(self, timeout: float = 15.0) -> None:
        """Until ``/readyz`` answers 200 (the broker is connected to MQTT)."""
        def ready() -> bool:
            if self.broker is not None and not self.broker.is_ours():
                raise LabError(f"the broker exited:\n{self.broker.log_tail()}")
            return http_get(self.broker_url + "/readyz")[0] == 200
        wait_until(ready, timeout, f"the broker on {self.broker_url} to be ready", interval=0.05)

    def wait_eligible(self, names: list[str], timeout: float = 15.0, eligible: bool = True) -> float:
        """Until the broker counts each of ``names`` as eligible (or not) for v2; seconds waited."""
        start = time.monotonic()

        def check() -> bool:
            for gw in self.gateways.values():
                if gw.worker is not None and not gw.worker.is_ours():
                    raise LabError(f"worker {gw.name} exited:\n{gw.worker.log_tail()}")
            rows = self.worker_rows()
            return all(bool(rows.get(n, {}).get("eligible")) == eligible for n in names)

        state = "eligible" if eligible else "no longer eligible"
        try:
            wait_until(check, timeout, f"the broker to see {', '.join(names)} {state}", interval=0.05)
        except LabError as exc:
            tails = [f"--- {p.name} ({p.log}):\n{p.log_tail(10)}" for p in self.ledger.procs()
                     if p.name == "broker" or p.name.startswith("worker")]
            raise LabError(f"{exc}; broker's view: {self.worker_rows()}\n" + "\n".join(tails)) from None
        return time.monotonic() - start

    # -- down / status ----------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything this lab recorded; returns what could not be removed."""
        problems = self.ledger.teardown()
        base = os.path.dirname(self.directory)
        if not problems and not _other_labs(base):
            try:
                os.rmdir(base)  # only if empty
            except OSError:
                pass
        self.gateways.clear()
        self.routers.clear()
        self.broker = None
        self.mosquitto = None
        self.lan = None
        return problems

    def status(self) -> dict[str, Any]:
        """What runs, from the state file (works from another process than the one that ran ``up``)."""
        if not self.ledger.exists:
            return {"id": self.id, "up": False, "state_dir": self.directory}
        info = dict(self.ledger.info)
        procs = [{"name": p.name, "pid": p.pid, "running": p.is_ours(), "log": p.log} for p in self.ledger.procs()]
        nss = [{"name": n.name, "exists": n.exists()} for n in self.ledger.namespaces()]
        url = info.get("broker_url")
        return {
            "id": self.id,
            "up": self.is_up(),
            "state_dir": self.directory,
            "processes": procs,
            "namespaces": nss,
            "info": info,
            "broker_status": _fetch_json(url + "/api/v1/status") if url else None,
        }


def _fetch_json(url: str) -> Any:
    status, body = http_get(url)
    if status != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _other_labs(base: str) -> bool:
    """True when another lab has a state directory under ``base``."""
    try:
        return any(os.path.exists(os.path.join(base, d, "state.json")) for d in os.listdir(base))
    except FileNotFoundError:
        return False


def leftover_namespaces(lab_id: str) -> list[str]:
    """Namespaces named like this lab's (e.g. after a state directory was deleted by hand)."""
    return namespaces(f"wgkex-{lab_id}-")
