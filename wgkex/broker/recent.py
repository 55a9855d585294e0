"""The keys the MQTT server acknowledged lately: what :mod:`wgkex.broker.replay` re-publishes.

:class:`RecentKeys` keeps every key acknowledged in the last
``broker.replay_window`` seconds, at most ``broker.replay_limit`` of them
(32 bytes each, packed per domain and second: 100,000 keys take about 3 MB).
:class:`RecordingBus` feeds it: the key exchange publishes through it, and a
key is remembered once the server's PUBACK arrives. Until then the outbox and
its spool hold it, and :class:`RecentKeys` counts it as *unacknowledged*: a
replay includes those too, because the server may already have dropped such a
key for want of a subscriber while its PUBACK is still on the way (a worker's
status can overtake it, and that status is what starts the replay). Why the
broker keeps keys at all is in :mod:`wgkex.broker.replay`.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from wgkex.bus import Bus, ForwardingBus
from wgkex.contract import published_key_domain

__all__ = ["KEY_BYTES", "RecentKeys", "RecordingBus", "distinct_keys"]

#: A public key, decoded.
KEY_BYTES = 32


@dataclass
class _Second:
    """The keys of one domain acknowledged within one second, packed."""

    second: int
    keys: bytearray = field(default_factory=bytearray)

    def __len__(self) -> int:
        return len(self.keys) // KEY_BYTES


class RecentKeys:
    """The keys acknowledged in the last ``window`` seconds, at most ``limit`` of them, per domain.

    Pure apart from the clock. A key sent twice within the window is kept twice
    (and counted twice against ``limit``); :meth:`keys` gives it once.
    """

    def __init__(self, clock: IReactorTime, window: float, limit: int) -> None:
        self._clock = clock
        self.window = window
        self.limit = limit
        #: domain -> seconds, oldest first
        self._domains: dict[str, deque[_Second]] = {}
        self._count = 0
        #: domain -> key (raw) -> copies handed to the bus and not yet acknowledged or failed
        #: (bounded by the outbox's queue limit: the bus refuses keys beyond it)
        self._unacked: dict[str, dict[bytes, int]] = {}

    def __len__(self) -> int:
        """Keys held now (duplicates included)."""
        self._expire()
        return self._count

    def sending(self, domain: str, key: str) -> bytes | None:
        """``key`` (base64) was just handed to the bus for ``domain``: it counts as unacknowledged
        until :meth:`settled`.

        Returns the decoded key to settle it with; None (nothing to settle) for a key that is
        not 32 bytes in base64, or when replays are off.
        """
        if self.window <= 0 or self.limit <= 0:
            return None
        raw = base64.b64decode(key)
        if len(raw) != KEY_BYTES:
            return None
        keys = self._unacked.setdefault(domain, {})
        keys[raw] = keys.get(raw, 0) + 1
        return raw

    def settled(self, domain: str, raw: bytes, acknowledged: bool) -> None:
        """The bus is done with a key :meth:`sending` returned ``raw`` for; an ``acknowledged``
        one is remembered as acknowledged now."""
        keys = self._unacked.get(domain)
        if keys is not None and raw in keys:
            keys[raw] -= 1
            if keys[raw] <= 0:
                del keys[raw]
                if not keys:
                    del self._unacked[domain]
        if acknowledged:
            self._remember(domain, raw)

    def _remember(self, domain: str, raw: bytes) -> None:
        if self.window <= 0 or self.limit <= 0:
            return
        second = int(self._clock.seconds())
        seconds = self._domains.setdefault(domain, deque())
        if not seconds or seconds[-1].second != second:
            seconds.append(_Second(second))
        seconds[-1].keys += raw
        self._count += 1
        self._expire()
        while self._count > self.limit:
            self._drop_oldest(self._count - self.limit)

    @property
    def unacknowledged(self) -> int:
        """Keys handed to the bus and not yet acknowledged, over all domains."""
        return sum(sum(keys.values()) for keys in self._unacked.values())

    def keys(self, domain: str) -> list[str]:
        """``domain``'s keys within the window, then those not yet acknowledged, each once, oldest first."""
        return list(distinct_keys(self.packed(domain)))

    def packed(self, domain: str) -> bytes:
        """``domain``'s keys within the window, 32 bytes each, oldest first (repeats included),
        then the keys handed to the bus and not yet acknowledged.

        One copy (about 3 MB for 100,000 keys); a replay encodes the keys one by one as it
        hands them over, so it never holds the reactor for long.
        """
        self._expire()
        acknowledged = b"".join(entry.keys for entry in self._domains.get(domain, ()))
        return acknowledged + b"".join(self._unacked.get(domain, {}))

    def _expire(self) -> None:
        # A key acknowledged at t is kept while now - t < window; with whole seconds
        # stored, that is rounded so that no key leaves before its window is over.
        oldest = self._clock.seconds() - self.window
        for domain, seconds in list(self._domains.items()):
            while seconds and seconds[0].second + 1 <= oldest:
                self._count -= len(seconds.popleft())
            if not seconds:
                del self._domains[domain]

    def _drop_oldest(self, excess: int) -> None:
        """Forget up to ``excess`` keys of the oldest second over all domains."""
        domain, seconds = min(self._domains.items(), key=lambda item: item[1][0].second)
        first = seconds[0]
        n = min(excess, len(first))
        del first.keys[: n * KEY_BYTES]
        self._count -= n
        if not first.keys:
            seconds.popleft()
            if not seconds:
                del self._domains[domain]


def distinct_keys(packed: bytes) -> Iterator[str]:
    """The keys packed in ``packed``, in base64, each the first time it occurs."""
    seen: set[bytes] = set()
    for offset in range(0, len(packed), KEY_BYTES):
        raw = packed[offset : offset + KEY_BYTES]
        if raw not in seen:
            seen.add(raw)
            yield base64.b64encode(raw).decode("ascii")


class RecordingBus(ForwardingBus):
    """A :class:`~wgkex.bus.Bus` that remembers each key once the MQTT server acknowledged it.

    The key exchange publishes through it; nothing else changes. Only key
    topics (``wireguard/{domain}/all``) are remembered.
    """

    def __init__(self, bus: Bus, recent: RecentKeys) -> None:
        super().__init__(bus)
        self._recent = recent

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]:
        d = self._bus.publish(topic, payload, qos, retain)
        domain = published_key_domain(topic)
        if domain is not None:
            text = payload.decode("ascii") if isinstance(payload, bytes) else payload
            raw = self._recent.sending(domain, text)
            if raw is not None:
                recent = self._recent

                def settled(result: object) -> object:
                    recent.settled(domain, raw, acknowledged=not isinstance(result, Failure))
                    return result

                d.addBoth(settled)
        return d
