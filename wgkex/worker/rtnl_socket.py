"""rtnetlink messages (packed with :mod:`struct`) and one socket that sends many per ``send()``.

The message constants come from ``uapi/linux/netlink.h``, ``rtnetlink.h`` and
``neighbour.h``; the payloads for routes and FDB entries are pinned against
pyroute2's decoder by the unit tests and against the kernel by the
integration test (:mod:`wgkex.worker.rtnl` says why the worker packs them).

pyroute2 waits for each acknowledgement before it sends the next message;
:class:`RtnlSocket` sends up to ``batch_size`` messages in one ``send()`` and
then collects one acknowledgement per message, matched by sequence number
(:meth:`RtnlSocket.transact`). The kernel keeps going after a failing message,
so every message gets its own result. If the kernel still drops some
acknowledgements (``ENOBUFS``), the unanswered messages are sent again, in
smaller batches (harmless: they are idempotent). It also reads the all-zero
FDB destinations of a VXLAN (:meth:`RtnlSocket.fdb_zero_entries`).

The socket itself is pyroute2's ``IPRoute``, opened lazily by ``open`` in the
calling (pool) thread and reopened after a send or receive error.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import struct
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


def attrs(data: bytes, offset: int, end: int | None = None) -> Iterator[tuple[int, bytes]]:
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


def route_replace(address: bytes, indexes: list[int]) -> tuple[int, int, bytes]:
    return RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, route_payload(address, indexes[0])


def route_delete(address: bytes, indexes: list[int]) -> tuple[int, int, bytes]:
    return RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, route_payload(address, indexes[0], delete=True)


def fdb_append(address: bytes, indexes: list[int]) -> tuple[int, int, bytes]:
    vx_index, wg_index = indexes
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
    return RTM_NEWNEIGH, flags, fdb_payload(vx_index, address, wg_index)


def pack_address(address: str) -> bytes:
    try:
        return socket.inet_pton(socket.AF_INET6, address)
    except (OSError, ValueError, TypeError):
        raise ValueError(f"{address!r} is not an IPv6 address") from None


def errno_text(code: int) -> str:
    return f"{os.strerror(code)} (errno {code})"


def messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """``(type, flags, seq, payload offset, end)`` of each netlink message in ``data``."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            return
        yield kind, flags, seq, offset + _HEADER.size, offset + length
        offset += (length + 3) & ~3


class _AcksLost(Exception):
    """The kernel dropped acknowledgements (``ENOBUFS``): the receive buffer overflowed."""


class RtnlSocket:
    """A lazily opened ``IPRoute`` socket with batched requests (see the module docstring)."""

    log = Logger()

    def __init__(self, open: Callable[[], Any], *, batch_size: int = 256, timeout: float = 10.0) -> None:
        self._open = open
        self.batch_size = max(1, batch_size)
        self.timeout = timeout
        self._ipr: Any = None
        self._seqs = itertools.count(_FIRST_SEQ)
        #: How often the kernel dropped acknowledgements and messages were sent again.
        self.resends = 0

    def iproute(self) -> Any:
        """The pyroute2 socket (opened on first use)."""
        if self._ipr is None:
            self._ipr = self._open()
        return self._ipr

    def close(self) -> None:
        """Close the socket (reopened on next use)."""
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def _next_seq(self) -> int:
        seq = next(self._seqs)
        if seq >= _LAST_SEQ:
            self._seqs = itertools.count(_FIRST_SEQ + 1)
            seq = _FIRST_SEQ
        return seq

    def transact(self, requests: Sequence[tuple[int, int, bytes]]) -> list[int]:
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
        ipr = self.iproute()
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
            for kind, _flags, seq, offset, _end in messages(data):
                if kind == NLMSG_ERROR and seq in waiting:
                    results[waiting.pop(seq)] = -_ERRNO.unpack_from(data, offset)[0]
        if waiting:
            if overflowed:
                raise _AcksLost()
            raise BackendError(f"no netlink reply for {len(waiting)} message(s) within {self.timeout:g} s")

    def fdb_zero_entries(
        self, vx_index: int, wanted: Container[bytes] | None = None
    ) -> list[tuple[bytes, int | None, bytes | None, bytes | None]]:
        """``(dst, via ifindex, port, vni)`` of every all-zero-MAC FDB destination on ``vx_index``.

        The dump is filtered by the kernel (``ifi_index``, like ``bridge fdb
        show dev``) and again here, and with ``wanted`` to those destinations
        (a gateway's FDB may hold 100,000 of them: only the few asked for become
        objects); an interrupted dump is repeated.
        """
        ipr = self.iproute()
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
                for kind, flags, reply_seq, offset, end in messages(data):
                    if reply_seq != seq:
                        continue
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if kind == NLMSG_DONE:
                        finished = True
                    elif kind == NLMSG_ERROR:
                        code = -_ERRNO.unpack_from(data, offset)[0]
                        if code:
                            raise BackendError(f"FDB dump failed: {errno_text(code)}")
                        finished = True
                    elif kind == RTM_NEWNEIGH:
                        family, ifindex, _state, _ndm_flags, _type = _NDMSG.unpack_from(data, offset)
                        if family != socket.AF_BRIDGE or ifindex != vx_index:
                            continue
                        found = dict(attrs(data, offset + _NDMSG.size, end))
                        dst = found.get(NDA_DST, b"")
                        if found.get(NDA_LLADDR) != _ZERO_MAC or len(dst) != 16:
                            continue
                        if wanted is not None and dst not in wanted:
                            continue
                        via = found.get(NDA_IFINDEX)
                        via_index = _U32.unpack(via)[0] if via else None
                        entries.append((dst, via_index, found.get(NDA_PORT), found.get(NDA_VNI)))
            if not finished:
                raise BackendError(f"FDB dump did not finish within {self.timeout:g} s")
            if not interrupted:
                return entries
        raise BackendError("the FDB dump was interrupted 5 times in a row; try again")

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


__all__ = ["RtnlSocket", "fdb_payload", "route_payload"]
