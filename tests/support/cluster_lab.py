"""wgkex on a RabbitMQ cluster: nodes, brokers and gateways as real processes on one machine.

::

    root namespace     RabbitMQ nodes a, b, c   MQTT on 127.0.0.1:<port each>   (tests/support/rabbitmq.py)
                       broker 1: mqtt.servers a, b, c    broker 2: b, c, a       127.0.0.1:<port each>
    wgkex-<id>-lan     bridge joining the gateways
    wgkex-<id>-gw1     wg-welt (wireguard-go), vx-welt, worker: mqtt.servers a, b, c
    wgkex-<id>-gw2     ... worker: mqtt.servers b, c, a
                       + a relay per gateway: 127.0.0.1:<node port> inside -> the node outside

Each broker and each worker is pointed at a different node first, so that
killing any node moves some of them to another node. Workers reach the nodes
through :mod:`tests.support.netns_relay` (RabbitMQ has no unix socket to share
with the namespaces); a dead node closes the worker's connection there, as a
dead server would.

::

    lab = ClusterLab(gateways=("gw1", "gw2"), metrics_interval=5)
    try:
        lab.up()
        lab.brokers[0].url          # POST v2 here
        lab.cluster.nodes[0].kill()
        lab.installed_keys(lab.gateways["gw1"])
    finally:
        lab.down()
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tests.support import netns_relay
from tests.support.rabbitmq import RabbitCluster
from wgkex.keys import lladdr
from wgkex.lab.configs import broker_config, write_config
from wgkex.lab.gateway import BRIDGE, Gateway, twistd
from wgkex.lab.lab import DOMAIN, PREFIXES, VNI, broker_status, worker_rows
from wgkex.lab.mosquitto import free_port
from wgkex.lab.netns import NETNS_DIR, Namespace, add_bridge
from wgkex.lab.proc import LabError, Proc, spawn, wait_until
from wgkex.lab.state import Ledger

#: Short keepalive and backoff: a lost server is noticed and left within seconds.
KEEPALIVE = 3
RECONNECT_MAX_DELAY = 1.0


def rotate(items: Sequence[Any], start: int) -> list[Any]:
    """``items`` starting at index ``start`` (wrapping round)."""
    n = len(items)
    return [items[(start + i) % n] for i in range(n)]


@dataclass
class BrokerProc:
    """One ``twistd -n wgkex-broker`` of the lab."""

    name: str
    port: int
    argv: list[str]
    log: str
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        """``/api/v1/status`` ({} when it does not answer)."""
        return broker_status(self.url)


class ClusterLab:
    """A RabbitMQ cluster, brokers and gateways; nothing runs before :meth:`up`."""

    def __init__(
        self,
        *,
        gateways: Sequence[str] = ("gw1", "gw2"),
        brokers: int = 2,
        nodes: int = 3,
        metrics_interval: float = 5.0,
        mirror: bool = True,
        directory: str | None = None,
        rabbitmq: dict[str, Any] | None = None,
    ) -> None:
        self.id = "c" + secrets.token_hex(3)
        self.directory = directory or tempfile.mkdtemp(prefix=f"wgkex-{self.id}-")
        self.ledger = Ledger(os.path.join(self.directory, "lab"))
        self.cluster = RabbitCluster(os.path.join(self.directory, "rabbitmq"), size=nodes, mirror=mirror,
                                    **(rabbitmq or {}))
        self.gateway_names = list(gateways)
        self.broker_count = brokers
        self.metrics_interval = metrics_interval
        self.domain = DOMAIN
        self.gateways: dict[str, Gateway] = {}
        self.brokers: list[BrokerProc] = []
        self.relays: dict[str, Proc] = {}

    # -- configuration ----------------------------------------------------------------------

    def servers(self, first: int) -> list[dict[str, Any]]:
        """``mqtt.servers`` starting with node ``first`` (then the others, in order)."""
        return [{"host": n.host, "port": n.mqtt_port} for n in rotate(self.cluster.nodes, first)]

    def mqtt_section(self, first: int) -> dict[str, Any]:
        servers = self.servers(first)
        return {"broker_url": servers[0]["host"], "broker_port": servers[0]["port"], "servers": servers,
                "keepalive": KEEPALIVE, "reconnect_max_delay": RECONNECT_MAX_DELAY}

    # -- up / down ----------------------------------------------------------------------------

    def up(self, timeout: float = 300.0, picture_timeout: float = 60.0) -> float:
        """Start everything; returns seconds taken. Ready when every broker sees every gateway eligible.

        ``timeout`` bounds the start of the processes (RabbitMQ takes most of it),
        ``picture_timeout`` then the wait for the brokers' picture.
        """
        began = time.monotonic()
        deadline = began + timeout
        os.makedirs(self.directory, exist_ok=True)
        self.ledger.save()
        self.cluster.start(timeout=max(1.0, deadline - time.monotonic()))
        lan = self.ledger.add_netns(Namespace.create(f"wgkex-{self.id}-lan"))
        add_bridge(lan, BRIDGE)
        for index, name in enumerate(self.gateway_names, start=1):
            gw = Gateway.create(
                ledger=self.ledger, lab_id=self.id, name=name, index=index, lan=lan, domain=self.domain,
                prefixes=PREFIXES, mqtt_socket=os.devnull, vni=VNI, keepalive=KEEPALIVE,
                metrics_interval=self.metrics_interval, directory=os.path.join(self.directory, name),
                mqtt=self.mqtt_section(index - 1),
            )
            self.gateways[name] = gw
            self.start_relay(gw)
            gw.start_worker()
        # The brokers start after the workers: on RabbitMQ they get none of the workers'
        # retained messages and must learn of them from the repeated reports.
        for index in range(self.broker_count):
            port = free_port()
            config = broker_config(domains=[self.domain], prefixes=PREFIXES,
                                   weights={n: 1 for n in self.gateway_names}, mqtt_port=1883, listen_port=port)
            config["mqtt"] = self.mqtt_section(index)
            # Each broker its own spool (the default /var/lib/wgkex would be shared, and a
            # segment left by one test's killed broker replayed by the next test's).
            config["broker"] = {"rate_limit": 1_000_000, "rate_burst": 1_000_000,
                                "state_dir": os.path.join(self.directory, f"broker{index + 1}-state")}
            path = write_config(os.path.join(self.directory, f"broker{index + 1}.yaml"), config)
            broker = BrokerProc(f"broker{index + 1}", port,
                                [twistd(), "-n", "--pidfile=", "wgkex-broker", "--config", path],
                                os.path.join(self.directory, f"broker{index + 1}.log"))
            self.brokers.append(broker)
            self.start_broker(broker)
        self.wait_picture(picture_timeout)
        return time.monotonic() - began

    def start_relay(self, gw: Gateway) -> Proc:
        """The gateway's relay: 127.0.0.1:<node port> inside its namespace to each node."""
        specs = [f"{n.mqtt_port}:{n.host}:{n.mqtt_port}" for n in self.cluster.nodes]
        log = os.path.join(gw.directory, "relay.log")
        proc = self.ledger.add_proc(spawn(f"relay {gw.name}", [sys.executable, netns_relay.__file__,
                                                                os.path.join(NETNS_DIR, gw.ns.name), *specs], log))
        self.relays[gw.name] = proc

        def ready() -> bool:
            if not proc.is_ours():
                raise LabError(f"the relay of {gw.name} exited:\n{proc.log_tail()}")
            with open(log) as f:
                return "ready" in f.read()

        wait_until(ready, 30.0, f"the relay into {gw.ns.name}", 0.05)
        return proc

    def start_broker(self, broker: BrokerProc) -> Proc:
        if broker.proc is not None and broker.proc.is_ours():
            return broker.proc
        broker.proc = self.ledger.add_proc(spawn(broker.name, broker.argv, broker.log))
        return broker.proc

    def stop_broker(self, broker: BrokerProc, sig: int = signal.SIGTERM) -> None:
        proc, broker.proc = broker.proc, None
        if proc is not None:
            proc.stop(sig=sig)
            self.ledger.forget_proc(proc)

    def down(self) -> list[str]:
        """Stop every process, remove namespaces and the directory; returns what could not be removed."""
        problems = self.ledger.teardown()
        self.cluster.stop()
        if not problems:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.gateways.clear()
        self.brokers.clear()
        return problems

    # -- what the brokers see ---------------------------------------------------------------

    def picture_complete(self, since: float | None = None) -> bool:
        """Every broker is connected and sees every gateway eligible (heard of after ``since``)."""
        for broker in self.brokers:
            if broker.proc is not None and not broker.proc.is_ours():
                raise LabError(f"{broker.name} exited:\n{broker.proc.log_tail()}")
            status = broker.status()
            if not status.get("mqtt", {}).get("connected"):
                return False
            rows = worker_rows(status, self.domain)
            for name in self.gateway_names:
                row = rows.get(name)
                if row is None or not row.get("eligible"):
                    return False
                if since is not None and (row.get("last_seen") or 0) < since:
                    return False
        for gw in self.gateways.values():
            if gw.worker is not None and not gw.worker.is_ours():
                raise LabError(f"worker {gw.name} exited:\n{gw.worker.log_tail()}")
        return True

    def wait_picture(self, timeout: float, since: float | None = None) -> float:
        """Until :meth:`picture_complete`; seconds waited."""
        began = time.monotonic()
        try:
            wait_until(lambda: self.picture_complete(since), timeout, "every broker to see every gateway", 0.1)
        except LabError as exc:
            tails = "\n".join(f"--- {p.name}:\n{p.log_tail(15)}" for p in self.ledger.procs())
            raise LabError(f"{exc}\n{tails}") from None
        return time.monotonic() - began

    # -- what the gateways did ----------------------------------------------------------------

    def gateway_by_key(self) -> dict[str, str]:
        """Gateway name by its public key (what v2 answers name)."""
        return {gw.public_key: name for name, gw in self.gateways.items()}


def installed_keys(gw: Gateway) -> set[str]:
    """Keys that are a peer (allowed IP lladdr/128), a /128 route and an FDB entry on ``gw``."""
    routes = {ipaddress.ip_network(r) for r in gw.routes()}
    fdb = {ipaddress.ip_address(e["dst"]) for e in gw.fdb()
           if e.get("mac") == "00:00:00:00:00:00" and "dst" in e}
    out = set()
    for key, peer in gw.peers().items():
        ll = ipaddress.ip_address(lladdr(key))
        host = ipaddress.ip_network(f"{ll}/128")
        if host in {ipaddress.ip_network(a) for a in peer.allowed_ips} and host in routes and ll in fdb:
            out.add(key)
    return out
