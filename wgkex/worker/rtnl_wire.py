"""rtnetlink messages for routes and FDB entries, packed and parsed with :mod:`struct`.

The constants come from ``uapi/linux/netlink.h``, ``rtnetlink.h`` and
``neighbour.h``. The payloads are pinned against pyroute2's decoder by the unit
tests and against the kernel by the integration test; :mod:`wgkex.worker.rtnl`
says why the worker packs them itself.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

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
