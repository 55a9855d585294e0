"""Per-client rate limiting for the key exchange: a token bucket per address.

Each client address owns a bucket of ``burst`` tokens that refills at ``rate``
tokens per second; a request takes one token or is refused with the number of
seconds until the next token (the ``Retry-After`` of the 429). The defaults
(10/s, burst 200) leave room for hundreds of routers behind one carrier-grade
NAT address, each calling at most once a minute, while one client alone can
no longer make every gateway install millions of peers.

IPv6 clients are bucketed per /64 (one subscriber's usual prefix), so rotating
through the addresses of one prefix does not multiply the allowance.

Which address a request comes from is :func:`client_address`'s job: the
connection's peer, or -- only when that peer is a configured trusted proxy --
the right-most address in ``X-Forwarded-For`` that is not itself a trusted
proxy.

Memory stays bounded: buckets that have refilled completely carry no
information and are dropped when the table grows past ``max_entries``.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimiter:
    """Token buckets keyed by client address, driven by ``clock``."""

    def __init__(self, rate: float, burst: int, clock: IReactorTime, max_entries: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._max_entries = max_entries
        #: key -> (tokens, clock time they were counted)
        self._buckets: dict[str, tuple[float, float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, address: str) -> int:
        """Take a token for ``address``: 0 if allowed, else whole seconds to wait (>= 1)."""
        key = bucket_key(address)
        now = self._clock.seconds()
        entry = self._buckets.get(key)
        if entry is None:
            tokens = self.burst
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        if tokens >= 1.0:
            if entry is None and len(self._buckets) >= self._max_entries:
                self._prune(now)
            self._buckets[key] = (tokens - 1.0, now)
            return 0
        self._buckets[key] = (tokens, now)
        return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _prune(self, now: float) -> None:
        """Drop buckets that are full again; if that frees nothing, drop the oldest half."""
        burst, rate = self.burst, self.rate
        self._buckets = {k: v for k, v in self._buckets.items() if v[0] + (now - v[1]) * rate < burst}
        if len(self._buckets) >= self._max_entries:
            ordered = sorted(self._buckets.items(), key=lambda kv: kv[1][1])
            self._buckets = dict(ordered[len(ordered) // 2:])


def bucket_key(address: str) -> str:
    """The bucket an address counts against: itself, or its /64 for IPv6."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def parse_networks(values: Iterable[str]) -> tuple[_Network, ...]:
    """Trusted proxy addresses/networks from the configuration."""
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


def _trusted(address: str, networks: Sequence[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def peer_address(peer: IAddress | None) -> str:
    """The text form of a connection's peer ("unix" for a unix socket)."""
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return peer.host
    return "unix"


def client_address(peer: IAddress | None, forwarded_for: list[bytes] | None, trusted: Sequence[_Network]) -> str:
    """The client a request is accounted to.

    ``X-Forwarded-For`` is read only when the connection comes from a trusted
    proxy (or over a unix socket, which only local processes can reach). Its
    entries are walked from the right, skipping trusted proxies; the first
    other entry is the client. Entries further left are the client's own claims
    and are never believed.
    """
    address = peer_address(peer)
    if not forwarded_for or not (address == "unix" or _trusted(address, trusted)):
        return address
    hops = [h.strip() for h in b",".join(forwarded_for).decode("latin-1").split(",")]
    hops = [h for h in hops if h]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop[:64]
    return hops[0][:64] if hops else address
