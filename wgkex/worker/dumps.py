"""Whole peer dumps: what one tells (peer counts) and how often the WireGuard device may be held for one.

Three things dump every peer of a domain's interface, all in the housekeeping
lane (:mod:`wgkex.worker.pool`): the start-up dump that fills the key memory,
the connected-peer count of every ``metrics_interval``
(:mod:`wgkex.worker.report`) and the stale-peer sweep
(:mod:`wgkex.worker.sweep`). Each of them counts the peers it saw
(:func:`count_peers_of`), so one dump serves both the sweep and the count.

A userspace daemon (wireguard-go, and the fake one of the benchmarks) answers
a dump in one piece with its device locked: 0.5-0.7 s for 65,530 peers with
wireguard-go (``bench/uapi_dump_lock.py``). A new key's peer waits for that, so
at 100,000 peers every dump shows up in the routers' latency.
:class:`DumpPacing` bounds the share of time the device is held for dumps:
after a dump that took ``d`` seconds (at least :data:`PACED_DUMP`), no other
dump starts before ``d / MAX_DUMP_SHARE`` seconds have passed since it began.
Meanwhile a sweep that is due waits, and the peer count publishes the counts
of the last dump, whichever job made it. The kernel's WireGuard dumps in
netlink chunks, holding the device for one chunk at a time so that keys go in
between: with ``wireguard_backend: kernel`` nothing is paced.

Measured with ``bench/sweep_latency.py`` (100,000 peers, sweeps back to back,
``metrics_interval`` 60 s): with only the sweeps paced, 3 of the 4 dumps of a
180 s run were peer counts, and publish-to-installed was 19/202/1062 ms
(p50/p99/max); with the pacing shared by every dump, 15.7/40.2/113 ms over
1,179 keys in 300 s, and a single dump of 0.32 s in the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wgkex.worker.backend import PeerInfo
    from wgkex.worker.pool import Backends

#: A peer counts as connected with a handshake at most this many seconds old.
CONNECTED_WINDOW = 180.0

#: Whole dumps hold a WireGuard device at most this share of the time: after a dump that took
#: ``d`` seconds, the next one starts no sooner than ``d / MAX_DUMP_SHARE`` after it began
#: (100,000 peers on wireguard-go: a dump about every 1-2 minutes).
MAX_DUMP_SHARE = 0.005
#: Dumps shorter than this never pace: a key waiting that long now and then is of no concern,
#: and a dump of a few peers that took long only because the machine was busy must not hold
#: short test sweeps back for many seconds.
PACED_DUMP = 0.2


@dataclass(frozen=True)
class PeerCount:
    """Peers of one interface: all of them and those connected."""

    total: int
    connected: int


def count_peers_of(last_handshakes: Iterable[float | None], now: float, window: float = CONNECTED_WINDOW) -> PeerCount:
    """The peers and how many shook hands within ``window`` seconds before ``now`` (``None``/0: never)."""
    total = connected = 0
    for handshake in last_handshakes:
        total += 1
        if handshake and now - handshake <= window:
            connected += 1
    return PeerCount(total=total, connected=connected)


def timed_dump(backends: Backends, wg: str, monotonic: Callable[[], float]) -> tuple[list[PeerInfo], float]:
    """Pool thread: every peer of ``wg`` and the seconds the dump took (call it inside
    ``backends.gc_pause``, which must also cover what is done with the peers)."""
    began = monotonic()
    peers = backends.wireguard.peers(wg)
    return peers, monotonic() - began


@dataclass(frozen=True)
class Pause:
    """Dumps wait: ``seconds`` from the start of a dump of ``peers`` peers that held the device ``held`` s."""

    seconds: float
    peers: int
    held: float


class DumpPacing:
    """When the next whole dump may start, and the peer counts of the last one (one per worker).

    ``paced`` is False for the kernel backend: then every dump may start at
    once and nothing is cached for the count.
    """

    def __init__(self, paced: bool, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.paced = paced
        self._monotonic = monotonic
        self._until = 0.0
        #: Per domain, the counts of the last dump that read it.
        self._counts: dict[str, PeerCount] = {}

    def now(self) -> float:
        """The pacing's (monotonic) clock: when a dump job starts."""
        return self._monotonic()

    def allows_dump(self) -> bool:
        """True when a dump may start now."""
        return self._monotonic() >= self._until

    def cached_counts(self) -> dict[str, PeerCount]:
        """The counts of the last dump, per domain, while dumps wait (else nothing: count afresh)."""
        if self.allows_dump():
            return {}
        return dict(self._counts)

    def dumped(self, started: float, held: Mapping[str, tuple[float, int]], counts: Mapping[str, PeerCount]) -> Pause | None:
        """A dump job that began at (monotonic) ``started`` is done.

        ``held``: per domain, the seconds the device was held and the peers
        read; ``counts``: per domain, what the dump counted (domains that could
        not be read are left out). Returns the pause the dump imposes, if any.
        """
        self._counts.update(counts)
        longest = max(held.values(), default=(0.0, 0))
        if not self.paced or longest[0] < PACED_DUMP:
            return None
        gap = longest[0] / MAX_DUMP_SHARE
        self._until = max(self._until, started + gap)
        return Pause(gap, longest[1], longest[0])

    def forget(self, domain: str) -> None:
        """``domain``'s interface changed: its next count reads it afresh."""
        self._counts.pop(domain, None)
