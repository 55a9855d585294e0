"""The shape both WireGuard backends share: peer changes in batched transactions, with a fallback.

Adding or removing peers one transaction at a time is slow (a UAPI round trip
or a netlink message each), so :class:`BatchedWireGuard` sends many in one
(:meth:`~BatchedWireGuard._send`): a UAPI ``set=1`` for wireguard-go, a
``WG_CMD_SET_DEVICE`` message (at most :attr:`~BatchedWireGuard.per_transaction`
peers) for the kernel. Neither rolls back: both apply the peers of a
transaction in order and stop at the first failing one. So when a transaction
fails, its peers are sent again one per transaction, and exactly the failing
keys are reported with :class:`~wgkex.worker.backend.PeersFailed` (every other
key is in place). This is step 1 of the worker's retry policy
(:mod:`wgkex.worker.retry`).

A peer that cannot even be encoded (bad key, bad allowed IP) fails alone,
without a transaction. :class:`~wgkex.worker.backend.InterfaceMissing` and
:class:`~wgkex.worker.backend.BackendError` raised by ``_send`` pass through:
nothing, or an unknown part, was applied.
"""

from __future__ import annotations

import threading
from functools import partial
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from twisted.logger import Logger

from wgkex.worker.backend import PeersFailed

#: One peer's change, encoded for the backend's transaction (UAPI lines, netlink attributes).
Change = TypeVar("Change")


class BatchedWireGuard(Generic[Change]):
    """The ``add_peers``/``remove_peers`` half of :class:`~wgkex.worker.backend.WireGuard`, batched.

    Subclasses encode one change (:meth:`_encode_add`, :meth:`_encode_remove`,
    raising ``ValueError`` with the reason) and send a transaction
    (:meth:`_send`: None on success, else the backend's reason). One call at a
    time per object (:attr:`_lock`; subclasses take it for their other calls too).
    """

    log = Logger()
    #: Peers per transaction (None: all of a call in one).
    per_transaction: int | None = None
    #: What one transaction is called in log lines.
    transaction = "transaction"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
        """Add or update ``(public_key, allowed_ip)`` peers, replacing each one's allowed IPs."""
        self._change(iface, "add", [(key, partial(self._encode_add, key, ip)) for key, ip in peers])

    def remove_peers(self, iface: str, keys: Sequence[str]) -> None:
        """Remove peers by public key; absent peers are fine."""
        self._change(iface, "remove", [(key, partial(self._encode_remove, key)) for key in keys])

    # -- what a backend provides ------------------------------------------------------------

    def _encode_add(self, key: str, allowed_ip: str) -> Change:
        raise NotImplementedError

    def _encode_remove(self, key: str) -> Change:
        raise NotImplementedError

    def _send(self, iface: str, changes: list[Change]) -> str | None:
        raise NotImplementedError

    # -- the shared shape -------------------------------------------------------------------

    def _change(self, iface: str, what: str, encoders: Sequence[tuple[str, Callable[[], Change]]]) -> None:
        failed: dict[str, str] = {}
        entries: list[tuple[str, Change]] = []
        for key, encode in encoders:
            try:
                entries.append((key, encode()))
            except ValueError as e:
                failed[key] = str(e)
        with self._lock:
            self._send_with_fallback(iface, entries, failed, what)
        if failed:
            raise PeersFailed(iface, failed)

    def _send_with_fallback(
        self, iface: str, entries: list[tuple[str, Change]], failed: dict[str, str], what: str
    ) -> None:
        step = max(1, self.per_transaction or len(entries))
        for start in range(0, len(entries), step):
            chunk = entries[start : start + step]
            problem = self._send(iface, [change for _, change in chunk])
            if problem is None:
                continue
            self.log.warn(
                "{iface}: {what} of {count} peers in one {transaction} failed ({problem}); retrying them one by one",
                iface=iface,
                what=what,
                count=len(chunk),
                transaction=self.transaction,
                problem=problem,
            )
            for key, change in chunk:
                problem = self._send(iface, [change])
                if problem is not None:
                    failed[key] = f"{what} peer on {iface} failed: {problem}"


__all__ = ["BatchedWireGuard"]
