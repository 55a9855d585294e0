"""The UAPI WireGuard backend against a fake daemon speaking the cross-platform protocol.

The fake listens on a real unix socket in a temporary directory (as
wireguard-go does in ``/var/run/wireguard``), keeps a device with peers, and
behaves like wireguard-go where it matters: many requests per connection,
keys in hex, a ``set=1`` applied line by line without rollback, a negative
``errno`` on failure after which the connection is unusable.
"""

from __future__ import annotations

import base64
import os
import random
import socket
import tempfile
import threading

from twisted.trial.unittest import SynchronousTestCase

from wgkex.keys import lladdr
from wgkex.worker.backend import BackendError, InterfaceMissing, PeerInfo, PeersFailed
from wgkex.worker.wg_uapi import UapiWireGuard, parse_peers, public_key_from_private

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


class AddPeersTests(UapiTestCase):
    def test_batch_is_one_transaction_in_hex(self) -> None:
        """All peers of a batch go into one set=1 with hex keys and replaced allowed IPs."""
        self.wg.add_peers(IFACE, [(KEY_A, lladdr(KEY_A) + "/128"), (KEY_B, lladdr(KEY_B) + "/128")])
        self.assertEqual(
            self.sets(),
            [
                [
                    f"public_key={hexkey(KEY_A)}",
                    "replace_allowed_ips=true",
                    "allowed_ip=fe80::2a6:8fff:fe21:5465/128",
                    f"public_key={hexkey(KEY_B)}",
                    "replace_allowed_ips=true",
                    "allowed_ip=fe80::25b:c1ff:fe61:e5bd/128",
                ]
            ],
        )
        self.assertEqual(self.daemon.peers[hexkey(KEY_A)]["allowed"], ["fe80::2a6:8fff:fe21:5465/128"])

    def test_repeat_changes_nothing(self) -> None:
        """Adding the same peer twice leaves one peer with one allowed IP."""
        for _ in range(2):
            self.wg.add_peers(IFACE, [(KEY_A, lladdr(KEY_A) + "/128")])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_A)])
        self.assertEqual(self.daemon.peers[hexkey(KEY_A)]["allowed"], ["fe80::2a6:8fff:fe21:5465/128"])

    def test_connection_is_reused(self) -> None:
        """Several calls share one connection to the daemon."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128")])
        self.wg.peers(IFACE)
        self.wg.interface(IFACE)
        self.wg.remove_peers(IFACE, [KEY_A])
        self.assertEqual(self.daemon.connections, 1)
        self.assertEqual(len(self.daemon.requests), 4)

    def test_errno_22_fails_only_the_bad_key(self) -> None:
        """An errno=-22 batch is retried peer by peer: only the refused key fails, the others land."""
        self.daemon.reject.add(hexkey(KEY_B))
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128"), (KEY_C, "fe80::3/128")])
        self.assertEqual(list(raised.exception.failed), [KEY_B])
        self.assertIn("errno=-22 (Invalid argument)", raised.exception.failed[KEY_B])
        self.assertIn(IFACE, raised.exception.failed[KEY_B])
        self.assertEqual(set(self.daemon.peers), {hexkey(KEY_A), hexkey(KEY_C)})
        # one batch, then one transaction per peer on a fresh connection
        self.assertEqual(len(self.sets()), 4)
        self.assertEqual(self.daemon.connections, 3)

    def test_daemon_refusing_everything_fails_every_key(self) -> None:
        """When every transaction fails, every key is reported with the errno."""
        self.daemon.fail_sets = -5
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {KEY_A, KEY_B})
        self.assertIn("errno=-5", str(raised.exception))
        self.assertIn(IFACE, str(raised.exception))

    def test_bad_input_never_reaches_the_socket(self) -> None:
        """A bad key or an allowed IP smuggling a line fails alone and is never sent."""
        sneaky = "fe80::1/128\nprivate_key=" + "00" * 32
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [("bad", "fe80::1/128"), (KEY_A, sneaky), (KEY_B, "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {"bad", KEY_A})
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])
        self.assertEqual(self.daemon.private_key, RFC7748_PRIVATE)

    def test_scoped_allowed_ip_never_reaches_the_socket(self) -> None:
        """An allowed IP with a scope (whose text Python's parser takes as it is) fails alone, unsent."""
        sneaky = "fe80::1%x\nprivate_key=" + "00" * 32 + "/128"
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(KEY_A, sneaky), (KEY_B, "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {KEY_A})
        self.assertIn("is not an address/prefix", raised.exception.failed[KEY_A])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])
        self.assertEqual(self.daemon.private_key, RFC7748_PRIVATE)

    def test_allowed_ips_other_than_ipv6_hosts_are_rendered_parsed(self) -> None:
        """IPv6 /128s go out as given (inet_pton-checked); other prefixes and IPv4 are parsed and rendered."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "FE80::1:0:0:5/64"), (KEY_C, "192.0.2.7/32")])
        allowed = [line for line in self.sets()[0] if line.startswith("allowed_ip=")]
        self.assertEqual(allowed, ["allowed_ip=fe80::1/128", "allowed_ip=fe80::/64", "allowed_ip=192.0.2.7/32"])

    def test_empty_batch_sends_nothing(self) -> None:
        """No peers, no request."""
        self.wg.add_peers(IFACE, [])
        self.assertEqual(self.daemon.requests, [])


class RemovePeersTests(UapiTestCase):
    def test_remove_in_one_transaction(self) -> None:
        """Removal sends public_key + remove=true per key in one transaction; absent keys are fine."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128")])
        self.daemon.requests.clear()
        self.wg.remove_peers(IFACE, [KEY_A])
        self.assertEqual(self.sets(), [[f"public_key={hexkey(KEY_A)}", "remove=true"]])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])


class ReadTests(UapiTestCase):
    def test_peers_parses_the_dump(self) -> None:
        """peers() gives base64 keys, handshake times (None when 0) and allowed IPs."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128")])
        self.daemon.peers[hexkey(KEY_B)]["handshake"] = (1700000000, 500000000)
        self.assertEqual(
            self.wg.peers(IFACE),
            [
                PeerInfo(KEY_A, None, ("fe80::1/128",)),
                PeerInfo(KEY_B, 1700000000.5, ("fe80::2/128",)),
            ],
        )

    def test_interface_derives_the_public_key(self) -> None:
        """interface() derives the public key from the private key (RFC 7748 vector) and reads the port."""
        info = self.wg.interface(IFACE)
        self.assertEqual(info.public_key, base64.b64encode(bytes.fromhex(RFC7748_PUBLIC)).decode())
        self.assertEqual(info.listen_port, 51820)

    def test_public_key_from_private(self) -> None:
        """The X25519 derivation matches RFC 7748 for Alice's key."""
        self.assertEqual(
            base64.b64decode(public_key_from_private(bytes.fromhex(RFC7748_PRIVATE))).hex(), RFC7748_PUBLIC
        )

    def test_interface_without_private_key(self) -> None:
        """A device without a private key is an error telling how to give it one."""
        self.daemon.private_key = None
        with self.assertRaises(BackendError) as raised:
            self.wg.interface(IFACE)
        self.assertIn("private-key", str(raised.exception))

    def test_malformed_dump_names_interface(self) -> None:
        """A dump with a broken key is a BackendError naming the interface."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128")])
        self.daemon.peers["nothex"] = self.daemon.peers.pop(hexkey(KEY_A))
        with self.assertRaises(BackendError) as raised:
            self.wg.peers(IFACE)
        self.assertIn(IFACE, str(raised.exception))
        self.assertIn("malformed", str(raised.exception))

    def test_get_failure_names_interface_and_errno(self) -> None:
        """A get answered with a non-zero errno raises naming the interface and the errno."""
        self.daemon.fail_gets = -22
        with self.assertRaises(BackendError) as raised:
            self.wg.peers(IFACE)
        self.assertIn(IFACE, str(raised.exception))
        self.assertIn("errno=-22", str(raised.exception))


#: ``wg-x`` of wireguard-go v0.0.20220316 with two peers, as its get=1 answered (errno line cut off).
WIREGUARD_GO_DUMP = b"""private_key=f8a7e1fc5bc0e182bd7bdb31f5abed8f0d2f35bc641fe5ca2b4302b872b4ae72
listen_port=51820
public_key=6ee90bbc2f11f8832495c85b15f1d729814e6863acd9b4e2a6f880b05bb20733
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
last_handshake_time_sec=0
last_handshake_time_nsec=0
tx_bytes=0
rx_bytes=0
persistent_keepalive_interval=0
allowed_ip=fe80::2/128
public_key=23e4dadd1ba237a3d5988d8d8d361a58ded9132c75c25062ee98642c82d44d77
preshared_key=0000000000000000000000000000000000000000000000000000000000000000
protocol_version=1
endpoint=[2001:db8::2]:51820
last_handshake_time_sec=1764160000
last_handshake_time_nsec=250000000
tx_bytes=92
rx_bytes=148
persistent_keepalive_interval=0
allowed_ip=fe80::1/128
"""


def reference_parse(dump: bytes) -> list[PeerInfo]:
    """The obvious line-by-line reading of a dump, to check parse_peers against."""
    result: list[PeerInfo] = []
    current: dict[str, object] | None = None

    def finish() -> None:
        if current is not None:
            sec, nsec = int(str(current["sec"])), int(str(current["nsec"]))
            handshake = None if sec == 0 and nsec == 0 else sec + nsec / 1e9
            result.append(PeerInfo(str(current["key"]), handshake, tuple(current["allowed"])))  # type: ignore[arg-type]

    for line in dump.decode().split("\n"):
        name, _, value = line.partition("=")
        if name == "public_key":
            finish()
            current = {"key": base64.b64encode(bytes.fromhex(value)).decode(), "sec": 0, "nsec": 0, "allowed": []}
        elif current is None:
            continue
        elif name == "last_handshake_time_sec":
            current["sec"] = value
        elif name == "last_handshake_time_nsec":
            current["nsec"] = value
        elif name == "allowed_ip":
            current["allowed"].append(value)  # type: ignore[attr-defined]
    finish()
    return result


def random_dump(rng: random.Random) -> bytes:
    """A dump with a random device part and peers whose lines come in a random order."""
    lines: list[str] = []
    if rng.random() < 0.7:
        lines += ["private_key=" + "11" * 32, "listen_port=51820"]
    if rng.random() < 0.2:
        lines.append("fwmark=7")
    for _ in range(rng.randrange(0, 6)):
        fields = [f"preshared_key={'00' * 32}", "protocol_version=1", "tx_bytes=5", "rx_bytes=9",
                  "persistent_keepalive_interval=25"]
        if rng.random() < 0.5:
            fields.append(f"endpoint=[2001:db8::{rng.randrange(1, 999)}]:51820")
        if rng.random() < 0.8:
            fields.append(f"last_handshake_time_sec={rng.choice([0, 1764160000 + rng.randrange(1000)])}")
        if rng.random() < 0.8:
            fields.append(f"last_handshake_time_nsec={rng.choice([0, rng.randrange(10**9)])}")
        fields += [f"allowed_ip=fe80::{rng.randrange(1, 0xFFFF):x}/128" for _ in range(rng.randrange(0, 4))]
        rng.shuffle(fields)
        lines += [f"public_key={rng.randbytes(32).hex()}", *fields]
    return "".join(line + "\n" for line in lines).encode()


class ParsePeersTests(SynchronousTestCase):
    def test_wireguard_go_dump(self) -> None:
        """A real wireguard-go dump: keys in base64, 'never' as None, seconds plus nanoseconds, allowed IPs."""
        self.assertEqual(
            parse_peers(WIREGUARD_GO_DUMP),
            [
                PeerInfo(base64.b64encode(bytes.fromhex("6ee90bbc2f11f8832495c85b15f1d729814e6863acd9b4e2a6f880b05bb20733")).decode(),
                         None, ("fe80::2/128",)),
                PeerInfo(base64.b64encode(bytes.fromhex("23e4dadd1ba237a3d5988d8d8d361a58ded9132c75c25062ee98642c82d44d77")).decode(),
                         1764160000.25, ("fe80::1/128",)),
            ],
        )

    def test_same_as_reading_line_by_line(self) -> None:
        """On 500 random dumps (any field order, several or no allowed IPs, no device lines) it agrees with a line reader."""
        rng = random.Random(4)
        for _ in range(500):
            dump = random_dump(rng)
            self.assertEqual(parse_peers(dump), reference_parse(dump), dump.decode())
            self.assertEqual(parse_peers(bytearray(dump)), reference_parse(dump))

    def test_no_peers(self) -> None:
        """Device lines only, or nothing at all: no peers."""
        self.assertEqual(parse_peers(b"private_key=" + b"11" * 32 + b"\nlisten_port=1\n"), [])
        self.assertEqual(parse_peers(b""), [])

    def test_malformed_key_raises(self) -> None:
        """A public_key that is not 32 bytes of hex is a ValueError (peers() makes it a BackendError)."""
        with self.assertRaises(ValueError):
            parse_peers(b"public_key=abc\n")
        with self.assertRaises(ValueError):
            parse_peers(b"public_key=" + b"zz" * 32 + b"\n")


class ConnectionTests(UapiTestCase):
    def test_missing_socket_is_interface_missing(self) -> None:
        """No socket file: InterfaceMissing naming the interface and path, for every operation."""
        for call in (
            lambda: self.wg.add_peers("wg-none", [(KEY_A, "fe80::1/128")]),
            lambda: self.wg.remove_peers("wg-none", [KEY_A]),
            lambda: self.wg.peers("wg-none"),
            lambda: self.wg.interface("wg-none"),
        ):
            with self.assertRaises(InterfaceMissing) as raised:
                call()
            self.assertIn("wg-none", str(raised.exception))
            self.assertIn(os.path.join(self.directory, "wg-none.sock"), str(raised.exception))

    def test_stale_socket_file_is_interface_missing(self) -> None:
        """A socket file nobody listens on (daemon killed hard) is a missing interface."""
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(os.path.join(self.directory, "wg-dead.sock"))
        stale.close()
        with self.assertRaises(InterfaceMissing):
            self.wg.peers("wg-dead")

    def test_restarted_daemon_is_reconnected(self) -> None:
        """After the daemon restarts, the dead cached connection is replaced transparently."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128")])
        self.daemon.stop()
        with self.assertRaises(InterfaceMissing):
            self.wg.peers(IFACE)
        self.daemon = self.start_daemon()
        self.wg.add_peers(IFACE, [(KEY_B, "fe80::2/128")])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])

    def test_connection_dropped_between_calls_is_replaced(self) -> None:
        """A daemon that closed our idle connection (and still runs) gets a fresh one, no error."""
        self.wg.peers(IFACE)
        with self.daemon.lock:
            client = self.daemon._clients[0]
        client.shutdown(socket.SHUT_RDWR)
        self.assertEqual(self.wg.peers(IFACE), [])
        self.assertEqual(self.daemon.connections, 2)

    def test_close_then_use_reconnects(self) -> None:
        """close() drops the connection; the next call opens a new one."""
        self.wg.peers(IFACE)
        self.wg.close()
        self.wg.peers(IFACE)
        self.assertEqual(self.daemon.connections, 2)

    def test_silent_daemon_times_out(self) -> None:
        """A daemon that never answers gives a BackendError after the timeout, not a hang."""
        self.daemon.silent = True
        wg = UapiWireGuard(self.directory, timeout=0.05)
        self.addCleanup(wg.close)
        with self.assertRaises(BackendError) as raised:
            wg.peers(IFACE)
        self.assertIn("no reply", str(raised.exception))
