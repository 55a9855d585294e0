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
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from wgkex.worker.backend import BackendError
from wgkex.worker.rtnl_socket import (
    RtnlSocket,
    IFA_F_DADFAILED,
    IFA_F_STABLE_PRIVACY,
    IFA_F_TEMPORARY,
    NLM_F_ACK,
    NLM_F_REQUEST,
    RTM_DELNEIGH,
    errno_text,
    fdb_append,
    fdb_payload,
    pack_address,
    route_delete,
    route_payload,
    route_replace,
)


class PyrouteRtnl:
    """:class:`~wgkex.worker.backend.Rtnl` on one lazily opened pyroute2 ``IPRoute`` socket.

    ``netns`` names a network namespace (as in ``ip netns``) to work in; it is
    never created (``flags=0``): when it does not exist every call fails with
    a :class:`~wgkex.worker.backend.BackendError` saying so. None is the
    worker's own namespace. ``batch_size`` bounds the messages in flight,
    ``timeout`` the wait for the kernel's replies (seconds).
    """

    def __init__(
        self,
        *,
        netns: str | None = None,
        batch_size: int = 256,
        timeout: float = 10.0,
        iproute_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.netns = netns
        self._socket = RtnlSocket(iproute_factory or self._open_iproute, batch_size=batch_size, timeout=timeout)
        self._indexes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def resends(self) -> int:
        """How often the kernel dropped acknowledgements and messages were sent again."""
        return self._socket.resends

    # -- the Rtnl interface -----------------------------------------------------------------

    def replace_routes(self, iface: str, addresses: Sequence[str]) -> dict[str, str]:
        """``ip -6 route replace ADDR/128 dev IFACE`` for each address; failures addr -> reason."""
        with self._lock:
            return self._per_address(
                (iface,),
                addresses,
                route_replace,
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
                fdb_append,
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
                route_delete,
                "route delete",
                stale_codes=(errno.ENODEV,),
                absent_codes=(errno.ESRCH, errno.ENOENT),
                missing_is_absent=True,
            )
        self._raise_failures(iface, "delete routes", failures)

    def delete_fdb(self, vx_iface: str, addresses: Sequence[str], via_iface: str | None = None) -> None:
        """Remove the all-zero FDB destinations ``addresses`` of ``vx_iface``; absent ones are fine.

        The kernel only deletes a destination when the request names its
        ``via`` interface (and port/VNI if not the defaults). With ``via_iface``
        the destinations are first deleted as :meth:`append_fdb` adds them (via
        that interface, default port and VNI): no dump, which matters on a
        gateway whose FDB holds 100,000 destinations. Those the kernel does not
        find that way (added by hand or by another program), and all of them
        without ``via_iface``, are looked up in a dump (filtered in Python) and
        deleted exactly as dumped.
        """
        wanted: dict[bytes, str] = {}
        failures: dict[str, str] = {}
        for address in addresses:
            try:
                wanted[pack_address(address)] = address
            except ValueError as e:
                failures[address] = str(e)
        with self._lock:
            self._indexes.pop(vx_iface, None)  # a stale index would dump nothing: look it up afresh
            vx_index = self._ifindex(vx_iface)
            if vx_index is None or not wanted:
                self._raise_failures(vx_iface, "delete FDB entries", failures)
                return  # the entries went away with the interface
            if via_iface is not None:
                self._indexes.pop(via_iface, None)
                via_index = self._ifindex(via_iface)
                if via_index is not None:
                    wanted = self._delete_fdb_as_added(vx_index, via_index, wanted, failures)
            if wanted:
                self._delete_fdb_as_dumped(vx_index, wanted, failures)
        self._raise_failures(vx_iface, "delete FDB entries", failures)

    def _delete_fdb_as_added(
        self, vx_index: int, via_index: int, wanted: dict[bytes, str], failures: dict[str, str]
    ) -> dict[bytes, str]:
        """Delete ``wanted`` as appended via ``via_index``; returns those not found that way."""
        items = list(wanted.items())
        requests = [
            (RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, fdb_payload(vx_index, dst, via_index)) for dst, _ in items
        ]
        left: dict[bytes, str] = {}
        for (dst, name), code in zip(items, self._socket.transact(requests)):
            # ENOENT: no such destination via that interface; EADDRNOTAVAIL: the via
            # interface went away meanwhile. Either way the dump finds it, if it is there.
            if code in (errno.ENOENT, errno.EADDRNOTAVAIL):
                left[dst] = name
            elif code not in (0, errno.ENODEV):
                failures[name] = f"fdb delete failed: {errno_text(code)}"
        return left

    def _delete_fdb_as_dumped(self, vx_index: int, wanted: dict[bytes, str], failures: dict[str, str]) -> None:
        """Dump ``vx_index``'s all-zero destinations and delete those in ``wanted`` exactly as dumped."""
        requests: list[tuple[int, int, bytes]] = []
        names: list[str] = []
        for dst, via, port, vni in self._socket.fdb_zero_entries(vx_index, wanted):
            if dst in wanted:
                requests.append(
                    (RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, fdb_payload(vx_index, dst, via, port=port, vni=vni))
                )
                names.append(wanted[dst])
        for name, code in zip(names, self._socket.transact(requests)):
            if code not in (0, errno.ENOENT, errno.ENODEV):
                failures[name] = f"fdb delete failed: {errno_text(code)}"

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
            for message in self._socket.iproute().get_addr(family=socket.AF_INET6):
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
            self._socket.close()

    # -- interfaces -------------------------------------------------------------------------

    def _open_iproute(self) -> Any:
        from pyroute2 import IPRoute

        if self.netns is None:
            return IPRoute()
        try:
            return IPRoute(netns=self.netns, flags=0)
        except OSError as e:
            raise BackendError(f"cannot open a netlink socket in network namespace {self.netns}: {e}") from None

    def _ifindex(self, name: str) -> int | None:
        """The index of interface ``name`` (cached), or None if there is no such interface."""
        index = self._indexes.get(name)
        if index is not None:
            return index
        ipr = self._socket.iproute()
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
                todo.append((address, pack_address(address)))
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
            codes = self._socket.transact([build(packed, indexes) for _, packed in todo])
            stale: list[tuple[str, bytes]] = []
            for (address, packed), code in zip(todo, codes):
                if code == 0 or code in absent_codes:
                    continue
                if code in stale_codes and attempt == 1:
                    stale.append((address, packed))
                else:
                    failures[address] = f"{what} failed: {errno_text(code)}"
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


__all__ = ["PyrouteRtnl", "fdb_payload", "route_payload"]
