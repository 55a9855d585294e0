"""Batched rtnetlink for routes and VXLAN FDB entries, against a fake kernel at the socket.

The fake stands in for pyroute2's ``IPRoute`` (its socket-like ``send``/``recv``
plus ``link`` and ``get_addr``). It decodes every message we send with
pyroute2's own ``rtmsg``/``ndmsg`` parsers (so the hand-packed messages are
checked against an independent decoder), keeps routes and FDB destinations,
and answers like the kernel: one ``NLMSG_ERROR`` acknowledgement per message
with its sequence number, queued during ``send()``; ``ENOBUFS`` when more
acknowledgements than fit in the receive buffer. The real kernel is checked by
``tests.integration.test_backends``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_MULTI,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg
from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.backend import BackendError
from wgkex.worker.rtnl import PyrouteRtnl

RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 24, 25, 28, 29, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
HEADER = struct.Struct("=IHHII")
A = [f"fe80::2a6:8fff:fe21:{i:x}" for i in range(1, 11)]


class FakeIPRoute:
    """The kernel side of one rtnetlink socket, as far as :class:`PyrouteRtnl` uses it."""

    def __init__(self, links: dict[str, int]) -> None:
        self.links = dict(links)
        self.routes: dict[str, int] = {}  # dst -> oif
        self.fdb: dict[int, set[tuple[str, int]]] = {}  # vx index -> {(dst, via)}
        #: FDB dumps asked for.
        self.fdb_dumps = 0
        self.refuse: set[str] = set()  # destinations refused with EINVAL
        self.eexist: set[str] = set()  # FDB appends answered EEXIST (as a kernel might)
        self.ack_capacity: int | None = None  # acks that fit before ENOBUFS (per send)
        self.addresses: list[tuple[int, str, int]] = []  # (index, address, IFA_FLAGS)
        self.decoded: list[Any] = []
        self.sends = 0
        self.lookups: list[str] = []
        self.closed = False
        self._queue: list[bytes] = []
        self._overflowed = False
        self._never_readable, self._w = os.pipe()

    # -- pyroute2 API -------------------------------------------------------------------------

    def link(self, command: str, ifname: str) -> list[dict[str, int]]:
        assert command == "get"
        self.lookups.append(ifname)
        if ifname not in self.links:
            raise NetlinkError(errno.ENODEV, "No such device")
        return [{"index": self.links[ifname]}]

    def get_addr(self, family: int) -> list[Any]:
        out = []
        for index, address, flags in self.addresses:
            msg = ifaddrmsg()
            msg["family"], msg["prefixlen"], msg["flags"] = family, 64, flags & 0xFF
            msg["scope"], msg["index"] = 253, index
            msg["attrs"] = [["IFA_ADDRESS", address], ["IFA_FLAGS", flags]]
            msg.encode()
            parsed = ifaddrmsg(msg.data)
            parsed.decode()
            out.append(parsed)
        return out

    def fileno(self) -> int:
        return self._never_readable

    def close(self) -> None:
        self.closed = True
        os.close(self._never_readable)
        os.close(self._w)

    def send(self, data: bytes) -> int:
        assert not self.closed
        self.sends += 1
        acks = 0
        offset = 0
        while offset < len(data):
            length, kind, flags, seq, _ = HEADER.unpack_from(data, offset)
            if kind == RTM_GETNEIGH:
                self._dump_fdb(data[offset : offset + length], seq)
            else:
                code = self._apply(kind, flags, data[offset : offset + length])
                if self.ack_capacity is not None and acks >= self.ack_capacity:
                    self._overflowed = True  # the kernel drops the ack and flags the socket
                else:
                    ack = HEADER.pack(36, NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -code) + data[offset : offset + 16]
                    self._queue.append(ack)
                    acks += 1
            offset += (length + 3) & ~3
        return len(data)

    def recv(self, size: int) -> bytes:
        if self._overflowed:
            self._overflowed = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        if not self._queue:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        return self._queue.pop(0)

    # -- the kernel -----------------------------------------------------------------------------

    def _apply(self, kind: int, flags: int, data: bytes) -> int:
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            msg = rtmsg(data)
        else:
            msg = ndmsg(data)
        msg.decode()
        self.decoded.append(msg)
        assert flags & (NLM_F_REQUEST | NLM_F_ACK) == NLM_F_REQUEST | NLM_F_ACK
        indexes = set(self.links.values())
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            dst, oif = msg.get_attr("RTA_DST"), msg.get_attr("RTA_OIF")
            assert (msg["family"], msg["dst_len"], msg["table"]) == (socket.AF_INET6, 128, 254)
            if oif not in indexes:
                return errno.ENODEV
            if dst in self.refuse:
                return errno.EINVAL
            if kind == RTM_NEWROUTE:
                assert flags & (NLM_F_CREATE | NLM_F_REPLACE) == NLM_F_CREATE | NLM_F_REPLACE
                self.routes[dst] = oif
                return 0
            if self.routes.get(dst) != oif:
                return errno.ESRCH
            del self.routes[dst]
            return 0
        assert msg["family"] == socket.AF_BRIDGE
        assert msg.get_attr("NDA_LLADDR") == "00:00:00:00:00:00"
        if msg["ifindex"] not in indexes:
            return errno.ENODEV
        via = msg.get_attr("NDA_IFINDEX") or 0
        if via and via not in indexes:
            return errno.EADDRNOTAVAIL  # what the vxlan driver says for an unknown NDA_IFINDEX
        dst = msg.get_attr("NDA_DST")
        if dst in self.refuse:
            return errno.EINVAL
        entries = self.fdb.setdefault(msg["ifindex"], set())
        if kind == RTM_NEWNEIGH and dst in self.eexist:
            return errno.EEXIST
        if kind == RTM_NEWNEIGH:
            assert flags & (NLM_F_CREATE | NLM_F_APPEND) == NLM_F_CREATE | NLM_F_APPEND
            entries.add((dst, via))
            return 0
        if (dst, via) not in entries:
            return errno.ENOENT
        entries.remove((dst, via))
        return 0

    def _dump_fdb(self, request: bytes, seq: int) -> None:
        _, _, flags, _, _ = HEADER.unpack_from(request)
        assert flags == NLM_F_REQUEST | NLM_F_DUMP
        self.fdb_dumps += 1
        (family, index) = struct.unpack_from("=Bxxxi", request, 16)
        assert family == socket.AF_BRIDGE
        for vx, entries in self.fdb.items():
            if index and vx != index:
                continue
            for dst, via in sorted(entries):
                msg = ndmsg()
                msg["family"], msg["ifindex"], msg["state"], msg["flags"] = socket.AF_BRIDGE, vx, 0xC0, 2
                msg["attrs"] = [["NDA_LLADDR", "00:00:00:00:00:00"], ["NDA_DST", dst]]
                if via:
                    msg["attrs"].append(["NDA_IFINDEX", via])
                msg["header"]["type"], msg["header"]["flags"], msg["header"]["sequence_number"] = RTM_NEWNEIGH, NLM_F_MULTI, seq
                msg.encode()
                self._queue.append(bytes(msg.data))
        self._queue.append(HEADER.pack(20, NLMSG_DONE, NLM_F_MULTI, seq, 0) + struct.pack("=i", 0))


class RtnlTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.kernel = FakeIPRoute({"wg-a": 5, "vx-a": 6})
        self.opened: list[FakeIPRoute] = []
        self.rtnl = PyrouteRtnl(iproute_factory=self.open, batch_size=4, timeout=0.01)
        self.addCleanup(self.rtnl.close)

    def open(self) -> FakeIPRoute:
        self.opened.append(self.kernel)
        return self.kernel


class RouteTests(RtnlTestCase):
    def test_routes_are_batched_and_shaped_like_ip_route_replace(self) -> None:
        """Ten routes at four per send are three sends of static unicast /128 routes via the interface."""
        self.assertEqual(self.rtnl.replace_routes("wg-a", A), {})
        self.assertEqual(self.kernel.routes, {a: 5 for a in A})
        self.assertEqual(self.kernel.sends, 3)
        msg = self.kernel.decoded[0]
        self.assertEqual(
            (msg["proto"], msg["scope"], msg["type"], msg["src_len"], msg["tos"]), (4, 0, 1, 0, 0)
        )

    def test_repeat_is_harmless(self) -> None:
        """Replacing existing routes succeeds and changes nothing."""
        self.rtnl.replace_routes("wg-a", A[:2])
        self.assertEqual(self.rtnl.replace_routes("wg-a", A[:2]), {})
        self.assertEqual(self.kernel.routes, {a: 5 for a in A[:2]})

    def test_one_failure_does_not_stop_the_others(self) -> None:
        """A refused route is reported with the kernel's reason; the rest of the batch lands."""
        self.kernel.refuse.add(A[1])
        failures = self.rtnl.replace_routes("wg-a", A[:4])
        self.assertEqual(list(failures), [A[1]])
        self.assertIn("Invalid argument", failures[A[1]])
        self.assertEqual(set(self.kernel.routes), {A[0], A[2], A[3]})

    def test_bad_address_fails_alone(self) -> None:
        """Something that is not an IPv6 address fails without a message; the others land."""
        failures = self.rtnl.replace_routes("wg-a", ["192.0.2.1", A[0]])
        self.assertEqual(failures, {"192.0.2.1": "'192.0.2.1' is not an IPv6 address"})
        self.assertEqual(set(self.kernel.routes), {A[0]})

    def test_missing_interface_fails_every_address_until_it_appears(self) -> None:
        """No wg-b: every address fails naming it; once wg-b exists the same call works."""
        self.assertEqual(self.rtnl.replace_routes("wg-b", A[:2]), {a: "interface wg-b missing" for a in A[:2]})
        self.kernel.links["wg-b"] = 9
        self.assertEqual(self.rtnl.replace_routes("wg-b", A[:2]), {})
        self.assertEqual(self.kernel.routes, {a: 9 for a in A[:2]})

    def test_index_is_cached(self) -> None:
        """The interface index is looked up once for many calls."""
        for address in A[:3]:
            self.rtnl.replace_routes("wg-a", [address])
        self.assertEqual(self.kernel.lookups, ["wg-a"])

    def test_recreated_interface_is_found_again(self) -> None:
        """A recreated interface (new index: ENODEV on the old one) is looked up again and used."""
        self.rtnl.replace_routes("wg-a", A[:1])
        self.kernel.links["wg-a"] = 15
        self.assertEqual(self.rtnl.replace_routes("wg-a", A[1:3]), {})
        self.assertEqual(self.kernel.routes[A[2]], 15)
        self.assertEqual(self.kernel.lookups, ["wg-a", "wg-a"])

    def test_delete_routes(self) -> None:
        """Deleting removes the routes; absent routes and a missing interface are fine."""
        self.rtnl.replace_routes("wg-a", A[:3])
        self.rtnl.delete_routes("wg-a", A[:2] + [A[5]])
        self.assertEqual(set(self.kernel.routes), {A[2]})
        self.rtnl.delete_routes("wg-gone", A[:2])

    def test_delete_routes_reports_real_failures(self) -> None:
        """A deletion the kernel refuses for another reason raises a BackendError naming it."""
        self.rtnl.replace_routes("wg-a", A[:2])
        self.kernel.refuse.add(A[0])
        with self.assertRaises(BackendError) as raised:
            self.rtnl.delete_routes("wg-a", A[:2])
        self.assertIn(A[0], str(raised.exception))


class FdbTests(RtnlTestCase):
    def test_append_adds_destinations_via_the_wireguard_interface(self) -> None:
        """Each address becomes an all-zero FDB destination on vx-a via wg-a, permanent + self."""
        self.assertEqual(self.rtnl.append_fdb("vx-a", "wg-a", A[:5]), {})
        self.assertEqual(self.kernel.fdb[6], {(a, 5) for a in A[:5]})
        msg = self.kernel.decoded[0]
        self.assertEqual((msg["state"], msg["flags"]), (0x80 | 0x40, 0x02))

    def test_append_twice_is_harmless(self) -> None:
        """Appending existing destinations succeeds."""
        self.rtnl.append_fdb("vx-a", "wg-a", A[:2])
        self.assertEqual(self.rtnl.append_fdb("vx-a", "wg-a", A[:2]), {})

    def test_eexist_counts_as_done(self) -> None:
        """An append answered EEXIST (the destination is there) is not a failure."""
        self.kernel.eexist.add(A[0])
        self.assertEqual(self.rtnl.append_fdb("vx-a", "wg-a", A[:2]), {})

    def test_missing_vxlan_or_wireguard_interface(self) -> None:
        """A missing VXLAN or WireGuard interface fails every address, naming the missing one."""
        self.assertEqual(self.rtnl.append_fdb("vx-b", "wg-a", A[:1]), {A[0]: "interface vx-b missing"})
        self.assertEqual(self.rtnl.append_fdb("vx-a", "wg-b", A[:1]), {A[0]: "interface wg-b missing"})
        self.assertEqual(self.rtnl.append_fdb("vx-b", "wg-b", A[:1]), {A[0]: "interfaces vx-b and wg-b missing"})

    def test_recreated_wireguard_interface(self) -> None:
        """A stale via index (EADDRNOTAVAIL from the vxlan driver) triggers a fresh lookup."""
        self.rtnl.append_fdb("vx-a", "wg-a", A[:1])
        self.kernel.links["wg-a"] = 16
        self.assertEqual(self.rtnl.append_fdb("vx-a", "wg-a", A[1:2]), {})
        self.assertIn((A[1], 16), self.kernel.fdb[6])

    def test_delete_fdb_deletes_exactly_the_dumped_entries(self) -> None:
        """delete_fdb removes the named destinations (as dumped, with their via) and nothing else."""
        self.kernel.links["vx-b"] = 7
        self.rtnl.append_fdb("vx-a", "wg-a", A[:3])
        self.rtnl.append_fdb("vx-b", "wg-a", A[:1])
        self.kernel.fdb[6].add((A[4], 0))  # an entry someone added without "via"
        self.rtnl.delete_fdb("vx-a", [A[0], A[2], A[4], A[9]])
        self.assertEqual(self.kernel.fdb[6], {(A[1], 5)})
        self.assertEqual(self.kernel.fdb[7], {(A[0], 5)})

    def test_delete_fdb_via_deletes_without_a_dump(self) -> None:
        """Told the via interface, delete_fdb removes the worker's own entries without dumping the FDB."""
        self.rtnl.append_fdb("vx-a", "wg-a", A[:5])
        self.rtnl.delete_fdb("vx-a", [A[0], A[3], A[9]], "wg-a")
        self.assertEqual(self.kernel.fdb[6], {(A[1], 5), (A[2], 5), (A[4], 5)})
        self.assertEqual(self.kernel.fdb_dumps, 1)  # A[9] is nowhere: looked up once, absent is fine

    def test_delete_fdb_via_falls_back_to_the_dump(self) -> None:
        """An entry made without "via" (by hand) is still found and deleted, through one dump."""
        self.rtnl.append_fdb("vx-a", "wg-a", A[:2])
        self.kernel.fdb[6].add((A[4], 0))
        self.rtnl.delete_fdb("vx-a", [A[0], A[4]], "wg-a")
        self.assertEqual(self.kernel.fdb[6], {(A[1], 5)})
        self.assertEqual(self.kernel.fdb_dumps, 1)

    def test_delete_fdb_via_only_own_entries_no_dump(self) -> None:
        """When every destination was appended via the interface, no dump at all."""
        self.rtnl.append_fdb("vx-a", "wg-a", A[:3])
        self.rtnl.delete_fdb("vx-a", A[:3], "wg-a")
        self.assertEqual(self.kernel.fdb[6], set())
        self.assertEqual(self.kernel.fdb_dumps, 0)

    def test_delete_fdb_on_missing_interface_is_fine(self) -> None:
        """Entries of a VXLAN interface that is gone are gone too: nothing to do."""
        self.rtnl.delete_fdb("vx-gone", A[:2])


class BatchTests(RtnlTestCase):
    def test_lost_acknowledgements_are_resent(self) -> None:
        """When the kernel drops acknowledgements (ENOBUFS), the unanswered messages are sent again."""
        self.kernel.ack_capacity = 3
        self.kernel.refuse.add(A[3])
        failures = self.rtnl.replace_routes("wg-a", A[:4])
        self.assertEqual(list(failures), [A[3]])
        self.assertEqual(set(self.kernel.routes), set(A[:3]))
        self.assertEqual(self.rtnl.resends, 1)

    def test_endless_loss_gives_up(self) -> None:
        """If acknowledgements keep getting lost, a BackendError says what to tune."""
        self.kernel.ack_capacity = 0
        with self.assertRaises(BackendError) as raised:
            self.rtnl.replace_routes("wg-a", A[:2])
        self.assertIn("rmem_max", str(raised.exception))

    def test_no_reply_times_out(self) -> None:
        """A kernel that never answers gives a BackendError after the timeout."""
        self.kernel.ack_capacity = None
        self.kernel.send = lambda data: len(data)  # type: ignore[method-assign]
        with self.assertRaises(BackendError) as raised:
            self.rtnl.replace_routes("wg-a", A[:1])
        self.assertIn("no netlink reply", str(raised.exception))

    def test_socket_is_lazy_reused_and_closed(self) -> None:
        """One socket, opened on first use, for every call; close() closes it."""
        self.assertEqual(self.opened, [])
        self.rtnl.replace_routes("wg-a", A[:1])
        self.rtnl.append_fdb("vx-a", "wg-a", A[:1])
        self.assertEqual(len(self.opened), 1)
        self.rtnl.close()
        self.assertTrue(self.kernel.closed)


class LinkLocalTests(RtnlTestCase):
    def test_configured_address_wins_over_generated(self) -> None:
        """The configured link-local address is preferred to a stable-privacy one the kernel made."""
        self.kernel.addresses = [(5, "fe80::ef09:53a2:1dbe:9128", 0x880), (5, "2001:db8::1", 0x80), (5, "fe80::1", 0x80), (6, "fe80::9", 0x80)]
        self.assertEqual(self.rtnl.link_local_address("wg-a"), "fe80::1")

    def test_oldest_of_several_configured(self) -> None:
        """Of several configured addresses the first configured (listed last by the kernel) is used."""
        self.kernel.addresses = [(5, "fe80::2", 0x80), (5, "fe80::1", 0x80)]
        self.assertEqual(self.rtnl.link_local_address("wg-a"), "fe80::1")

    def test_generated_only(self) -> None:
        """With only a generated address, that one is reported."""
        self.kernel.addresses = [(5, "fe80::ef09:53a2:1dbe:9128", 0x880)]
        self.assertEqual(self.rtnl.link_local_address("wg-a"), "fe80::ef09:53a2:1dbe:9128")

    def test_none(self) -> None:
        """No link-local address, or no interface: None."""
        self.kernel.addresses = [(5, "2001:db8::1", 0x80)]
        self.assertIsNone(self.rtnl.link_local_address("wg-a"))
        self.assertIsNone(self.rtnl.link_local_address("wg-gone"))
