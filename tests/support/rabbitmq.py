"""A real RabbitMQ cluster with the MQTT plugin, on free 127.0.0.1 ports under one directory.

Debian's ``rabbitmq-server`` (3.10) is started from ``/usr/lib/rabbitmq/bin``
as the current user (root in tests), with everything a node would otherwise
take from the system in the cluster's directory: its own ``epmd`` on a free
port (``ERL_EPMD_PORT``), a shared Erlang cookie (``$HOME/.erlang.cookie``),
per node a name (``wgkex-<id>-<letter>@localhost``), AMQP, distribution and
MQTT ports, a config file, an ``enabled_plugins`` file (``[rabbitmq_mqtt].``:
enabled offline, no ``rabbitmq-plugins`` call), data and log directories. So
several clusters, the system's own RabbitMQ and other tests never meet.

::

    cluster = RabbitCluster(tempdir, size=3)
    cluster.start()                 # boots every node, joins them, sets the policy
    cluster.nodes[0].mqtt_port      # where MQTT clients connect
    cluster.nodes[1].kill()         # SIGKILL: no clean shutdown
    cluster.restart(cluster.nodes[1])   # rejoins from its data, serves MQTT again
    cluster.cleanup()               # stops every node and epmd, removes the directory

Facts this harness is built on (verified with Debian's 3.10.8 here; see the
"Scaling out" section of the README):

* ``rabbitmq-server`` is a shell script that runs ``erl`` in the background
  and waits, so a signal would hit the script only; ``RABBITMQ_ALLOW_INPUT``
  makes it ``exec`` erl (the PID we hold is ``beam.smp``) and ``-noinput`` in
  the extra arguments keeps the Erlang shell off.
* Nodes join with ``rabbitmqctl stop_app``, ``join_cluster``, ``start_app``
  (``join="cli"``) or, cheaper, by peer discovery from a fixed list as they
  boot (the default here); a node restarted from its data directory rejoins by
  itself.
* The MQTT plugin tracks client ids in a Raft cluster of all nodes and
  documents that it needs a majority. With two nodes the survivor still
  accepts connections, but a killed node started again stalls about 100 s in
  the plugin's start (asking the leaderless survivor for the Raft members)
  before it serves MQTT; with three nodes the survivors keep a Raft leader and
  a restarted node does not wait for one. ``wait_ready`` connects over MQTT.
* An MQTT persistent session's queue (``mqtt-subscription-<client id>qos1``)
  is a classic queue on the node the client first connected to; the policy
  :data:`MIRROR_POLICY` mirrors it to a second node so it survives the loss
  of either (``ha-mode: exactly``, 2 copies; when one dies RabbitMQ makes a
  new mirror on a remaining node and syncs it). A copy on every node of three
  cost the herd about a third more RabbitMQ CPU (each key goes to every
  worker's queue, and every copy of it is work).
* The plugin sends a subscriber at most ``mqtt.prefetch`` unacknowledged
  messages (default 10). The worker acknowledges a key once installed, so 10
  capped its batches; :data:`MQTT_PREFETCH` (1000, the broker's publish window)
  lets it take the keys of a herd in large batches. A key delivered but not
  acknowledged when a node dies is delivered again, so nothing is lost.
* Erlang's schedulers busy-wait for work before they sleep by default, but
  RabbitMQ's start script already turns that off (``+sbwt none +sbwtdcpu none
  +sbwtdio none`` from ``RABBITMQ_SCHEDULER_BUSY_WAIT_THRESHOLD=none`` in
  ``sbin/rabbitmq-env``; seen in ``beam.smp``'s command line): nothing to add.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

from tests.support.mqtt_probe import mqtt_connack
from wgkex.lab.mosquitto import free_port
from wgkex.lab.proc import LabError, Proc, spawn, wait_until

RABBIT_BIN = "/usr/lib/rabbitmq/bin"
EPMD = shutil.which("epmd") or "/usr/bin/epmd"
#: The policy that mirrors MQTT sessions' queues to two nodes (classic mirroring, RabbitMQ 3.x).
MIRROR_POLICY = {
    "name": "wgkex-mqtt-sessions",
    "pattern": "^mqtt-subscription-",
    "definition": {"ha-mode": "exactly", "ha-params": 2, "ha-sync-mode": "automatic"},
    "apply-to": "queues",
}
#: ``mqtt.prefetch``: keys in flight to a worker (see :meth:`RabbitNode.write_files`).
MQTT_PREFETCH = 1000


def have_rabbitmq() -> bool:
    """True when Debian's rabbitmq-server and Erlang's epmd are installed."""
    return os.path.exists(os.path.join(RABBIT_BIN, "rabbitmq-server")) and os.path.exists(EPMD)


class RabbitNode:
    """One node of a :class:`RabbitCluster` (ports fixed at construction, so restarts keep them)."""

    def __init__(self, cluster: RabbitCluster, letter: str) -> None:
        self.cluster = cluster
        self.letter = letter
        self.short = f"wgkex-{cluster.id}-{letter}"
        self.nodename = f"{self.short}@localhost"
        self.host = "127.0.0.1"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.mqtt_port = free_port()
        self.directory = os.path.join(cluster.directory, letter)
        self.config_path = os.path.join(self.directory, "rabbitmq.conf")
        self.plugins_path = os.path.join(self.directory, "enabled_plugins")
        self.log_dir = os.path.join(self.directory, "log")
        self.out_path = os.path.join(self.directory, "stdout.log")
        self.proc: Proc | None = None

    @property
    def log_path(self) -> str:
        """RabbitMQ's own log file of this node."""
        return os.path.join(self.log_dir, f"{self.nodename}.log")

    def env(self) -> dict[str, str]:
        """The environment of this node's server and of CLI calls addressed to it."""
        env = self.cluster.env()
        env.update(
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(self.directory, "mnesia"),
            RABBITMQ_LOG_BASE=self.log_dir,
            RABBITMQ_CONFIG_FILE=self.config_path,
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.directory, "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=self.plugins_path,
            RABBITMQ_PID_FILE=os.path.join(self.directory, "rabbitmq.pid"),
            RABBITMQ_ALLOW_INPUT="1",
            # -noinput: no Erlang shell; distribution only on the loopback address.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=" ".join(
                ["-noinput -kernel inet_dist_use_interface {127,0,0,1}", *self.cluster.erl_args]),
        )
        return env

    def write_files(self, seed: RabbitNode | None = None) -> None:
        """Config and plugins files; with ``seed``, a fresh node joins ``seed``'s cluster as it boots."""
        os.makedirs(self.log_dir, exist_ok=True)
        lines = [
            "# written by tests/support/rabbitmq.py",
            f"listeners.tcp.default = {self.host}:{self.amqp_port}",
            f"mqtt.listeners.tcp.default = {self.host}:{self.mqtt_port}",
            "mqtt.allow_anonymous = true",
            # Unacknowledged messages the server sends one subscriber (default 10). The worker
            # acknowledges a key once it is installed and installs keys in batches: with 10 it
            # got batches of at most 10 and the herd took 56 s instead of 22 s.
            f"mqtt.prefetch = {MQTT_PREFETCH}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            # A test's data directory is small and temporary: no free-disk alarm.
            "disk_free_limit.absolute = 1MB",
            *self.cluster.settings,
        ]
        if seed is not None:
            # Peer discovery from a fixed list: what `rabbitmqctl join_cluster` does, without
            # three more Erlang VMs per node (stop_app, join_cluster, start_app) at start.
            lines += [
                "cluster_formation.peer_discovery_backend = classic_config",
                f"cluster_formation.classic_config.nodes.1 = {seed.nodename}",
            ]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(self.plugins_path, "w") as f:
            f.write("[rabbitmq_mqtt].\n")

    # -- process --------------------------------------------------------------------------------

    def start(self, seed: RabbitNode | None = None) -> Proc:
        """Start the node (no wait; see :meth:`wait_ready`). A no-op while it runs.

        A node with no data yet joins ``seed``'s cluster while it boots; a node with
        data rejoins the cluster it was in.
        """
        if self.proc is not None and self.proc.is_ours():
            return self.proc
        self.write_files(seed)
        self.proc = spawn(
            f"rabbitmq {self.short}",
            [os.path.join(RABBIT_BIN, "rabbitmq-server")],
            self.out_path,
            env=self.env(),
        )
        return self.proc

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.is_ours()

    def mqtt_ready(self) -> bool:
        """True when this node accepts an MQTT connection (CONNACK 0)."""
        return mqtt_connack(self.host, self.mqtt_port) == 0

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait until the node accepts MQTT connections; seconds waited."""
        start = time.monotonic()

        def ready() -> bool:
            if not self.running:
                raise LabError(f"rabbitmq node {self.nodename} exited:\n{self.log_tail()}")
            return self.mqtt_ready()

        wait_until(ready, timeout, f"rabbitmq node {self.nodename} to accept MQTT on port {self.mqtt_port}", 0.2)
        return time.monotonic() - start

    def kill(self) -> None:
        """SIGKILL the node and wait until it is gone (its sockets close at once)."""
        if self.proc is not None:
            self.proc.send(signal.SIGKILL)
            self.proc.wait_gone(30.0)
        self.proc = None

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (SIGTERM: Erlang's init:stop), SIGKILL after ``timeout``."""
        if self.proc is not None:
            self.proc.stop(timeout=timeout)
        self.proc = None

    # -- CLI ----------------------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 120.0) -> str:
        """``rabbitmqctl -n <this node> ARGS``; its stdout (LabError naming the call on failure)."""
        return self.cluster.cli("rabbitmqctl", "-n", self.nodename, *args, timeout=timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the node's log (or its stdout when the log does not exist yet)."""
        for path in (self.log_path, self.out_path):
            try:
                with open(path, errors="replace") as f:
                    return "".join(f.readlines()[-lines:])
            except FileNotFoundError:
                continue
        return ""


class RabbitCluster:
    """``size`` RabbitMQ nodes with the MQTT plugin, clustered, with MQTT sessions mirrored.

    ``erl_args`` are added to every node's Erlang VM flags, ``settings`` (lines
    of ``rabbitmq.conf``) to its config, and ``policy`` replaces
    :data:`MIRROR_POLICY`: knobs for benchmarks comparing configurations.
    """

    def __init__(self, directory: str, size: int = 3, mirror: bool = True, *,
                 erl_args: Sequence[str] = (), settings: Sequence[str] = (),
                 policy: dict[str, object] | None = None) -> None:
        if not 1 <= size <= 26:
            raise ValueError("a cluster has 1 to 26 nodes")
        self.id = secrets.token_hex(3)
        self.directory = directory
        self.mirror = mirror
        self.erl_args = list(erl_args or ())
        self.settings = list(settings)
        self.policy = policy or MIRROR_POLICY
        self.home = os.path.join(directory, "home")
        self.epmd_port = free_port()
        self.epmd: Proc | None = None
        self.nodes = [RabbitNode(self, chr(ord("a") + i)) for i in range(size)]

    def env(self) -> dict[str, str]:
        """What every server and CLI call of this cluster shares: cookie, epmd, no system files."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=self.home,
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_CONF_ENV_FILE=os.devnull,
        )
        return env

    def cli(self, tool: str, *args: str, timeout: float = 120.0) -> str:
        """Run a RabbitMQ CLI tool with this cluster's environment."""
        argv = [os.path.join(RABBIT_BIN, tool), *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=self.env(), check=False)
        except subprocess.TimeoutExpired:
            raise LabError(f"{' '.join(argv)}: no answer within {timeout:g} s") from None
        if done.returncode != 0:
            raise LabError(f"{' '.join(argv)}: exit status {done.returncode}: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 180.0, join: str = "boot") -> float:
        """Boot the nodes, cluster them, set the policy; seconds taken.

        ``join="boot"``: the first node boots, then the others boot at once and join
        it as they boot (peer discovery from a fixed list). ``join="cli"``: every node
        boots alone, then ``rabbitmqctl stop_app``, ``join_cluster``, ``start_app``
        join the others to the first (three more Erlang VMs per node: slower).
        Ready means: every node is a running member and accepts MQTT.
        """
        began = time.monotonic()
        deadline = began + timeout
        os.makedirs(self.home, exist_ok=True)
        cookie = os.path.join(self.home, ".erlang.cookie")
        if not os.path.exists(cookie):
            fd = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(20).upper())
        self.start_epmd()
        first, others = self.nodes[0], self.nodes[1:]
        if join == "boot":
            first.start()
            first.wait_ready(max(1.0, deadline - time.monotonic()))
            for node in others:
                node.start(seed=first)
        else:
            for node in self.nodes:
                node.start()
        for node in self.nodes:
            node.wait_ready(max(1.0, deadline - time.monotonic()))
        if join == "cli":
            for node in others:
                node.ctl("stop_app")
                node.ctl("join_cluster", first.nodename)
                node.ctl("start_app")
            for node in others:
                node.wait_ready(max(1.0, deadline - time.monotonic()))
        if self.mirror:
            p = self.policy
            first.ctl("set_policy", "--apply-to", str(p["apply-to"]), str(p["name"]), str(p["pattern"]),
                      json.dumps(p["definition"]))
        self.check_members(self.nodes)
        return time.monotonic() - began

    def start_epmd(self) -> Proc:
        """This cluster's own Erlang port mapper on the loopback address (a no-op while it runs)."""
        if self.epmd is not None and self.epmd.is_ours():
            return self.epmd
        os.makedirs(self.directory, exist_ok=True)
        self.epmd = spawn("epmd", [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                          os.path.join(self.directory, "epmd.log"), env=self.env())

        def up() -> bool:
            if self.epmd is None or not self.epmd.is_ours():
                raise LabError("epmd exited; see " + os.path.join(self.directory, "epmd.log"))
            try:
                with socket.create_connection(("127.0.0.1", self.epmd_port), timeout=0.5):
                    return True
            except OSError:
                return False

        wait_until(up, 10.0, f"epmd on port {self.epmd_port}")
        return self.epmd

    def running_members(self, via: RabbitNode | None = None) -> list[str]:
        """Node names the cluster reports as running (asked through ``via``, else a running node)."""
        asked = via or next((n for n in self.nodes if n.running), None)
        if asked is None:
            return []
        out = asked.ctl("cluster_status", "--formatter", "json", "-q")
        return sorted(json.loads(out).get("running_nodes", []))

    def check_members(self, nodes: Sequence[RabbitNode]) -> None:
        """Raise :class:`LabError` unless exactly ``nodes`` run as members of one cluster."""
        want = sorted(n.nodename for n in nodes)
        have = self.running_members(nodes[0])
        if have != want:
            raise LabError(f"rabbitmq cluster members are {have}, expected {want}")

    def restart(self, node: RabbitNode, timeout: float = 120.0) -> float:
        """Start a stopped or killed ``node`` again; seconds until it is back in the cluster and serves MQTT."""
        began = time.monotonic()
        node.start()
        node.wait_ready(timeout)
        self.check_members([n for n in self.nodes if n.running])
        return time.monotonic() - began

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL), then epmd."""
        for node in self.nodes:
            if node.proc is not None:
                node.proc.send(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None and not node.proc.wait_gone(30.0):
                node.kill()
            node.proc = None
        if self.epmd is not None:
            self.epmd.stop()
            self.epmd = None

    def cleanup(self) -> None:
        """Stop everything and remove the directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def queues(self, via: RabbitNode | None = None) -> list[dict[str, object]]:
        """``list_queues`` (name, node, messages, mirrors) as dicts."""
        asked = via or next(n for n in self.nodes if n.running)
        out = asked.ctl("list_queues", "name", "messages", "type", "pid", "slave_pids",
                        "synchronised_slave_pids", "--formatter", "json", "-q")
        value = json.loads(out)
        return list(value) if isinstance(value, list) else []


__all__ = ["MIRROR_POLICY", "MQTT_PREFETCH", "RabbitCluster", "RabbitNode", "have_rabbitmq"]
