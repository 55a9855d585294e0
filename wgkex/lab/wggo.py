"""wireguard-go in a network namespace, with a mount namespace of its own.

The kernel here has no WireGuard module, so every lab interface is a
wireguard-go daemon. Its UAPI socket path ``/var/run/wireguard/<iface>.sock`` is
the same in every network namespace, so two daemons for ``wg-welt`` would
collide. Each daemon therefore runs in a private mount namespace with a tmpfs on
``/run/wireguard``:

- tools that must see the socket (``wg``, the worker) run with
  :meth:`WireGuardGo.enter_argv` (``nsenter -t PID -m -n``: that mount *and*
  network namespace; nsenter sets the working directory to ``/``, so give
  absolute paths);
- code in the root mount namespace reaches the socket at
  :attr:`WireGuardGo.uapi_socket` (``/proc/PID/root/run/wireguard/<iface>.sock``).

Like the kernel's WireGuard links (and unlike a plain TUN link), the interface
carries only the link-local address we give it: see :meth:`WireGuardGo.configure`.

Stopping the daemon deletes its interface, and the kernel deletes a VXLAN link
on top of it together with its routes and FDB entries.

Example::

    wg = WireGuardGo.start(ns, "wg-welt", log_path="/tmp/wg.log")
    key = genkey()
    wg.configure(key, listen_port=51820)
    wg.wg("show")
    wg.stop()
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from wgkex.keys import lladdr
from wgkex.lab.netns import Namespace, add_address
from wgkex.lab.proc import LabError, Proc, run, spawn, wait_until

#: The directory wireguard-go puts its sockets in (``/var/run`` is ``/run`` on Debian).
SOCKET_DIR = "/run/wireguard"


def genkey() -> str:
    """A fresh WireGuard private key (base64), from ``wg genkey``."""
    return run(["wg", "genkey"]).strip()


def pubkey(private_key: str) -> str:
    """The public key of ``private_key``, from ``wg pubkey``."""
    return run(["wg", "pubkey"], input=private_key + "\n").strip()


def ensure_socket_dir() -> bool:
    """Make sure the mount point ``/run/wireguard`` exists; True if this call created it.

    It is wireguard-go's standard directory; the lab mounts a private tmpfs over
    it in each daemon's mount namespace, so the directory in the root mount
    namespace stays empty.
    """
    if os.path.isdir(SOCKET_DIR):
        return False
    os.makedirs(SOCKET_DIR, mode=0o755, exist_ok=True)
    return True


@dataclass(frozen=True)
class WgPeer:
    """One peer as ``wg show dump`` reports it."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    #: Unix time of the latest handshake, 0 for none.
    latest_handshake: int
    rx_bytes: int
    tx_bytes: int


class WireGuardGo:
    """One wireguard-go daemon serving interface ``iface`` inside namespace ``ns``."""

    def __init__(self, ns: Namespace, iface: str, proc: Proc) -> None:
        self.ns = ns
        self.iface = iface
        self.proc = proc

    def __repr__(self) -> str:
        return f"WireGuardGo({self.ns.name!r}, {self.iface!r}, pid={self.pid})"

    @classmethod
    def start(cls, ns: Namespace, iface: str, log_path: str, timeout: float = 10.0) -> WireGuardGo:
        """Start the daemon and wait until its interface and UAPI socket exist."""
        ensure_socket_dir()
        # ip netns exec, unshare and sh all exec, so the PID we get is wireguard-go's.
        script = (
            f'mount -t tmpfs -o mode=0755 wgkex-lab "{SOCKET_DIR}" && exec wireguard-go -f "$0"'
        )
        argv = ns.exec_argv(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, iface])
        proc = spawn(f"wireguard-go {ns.name}/{iface}", argv, log_path)
        daemon = cls(ns, iface, proc)

        def ready() -> bool:
            if not proc.is_ours():
                raise LabError(f"wireguard-go for {iface} in {ns.name} exited: {proc.log_tail()}")
            return os.path.exists(daemon.uapi_socket) and ns.link_exists(iface)

        try:
            wait_until(ready, timeout, f"wireguard-go {iface} in {ns.name}")
        except LabError:
            proc.stop()
            raise
        return daemon

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uapi_socket(self) -> str:
        """The UAPI socket as seen from the root mount namespace."""
        return f"/proc/{self.pid}/root{SOCKET_DIR}/{self.iface}.sock"

    @property
    def socket_dir(self) -> str:
        """The daemon's private socket directory as seen from the root mount namespace."""
        return f"/proc/{self.pid}/root{SOCKET_DIR}"

    def enter_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run in the daemon's mount and network namespace."""
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *argv]

    def wg(self, *args: str, input: str | None = None) -> str:
        """``wg ARGS...`` against this daemon; stdout."""
        return run(self.enter_argv(["wg", *args]), input=input)

    def configure(self, private_key: str, listen_port: int | None = None, address: str | None = None) -> str:
        """Set the private key (and listen port), bring the link up with its link-local address.

        ``address`` defaults to the link-local address derived from the public
        key (``wgkex.keys.lladdr``) with prefix length 64, as Gluon does. Returns
        the public key.
        """
        args = ["set", self.iface, "private-key", "/dev/stdin"]
        if listen_port is not None:
            args += ["listen-port", str(listen_port)]
        self.wg(*args, input=private_key + "\n")
        public = pubkey(private_key)
        # A TUN link would get a kernel-made (stable-privacy) link-local address
        # next to ours; the kernel's own WireGuard links get none. Without this the
        # kernel may pick that address as source and the far side drops the packets
        # (it is not in the peer's allowed IPs).
        self.ns.ip("link", "set", "dev", self.iface, "addrgenmode", "none")
        add_address(self.ns, self.iface, address or f"{lladdr(public)}/64")
        return public

    def add_peer(
        self,
        public_key: str,
        allowed_ips: Sequence[str],
        endpoint: str | None = None,
        persistent_keepalive: int | None = None,
    ) -> None:
        """``wg set IFACE peer KEY allowed-ips ... [endpoint E] [persistent-keepalive N]``."""
        args = ["set", self.iface, "peer", public_key, "allowed-ips", ",".join(allowed_ips)]
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if persistent_keepalive is not None:
            args += ["persistent-keepalive", str(persistent_keepalive)]
        self.wg(*args)

    def public_key(self) -> str:
        return self.wg("show", self.iface, "public-key").strip()

    def listen_port(self) -> int:
        return int(self.wg("show", self.iface, "listen-port").strip())

    def peers(self) -> dict[str, WgPeer]:
        """Peers by public key, from ``wg show IFACE dump``."""
        out: dict[str, WgPeer] = {}
        for line in self.wg("show", self.iface, "dump").splitlines()[1:]:
            f = line.split("\t")
            out[f[0]] = WgPeer(
                public_key=f[0],
                endpoint=None if f[2] == "(none)" else f[2],
                allowed_ips=() if f[3] == "(none)" else tuple(f[3].split(",")),
                latest_handshake=int(f[4]),
                rx_bytes=int(f[5]),
                tx_bytes=int(f[6]),
            )
        return out

    def handshake_age(self, public_key: str) -> float | None:
        """Seconds since the last handshake with ``public_key``; None if none happened (or no such peer)."""
        peer = self.peers().get(public_key)
        if peer is None or not peer.latest_handshake:
            return None
        return max(0.0, time.time() - peer.latest_handshake)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the daemon (its interface, and any VXLAN on it, disappear)."""
        self.proc.stop(timeout)
