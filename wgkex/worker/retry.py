"""The worker's one retry policy, and the ledger that carries out its last step.

A key either lands (peer, /128 route, FDB entry) or fails with a reason
(:class:`~wgkex.worker.apply.KeyFailure`). Failures are narrowed down first,
then retried later, in exactly these places:

1. **Inside a backend call** (:class:`~wgkex.worker.wg_batch.BatchedWireGuard`):
   many peers go into one transaction (UAPI ``set=1``, a netlink message);
   when it fails, its peers are sent again one by one, so the call reports
   exactly the failing keys (``PeersFailed``) and every other key is in.
2. **Choosing the backend again** (:class:`~wgkex.worker.wireguard.AutoWireGuard`,
   mode ``auto`` only): a call that fails because the interface moved between
   wireguard-go and the kernel module is made once more on the other one.
3. **Unknown outcome** (:func:`~wgkex.worker.apply.apply_batch`): a WireGuard
   call that fails without saying which keys (``BackendError``) is bisected,
   so one bad key costs about ``2 log2(n)`` extra calls and sinks no other.
4. **Later** (:class:`RetryLedger`, driven by the service): a key whose
   interface is missing is re-applied when the interface watch sees it
   appear; a key that failed for any other reason (say, wireguard-go's limit
   of 65,536 peers) is queued again with each metrics tick, at most
   :data:`MAX_RETRIES` times, then given up until its router registers again
   (which earns it its retries again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from wgkex.worker.apply import KeyFailure

#: Retries of a key that failed for a reason other than a missing interface
#: before the worker gives up on it; the router's next registration brings it back.
MAX_RETRIES = 3

#: Failure reasons retried without a count: the interface watch re-applies once the
#: interface is back, and "stopped" only happens while the worker shuts down.
_WAIT_FOR_INTERFACE = frozenset({"interface_missing", "stopped"})


class RetryLedger:
    """Per domain, the keys waiting for a retry and how often each has failed in a row."""

    def __init__(self, domains: Iterable[str], max_retries: int = MAX_RETRIES) -> None:
        self.max_retries = max_retries
        self._waiting: dict[str, set[str]] = {d: set() for d in domains}
        self._attempts: dict[tuple[str, str], int] = {}

    def registered(self, domain: str, key: str) -> None:
        """A fresh registration from the bus: the key earns its retries again."""
        self._attempts.pop((domain, key), None)

    def applied(self, domain: str, keys: Iterable[str]) -> None:
        """These keys landed: nothing to retry."""
        waiting = self._waiting[domain]
        for key in keys:
            waiting.discard(key)
            if self._attempts:
                self._attempts.pop((domain, key), None)

    def failed(self, domain: str, failures: Mapping[str, KeyFailure]) -> list[str]:
        """Record failures; returns the keys given up now (after :attr:`max_retries` retries)."""
        waiting = self._waiting[domain]
        given_up: list[str] = []
        for key, failure in failures.items():
            if failure.reason in _WAIT_FOR_INTERFACE:
                waiting.add(key)
                continue
            attempts = self._attempts.get((domain, key), 0) + 1
            if attempts > self.max_retries:
                self._attempts.pop((domain, key), None)
                waiting.discard(key)
                given_up.append(key)
            else:
                self._attempts[(domain, key)] = attempts
                waiting.add(key)
        return given_up

    def waiting(self, domain: str) -> frozenset[str]:
        """Keys of ``domain`` whose last attempt failed and that are still to be retried."""
        return frozenset(self._waiting[domain])

    def due(self, still_known: Callable[[str, str], bool]) -> dict[str, list[str]]:
        """Per domain the keys to retry now, forgetting those no longer known (swept meanwhile)."""
        due: dict[str, list[str]] = {}
        for domain, waiting in self._waiting.items():
            waiting.intersection_update([k for k in waiting if still_known(domain, k)])
            if waiting:
                due[domain] = sorted(waiting)
        return due


__all__ = ["MAX_RETRIES", "RetryLedger"]
