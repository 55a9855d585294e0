"""Which worker a router is sent to (API v2): the weighted-deficit rule, pure.

Each candidate is a worker online for the router's domain D (status ``1``,
data for D, a peer-count metric for D that is >= 0). Its *deficit* is

    peers(w) - weight(w) / sum(weights) * total_peers

where ``peers(w)`` counts w's connected peers over all its domains. The
candidate with the smallest deficit -- the one furthest below its fair share --
is chosen; equal deficits go to the smallest name, so every broker that sees
the same bus chooses the same worker.

Decided here (and written down in docs/protocol.md): ``sum(weights)`` and
``total_peers`` both range over the *candidates* only. Then the targets add
up to exactly the peers being balanced, so a stream of choices converges to
the configured ratio (3:1 weights give 30:10 out of 40) whether or not other
workers are offline, serve other domains, or still show a stale retained count
after they died. (The original sums the weights of all *configured* workers
and the peers of all *known* workers; with every worker online for D both
readings agree.)

A weight of 0 drains a worker: it is chosen only when no candidate with a
positive weight exists. The arithmetic is done in integers (deficits scaled by
the weight sum), so ties are exact and never depend on float rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Candidate(NamedTuple):
    """A worker eligible for the domain, as the rule sees it (a tuple: v2 builds some per request)."""

    name: str
    #: Connected peers over all the worker's domains (negative counts as 0).
    peers: int
    #: Configured weight (1 when unconfigured, 0 to drain).
    weight: int


@dataclass(frozen=True)
class Assessment:
    """One candidate's standing: its share of the weight and its deficit."""

    name: str
    peers: int
    weight: int
    #: weight / sum(weights) of the candidates considered (0.0 for drained workers).
    target_share: float
    #: peers - target_share * total_peers.
    deficit: float


def _pool(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates the rule weighs: those with a positive weight, else all (drain)."""
    everyone = list(candidates)
    weighted = [c for c in everyone if c.weight > 0]
    return weighted or everyone


def _scaled_deficits(pool: Sequence[Candidate]) -> list[tuple[int, str, Candidate]]:
    """(deficit * sum(weights), name, candidate) for each candidate, in integers."""
    total_peers = sum(max(c.peers, 0) for c in pool)
    total_weight = sum(c.weight for c in pool)
    if total_weight <= 0:
        # Every candidate is drained: spread them evenly (each weighs the same).
        return [(max(c.peers, 0) * len(pool) - total_peers, c.name, c) for c in pool]
    return [(max(c.peers, 0) * total_weight - c.weight * total_peers, c.name, c) for c in pool]


def choose(candidates: Iterable[Candidate]) -> str | None:
    """The name of the candidate furthest below its target, or None without candidates."""
    scored = _scaled_deficits(_pool(candidates))
    if not scored:
        return None
    return min((deficit, name) for deficit, name, _ in scored)[1]


def assess(candidates: Iterable[Candidate]) -> list[Assessment]:
    """Every candidate's target share and deficit, best first (for the status page)."""
    everyone = list(candidates)
    pool = _pool(everyone)
    in_pool = {c.name for c in pool}
    total_peers = sum(max(c.peers, 0) for c in pool)
    total_weight = sum(c.weight for c in pool)
    result: list[Assessment] = []
    for c in everyone:
        if c.name not in in_pool:
            share = 0.0
        elif total_weight > 0:
            share = c.weight / total_weight
        else:
            share = 1 / len(pool)
        peers = max(c.peers, 0)
        result.append(Assessment(c.name, peers, c.weight, share, peers - share * total_peers))
    chosen = choose(everyone)
    result.sort(key=lambda a: (a.name != chosen, a.name not in in_pool, a.deficit, a.name))
    return result
