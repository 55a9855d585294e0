"""twistd plugin ``wgkex-broker``: builds the broker's service tree from the configuration.

``twistd -n wgkex-broker [--config PATH]``. Options are parsed (and the
configuration validated) by :class:`wgkex.options.Options`; ``makeService``
only builds the tree of :func:`wgkex.broker.service.build_broker`, which opens
nothing until twistd starts it. Klein is imported here, inside ``makeService``,
never at plugin-scan time: importing it installs the reactor.

Process-wide tuning lives here, in one place, not in library services: once the
reactor runs, everything built so far is moved out of the garbage collector's
generations (``gc.freeze()``). It lives as long as the process; without the
freeze, collections walk the whole Klein/werkzeug/prometheus object graph and
pauses of up to 40 ms were measured under request load (Klein leaves many
reference cycles per request). The youngest generation is then collected
every :data:`YOUNG_THRESHOLD` net allocations instead of 700: each request
leaves a few hundred objects alive while it waits for its PUBACK, so at 700
the collector ran every request or two and walked every request in flight
(0.21 s of collections for 5,000 v2 requests; 0.07 s at 5,000, measured with
``gc.callbacks`` under ``bench/broker.py``). Garbage cycles wait a little longer
for their collection; that is all.
"""

from __future__ import annotations

import gc

from twisted.application.service import IService

from wgkex.options import Options
from wgkex.reactor import IReactor
from wgkex.gcwatch import watch_collections

__all__ = ["Options", "makeService"]

#: Net allocations between two collections of the youngest generation (Python's default: 700).
YOUNG_THRESHOLD = 10_000


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    """Build (not start) the broker's services (on Twisted's global reactor unless given one)."""
    from wgkex.broker.service import build_broker
    from wgkex.reactor import installed_reactor

    if reactor is None:
        reactor = installed_reactor()

    broker = build_broker(options.config, reactor)
    reactor.callWhenRunning(_freeze_start_up_objects)
    watch_collections(reactor)
    return broker.service


def _freeze_start_up_objects() -> None:
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
