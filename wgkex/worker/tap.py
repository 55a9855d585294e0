"""twistd plugin ``wgkex-worker``: the worker's service tree, and the process-wide tuning.

``twistd -n wgkex-worker [--config PATH]``. Options are parsed (and the
configuration validated) by :class:`wgkex.options.Options`; ``makeService``
calls :func:`wgkex.worker.service.build_worker`, which only *builds* the tree
(sockets, threads and timers open when twistd starts it). Heavy imports
(paho, pyroute2) happen here, never at plugin-scan time.

Process-wide tuning lives here and only here (:func:`tune_process`), because
it concerns the whole interpreter rather than one service:

* **Thread switch interval 1 ms** (Python's default is 5 ms). While the pool's
  lanes run Python code (parsing a dump of 100,000 peers, packing netlink
  messages), the reactor thread waits up to one interval for the GIL each time
  it wakes up (a request, a key), several times per request. Measured with
  ``bench/worker_reactor.py`` (100,000 peers counted and swept every second):
  ``/healthz`` p99 27 ms -> 8 ms, max 38 ms -> 22 ms; a 20,000-key burst
  (``bench/worker_burst.py``) is as fast as before.
* **The collector pause** (:class:`~wgkex.worker.pool.GcPause`): jobs that
  hold a whole peer dump (the sweep, the peer count, the start-up dump) turn
  Python's cyclic garbage collector off meanwhile; the collector is
  process-wide, so the process has exactly one pause, made here and handed to
  the worker's tree.
* **Slow collections are logged** (:mod:`wgkex.gcwatch`): a collection that
  stops the process for 0.2 s or more leaves a warning with its generation.
"""

from __future__ import annotations

import sys

from twisted.application.service import IService

from wgkex.gcwatch import watch_collections
from wgkex.options import Options
from wgkex.reactor import IReactor
from wgkex.worker.pool import GcPause

__all__ = ["Options", "SWITCH_INTERVAL", "makeService", "tune_process"]

#: Python's thread switch interval for the worker process (seconds); see the module docstring.
SWITCH_INTERVAL = 0.001


def tune_process() -> GcPause:
    """Apply the process-wide settings of the module docstring; the process's collector pause."""
    sys.setswitchinterval(SWITCH_INTERVAL)
    return GcPause()


def makeService(options: Options, reactor: IReactor | None = None) -> IService:
    """Build (not start) the worker's services; tune the process it runs in."""
    from wgkex.reactor import installed_reactor
    from wgkex.worker.service import build_worker

    gc_pause = tune_process()
    if reactor is None:
        reactor = installed_reactor()
    watch_collections(reactor)
    return build_worker(options.config, reactor, gc_pause=gc_pause)
