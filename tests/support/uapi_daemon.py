"""A fake userspace WireGuard daemon speaking the cross-platform UAPI, for the UAPI backend's unit tests.

:class:`FakeDaemon` listens on a real unix socket in a temporary directory (as
wireguard-go does in ``/var/run/wireguard``), keeps a device with peers, and
behaves like wireguard-go where it matters: many requests per connection,
keys in hex, a ``set=1`` applied line by line without rollback, a negative
``errno`` on failure after which the connection is unusable.
:class:`UapiTestCase` starts one per test and a backend connected to it.
"""

from __future__ import annotations

import base64
import os
import socket
import tempfile
import threading

from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.wg_uapi import UapiWireGuard


IFACE = "wg-test"
KEY_A = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
KEY_B = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
KEY_C = base64.b64encode(bytes(range(1, 33))).decode()

# RFC 7748, section 6.1: Alice's private key and the public key X25519 derives from it.
RFC7748_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
RFC7748_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


def hexkey(key: str) -> str:
    return base64.b64decode(key).hex()


class FakeDaemon:
    """A userspace WireGuard daemon for one interface, on ``<directory>/<iface>.sock``."""

    def __init__(self, directory: str, iface: str = IFACE) -> None:
        self.path = os.path.join(directory, f"{iface}.sock")
        self.lock = threading.Lock()
        self.private_key: str | None = RFC7748_PRIVATE
        self.listen_port = 51820
        self.peers: dict[str, dict[str, object]] = {}
        #: hex keys whose ``public_key`` line is refused with errno -22
        self.reject: set[str] = set()
        #: make every set fail with this errno (None: behave)
        self.fail_sets: int | None = None
        self.fail_gets: int | None = None
        #: ("set"|"get", lines) of every request
        self.requests: list[tuple[str, list[str]]] = []
        self.connections = 0
        #: never answer (to exercise the client's timeout)
        self.silent = False
        self._clients: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._start(self._accept_loop)

    def stop(self) -> None:
        """Go away like a killed daemon: no socket file, every connection closed."""
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self.lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _start(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._clients.append(client)
            self._start(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                op = reader.readline()
                if op == b"get=1\n":
                    if reader.readline() != b"\n":
                        return
                    with self.lock:
                        self.requests.append(("get", []))
                        reply = self._get()
                elif op == b"set=1\n":
                    lines = []
                    while True:
                        line = reader.readline()
                        if line in (b"", b"\n"):
                            break
                        lines.append(line.decode().rstrip("\n"))
                    with self.lock:
                        self.requests.append(("set", lines))
                        code = self._set(lines)
                    reply = f"errno={code}\n\n"
                else:
                    return
                if self.silent:
                    reader.read()  # until the client gives up
                    return
                client.sendall(reply.encode())
                if not reply.startswith("errno=0") and "\nerrno=0\n" not in reply:
                    return  # like wireguard-go: the rest of the request would be taken as garbage
        except OSError:
            return
        finally:
            reader.close()
            client.close()

    def _get(self) -> str:
        if self.fail_gets is not None:
            return f"errno={self.fail_gets}\n\n"
        out = []
        if self.private_key is not None:
            out.append(f"private_key={self.private_key}")
        out.append(f"listen_port={self.listen_port}")
        for key, peer in self.peers.items():
            handshake: tuple[int, int] = peer["handshake"]  # type: ignore[assignment]
            seconds, nanoseconds = handshake
            out += [
                f"public_key={key}",
                "preshared_key=" + "0" * 64,
                "protocol_version=1",
                f"last_handshake_time_sec={seconds}",
                f"last_handshake_time_nsec={nanoseconds}",
                "tx_bytes=0",
                "rx_bytes=0",
                "persistent_keepalive_interval=0",
            ]
            out += [f"allowed_ip={ip}" for ip in peer["allowed"]]  # type: ignore[attr-defined]
        return "\n".join(out) + "\nerrno=0\n\n"

    def _set(self, lines: list[str]) -> int:
        """Apply line by line and stop at the first bad one, without rollback (as wireguard-go)."""
        if self.fail_sets is not None:
            return self.fail_sets
        current: dict[str, object] | None = None
        current_key = ""
        for line in lines:
            name, _, value = line.partition("=")
            if name == "public_key":
                if len(value) != 64 or value in self.reject:
                    return -22
                current_key = value
                current = self.peers.setdefault(value, {"allowed": [], "handshake": (0, 0)})
            elif name == "replace_allowed_ips" and current is not None:
                current["allowed"] = []
            elif name == "allowed_ip" and current is not None:
                current["allowed"].append(value)  # type: ignore[attr-defined]
            elif name == "remove" and current is not None:
                del self.peers[current_key]
                current = None
            elif name == "listen_port":
                self.listen_port = int(value)
            else:
                return -22
        return 0


class UapiTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="wgkex-uapi-")
        self.addCleanup(self._remove_directory)
        self.daemon = self.start_daemon()
        self.wg = UapiWireGuard(self.directory, timeout=5)
        self.addCleanup(self.wg.close)

    def start_daemon(self) -> FakeDaemon:
        daemon = FakeDaemon(self.directory)
        self.addCleanup(lambda: daemon.stop() if os.path.exists(daemon.path) else None)
        return daemon

    def _remove_directory(self) -> None:
        for name in os.listdir(self.directory):
            os.unlink(os.path.join(self.directory, name))
        os.rmdir(self.directory)

    def sets(self) -> list[list[str]]:
        return [lines for op, lines in self.daemon.requests if op == "set"]
