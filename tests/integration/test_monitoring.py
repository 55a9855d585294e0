"""contrib/grafana/wgkex.json and contrib/prometheus/wgkex-alerts.yml, checked with the real tools.

``promtool check rules`` (Debian's prometheus package; ``make test`` extracts
just promtool into ``.cache/``) validates the rules, ``promtool test rules``
runs their unit tests (``tests/prometheus/``), and every metric the dashboard
and the rules name must be exported by a running broker or worker (real
``twistd`` processes, their ``/metrics`` read over HTTP).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import yaml

from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_process import BrokerProcess
from tests.support.mosquitto import free_port, wait_for
from wgkex.lab.proc import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RULES = os.path.join(ROOT, "contrib", "prometheus", "wgkex-alerts.yml")
RULE_TESTS = os.path.join(ROOT, "tests", "prometheus", "wgkex-alerts-test.yml")
DASHBOARD = os.path.join(ROOT, "contrib", "grafana", "wgkex.json")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

METRIC = re.compile(r"\bwgkex_[a-z0-9_]+\b")


def promtool() -> str | None:
    return os.environ.get("PROMTOOL") or shutil.which("promtool") or (
        os.path.join(ROOT, ".cache", "promtool", "promtool")
        if os.access(os.path.join(ROOT, ".cache", "promtool", "promtool"), os.X_OK) else None)


def need_promtool() -> str | None:
    if promtool() is None:
        return ("needs promtool: `make test` extracts it from Debian's prometheus package into .cache/promtool "
                "(apt-get download prometheus); or set PROMTOOL")
    return None


def dashboard_exprs() -> list[str]:
    with open(DASHBOARD) as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def rule_exprs() -> list[str]:
    # The expressions, not the comments or annotations (which name metrics for people to look at).
    with open(RULES) as f:
        rules = yaml.safe_load(f)
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def exported_names(exposition: str) -> set[str]:
    """Series names a Prometheus scrape of this text would store (histograms: _bucket, _sum, _count)."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names.update({name + "_bucket", name + "_sum", name + "_count"})
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


class RulesTests(SynchronousTestCase):
    skip = need_promtool()

    def run_promtool(self, *args: str) -> str:
        tool = promtool()
        assert tool is not None
        proc = subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        return proc.stdout + proc.stderr

    def test_check_rules(self) -> None:
        """promtool check rules accepts the alert rules, all of them."""
        out = self.run_promtool("check", "rules", RULES)
        self.assertIn(f"SUCCESS: {len(rule_exprs())} rules found", out)

    def test_rule_unit_tests(self) -> None:
        """The alerts fire on the series they are meant for and stay quiet otherwise (promtool test rules)."""
        self.assertIn("SUCCESS", self.run_promtool("test", "rules", RULE_TESTS))

    def test_required_alerts_exist(self) -> None:
        """Worker offline, MQTT disconnected, keys not installed, outbox filling and 5xx are covered."""
        with open(RULES) as f:
            text = f.read()
        for alert in ("WgkexGatewayOffline", "WgkexBrokerMqttDisconnected", "WgkexWorkerMqttDisconnected",
                      "WgkexKeysNotInstalled", "WgkexBrokerQueueFilling", "WgkexBroker5xx"):
            self.assertIn(f"alert: {alert}\n", text)


class DashboardTests(SynchronousTestCase):
    def test_dashboard_shape(self) -> None:
        """The dashboard is importable JSON: unique panel ids, every query on the chosen Prometheus."""
        with open(DASHBOARD) as f:
            dash = json.load(f)
        ids = [p["id"] for p in dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        self.assertEqual(dash["uid"], "wgkex")
        variables = {v["name"] for v in dash["templating"]["list"]}
        self.assertLessEqual({"datasource", "broker_job", "worker_job", "domain"}, variables)
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                self.assertEqual(target["datasource"]["uid"], "${datasource}", panel["title"])
        topics = " ".join(p["title"].lower() for p in dash["panels"])
        for topic in ("registrations", "latency", "mqtt", "queue", "peers", "applied", "failures", "sweeps"):
            self.assertIn(topic, topics)


class ExportedTests(SynchronousTestCase):
    def test_every_named_metric_is_exported(self) -> None:
        """Each metric the dashboard and the rules query is served by a running broker or worker."""
        broker = BrokerProcess(self, free_port())  # MQTT down: every metric is there all the same
        code, body = broker.get("/metrics")
        self.assertEqual(code, 200)
        names = exported_names(body.decode())
        names |= exported_names(self.worker_metrics())
        wanted = {m for expr in dashboard_exprs() + rule_exprs() for m in METRIC.findall(expr)}
        self.assertGreater(len(wanted), 20)
        self.assertEqual(sorted(wanted - names), [])

    def worker_metrics(self) -> str:
        """/metrics of a real ``twistd -n wgkex-worker`` (no interfaces, no MQTT server: it serves anyway)."""
        scratch = tempfile.mkdtemp(prefix="wgkex-mon-")
        self.addCleanup(shutil.rmtree, scratch, True)
        port = free_port()
        config = os.path.join(scratch, "wgkex.yaml")
        with open(config, "w") as f:
            f.write(
                "domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\nworker_name: gw-mon\n"
                "externalName: gw-mon.example.org\nconnectivity_check: false\n"
                f"wireguard_backend: uapi\nuapi_socket_dir: {scratch}\nworker_listen: 127.0.0.1:{port}\n"
                f"mqtt: {{broker_url: 127.0.0.1, broker_port: {free_port()}}}\n"
            )
        proc = spawn("wgkex-worker", [TWISTD, "-n", "--pidfile=", "wgkex-worker", "--config", config],
                     os.path.join(scratch, "worker.log"))
        self.addCleanup(proc.stop, 15.0)

        def scrape() -> str | None:
            if not proc.alive:
                raise AssertionError(f"worker exited with {proc.exit_status()}: {proc.log_tail(40)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text: str = r.read().decode()
                    return text
            except OSError:
                return None

        return wait_for(scrape, 30, interval=0.2, what="the worker's /metrics")
