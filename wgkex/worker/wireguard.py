"""Choosing the WireGuard backend per interface: ``kernel``, ``uapi`` or ``auto``.

Configuration ``wireguard_backend`` selects how the worker reaches each
``wg-<D>``:

* ``uapi``: always the userspace API socket ``<socket_dir>/<iface>.sock``
  (:class:`~wgkex.worker.wg_uapi.UapiWireGuard`);
* ``kernel``: always generic netlink (:class:`~wgkex.worker.wg_kernel.KernelWireGuard`);
* ``auto`` (default): the socket when it exists, else the kernel. The choice is
  remembered per interface and made again when a call on that interface fails,
  so a daemon that restarted, or an interface that moved between wireguard-go
  and the kernel module, is picked up without restarting the worker. When the
  failed call would now go to the other backend, it is retried there at once
  (step 2 of the retry policy, :mod:`wgkex.worker.retry`).

In ``auto`` mode an interface that neither has a socket nor exists in a kernel
with the WireGuard module is reported as missing
(:class:`~wgkex.worker.backend.InterfaceMissing`), so its keys fail one by one
and work again once the interface appears.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from wgkex.worker.backend import BackendError, InterfaceInfo, InterfaceMissing, PeerInfo, PeersFailed, WireGuard
from wgkex.worker.wg_kernel import KernelModuleMissing, KernelWireGuard
from wgkex.worker.wg_uapi import DEFAULT_SOCKET_DIR, UapiWireGuard

MODES = ("auto", "kernel", "uapi")

T = TypeVar("T")


class AutoWireGuard:
    """:class:`~wgkex.worker.backend.WireGuard` that dispatches each interface to a backend.

    ``uapi`` and ``kernel`` replace the real backends (tests pass fakes).
    """

    def __init__(
        self,
        mode: str = "auto",
        socket_dir: str = DEFAULT_SOCKET_DIR,
        *,
        uapi: WireGuard | None = None,
        kernel: WireGuard | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"wireguard backend must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.socket_dir = socket_dir
        self.uapi: WireGuard = uapi if uapi is not None else UapiWireGuard(socket_dir)
        self.kernel: WireGuard = kernel if kernel is not None else KernelWireGuard()
        self._chosen: dict[str, WireGuard] = {}
        self._lock = threading.Lock()

    def backend_for(self, iface: str) -> WireGuard:
        """The backend that ``iface`` goes to now (remembered until a call on it fails)."""
        with self._lock:
            backend = self._chosen.get(iface)
            if backend is None:
                backend = self._choose(iface)
                self._chosen[iface] = backend
            return backend

    def socket_path(self, iface: str) -> str:
        return os.path.join(self.socket_dir, f"{iface}.sock")

    # -- the WireGuard interface ------------------------------------------------------------

    def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
        self._call(iface, lambda backend: backend.add_peers(iface, peers))

    def remove_peers(self, iface: str, keys: Sequence[str]) -> None:
        self._call(iface, lambda backend: backend.remove_peers(iface, keys))

    def peers(self, iface: str) -> list[PeerInfo]:
        return self._call(iface, lambda backend: backend.peers(iface))

    def interface(self, iface: str) -> InterfaceInfo:
        return self._call(iface, lambda backend: backend.interface(iface))

    def close(self) -> None:
        """Close both backends (each closes only what it opened)."""
        with self._lock:
            self._chosen.clear()
        try:
            self.uapi.close()
        finally:
            self.kernel.close()

    # -- internals --------------------------------------------------------------------------

    def _choose(self, iface: str) -> WireGuard:
        if self.mode == "uapi":
            return self.uapi
        if self.mode == "kernel":
            return self.kernel
        return self.uapi if os.path.exists(self.socket_path(iface)) else self.kernel

    def _call(self, iface: str, operation: Callable[[WireGuard], T]) -> T:
        backend = self.backend_for(iface)
        try:
            return self._translated(iface, backend, operation)
        except PeersFailed:
            raise  # the backend works; only some keys failed
        except (InterfaceMissing, BackendError):
            if self.mode != "auto":
                raise
            with self._lock:
                if self._chosen.get(iface) is backend:
                    del self._chosen[iface]
            again = self.backend_for(iface)
            if again is backend:
                raise
            return self._translated(iface, again, operation)

    def _translated(self, iface: str, backend: WireGuard, operation: Callable[[WireGuard], T]) -> T:
        try:
            return operation(backend)
        except KernelModuleMissing:
            if self.mode != "auto":
                raise
            raise InterfaceMissing(
                f"{iface} missing: no UAPI socket {self.socket_path(iface)} and no WireGuard kernel module"
            ) from None


__all__ = ["MODES", "AutoWireGuard"]
