"""The worker's boundary to the kernel: what a WireGuard backend and rtnetlink must do.

Everything behind these interfaces blocks (netlink sockets, the UAPI unix
socket) and therefore runs only in the worker's thread pool, never on the
reactor. One object of each kind lives in the pool thread, keeps its sockets
open between calls and closes them in :meth:`close`.

Two WireGuard implementations exist: ``kernel`` (pyroute2's generic netlink
WireGuard, :mod:`wgkex.worker.wg_kernel`) and ``uapi`` (the userspace API
socket of wireguard-go/boringtun, :mod:`wgkex.worker.wg_uapi`). Routes and
FDB entries always go through rtnetlink (:mod:`wgkex.worker.rtnl`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class InterfaceMissing(Exception):
    """The named interface does not exist (yet); keys for it fail until it is back."""


class BackendError(Exception):
    """A netlink or UAPI operation failed; the message names the interface and the reason."""


class PeersFailed(BackendError):
    """Some peers of a batch could not be added or removed; every other peer of it was.

    ``failed`` maps each such public key to the reason. Raised by
    :meth:`WireGuard.add_peers` and :meth:`WireGuard.remove_peers` (a plain
    :class:`BackendError` leaves the outcome of the batch unknown).
    """

    def __init__(self, iface: str, failed: dict[str, str]) -> None:
        self.iface = iface
        self.failed = dict(failed)
        example_key, example_reason = next(iter(self.failed.items()))
        super().__init__(
            f"{iface}: {len(self.failed)} peer(s) failed, e.g. {example_key}: {example_reason}"
        )


@dataclass(frozen=True)
class PeerInfo:
    """One WireGuard peer as read back from an interface."""

    public_key: str  # base64
    #: Unix time of the latest handshake; None when the peer never shook hands.
    last_handshake: float | None
    allowed_ips: tuple[str, ...] = ()


@dataclass(frozen=True)
class InterfaceInfo:
    """What the worker reports about a WireGuard interface."""

    public_key: str  # base64
    listen_port: int


@dataclass(frozen=True)
class ApplyResult:
    """Outcome of applying a batch: which keys failed and why (all others succeeded)."""

    failed: dict[str, str]  # key -> reason


class WireGuard(Protocol):
    """A WireGuard implementation reached from the pool thread."""

    def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
        """Add (or update) peers ``(public_key, allowed_ip_with_prefix)`` on ``iface``.

        Idempotent. Raises :class:`InterfaceMissing` (nothing applied),
        :class:`PeersFailed` (all but the named keys applied) or
        :class:`BackendError` (outcome unknown; retrying is safe).
        """

    def remove_peers(self, iface: str, keys: Sequence[str]) -> None:
        """Remove the peers with these public keys from ``iface`` (absent ones are fine)."""

    def peers(self, iface: str) -> list[PeerInfo]:
        """Every peer of ``iface`` (dumps merged, interrupted dumps retried)."""

    def interface(self, iface: str) -> InterfaceInfo:
        """Public key and listen port of ``iface``."""

    def close(self) -> None:
        """Release sockets; called in the pool thread when the worker stops."""


class Rtnl(Protocol):
    """Routes and VXLAN FDB entries through rtnetlink, from the pool thread."""

    def replace_routes(self, iface: str, addresses: Sequence[str]) -> dict[str, str]:
        """``ip -6 route replace ADDR/128 dev IFACE`` for each; returns failures addr -> reason."""

    def append_fdb(self, vx_iface: str, wg_iface: str, addresses: Sequence[str]) -> dict[str, str]:
        """``bridge fdb append 00:00:00:00:00:00 dst ADDR via WG dev VX``; failures addr -> reason."""

    def delete_routes(self, iface: str, addresses: Sequence[str]) -> None:
        """Remove the /128 routes (absent ones are fine)."""

    def delete_fdb(self, vx_iface: str, addresses: Sequence[str], via_iface: str | None = None) -> None:
        """Remove the all-zero FDB entries with these destinations (absent ones are fine); ``via_iface``:
        the WireGuard interface they were appended via, if known (saves a dump of the whole FDB)."""

    def link_local_address(self, iface: str) -> str | None:
        """The first fe80::/10 address configured on ``iface``, or None."""

    def close(self) -> None:
        """Release the netlink socket; called in the pool thread."""
