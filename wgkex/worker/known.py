"""What the worker remembers about keys, in memory: which keys it serves and since when.

Per domain, every valid key received from the bus (and every peer found on the
interface at start-up) with the time the worker first knew it. Two uses:

* **Sweeping** a peer that never shook hands: it is stale only once the worker
  has known it for longer than ``peer_timeout``. Peers already on the
  interface when the worker starts are seeded with the time of that first dump,
  so a restart never sweeps fresh keys.
* **Re-applying** after wireguard-go restarts: the kernel then deletes
  ``wg-*``, the VXLAN on top and its routes and FDB entries; the worker queues
  every known key of that domain again once the interfaces are back. Those
  peers start without a handshake, so their clock starts again too
  (:meth:`KnownKeys.restart_clock`): a sweep right after the restart must not
  take routers that were connected a minute ago.

Nothing is persisted: after a restart the first dump is the memory.
Only the reactor thread touches this object; the sweep works on a snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class KnownKeys:
    """Keys per domain with the time each was first known."""

    def __init__(self, domains: Iterable[str]) -> None:
        self._first_seen: dict[str, dict[str, float]] = {d: {} for d in domains}
        # Keys received while a sweep runs: that sweep must not forget them.
        self._touched: dict[str, set[str]] | None = None

    def add(self, domain: str, key: str, now: float) -> None:
        """Remember ``key`` on ``domain`` (keeps the first time it was seen)."""
        self._first_seen[domain].setdefault(key, now)
        if self._touched is not None:
            self._touched[domain].add(key)

    def seed(self, domain: str, keys: Iterable[str], now: float) -> int:
        """Remember keys found on the interface; returns how many were new."""
        known = self._first_seen[domain]
        before = len(known)
        for key in keys:
            known.setdefault(key, now)
        return len(known) - before

    def restart_clock(self, domain: str, now: float) -> None:
        """Count every key of ``domain`` as first seen ``now`` (its peers are being installed afresh)."""
        known = self._first_seen[domain]
        for key in known:
            known[key] = now
        if self._touched is not None:
            # A sweep running now decided on the old times: it must not forget these keys.
            self._touched[domain].update(known)

    def keys(self, domain: str) -> list[str]:
        """Every key known on ``domain``."""
        return list(self._first_seen[domain])

    def count(self, domain: str) -> int:
        return len(self._first_seen[domain])

    def first_seen(self, domain: str, key: str) -> float | None:
        return self._first_seen[domain].get(key)

    def received_during_sweep(self, domain: str) -> frozenset[str] | set[str]:
        """Keys of ``domain`` received (or whose clock restarted) since the running sweep began."""
        if self._touched is None:
            return frozenset()
        return self._touched[domain]

    def snapshot(self) -> dict[str, dict[str, float]]:
        """A copy for a sweep running in the pool thread; marks the sweep as begun."""
        self._touched = {d: set() for d in self._first_seen}
        return {d: dict(keys) for d, keys in self._first_seen.items()}

    def sweep_done(self, removed: Mapping[str, Iterable[str]], unseen: Mapping[str, Iterable[str]], now: float) -> None:
        """Forget swept keys (unless received again meanwhile); remember peers seen for the first time."""
        touched = self._touched or {}
        self._touched = None
        for domain, keys in removed.items():
            known = self._first_seen[domain]
            again = touched.get(domain, set())
            for key in keys:
                if key not in again:
                    known.pop(key, None)
        for domain, keys in unseen.items():
            self.seed(domain, keys, now)

    def sweep_failed(self) -> None:
        self._touched = None
