"""WireGuard through the cross-platform userspace API socket (wireguard-go, boringtun).

A userspace WireGuard daemon listens on ``<socket_dir>/<iface>.sock`` (by
default ``/var/run/wireguard``) and speaks a line protocol
(https://www.wireguard.com/xplatform/):

* ``set=1\\n`` followed by ``key=value`` lines and an empty line changes the
  device; ``get=1\\n\\n`` dumps it as ``key=value`` lines;
* every reply ends with ``errno=N\\n\\n``; ``0`` is success, a negative errno
  (``-22``: invalid argument) a failure;
* keys travel in hex, not base64.

The daemon serves any number of requests on one connection, so one connection
per interface is kept open between calls and reopened when it drops (the
daemon restarted, or closed it after a failed request).

**What a failing ``set=1`` means.** The daemon applies the lines in order and
stops at the first bad one; nothing is rolled back. A batch of peers is one
transaction (far faster than one per peer: wireguard-go adds 10,000 peers in
under a second that way), so when it fails every peer of the batch is retried
in its own transaction (:mod:`wgkex.worker.wg_batch`), and then the call either
returns (all peers are there after all) or raises
:class:`~wgkex.worker.backend.PeersFailed` naming exactly the keys that are
not (all others are in place). :class:`~wgkex.worker.backend.InterfaceMissing`
means nothing was applied; a plain :class:`~wgkex.worker.backend.BackendError`
means the state is unknown, and since every operation here is idempotent the
caller may simply retry the whole batch later.

The UAPI reports the private key but not the public key: the public key is
derived with X25519 (the ``cryptography`` package, which Twisted's TLS extra,
required by treq, already brings).

Everything here blocks; it runs in the worker's thread pool.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from wgkex.worker.backend import BackendError, InterfaceInfo, InterfaceMissing, PeerInfo
from wgkex.worker.wg_batch import BatchedWireGuard

DEFAULT_SOCKET_DIR = "/var/run/wireguard"

_END = b"\n\n"
_RECV_SIZE = 256 * 1024


class _ConnectionLost(Exception):
    """The daemon closed the connection before a complete reply."""


def errno_text(code: int) -> str:
    """``errno=-22 (Invalid argument)``: a UAPI status as a reader understands it."""
    try:
        name = os.strerror(abs(code))
    except ValueError:  # pragma: no cover - os.strerror accepts any int on Linux
        name = "unknown error"
    return f"errno={code} ({name})"


def _key_hex(key: str) -> str:
    """The hex form of a base64 public key; ValueError if it is not 32 bytes of base64."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from None
    if len(raw) != 32:
        raise ValueError("not a 32-byte key")
    return raw.hex()


def _allowed_ip(text: str) -> str:
    """``text`` as an ``allowed_ip`` value; ValueError unless it is an address/prefix.

    Nothing from outside reaches the line protocol raw: an IPv6 host route (what
    the worker sends, thousands per burst) passes ``inet_pton``, which takes
    nothing but hex digits, colons and dots; anything else is rendered from
    its parsed value. A scope (``fe80::1%x``) is refused: Python's parser takes
    any text after the ``%``, newlines included.
    """
    address, slash, prefix = text.partition("/")
    if slash and prefix == "128":
        try:
            socket.inet_pton(socket.AF_INET6, address)
        except (OSError, ValueError):
            pass
        else:
            return text
    try:
        if "%" in text:
            raise ValueError("scoped address")
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"allowed IP {text!r} is not an address/prefix") from None


class UapiWireGuard(BatchedWireGuard[str]):
    """:class:`~wgkex.worker.backend.WireGuard` over ``<socket_dir>/<iface>.sock``.

    ``socket_dir`` may be any directory holding the sockets, e.g.
    ``/proc/<pid>/root/run/wireguard`` to reach a daemon that runs in its own
    mount namespace. ``timeout`` bounds every single read or write on the
    socket (not a whole request), in seconds.
    """

    transaction = "UAPI transaction"

    def __init__(self, socket_dir: str = DEFAULT_SOCKET_DIR, *, timeout: float = 60.0) -> None:
        super().__init__()
        self.socket_dir = socket_dir
        self.timeout = timeout
        self._connections: dict[str, socket.socket] = {}

    def socket_path(self, iface: str) -> str:
        """Where the daemon for ``iface`` listens."""
        return os.path.join(self.socket_dir, f"{iface}.sock")

    # -- the WireGuard interface ------------------------------------------------------------

    def peers(self, iface: str) -> list[PeerInfo]:
        """Every peer of ``iface`` with its latest handshake and allowed IPs (see :func:`parse_peers`)."""
        with self._lock:
            dump = self._get(iface)
        try:
            return parse_peers(dump)
        except ValueError as e:
            raise BackendError(f"{iface}: malformed UAPI peer dump: {e}") from None

    def interface(self, iface: str) -> InterfaceInfo:
        """Listen port and public key (derived from the private key the daemon reports)."""
        with self._lock:
            dump = self._get(iface)
        private_key: str | None = None
        listen_port = 0
        # Only the device lines before the first peer: never split a dump of 100,000 peers for two values.
        first_peer = dump.find(b"public_key=")
        header = bytes(dump[: first_peer if first_peer != -1 else len(dump)]).decode("ascii", "replace")
        for line in header.split("\n"):
            name, _, value = line.partition("=")
            if name == "private_key":
                private_key = value
            elif name == "listen_port":
                listen_port = int(value)
        if private_key is None:
            raise BackendError(
                f"{iface} has no private key yet; give it one, e.g. `wg set {iface} private-key FILE`"
            )
        return InterfaceInfo(public_key_from_private(bytes.fromhex(private_key)), listen_port)

    def close(self) -> None:
        """Close every open daemon connection."""
        with self._lock:
            for iface in list(self._connections):
                self._drop(iface)

    # -- requests -------------------------------------------------------------------------

    # -- batched peer changes (wgkex.worker.wg_batch) ---------------------------------------

    def _encode_add(self, key: str, allowed_ip: str) -> str:
        try:
            hexkey = _key_hex(key)
        except ValueError as e:
            raise ValueError(f"public key {e}") from None
        return f"public_key={hexkey}\nreplace_allowed_ips=true\nallowed_ip={_allowed_ip(allowed_ip)}\n"

    def _encode_remove(self, key: str) -> str:
        try:
            return f"public_key={_key_hex(key)}\nremove=true\n"
        except ValueError as e:
            raise ValueError(f"public key {e}") from None

    def _send(self, iface: str, changes: list[str]) -> str | None:
        """One ``set=1`` transaction; None on success, else the daemon's status."""
        code = self._set(iface, changes)
        return None if code == 0 else errno_text(code)

    # -- requests -------------------------------------------------------------------------

    def _set(self, iface: str, blocks: Iterable[str]) -> int:
        request = "set=1\n" + "".join(blocks) + "\n"
        code, _ = self._exchange(iface, request.encode("ascii"))
        return code

    def _get(self, iface: str) -> bytearray:
        """The ``get=1`` dump: ``key=value`` lines, without the final ``errno=0``."""
        code, body = self._exchange(iface, b"get=1\n\n")
        if code != 0:
            raise BackendError(f"{iface}: UAPI get failed with {errno_text(code)}")
        return body

    def _exchange(self, iface: str, request: bytes) -> tuple[int, bytearray]:
        """Send one request and return ``(errno, reply lines before errno)``.

        A cached connection that turns out dead is replaced once; requests are
        idempotent, so resending after a drop is safe.
        """
        for attempt in (1, 2):
            connection = self._connections.get(iface)
            fresh = connection is None
            if connection is None:
                connection = self._connect(iface)
            try:
                connection.sendall(request)
                reply = self._read_reply(connection)
            except TimeoutError:
                self._drop(iface)
                raise BackendError(
                    f"{iface}: no reply from the WireGuard daemon within {self.timeout:g} s"
                ) from None
            except (OSError, _ConnectionLost) as e:
                self._drop(iface)
                if fresh or attempt == 2:
                    if not os.path.exists(self.socket_path(iface)):
                        raise InterfaceMissing(f"{iface}: the WireGuard daemon went away") from None
                    raise BackendError(f"{iface}: UAPI connection failed: {e or 'closed'}") from None
                continue
            # A dump can be tens of megabytes: cut the status line off in place, copy nothing.
            status_at = reply.rfind(b"\n", 0, len(reply) - len(_END)) + 1
            status = bytes(reply[status_at : len(reply) - len(_END)])
            del reply[status_at:]
            body = reply
            if not status.startswith(b"errno="):
                self._drop(iface)
                raise BackendError(f"{iface}: UAPI reply does not end in errno=N: {status[:80]!r}")
            try:
                code = int(status[len(b"errno=") :])
            except ValueError:
                self._drop(iface)
                raise BackendError(f"{iface}: UAPI reply has a bad status line: {status[:80]!r}") from None
            if code != 0:
                # wireguard-go stops reading mid-request and would take the rest of
                # it for the next request: start the next one on a clean connection.
                self._drop(iface)
            return code, body
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self, iface: str) -> socket.socket:
        path = self.socket_path(iface)
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(self.timeout)
        try:
            connection.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            connection.close()
            reason = "no socket" if isinstance(e, FileNotFoundError) else "nobody listens on"
            raise InterfaceMissing(f"{iface} missing: {reason} {path}") from None
        except OSError as e:
            connection.close()
            raise BackendError(f"{iface}: cannot connect to {path}: {e.strerror or e}") from None
        self._connections[iface] = connection
        return connection

    def _drop(self, iface: str) -> None:
        connection = self._connections.pop(iface, None)
        if connection is not None:
            connection.close()

    @staticmethod
    def _read_reply(connection: socket.socket) -> bytearray:
        reply = bytearray()
        while not reply.endswith(_END):
            chunk = connection.recv(_RECV_SIZE)
            if not chunk:
                raise _ConnectionLost("the daemon closed the connection")
            reply += chunk
        return reply


def parse_peers(dump: bytes | bytearray) -> list[PeerInfo]:
    """The peers of a ``get=1`` dump (the lines before ``errno=``).

    A dump holds about 390 bytes per peer, 39 MB for 100,000 peers, and the
    worker reads one with every peer count and sweep, in its pool, while the
    reactor must keep answering. So the dump is never decoded or split as a
    whole (one C call on 39 MB holds the GIL for tens of milliseconds): it is
    walked with ``find``, peer by peer, each step short, and only what
    :class:`~wgkex.worker.backend.PeerInfo` holds is made into objects (few
    objects, few garbage collector passes). A peer's block starts with its
    ``public_key`` line; its fields may come in any order; unknown lines are
    skipped. ValueError for a malformed key or number.
    """
    find = dump.find
    size = len(dump)
    result: list[PeerInfo] = []
    append = result.append
    if dump.startswith(b"public_key="):
        start = 0
    else:
        start = find(b"\npublic_key=") + 1  # the device lines come first
        if start == 0:
            return result
    while True:
        key_end = find(b"\n", start)
        if key_end == -1:
            key_end = size
        following = find(b"\npublic_key=", key_end)
        end = size if following == -1 else following
        hexkey = dump[start + 11 : key_end]
        if len(hexkey) != 64:
            raise ValueError(f"public_key {bytes(hexkey[:80])!r} is not 32 bytes of hex")
        key = base64.b64encode(bytes.fromhex(hexkey.decode("ascii"))).decode("ascii")
        seconds = _field(dump, b"\nlast_handshake_time_sec=", key_end, end)
        nanoseconds = _field(dump, b"\nlast_handshake_time_nsec=", key_end, end)
        allowed: tuple[str, ...] = ()
        at = find(b"\nallowed_ip=", key_end, end)
        while at != -1:
            line_end = find(b"\n", at + 1, end)
            if line_end == -1:
                line_end = end
            allowed += (dump[at + 12 : line_end].decode("ascii", "replace"),)
            at = find(b"\nallowed_ip=", line_end, end)
        handshake = None if seconds == 0 and nanoseconds == 0 else seconds + nanoseconds / 1e9
        append(PeerInfo(key, handshake, allowed))
        if following == -1:
            return result
        start = following + 1


def _field(dump: bytes | bytearray, name: bytes, start: int, end: int) -> int:
    """The integer value of line ``name`` (given with its leading newline) in ``dump[start:end]``, else 0."""
    at = dump.find(name, start, end)
    if at == -1:
        return 0
    value_start = at + len(name)
    line_end = dump.find(b"\n", value_start, end)
    return int(dump[value_start : end if line_end == -1 else line_end])


def public_key_from_private(private_key: bytes) -> str:
    """The base64 WireGuard public key of a 32-byte private key (X25519 with the base point)."""
    public = X25519PrivateKey.from_private_bytes(private_key).public_key()
    return base64.b64encode(public.public_bytes_raw()).decode("ascii")


__all__ = ["DEFAULT_SOCKET_DIR", "UapiWireGuard", "errno_text", "parse_peers", "public_key_from_private"]
