"""``--check-config``: read and validate the file, print ``ok`` or the one-line error, start nothing."""

from __future__ import annotations

import os
import shlex

from twisted.trial.unittest import TestCase

from tests.integration.test_cli import ROOT, TWISTD, run_twistd
from tests.support.mosquitto import free_port


class CheckConfigTests(TestCase):
    def write(self, text: str) -> str:
        path: str = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def good_config(self) -> str:
        # An MQTT server nobody listens on: a started daemon would log connection attempts.
        return self.write(
            "domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\nworker_name: gw1\nexternalName: gw1.example.org\n"
            f"mqtt: {{broker_url: 127.0.0.1, broker_port: {free_port()}}}\n"
            f"broker_listen: {{host: 127.0.0.1, port: {free_port()}}}\n"
        )

    def test_good_file_prints_ok_for_both_roles(self) -> None:
        """Both plugins print exactly `ok` and exit 0 for a valid file, without starting (no log output)."""
        path = self.good_config()
        for plugin in ("wgkex-broker", "wgkex-worker"):
            rc, out, err, _ = run_twistd(plugin, "--config", path, "--check-config", timeout=60)
            self.assertEqual((rc, out, err), (0, "ok\n", ""), plugin)

    def test_bad_file_prints_one_line_and_exits_1(self) -> None:
        """A wrong value gives the usual one line naming file and key, exit status 1, nothing on stdout."""
        path = self.write("domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\nmqtt:\n  broker_port: many\n")
        for plugin in ("wgkex-broker", "wgkex-worker"):
            rc, out, err, _ = run_twistd(plugin, "--config", path, "--check-config", timeout=60)
            self.assertEqual(rc, 1, plugin)
            self.assertEqual(out, "")
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(path, err)
            self.assertIn("mqtt.broker_port", err)
            self.assertNotIn("Traceback", err)

    def test_systemd_units_check_before_start(self) -> None:
        """Each unit's ExecStartPre, run as written (venv and config paths swapped), checks the config."""
        good, missing = self.good_config(), os.path.abspath(self.mktemp())
        for role in ("broker", "worker"):
            with open(os.path.join(ROOT, "contrib", f"wgkex-{role}.service")) as f:
                lines = [line for line in f.read().splitlines() if line.startswith("ExecStartPre=")]
            self.assertEqual(len(lines), 1, role)
            argv = shlex.split(lines[0].split("=", 1)[1])
            self.assertEqual(argv[0], "/opt/wgkex/bin/twistd")
            self.assertIn("--check-config", argv)
            for path, expected in ((good, (0, "ok\n")), (missing, (1, ""))):
                args = [path if a == "/etc/wgkex.yaml" else a for a in argv[1:]]
                self.assertIn(path, args)
                rc, out, _, _ = run_twistd(*[a for a in args if a != "-n"], timeout=60)
                self.assertEqual((rc, out), expected, (role, path))
