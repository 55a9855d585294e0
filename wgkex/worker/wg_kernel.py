"""WireGuard in the Linux kernel, through pyroute2's generic netlink ``WireGuard`` socket.

One ``pyroute2.WireGuard`` socket is opened lazily in the calling (pool)
thread on first use, kept open and closed by :meth:`KernelWireGuard.close`.

* **Adding and removing peers**: many peers go into one ``WG_CMD_SET_DEVICE``
  message (at most ``peers_per_message``, because a netlink attribute, here the
  ``WGDEVICE_A_PEERS`` nest, cannot exceed 64 KiB). The kernel applies the
  peers of a message in order and stops at the first failure without rolling
  back, so a failed message is retried peer by peer (:mod:`wgkex.worker.wg_batch`) and exactly the failing
  keys are reported (:class:`~wgkex.worker.backend.PeersFailed`).
* **Dumps** (``WG_CMD_GET_DEVICE``) come in several messages: the first holds
  the device attributes and the first peers, the next ones more peers, and a
  peer with many allowed IPs may continue in the next message (same public
  key, more ``WGPEER_A_ALLOWEDIPS``). :func:`merge_device_dump` merges them.
  When peers change during the dump the kernel flags it ``NLM_F_DUMP_INTR``
  (pyroute2 0.9 passes the flag on, older versions raise
  ``NetlinkDumpInterrupted``); either way the dump is repeated, a bounded number
  of times.

Errors: ``ENODEV`` (no such interface) becomes
:class:`~wgkex.worker.backend.InterfaceMissing`; a kernel without the
WireGuard module (no ``wireguard`` generic netlink family) and everything else
become :class:`~wgkex.worker.backend.BackendError` with the reason.
"""

from __future__ import annotations

import base64
import errno
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)

from wgkex.worker.backend import BackendError, InterfaceInfo, InterfaceMissing, PeerInfo
from wgkex.worker.wg_batch import BatchedWireGuard


class KernelModuleMissing(BackendError):
    """The kernel has no ``wireguard`` generic netlink family: the module is not loaded."""


class WireGuardSocket(Protocol):
    """The part of ``pyroute2.WireGuard`` this module uses (the test fake implements it)."""

    @property
    def prid(self) -> int:
        """The generic netlink family id of ``wireguard``."""

    def info(self, interface: str) -> Sequence[Any]:
        """Dump the device: ``wgmsg`` messages."""

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> Sequence[Any]:
        """Send ``msg`` and return the replies; raises ``NetlinkError``."""

    def close(self) -> None:
        """Close the socket."""


def _open_pyroute2_wireguard() -> WireGuardSocket:
    from pyroute2 import WireGuard

    sock: WireGuardSocket = WireGuard()
    return sock


def _key_text(value: Any) -> str:
    """pyroute2 decodes keys to base64 ``bytes``; accept ``str`` too."""
    if isinstance(value, bytes):
        return value.decode("ascii")
    return str(value)


def _error_code(exc: BaseException) -> int | None:
    """The errno of a netlink error (pyroute2's ``NetlinkError.code``), else None."""
    if isinstance(exc, NetlinkError) and isinstance(exc.code, int):
        return abs(exc.code)
    return None


def merge_device_dump(messages: Iterable[Any]) -> tuple[dict[str, Any], list[PeerInfo]]:
    """Merge the chunks of a ``WG_CMD_GET_DEVICE`` dump.

    Returns the device attributes (``WGDEVICE_A_*`` name -> value, from
    whichever chunk carries them) and the peers in dump order, a peer split
    over chunks merged into one.
    """
    device: dict[str, Any] = {}
    handshakes: dict[str, float | None] = {}
    allowed: dict[str, list[str]] = {}
    for message in messages:
        for name, value in message["attrs"]:
            if name != "WGDEVICE_A_PEERS":
                device.setdefault(name, value)
        for peer in message.get_attr("WGDEVICE_A_PEERS") or ():
            raw_key = peer.get_attr("WGPEER_A_PUBLIC_KEY")
            if raw_key is None:  # pragma: no cover - the kernel always sends the key
                continue
            key = _key_text(raw_key)
            if key not in allowed:
                allowed[key] = []
                handshakes[key] = None
            stamp = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            if stamp is not None:
                seconds, nanoseconds = int(stamp["tv_sec"]), int(stamp["tv_nsec"])
                handshakes[key] = None if seconds == 0 and nanoseconds == 0 else seconds + nanoseconds / 1e9
            for entry in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                address = entry.get("addr")
                if address is not None:
                    allowed[key].append(address)
    peers = [PeerInfo(key, handshakes[key], tuple(ips)) for key, ips in allowed.items()]
    return device, peers


class KernelWireGuard(BatchedWireGuard[list[list[Any]]]):
    """:class:`~wgkex.worker.backend.WireGuard` over the kernel module's generic netlink API.

    ``socket_factory`` opens the pyroute2 socket (tests pass a fake);
    ``peers_per_message`` caps one set message; ``dump_attempts`` bounds the
    retries of an interrupted dump.
    """

    transaction = "netlink message"

    def __init__(
        self,
        *,
        socket_factory: Callable[[], WireGuardSocket] = _open_pyroute2_wireguard,
        peers_per_message: int = 128,
        dump_attempts: int = 5,
    ) -> None:
        super().__init__()
        self._socket_factory = socket_factory
        self.per_transaction = peers_per_message
        self._dump_attempts = dump_attempts
        self._socket: WireGuardSocket | None = None

    # -- the WireGuard interface ------------------------------------------------------------

    def peers(self, iface: str) -> list[PeerInfo]:
        """Every peer of ``iface`` (chunks merged, interrupted dumps repeated)."""
        with self._lock:
            _, peers = merge_device_dump(self._dump(iface))
        return peers

    def interface(self, iface: str) -> InterfaceInfo:
        """Public key and listen port of ``iface``."""
        with self._lock:
            device, _ = merge_device_dump(self._dump(iface))
        public_key = device.get("WGDEVICE_A_PUBLIC_KEY")
        if public_key is None:
            raise BackendError(
                f"{iface} has no private key yet; give it one, e.g. `wg set {iface} private-key FILE`"
            )
        return InterfaceInfo(_key_text(public_key), int(device.get("WGDEVICE_A_LISTEN_PORT") or 0))

    def close(self) -> None:
        """Close the netlink socket (reopened on next use)."""
        with self._lock:
            if self._socket is not None:
                sock, self._socket = self._socket, None
                sock.close()

    # -- internals --------------------------------------------------------------------------

    def _sock(self) -> WireGuardSocket:
        if self._socket is None:
            try:
                self._socket = self._socket_factory()
            except Exception as e:
                if _error_code(e) == errno.ENOENT:
                    raise KernelModuleMissing(
                        "the kernel has no WireGuard generic netlink family (module not loaded):"
                        " `modprobe wireguard`, or use the uapi backend with wireguard-go"
                    ) from None
                raise BackendError(f"cannot open the WireGuard netlink socket: {e}") from None
        return self._socket

    def _reset(self) -> None:
        """Forget a socket that failed in a way that may leave unread replies on it."""
        if self._socket is not None:
            sock, self._socket = self._socket, None
            try:
                sock.close()
            except Exception:  # pragma: no cover - best effort on an already broken socket
                pass

    # -- batched peer changes (wgkex.worker.wg_batch) ---------------------------------------

    def _encode_add(self, key: str, allowed_ip: str) -> list[list[Any]]:
        _check_key(key)
        address, _, prefix = allowed_ip.partition("/")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            packed = socket.inet_pton(family, address)
            length = int(prefix) if prefix else 8 * len(packed)
        except (OSError, ValueError):
            raise ValueError(f"allowed IP {allowed_ip!r} is not an address/prefix") from None
        if not 0 <= length <= 8 * len(packed):
            raise ValueError(f"allowed IP {allowed_ip!r} has a bad prefix length")
        allowed = {
            "attrs": [
                ["WGALLOWEDIP_A_FAMILY", family],
                ["WGALLOWEDIP_A_IPADDR", packed],
                ["WGALLOWEDIP_A_CIDR_MASK", length],
            ]
        }
        return [
            ["WGPEER_A_PUBLIC_KEY", key],
            ["WGPEER_A_FLAGS", WGPEER_F_REPLACE_ALLOWEDIPS],
            ["WGPEER_A_ALLOWEDIPS", [allowed]],
        ]

    def _encode_remove(self, key: str) -> list[list[Any]]:
        _check_key(key)
        return [["WGPEER_A_PUBLIC_KEY", key], ["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME]]

    def _send(self, iface: str, peers: list[list[list[Any]]]) -> str | None:
        """Send one set message; None on success, else the kernel's reason. Raises for ENODEV."""
        sock = self._sock()
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"] = [
            ["WGDEVICE_A_IFNAME", iface],
            ["WGDEVICE_A_PEERS", [{"attrs": attrs} for attrs in peers]],
        ]
        try:
            sock.nlm_request(msg, msg_type=sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK)
        except Exception as e:
            code = _error_code(e)
            if code is None:
                self._reset()
                raise BackendError(f"{iface}: WireGuard netlink request failed: {e}") from None
            self._raise_for_interface(iface, code)
            return f"{os.strerror(code)} (errno {code})"
        return None

    def _dump(self, iface: str) -> list[Any]:
        for _ in range(self._dump_attempts):
            sock = self._sock()
            try:
                messages = list(sock.info(iface))
            except Exception as e:
                if isinstance(e, NetlinkDumpInterrupted):
                    continue
                code = _error_code(e)
                if code is None:
                    self._reset()
                    raise BackendError(f"{iface}: WireGuard netlink dump failed: {e}") from None
                self._raise_for_interface(iface, code)
                raise BackendError(f"{iface}: WireGuard dump failed: {os.strerror(code)}") from None
            if any(m["header"].get("flags", 0) & NLM_F_DUMP_INTR for m in messages):
                continue
            return messages
        raise BackendError(
            f"{iface}: the peer dump was interrupted {self._dump_attempts} times in a row"
            " (peers change too fast); try again"
        )

    def _raise_for_interface(self, iface: str, code: int) -> None:
        """Raise the exception an errno about the interface (or the family) stands for."""
        if code == errno.ENODEV:
            raise InterfaceMissing(f"{iface} missing: no such network interface")
        if code == errno.EOPNOTSUPP:
            raise BackendError(f"{iface} is not a WireGuard interface")
        if code == errno.ENOENT:
            # The generic netlink family vanished (module unloaded) under an open socket:
            # open a new one next time, which finds the family if the module is back.
            self._reset()
            raise KernelModuleMissing(
                f"{iface}: the kernel's WireGuard netlink family is gone (module unloaded?);"
                " `modprobe wireguard`, or use the uapi backend"
            )


def _check_key(key: str) -> None:
    try:
        raw = base64.b64decode(key, validate=True)
    except ValueError:
        raise ValueError("public key is not base64") from None
    if len(raw) != 32:
        raise ValueError("public key is not 32 bytes")


__all__ = ["KernelModuleMissing", "KernelWireGuard", "WireGuardSocket", "merge_device_dump"]
