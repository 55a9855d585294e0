"""Routes and VXLAN FDB entries for peers, through rtnetlink, batched.

For each peer with link-local address ``L`` the worker needs

* ``ip -6 route replace L/128 dev wg-<D>`` (``RTM_NEWROUTE``, create|replace), and
* ``bridge fdb append 00:00:00:00:00:00 dst L via wg-<D> dev vx-<D>``
  (``RTM_NEWNEIGH`` for ``AF_BRIDGE``, create|append, ``NDA_IFINDEX`` = wg-<D>),

and the matching deletions when a peer is swept. Both are idempotent: a
replaced route and an appended FDB destination that already exist are left
as they are, and deleting what is absent is not an error.

**Throughput.** pyroute2 encodes a message in Python at roughly 60 µs and
waits for each acknowledgement before sending the next: about 3,400 route
replaces/s on a reused socket here, about 7,500/s with its
``nlm_request_batch``. These messages are tiny and of fixed shape, so this
module packs them with :mod:`struct` (pinned against pyroute2's decoder by
the unit tests and against the kernel by the integration test), sends up to
``batch_size`` of them in one ``send()`` on the one ``IPRoute`` socket and
then collects one acknowledgement per message, matched by sequence number.
The kernel keeps going after a failing message, so every address gets its own
result: measured 20,000-45,000 messages/s. At most ``batch_size`` messages are
outstanding so their acknowledgements fit in the socket's receive buffer; if
the kernel still drops some (``ENOBUFS``), the unacknowledged messages are sent
again (harmless: they are idempotent).

pyroute2 is used for what it is good at: opening the socket (also inside a
named network namespace, ``netns=``, without creating it), looking up
interface indexes (cached per name, forgotten when the kernel says the
interface is gone, so a recreated interface works without a restart) and
reading addresses.

Everything here blocks; create, use and close a :class:`PyrouteRtnl` in the
worker's pool thread.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any

from twisted.logger import Logger

from wgkex.worker.backend import BackendError

# uapi/linux/netlink.h, rtnetlink.h, neighbour.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x001
NLM_F_MULTI = 0x002
NLM_F_ACK = 0x004
NLM_F_DUMP_INTR = 0x010
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RT_TABLE_MAIN = 254
RTPROT_UNSPEC = 0
RTPROT_STATIC = 4  # what pyroute2 (and so the original wgkex) uses
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_NOWHERE = 255
RTN_UNSPEC = 0
RTN_UNICAST = 1
RTA_DST = 1
RTA_OIF = 4
NDA_DST = 1
NDA_LLADDR = 2
NDA_PORT = 6
NDA_VNI = 7
NDA_IFINDEX = 8
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFA_F_TEMPORARY = 0x01
IFA_F_DADFAILED = 0x08
IFA_F_STABLE_PRIVACY = 0x800

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_ERRNO = struct.Struct("=i")
_ZERO_MAC = bytes(6)

#: Our sequence numbers start above the range pyroute2 allocates for its own requests.
_FIRST_SEQ = 0x10000
_LAST_SEQ = 0x7FFFFFFF


def _attr(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + bytes(-length % 4)


def _attrs(data: bytes, offset: int, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Walk netlink attributes from ``offset`` to ``end`` (default: the end of ``data``), copying only values."""
    if end is None:
        end = len(data)
    while offset + _ATTR.size <= end:
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > end:
            return
        yield kind & 0x3FFF, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def route_payload(address: bytes, ifindex: int, *, delete: bool = False) -> bytes:
    """``rtmsg`` + ``RTA_DST`` + ``RTA_OIF`` for ``address/128 dev ifindex`` in the main table.

    A new route is ``proto static``, ``scope global``, ``unicast``; a deletion
    matches any protocol (like ``ip route del``).
    """
    if delete:
        protocol, scope, kind = RTPROT_UNSPEC, RT_SCOPE_NOWHERE, RTN_UNSPEC
    else:
        protocol, scope, kind = RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST
    header = _RTMSG.pack(socket.AF_INET6, 128, 0, 0, RT_TABLE_MAIN, protocol, scope, kind, 0)
    return header + _attr(RTA_DST, address) + _attr(RTA_OIF, _U32.pack(ifindex))


def fdb_payload(
    vx_index: int, address: bytes, via_index: int | None, *, port: bytes | None = None, vni: bytes | None = None
) -> bytes:
    """``ndmsg`` for the all-zero MAC on ``vx_index``, ``NDA_DST`` address, ``NDA_IFINDEX`` via.

    State ``permanent`` + ``noarp`` and flag ``self``, as ``bridge fdb`` sends them.
    ``port``/``vni`` (raw attribute values from a dump) make a deletion match
    a destination that was added with a non-default port or VNI.
    """
    payload = _NDMSG.pack(socket.AF_BRIDGE, vx_index, NUD_NOARP | NUD_PERMANENT, NTF_SELF, 0)
    payload += _attr(NDA_LLADDR, _ZERO_MAC) + _attr(NDA_DST, address)
    if via_index is not None:
        payload += _attr(NDA_IFINDEX, _U32.pack(via_index))
    if port is not None:
        payload += _attr(NDA_PORT, port)
    if vni is not None:
        payload += _attr(NDA_VNI, vni)
    return payload


def _route_replace(address: bytes, indexes: list[int]) -> tuple[int, int, bytes]:
    return RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, route_payload(address, indexes[0])


def _route_delete(address: bytes, indexes: list[int]) -> tuple[int, int, bytes]:
    return RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, route_payload(address, indexes[0], delete=True)


def _fdb_append(address: bytes, indexes: list[int]) -> tuple[int, int, bytes]:
    vx_index, wg_index = indexes
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
    return RTM_NEWNEIGH, flags, fdb_payload(vx_index, address, wg_index)


def _pack_address(address: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError, TypeError):
        raise ValueError(f"{address!r} is not an IPv6 address") from None


def _errno_text(code: int) -> str:
    return f"{os.strerror(code)} (errno {code})"


class _AcksLost(Exception):
    """The kernel dropped acknowledgements (``ENOBUFS``): the receive buffer overflowed."""


class PyrouteRtnl:
    """:class:`~wgkex.worker.backend.Rtnl` on one lazily opened pyroute2 ``IPRoute`` socket.

    ``netns`` names a network namespace (as in ``ip netns``) to work in; it is
    never created (``flags=0``): when it does not exist every call fails with
    a :class:`~wgkex.worker.backend.BackendError` saying so. None is the
    worker's own namespace. ``batch_size`` bounds the messages in flight,
    ``timeout`` the wait for the kernel's replies (seconds).
    """

    log = Logger()

    def __init__(
        self,
        *,
        netns: str | None = None,
        batch_size: int = 256,
        timeout: float = 10.0,
        iproute_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.netns = netns
        self.batch_size = max(1, batch_size)
        self.timeout = timeout
        self._iproute_factory = iproute_factory or self._open_iproute
        self._ipr: Any = None
        self._indexes: dict[str, int] = {}
        self._seqs = itertools.count(_FIRST_SEQ)
        self._lock = threading.Lock()
        #: How often the kernel dropped acknowledgements and messages were sent again.
        self.resends = 0

    # -- the Rtnl interface -----------------------------------------------------------------

    def replace_routes(self, iface: str, addresses: Sequence[str]) -> dict[str, str]:
        """``ip -6 route replace ADDR/128 dev IFACE`` for each address; failures addr -> reason."""
        with self._lock:
            return self._per_address(
                (iface,),
                addresses,
                _route_replace,
                "route replace",
                stale_codes=(errno.ENODEV,),
                absent_codes=(errno.EEXIST,),  # not sent by a replace; harmless if a kernel does
            )

    def append_fdb(self, vx_iface: str, wg_iface: str, addresses: Sequence[str]) -> dict[str, str]:
        """``bridge fdb append 00:00:00:00:00:00 dst ADDR via WG dev VX``; failures addr -> reason."""
        with self._lock:
            return self._per_address(
                (vx_iface, wg_iface),
                addresses,
                _fdb_append,
                "fdb append",
                # the vxlan driver answers EADDRNOTAVAIL for an unknown NDA_IFINDEX
                stale_codes=(errno.ENODEV, errno.EADDRNOTAVAIL),
                absent_codes=(errno.EEXIST,),  # the destination is there already: what we wanted
            )

    def delete_routes(self, iface: str, addresses: Sequence[str]) -> None:
        """Remove the /128 routes via ``iface``; absent routes (or interface) are fine."""
        with self._lock:
            failures = self._per_address(
                (iface,),
                addresses,
                _route_delete,
                "route delete",
                stale_codes=(errno.ENODEV,),
                absent_codes=(errno.ESRCH, errno.ENOENT),
                missing_is_absent=True,
            )
        self._raise_failures(iface, "delete routes", failures)

    def delete_fdb(self, vx_iface: str, addresses: Sequence[str]) -> None:
        """Remove the all-zero FDB destinations ``addresses`` of ``vx_iface``; absent ones are fine.

        The kernel only deletes a destination when the request names its
        ``via`` interface (and port/VNI if not the defaults), so the entries are
        dumped first (filtered in Python) and deleted exactly as dumped.
        """
        wanted: dict[bytes, str] = {}
        failures: dict[str, str] = {}
        for address in addresses:
            try:
                wanted[_pack_address(address)] = address
            except ValueError as e:
                failures[address] = str(e)
        with self._lock:
            self._indexes.pop(vx_iface, None)  # a stale index would dump nothing: look it up afresh
            vx_index = self._ifindex(vx_iface)
            if vx_index is None or not wanted:
                self._raise_failures(vx_iface, "delete FDB entries", failures)
                return  # the entries went away with the interface
            requests: list[tuple[int, int, bytes]] = []
            names: list[str] = []
            for dst, via, port, vni in self._fdb_zero_entries(vx_index, wanted):
                if dst in wanted:
                    requests.append(
                        (RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, fdb_payload(vx_index, dst, via, port=port, vni=vni))
                    )
                    names.append(wanted[dst])
            for name, code in zip(names, self._transact(requests)):
                if code not in (0, errno.ENOENT, errno.ENODEV):
                    failures[name] = f"fdb delete failed: {_errno_text(code)}"
        self._raise_failures(vx_iface, "delete FDB entries", failures)

    def link_local_address(self, iface: str) -> str | None:
        """The link-local address configured on ``iface``, or None (also when it is missing).

        Addresses the kernel made up itself (stable-privacy, temporary) and
        failed ones are passed over unless nothing else is there; of several,
        the one configured first (the kernel lists newer addresses first).
        """
        with self._lock:
            self._indexes.pop(iface, None)  # a stale index would find no address: look it up afresh
            index = self._ifindex(iface)
            if index is None:
                return None
            candidates: list[tuple[bool, str]] = []
            for message in self._iproute().get_addr(family=socket.AF_INET6):
                if message["index"] != index:
                    continue
                text = message.get_attr("IFA_ADDRESS")
                if text is None or not ipaddress.IPv6Address(text).is_link_local:
                    continue
                flags = message.get_attr("IFA_FLAGS")
                if flags is None:
                    flags = message["flags"]
                generated = bool(flags & (IFA_F_TEMPORARY | IFA_F_STABLE_PRIVACY | IFA_F_DADFAILED))
                candidates.append((generated, str(ipaddress.IPv6Address(text))))
        configured = [address for generated, address in candidates if not generated]
        if configured:
            return configured[-1]
        return candidates[-1][1] if candidates else None

    def close(self) -> None:
        """Close the socket (reopened on next use) and forget cached interface indexes."""
        with self._lock:
            self._indexes.clear()
            if self._ipr is not None:
                ipr, self._ipr = self._ipr, None
                ipr.close()

    # -- interfaces -------------------------------------------------------------------------

    def _open_iproute(self) -> Any:
        from pyroute2 import IPRoute

        if self.netns is None:
            return IPRoute()
        try:
            return IPRoute(netns=self.netns, flags=0)
        except OSError as e:
            raise BackendError(f"cannot open a netlink socket in network namespace {self.netns}: {e}") from None

    def _iproute(self) -> Any:
        if self._ipr is None:
            self._ipr = self._iproute_factory()
        return self._ipr

    def _ifindex(self, name: str) -> int | None:
        """The index of interface ``name`` (cached), or None if there is no such interface."""
        index = self._indexes.get(name)
        if index is not None:
            return index
        ipr = self._iproute()
        try:
            reply = ipr.link("get", ifname=name)
        except Exception as e:
            if getattr(e, "code", None) == errno.ENODEV:
                return None
            raise BackendError(f"cannot look up interface {name}: {e}") from None
        index = int(reply[0]["index"])
        self._indexes[name] = index
        return index

    def _per_address(
        self,
        ifaces: tuple[str, ...],
        addresses: Sequence[str],
        build: Callable[[bytes, list[int]], tuple[int, int, bytes]],
        what: str,
        *,
        stale_codes: tuple[int, ...],
        absent_codes: tuple[int, ...] = (),  # errnos that count as success
        missing_is_absent: bool = False,
    ) -> dict[str, str]:
        """Send one message per address; failures addr -> reason.

        A reply saying an interface is gone makes us look its index up again
        and retry those addresses once (the interface may have been recreated).
        """
        failures: dict[str, str] = {}
        todo: list[tuple[str, bytes]] = []
        for address in addresses:
            try:
                todo.append((address, _pack_address(address)))
            except ValueError as e:
                failures[address] = str(e)
        for attempt in (1, 2):
            if not todo:
                break
            found = [self._ifindex(name) for name in ifaces]
            if None in found and len(ifaces) > 1:
                # the cached indexes of the others may be stale as well: ask again
                for name in ifaces:
                    self._indexes.pop(name, None)
                found = [self._ifindex(name) for name in ifaces]
            missing = [name for name, index in zip(ifaces, found) if index is None]
            if missing:
                if not missing_is_absent:
                    reason = f"interface{'s' if len(missing) > 1 else ''} {' and '.join(missing)} missing"
                    for address, _ in todo:
                        failures[address] = reason
                return failures
            indexes = [index for index in found if index is not None]
            codes = self._transact([build(packed, indexes) for _, packed in todo])
            stale: list[tuple[str, bytes]] = []
            for (address, packed), code in zip(todo, codes):
                if code == 0 or code in absent_codes:
                    continue
                if code in stale_codes and attempt == 1:
                    stale.append((address, packed))
                else:
                    failures[address] = f"{what} failed: {_errno_text(code)}"
            if stale:
                for name in ifaces:
                    self._indexes.pop(name, None)
            todo = stale
        return failures

    @staticmethod
    def _raise_failures(iface: str, what: str, failures: dict[str, str]) -> None:
        if failures:
            example = next(iter(failures.items()))
            raise BackendError(
                f"{iface}: could not {what} for {len(failures)} address(es), e.g. {example[0]}: {example[1]}"
            )

    # -- batched netlink --------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = next(self._seqs)
        if seq >= _LAST_SEQ:
            self._seqs = itertools.count(_FIRST_SEQ + 1)
            seq = _FIRST_SEQ
        return seq

    def _transact(self, requests: Sequence[tuple[int, int, bytes]]) -> list[int]:
        """Send ``(type, flags, payload)`` messages in batches; the errno of each (0: success)."""
        results: list[int | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        size = self.batch_size
        resends = 0
        while pending:
            done: list[int] = []
            lost: list[int] = []
            for start in range(0, len(pending), size):
                chunk = pending[start : start + size]
                try:
                    self._send_and_collect(requests, chunk, results)
                except _AcksLost:
                    lost.extend(i for i in chunk if results[i] is None)
                done.extend(chunk)
            pending = lost
            if pending:
                resends += 1
                self.resends += 1
                if resends > 5:
                    raise BackendError(
                        f"the kernel keeps dropping netlink acknowledgements ({len(pending)} unanswered);"
                        " raise net.core.rmem_max or lower the batch size"
                    )
                size = max(1, size // 2)
                self.log.warn(
                    "netlink receive buffer overflowed: sending {count} messages again, {size} at a time",
                    count=len(pending),
                    size=size,
                )
        return [code if code is not None else 0 for code in results]

    def _send_and_collect(
        self, requests: Sequence[tuple[int, int, bytes]], chunk: list[int], results: list[int | None]
    ) -> None:
        ipr = self._iproute()
        waiting: dict[int, int] = {}
        parts: list[bytes] = []
        for index in chunk:
            kind, flags, payload = requests[index]
            seq = self._next_seq()
            waiting[seq] = index
            parts.append(_HEADER.pack(_HEADER.size + len(payload), kind, flags, seq, 0) + payload)
        self._send(ipr, b"".join(parts))
        deadline = time.monotonic() + self.timeout
        overflowed = False
        while waiting:
            try:
                # The kernel handles a batch within send(): once it overflowed, what
                # is not queued now never comes, so stop at the first empty read.
                data = self._read(ipr, deadline, wait=not overflowed)
            except _AcksLost:
                overflowed = True
                continue
            if not data:
                break
            for kind, _flags, seq, offset, _end in self._messages(data):
                if kind == NLMSG_ERROR and seq in waiting:
                    results[waiting.pop(seq)] = -_ERRNO.unpack_from(data, offset)[0]
        if waiting:
            if overflowed:
                raise _AcksLost()
            raise BackendError(f"no netlink reply for {len(waiting)} message(s) within {self.timeout:g} s")

    def _fdb_zero_entries(
        self, vx_index: int, wanted: Container[bytes] | None = None
    ) -> list[tuple[bytes, int | None, bytes | None, bytes | None]]:
        """``(dst, via ifindex, port, vni)`` of every all-zero-MAC FDB destination on ``vx_index``.

        The dump is filtered by the kernel (``ifi_index``, like ``bridge fdb
        show dev``) and again here, and with ``wanted`` to those destinations
        (a gateway's FDB may hold 100,000 of them: only the few asked for become
        objects); an interrupted dump is repeated.
        """
        ipr = self._iproute()
        for _ in range(5):
            seq = self._next_seq()
            payload = _IFINFOMSG.pack(socket.AF_BRIDGE, 0, vx_index, 0, 0)
            header = _HEADER.pack(_HEADER.size + len(payload), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
            self._send(ipr, header + payload)
            entries: list[tuple[bytes, int | None, bytes | None, bytes | None]] = []
            interrupted = finished = False
            deadline = time.monotonic() + self.timeout
            while not finished:
                try:
                    data = self._read(ipr, deadline, wait=True)
                except _AcksLost:
                    raise BackendError("netlink receive buffer overflowed during an FDB dump") from None
                if not data:
                    break
                for kind, flags, reply_seq, offset, end in self._messages(data):
                    if reply_seq != seq:
                        continue
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if kind == NLMSG_DONE:
                        finished = True
                    elif kind == NLMSG_ERROR:
                        code = -_ERRNO.unpack_from(data, offset)[0]
                        if code:
                            raise BackendError(f"FDB dump failed: {_errno_text(code)}")
                        finished = True
                    elif kind == RTM_NEWNEIGH:
                        family, ifindex, _state, _ndm_flags, _type = _NDMSG.unpack_from(data, offset)
                        if family != socket.AF_BRIDGE or ifindex != vx_index:
                            continue
                        attrs = dict(_attrs(data, offset + _NDMSG.size, end))
                        dst = attrs.get(NDA_DST, b"")
                        if attrs.get(NDA_LLADDR) != _ZERO_MAC or len(dst) != 16:
                            continue
                        if wanted is not None and dst not in wanted:
                            continue
                        via = attrs.get(NDA_IFINDEX)
                        via_index = _U32.unpack(via)[0] if via else None
                        entries.append((dst, via_index, attrs.get(NDA_PORT), attrs.get(NDA_VNI)))
            if not finished:
                raise BackendError(f"FDB dump did not finish within {self.timeout:g} s")
            if not interrupted:
                return entries
        raise BackendError("the FDB dump was interrupted 5 times in a row; try again")

    @staticmethod
    def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
        """``(type, flags, seq, payload offset, end)`` of each netlink message in ``data``."""
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, flags, seq, _pid = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size:
                return
            yield kind, flags, seq, offset + _HEADER.size, offset + length
            offset += (length + 3) & ~3

    def _send(self, ipr: Any, data: bytes) -> None:
        try:
            ipr.send(data)
        except OSError as e:
            self._discard_socket()
            raise BackendError(f"netlink send failed: {e}") from None

    def _read(self, ipr: Any, deadline: float, *, wait: bool) -> bytes:
        """One datagram; b"" when none comes (at once unless ``wait``, else by ``deadline``).

        Raises :class:`_AcksLost` when the kernel reports ``ENOBUFS``.
        """
        while True:
            try:
                data: bytes = ipr.recv(1 << 16)
                return data
            except BlockingIOError:
                if not wait:
                    return b""
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._readable(ipr, remaining):
                    return b""
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise _AcksLost() from None
                self._discard_socket()
                raise BackendError(f"netlink receive failed: {e}") from None

    @staticmethod
    def _readable(ipr: Any, timeout: float) -> bool:
        poller = select.poll()
        poller.register(ipr.fileno(), select.POLLIN)
        return bool(poller.poll(max(0, int(timeout * 1000))))

    def _discard_socket(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            try:
                ipr.close()
            except Exception:  # pragma: no cover - best effort on a broken socket
                pass


__all__ = ["PyrouteRtnl", "fdb_payload", "route_payload"]
