"""The kernel interfaces of each domain, computed once from the configuration.

Domain ``ffmuc_welt`` with prefix ``ffmuc_`` has ``wg-welt`` (WireGuard) and
``vx-welt`` (the VXLAN on top); see :meth:`wgkex.config.Config.wg_interface`.
The service builder computes the map once (:func:`domain_interfaces`) and hands
it to every part that needs it (apply path, sweep, interface watch, reports).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from wgkex.config import Config


@dataclass(frozen=True)
class Interfaces:
    """The kernel interfaces of one domain."""

    wg: str
    vx: str


def domain_interfaces(config: Config) -> Mapping[str, Interfaces]:
    """Every configured domain with its interfaces, in configuration order."""
    return {d: Interfaces(config.wg_interface(d), config.vx_interface(d)) for d in config.domains}


__all__ = ["Interfaces", "domain_interfaces"]
