"""The command line as an operator meets it: twistd plugins, --config, one-line errors, pip install."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from twisted.trial.unittest import TestCase

from tests.support.mosquitto import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")


def run_twistd(*args: str, env: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str, str, float]:
    """Run twistd in a scratch directory; return exit status, stdout, stderr and seconds taken."""
    start = time.monotonic()
    scratch = tempfile.mkdtemp(prefix="wgkex-cli-")
    try:
        proc = subprocess.run(
            [TWISTD, "-n", *args],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start


class ConfigErrorExitTests(TestCase):
    def assertOneLineError(self, rc: int, out: str, err: str, *needles: str) -> None:
        self.assertNotEqual(rc, 0)
        text = (out + err).strip()
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertNotIn("Traceback", text)
        for needle in needles:
            self.assertIn(needle, text)

    def test_missing_config_broker(self) -> None:
        """twistd -n wgkex-broker --config <missing> exits non-zero within 10 s with one line naming the path."""
        rc, out, err, took = run_twistd("wgkex-broker", "--config", "/nonexistent/wgkex.yaml")
        self.assertOneLineError(rc, out, err, "/nonexistent/wgkex.yaml", "not found")
        self.assertLess(took, 10)

    def test_missing_config_worker_from_env(self) -> None:
        """The worker takes its path from $WGKEX_CONFIG_FILE when --config is absent."""
        rc, out, err, _ = run_twistd("wgkex-worker", env={"WGKEX_CONFIG_FILE": "/nonexistent/env.yaml"})
        self.assertOneLineError(rc, out, err, "/nonexistent/env.yaml")

    def test_bad_value_names_key(self) -> None:
        """A wrong value stops twistd with one line naming the file and the dotted key."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\nmqtt:\n  broker_port: many\n")
        rc, out, err, _ = run_twistd("wgkex-broker", "--config", path)
        self.assertOneLineError(rc, out, err, path, "mqtt.broker_port", "must be an integer")

    def test_yaml_syntax_error(self) -> None:
        """A YAML syntax error stops twistd with one line giving the position."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("domains: [ffmuc_welt\n")
        rc, out, err, _ = run_twistd("wgkex-worker", "--config", path)
        self.assertOneLineError(rc, out, err, path, "YAML syntax error")


class StartFailureTests(TestCase):
    """Problems that show only when the daemon starts end it like a bad file: exit 1, one line on stderr."""

    def start_with(self, text: str) -> tuple[str, str, str]:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\nmqtt: {broker_url: 127.0.0.1, broker_port: 1}\n"
                    + text)
        rc, out, err, took = run_twistd("--pidfile=", "wgkex-broker", "--config", path, timeout=30)
        self.assertEqual(rc, 1, out + err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertNotIn("Traceback", out + err)
        self.assertLess(took, 30)
        return path, err, out

    def test_listen_port_in_use(self) -> None:
        """broker_listen on a port another process holds: exit 1, one line naming file, key and problem."""
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            path, err, _ = self.start_with(f"broker_listen: {{host: 127.0.0.1, port: {port}}}\n")
        self.assertEqual(err, f"wgkex: configuration error: {path}: broker_listen: cannot listen on 127.0.0.1:{port}: "
                              "Address already in use (another process already listens there)\n")

    def test_listen_host_unresolvable(self) -> None:
        """A broker_listen host name that does not resolve: exit 1, one line."""
        path, err, _ = self.start_with("broker_listen: {host: no-such-host.invalid, port: 5000}\n")
        self.assertIn(f"{path}: broker_listen: cannot listen on no-such-host.invalid:5000: the host name does not resolve",
                      err)

    def test_listen_address_not_here(self) -> None:
        """A broker_listen address that is not on this machine: exit 1, one line."""
        path, err, _ = self.start_with("broker_listen: {host: 192.0.2.7, port: 5000}\n")
        self.assertIn(f"{path}: broker_listen: cannot listen on 192.0.2.7:5000: ", err)
        self.assertIn("the address is not on this machine", err)

    def test_logging_config_bad_version(self) -> None:
        """logging_config with version 99 stops the daemon (it used to log and keep running)."""
        path, err, _ = self.start_with(f"broker_listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
                                       "logging_config: {version: 99}\n")
        self.assertTrue(err.startswith(f"wgkex: configuration error: {path}: logging_config: "), err)
        self.assertIn("99", err)

    def test_logging_config_unknown_handler(self) -> None:
        """logging_config naming a handler class that does not exist stops the daemon with one line."""
        path, err, _ = self.start_with(
            f"broker_listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
            "logging_config: {version: 1, handlers: {x: {class: no.such.Handler}}, root: {handlers: [x]}}\n")
        self.assertTrue(err.startswith(f"wgkex: configuration error: {path}: logging_config: "), err)


class PluginTests(TestCase):
    def test_help_lists_plugins(self) -> None:
        """twistd --help in the development venv lists both plugins; the broker's help shows --config."""
        out = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=30).stdout
        self.assertIn("wgkex-broker", out)
        self.assertIn("wgkex-worker", out)
        sub = subprocess.run([TWISTD, "wgkex-broker", "--help"], capture_output=True, text=True, timeout=30).stdout
        self.assertIn("--config", sub)

    def test_plugin_module_is_import_light(self) -> None:
        """Importing the plugin file pulls in neither klein nor a reactor."""
        code = (
            "import sys, twisted.plugins.wgkex_plugins;"
            "bad=[m for m in ('klein','prometheus_client','twisted.internet.reactor','wgkex.broker.api') if m in sys.modules];"
            "print(bad)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd="/")
        self.assertEqual(out.stdout.strip(), "[]", out.stderr)


class TwistTests(TestCase):
    def test_broker_under_twist(self) -> None:
        """`twist wgkex-broker` serves /healthz (MQTT down: /readyz 503) and exits 0 on SIGTERM."""
        from tests.support.mosquitto import free_port, wait_for

        scratch = tempfile.mkdtemp(prefix="wgkex-twist-")
        self.addCleanup(shutil.rmtree, scratch, True)
        port, dead_mqtt = free_port(), free_port()
        path = os.path.join(scratch, "wgkex.yaml")
        with open(path, "w") as f:
            f.write(
                "domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\n"
                f"mqtt: {{broker_url: 127.0.0.1, broker_port: {dead_mqtt}}}\n"
                f"broker_listen: {{host: 127.0.0.1, port: {port}}}\n"
            )
        log_path = os.path.join(scratch, "twist.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([os.path.join(BIN, "twist"), "wgkex-broker", "--config", path],
                                    cwd=scratch, stdout=log, stderr=subprocess.STDOUT)

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()

        self.addCleanup(kill)

        def status(url_path: str) -> int | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{url_path}", timeout=2) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)
            except OSError:
                return None

        def log_text() -> str:
            with open(log_path, errors="replace") as f:
                return f.read()[-3000:]

        wait_for(lambda: status("/healthz") == 200 or proc.poll() is not None, 60, what="the broker under twist")
        self.assertIsNone(proc.poll(), log_text())
        self.assertEqual(status("/readyz"), 503)
        proc.terminate()
        self.assertEqual(proc.wait(timeout=20), 0, log_text())
        self.assertNotIn("Traceback", log_text())


class PackagingTests(TestCase):
    timeout = 300

    def test_pip_install_into_fresh_venv(self) -> None:
        """After a plain `pip install .` into a fresh venv, twistd --help lists both plugins."""
        venv = tempfile.mkdtemp(prefix="wgkex-pkg-")
        self.addCleanup(shutil.rmtree, venv, True)
        build = tempfile.mkdtemp(prefix="wgkex-src-")
        self.addCleanup(shutil.rmtree, build, True)
        # Install from a copy without build leftovers, as a fresh clone would be.
        src = os.path.join(build, "src")
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "_trial_temp*", "*.egg-info", "build", "__pycache__", "dropin.cache"))
        # trial --jobs hands its workers the parent's sys.path as PYTHONPATH; with it pip
        # would find Twisted "already installed" and the fresh venv would get no twistd.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=120, env=env)
        pip = subprocess.run(
            [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", src],
            capture_output=True, text=True, timeout=280, env=env,
        )
        self.assertEqual(pip.returncode, 0, pip.stderr[-2000:])
        out = subprocess.run(
            [os.path.join(venv, "bin", "twistd"), "--help"], capture_output=True, text=True, timeout=60, cwd="/", env=env
        ).stdout
        self.assertIn("wgkex-broker", out)
        self.assertIn("wgkex-worker", out)
