"""Command-line options shared by both twistd plugins.

``--config`` names the YAML file (else ``$WGKEX_CONFIG_FILE``, else
``/etc/wgkex.yaml``). The file is loaded and validated while options are
parsed, before twistd daemonises or opens anything, so a bad file stops the
process with one line on stderr and exit status 1, never a traceback.

``--check-config`` stops right there: it prints ``ok`` (exit 0) or the same
one-line error (exit 1) and starts nothing, for configuration management and
``ExecStartPre`` in the systemd units.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from twisted.python import usage

from wgkex.config import Config, ConfigError, config_path, load_config


class Options(usage.Options):
    """``twistd wgkex-broker|wgkex-worker [--config PATH] [--check-config]``."""

    optParameters = [
        ["config", "c", None, "Path of the YAML configuration file "
         "(default: $WGKEX_CONFIG_FILE, else /etc/wgkex.yaml)."],
    ]
    optFlags = [
        ["check-config", None, "Read and validate the configuration, print ok or the error, "
         "exit 0 or 1; start nothing."],
    ]

    #: Where ``ok`` and the one-line configuration error go (tests replace them).
    stdout: TextIO = sys.stdout
    stderr: TextIO = sys.stderr

    def postOptions(self) -> None:
        path = config_path(self["config"], os.environ)
        try:
            self.config: Config = load_config(path)
        except ConfigError as exc:
            self.stderr.write(f"wgkex: configuration error: {exc}\n")
            self.stderr.flush()
            raise SystemExit(1) from None
        if self["check-config"]:
            self.stdout.write("ok\n")
            self.stdout.flush()
            raise SystemExit(0)
