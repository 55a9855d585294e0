"""Keys that trickle in are gathered for a few milliseconds, so that they share a batch.

A job in the keys lane costs about 0.8 ms of CPU in the worker and 0.1 ms in wireguard-go
whatever its size: the lane's thread, the WireGuard thread and the reactor
each sleep and are woken at least once per job (a wake-up alone costs ~75 us of
CPU on a 2-core VM, ~130 us through the reactor), plus a UAPI round trip and
two netlink transactions. When routers register one by one (the herd after an
outage brings each gateway ~300 keys/s, spread out) batches of one key would
pay that per key. So a batch starts no sooner than ``coalesce`` seconds after
the previous one started (the keys lane's
:data:`~wgkex.worker.pool.KEYS_COALESCE`, 8 ms): a key arriving after a quiet
spell goes at once, a key arriving right after a batch started waits at most
8 ms and goes with whatever came meanwhile, and in a burst (batches take
longer than that) nothing waits; a whole ``max_batch`` waiting goes at once.
Measured with ``bench/worker_burst.py 3000 --rate 300`` (2 cores shared with
other benchmarks, load 3.1-3.8, A/B alternating, two runs each), without ->
with: mean batch 1.3-1.4 -> 3.0-3.1 keys; worker CPU 1.43-1.48 -> 1.07 ms per
key, wireguard-go 0.50-0.55 -> 0.46-0.48 ms; sleeps per key of the worker's
pool threads 4.4-4.7 -> 2.0-2.1, of its reactor 1.8-1.9 -> 1.5;
publish-to-installed p50 2.4-3.0 -> 9.0-9.3 ms, p99 32-37 -> 43-44 ms. At
1000 keys/s (``5000 --rate 1000``) batches already form by themselves
(4.5-8.4 keys) and grow to 12-13: worker 0.47-0.54 -> 0.41-0.47 ms per key,
latency unchanged (p50 15-24 ms, p99 ~80 ms). A 10,000-key burst is as fast as
before (4.1-4.8 s either way, same CPU).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class BatchHold:
    """Whether the next batch waits for more keys, and the timer that ends the wait.

    The applier calls :meth:`started` whenever it hands a batch to the lane,
    asks :meth:`holds` before it starts the next one, and is called back
    (``release``) when a hold ends. ``interval`` 0 never holds.
    """

    def __init__(self, clock: IReactorTime, interval: float, release: Callable[[], None]) -> None:
        self._clock = clock
        self.interval = interval
        self._release = release
        #: Clock time the last batch was handed to the lane (None before the first).
        self._last_start: float | None = None
        #: The delayed start of a batch that is gathering keys.
        self._timer: IDelayedCall | None = None

    def started(self) -> None:
        """A batch was just handed to the lane."""
        self._last_start = self._clock.seconds()

    def holds(self, full: bool) -> bool:
        """True while the next batch waits (the last one started less than ``interval`` ago);
        ``full``: a whole batch is waiting, which never waits."""
        if full:
            self.cancel()
            return False
        if self._timer is not None:
            return True
        if self._last_start is None:
            return False
        # Bounded by the interval itself, so a clock stepped back never holds keys longer.
        wait = min(self._last_start + self.interval - self._clock.seconds(), self.interval)
        if wait <= 0:
            return False
        self._timer = self._clock.callLater(wait, self._end)
        return True

    def cancel(self) -> None:
        """No more waiting (a full batch, or the worker stops)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _end(self) -> None:
        self._timer = None
        self._release()
