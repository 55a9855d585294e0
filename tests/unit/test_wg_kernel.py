"""The kernel WireGuard backend at the pyroute2 boundary.

This machine has no WireGuard module, so a fake stands in for the
``pyroute2.WireGuard`` socket. It speaks in real ``wgmsg`` messages: requests
are encoded by pyroute2 and decoded again as the kernel would see them, dump
replies are built attribute by attribute like the kernel's
``wg_get_device_dump`` (device attributes in the first message only, peers
spread over several messages, a peer's allowed IPs continued in the next one),
encoded to bytes and decoded by pyroute2's parser, as they would arrive.
"""

from __future__ import annotations

import base64
import errno
import socket
import struct
from typing import Any

from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP_INTR, NLM_F_MULTI, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    wgmsg,
)
from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.backend import BackendError, InterfaceInfo, InterfaceMissing, PeerInfo, PeersFailed
from wgkex.worker.wg_kernel import KernelModuleMissing, KernelWireGuard

IFACE = "wg-test"
PRID = 0x1B
KEYS = [base64.b64encode(bytes([i]) * 32).decode() for i in range(1, 8)]
DEVICE_PUBLIC = base64.b64encode(b"\x42" * 32).decode()


def nested_flags(data: bytes, offset: int, end: int, path: tuple[int, ...]) -> list[bool]:
    """For each attribute reached along ``path`` (attribute types; 0 = any), whether it has NLA_F_NESTED."""
    found = []
    while offset + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, offset)
        if path[0] in (0, kind & 0x3FFF):
            if len(path) == 1:
                found.append(bool(kind & NLA_F_NESTED))
            else:
                found += nested_flags(data, offset + 4, offset + length, path[1:])
        offset += (length + 3) & ~3
    return found


def decode(data: bytes) -> Any:
    """Parse one netlink message the way pyroute2's marshal hands it out."""
    message = wgmsg(data)
    message.decode()
    return message


class FakeKernel:
    """Stands in for ``pyroute2.WireGuard``: one WireGuard device and the kernel's answers."""

    def __init__(self) -> None:
        self.devices: dict[str, dict[str, Any]] = {
            IFACE: {"ifindex": 7, "public_key": DEVICE_PUBLIC, "port": 51820, "peers": {}}
        }
        self.not_wireguard: set[str] = set()
        #: peers the kernel refuses (keys, base64) with EINVAL
        self.refuse: set[str] = set()
        #: what the next info() calls do first: "raise" (NetlinkDumpInterrupted) or "flag" (NLM_F_DUMP_INTR)
        self.interruptions: list[str] = []
        self.peers_per_chunk = 2
        self.requests: list[Any] = []  # decoded set messages
        self.raw_requests: list[bytes] = []  # and as sent
        self.info_calls = 0
        self.closed = False

    @property
    def prid(self) -> int:
        return PRID

    # -- set ----------------------------------------------------------------------------------

    def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> tuple[Any, ...]:
        assert not self.closed, "request on a closed socket"
        assert msg_type == PRID and msg_flags == NLM_F_REQUEST | NLM_F_ACK, (msg_type, msg_flags)
        msg.encode()
        request = decode(msg.data)
        self.requests.append(request)
        self.raw_requests.append(bytes(msg.data))
        assert request["cmd"] == WG_CMD_SET_DEVICE
        name = request.get_attr("WGDEVICE_A_IFNAME")
        device = self._device(name)
        # The kernel applies peer after peer and stops at the first failure, no rollback.
        for peer in request.get_attr("WGDEVICE_A_PEERS") or ():
            key = peer.get_attr("WGPEER_A_PUBLIC_KEY").decode()
            flags = peer.get_attr("WGPEER_A_FLAGS") or 0
            if key in self.refuse:
                raise NetlinkError(errno.EINVAL, "Invalid argument")
            if flags & WGPEER_F_REMOVE_ME:
                device["peers"].pop(key, None)
                continue
            entry = device["peers"].setdefault(key, {"handshake": (0, 0), "allowed": []})
            if flags & WGPEER_F_REPLACE_ALLOWEDIPS:
                entry["allowed"] = []
            entry["allowed"] += [a["addr"] for a in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()]
        return (object(),)  # the ACK

    # -- dump ---------------------------------------------------------------------------------

    def info(self, interface: str) -> tuple[Any, ...]:
        assert not self.closed, "dump on a closed socket"
        self.info_calls += 1
        device = self._device(interface)
        interruption = self.interruptions.pop(0) if self.interruptions else None
        if interruption == "raise":
            raise NetlinkDumpInterrupted()
        messages = self._dump_messages(interface, device)
        if interruption == "flag":
            messages[-1]["header"]["flags"] |= NLM_F_DUMP_INTR
        out = []
        for message in messages:
            message.encode()
            out.append(decode(message.data))
        return tuple(out)

    def _dump_messages(self, name: str, device: dict[str, Any]) -> list[Any]:
        """Messages like ``wg_get_device_dump``: device attributes first, then peer chunks."""
        # (key, first part of the peer?, allowed IPs in this part)
        parts: list[tuple[str, bool, list[str]]] = []
        for key, peer in device["peers"].items():
            allowed = peer["allowed"]
            if len(allowed) > 2:  # too many allowed IPs for one message: continued in the next
                parts += [(key, True, allowed[:2]), (key, False, allowed[2:])]
            else:
                parts.append((key, True, allowed))
        chunks = [parts[i : i + self.peers_per_chunk] for i in range(0, len(parts), self.peers_per_chunk)] or [[]]
        messages = []
        for number, chunk in enumerate(chunks):
            msg = wgmsg()
            msg["cmd"] = WG_CMD_GET_DEVICE
            msg["version"] = 1
            msg["header"]["type"] = PRID
            msg["header"]["flags"] = NLM_F_MULTI
            msg["header"]["sequence_number"] = 300
            attrs: list[list[Any]] = []
            if number == 0:
                attrs += [
                    ["WGDEVICE_A_LISTEN_PORT", device["port"]],
                    ["WGDEVICE_A_FWMARK", 0],
                    ["WGDEVICE_A_IFINDEX", device["ifindex"]],
                    ["WGDEVICE_A_IFNAME", name],
                ]
                if device["public_key"] is not None:
                    attrs += [
                        ["WGDEVICE_A_PRIVATE_KEY", base64.b64encode(b"\x01" * 32).decode()],
                        ["WGDEVICE_A_PUBLIC_KEY", device["public_key"]],
                    ]
            peers = []
            for key, first, allowed in chunk:
                peer_attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", key]]
                if first:
                    seconds, nanoseconds = device["peers"][key]["handshake"]
                    peer_attrs += [
                        ["WGPEER_A_LAST_HANDSHAKE_TIME", {"tv_sec": seconds, "tv_nsec": nanoseconds}],
                        ["WGPEER_A_RX_BYTES", 0],
                        ["WGPEER_A_TX_BYTES", 0],
                        ["WGPEER_A_PROTOCOL_VERSION", 1],
                    ]
                peer_attrs.append(["WGPEER_A_ALLOWEDIPS", [self._allowed(a) for a in allowed]])
                peers.append({"attrs": peer_attrs})
            if peers:
                attrs.append(["WGDEVICE_A_PEERS", peers])
            msg["attrs"] = attrs
            messages.append(msg)
        return messages

    @staticmethod
    def _allowed(text: str) -> dict[str, Any]:
        address, prefix = text.split("/")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return {
            "attrs": [
                ["WGALLOWEDIP_A_FAMILY", family],
                ["WGALLOWEDIP_A_IPADDR", socket.inet_pton(family, address)],
                ["WGALLOWEDIP_A_CIDR_MASK", int(prefix)],
            ]
        }

    def _device(self, name: str) -> dict[str, Any]:
        if name in self.not_wireguard:
            raise NetlinkError(errno.EOPNOTSUPP, "Operation not supported")
        if name not in self.devices:
            raise NetlinkError(errno.ENODEV, "No such device")
        return self.devices[name]

    def close(self) -> None:
        self.closed = True


class KernelTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.opened: list[FakeKernel] = []
        self.wg = KernelWireGuard(socket_factory=self.open, peers_per_message=3)

    def open(self) -> FakeKernel:
        self.kernel.closed = False
        self.opened.append(self.kernel)
        return self.kernel

    def peers_of(self, name: str = IFACE) -> dict[str, Any]:
        peers: dict[str, Any] = self.kernel.devices[name]["peers"]
        return peers


class SetTests(KernelTestCase):
    def test_peers_are_batched_per_message(self) -> None:
        """Seven peers with three per message are three set messages carrying them all."""
        self.wg.add_peers(IFACE, [(key, f"fe80::{i + 1}/128") for i, key in enumerate(KEYS)])
        self.assertEqual([len(r.get_attr("WGDEVICE_A_PEERS")) for r in self.kernel.requests], [3, 3, 1])
        self.assertEqual(self.peers_of()[KEYS[6]]["allowed"], ["fe80::7/128"])
        self.assertEqual(len(self.peers_of()), 7)

    def test_set_message_is_shaped_like_wg_set(self) -> None:
        """The message names the interface, replaces allowed IPs and marks nests NLA_F_NESTED."""
        self.wg.add_peers(IFACE, [(KEYS[0], "fe80::1/128")])
        (request,) = self.kernel.requests
        self.assertEqual(request.get_attr("WGDEVICE_A_IFNAME"), IFACE)
        # The kernel's nla_parse_nested() refuses nests without NLA_F_NESTED, as wg(8) sets them:
        # WGDEVICE_A_PEERS (8), each peer, its WGPEER_A_ALLOWEDIPS (9), each allowed IP.
        raw = self.kernel.raw_requests[0]
        start = 16 + 4  # nlmsghdr + genlmsghdr
        for path in ((8,), (8, 0), (8, 0, 9), (8, 0, 9, 0)):
            self.assertEqual(nested_flags(raw, start, len(raw), path), [True], path)
        (peer,) = request.get_attr("WGDEVICE_A_PEERS")
        self.assertEqual(peer.get_attr("WGPEER_A_FLAGS"), WGPEER_F_REPLACE_ALLOWEDIPS)
        self.assertEqual([a["addr"] for a in peer.get_attr("WGPEER_A_ALLOWEDIPS")], ["fe80::1/128"])

    def test_repeat_changes_nothing(self) -> None:
        """Adding a peer again leaves one allowed IP."""
        for _ in range(2):
            self.wg.add_peers(IFACE, [(KEYS[0], "fe80::1/128")])
        self.assertEqual(self.peers_of()[KEYS[0]]["allowed"], ["fe80::1/128"])

    def test_refused_peer_fails_alone(self) -> None:
        """A message the kernel refuses is retried per peer; only the refused key fails."""
        self.kernel.refuse.add(KEYS[1])
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(key, "fe80::1/128") for key in KEYS[:3]])
        self.assertEqual(list(raised.exception.failed), [KEYS[1]])
        self.assertIn("Invalid argument", raised.exception.failed[KEYS[1]])
        self.assertEqual(set(self.peers_of()), {KEYS[0], KEYS[2]})

    def test_bad_input_fails_alone(self) -> None:
        """A key that is not 32 bytes of base64 or a bad allowed IP fails without a request."""
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [("nope", "fe80::1/128"), (KEYS[0], "fe80::zz/128"), (KEYS[1], "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {"nope", KEYS[0]})
        self.assertEqual(list(self.peers_of()), [KEYS[1]])

    def test_remove(self) -> None:
        """Removal flags peers WGPEER_F_REMOVE_ME; absent ones are fine."""
        self.wg.add_peers(IFACE, [(KEYS[0], "fe80::1/128"), (KEYS[1], "fe80::2/128")])
        self.wg.remove_peers(IFACE, [KEYS[0], KEYS[5]])
        self.assertEqual(list(self.peers_of()), [KEYS[1]])
        flags = [p.get_attr("WGPEER_A_FLAGS") for p in self.kernel.requests[-1].get_attr("WGDEVICE_A_PEERS")]
        self.assertEqual(flags, [WGPEER_F_REMOVE_ME, WGPEER_F_REMOVE_ME])

    def test_missing_interface(self) -> None:
        """ENODEV is InterfaceMissing, for every operation."""
        for call in (
            lambda: self.wg.add_peers("wg-none", [(KEYS[0], "fe80::1/128")]),
            lambda: self.wg.remove_peers("wg-none", [KEYS[0]]),
            lambda: self.wg.peers("wg-none"),
            lambda: self.wg.interface("wg-none"),
        ):
            with self.assertRaises(InterfaceMissing) as raised:
                call()
            self.assertIn("wg-none", str(raised.exception))

    def test_not_a_wireguard_interface(self) -> None:
        """EOPNOTSUPP (an interface of another kind) is a BackendError saying so."""
        self.kernel.not_wireguard.add("eth0")
        with self.assertRaises(BackendError) as raised:
            self.wg.peers("eth0")
        self.assertIn("eth0 is not a WireGuard interface", str(raised.exception))


class DumpTests(KernelTestCase):
    def setUp(self) -> None:
        super().setUp()
        peers = self.peers_of()
        peers[KEYS[0]] = {"handshake": (0, 0), "allowed": ["fe80::1/128"]}
        peers[KEYS[1]] = {"handshake": (1700000000, 250000000), "allowed": ["fe80::2/128", "10.0.0.0/8", "192.0.2.1/32"]}
        peers[KEYS[2]] = {"handshake": (1600000000, 0), "allowed": []}
        peers[KEYS[3]] = {"handshake": (5, 0), "allowed": ["2001:db8::/32"]}

    def expected(self) -> list[PeerInfo]:
        return [
            PeerInfo(KEYS[0], None, ("fe80::1/128",)),
            PeerInfo(KEYS[1], 1700000000.25, ("fe80::2/128", "10.0.0.0/8", "192.0.2.1/32")),
            PeerInfo(KEYS[2], 1600000000.0, ()),
            PeerInfo(KEYS[3], 5.0, ("2001:db8::/32",)),
        ]

    def test_chunks_are_merged(self) -> None:
        """Peers over several messages, one continued across messages, come back merged."""
        self.assertGreater(len(self.kernel.info(IFACE)), 2)
        self.assertEqual(self.wg.peers(IFACE), self.expected())

    def test_interrupted_dump_exception_is_retried(self) -> None:
        """NetlinkDumpInterrupted, then success: the second dump is used."""
        self.kernel.interruptions = ["raise"]
        self.assertEqual(self.wg.peers(IFACE), self.expected())
        self.assertEqual(self.kernel.info_calls, 2)

    def test_interrupted_dump_flag_is_retried(self) -> None:
        """A dump flagged NLM_F_DUMP_INTR (pyroute2 0.9 does not raise) is repeated."""
        self.kernel.interruptions = ["flag", "raise"]
        self.assertEqual(self.wg.peers(IFACE), self.expected())
        self.assertEqual(self.kernel.info_calls, 3)

    def test_dump_interrupted_every_time_gives_up(self) -> None:
        """A dump interrupted on every attempt fails after a bounded number of tries."""
        self.kernel.interruptions = ["flag", "raise"] * 10
        with self.assertRaises(BackendError) as raised:
            self.wg.peers(IFACE)
        self.assertIn("interrupted 5 times", str(raised.exception))
        self.assertEqual(self.kernel.info_calls, 5)

    def test_interface(self) -> None:
        """interface() reports the device's public key and listen port."""
        self.assertEqual(self.wg.interface(IFACE), InterfaceInfo(DEVICE_PUBLIC, 51820))

    def test_interface_without_key(self) -> None:
        """A device without a private key (no public key attribute) says what to do."""
        self.kernel.devices[IFACE]["public_key"] = None
        with self.assertRaises(BackendError) as raised:
            self.wg.interface(IFACE)
        self.assertIn("private-key", str(raised.exception))

    def test_empty_device(self) -> None:
        """A device without peers dumps as one message without WGDEVICE_A_PEERS."""
        self.peers_of().clear()
        self.assertEqual(self.wg.peers(IFACE), [])


class SocketTests(KernelTestCase):
    def test_socket_is_opened_lazily_and_reused(self) -> None:
        """No socket before the first call; then one socket for all calls."""
        self.assertEqual(self.opened, [])
        self.wg.add_peers(IFACE, [(KEYS[0], "fe80::1/128")])
        self.wg.peers(IFACE)
        self.wg.interface(IFACE)
        self.assertEqual(len(self.opened), 1)

    def test_close_closes_and_next_call_reopens(self) -> None:
        """close() closes the socket; a later call opens a new one."""
        self.wg.peers(IFACE)
        self.wg.close()
        self.assertTrue(self.kernel.closed)
        self.wg.peers(IFACE)
        self.assertEqual(len(self.opened), 2)

    def test_module_missing(self) -> None:
        """No wireguard generic netlink family: KernelModuleMissing saying what to do, retried later."""
        attempts = []

        def missing() -> FakeKernel:
            attempts.append(1)
            raise NetlinkError(errno.ENOENT, "No such file or directory")

        wg = KernelWireGuard(socket_factory=missing)
        for _ in range(2):
            with self.assertRaises(KernelModuleMissing) as raised:
                wg.peers(IFACE)
        self.assertIn("modprobe wireguard", str(raised.exception))
        self.assertEqual(len(attempts), 2)

    def test_module_unloaded_under_an_open_socket(self) -> None:
        """ENOENT from an open socket (family gone) is KernelModuleMissing; the next call opens a new socket."""
        self.wg.peers(IFACE)
        self.kernel.devices.clear()
        self.kernel.not_wireguard.clear()
        original = self.kernel._device

        def family_gone(name: str) -> dict[str, Any]:
            raise NetlinkError(errno.ENOENT, "No such file or directory")

        self.kernel._device = family_gone  # type: ignore[method-assign]
        with self.assertRaises(KernelModuleMissing):
            self.wg.add_peers(IFACE, [(KEYS[0], "fe80::1/128")])
        self.assertTrue(self.kernel.closed)
        self.kernel._device = original  # type: ignore[method-assign]
        self.assertRaises(InterfaceMissing, self.wg.peers, IFACE)
        self.assertEqual(len(self.opened), 2)
