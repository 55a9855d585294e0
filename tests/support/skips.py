"""Reasons an integration test cannot run here, as trial ``skip`` strings (or None)."""

from __future__ import annotations

import os
import shutil

from tests.support.mosquitto import have_mosquitto


def need_mosquitto() -> str | None:
    if not have_mosquitto():
        return "needs mosquitto (apt-get install --no-install-recommends mosquitto; `make test` does this)"
    return None


def need_root_lab() -> str | None:
    """Namespaces, wireguard-go and VXLAN need root and the lab tools."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces (CI runs as root)"
    for tool in ("ip", "wireguard-go", "wg", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (make test installs iproute2, wireguard-go, wireguard-tools)"
    return need_mosquitto()
