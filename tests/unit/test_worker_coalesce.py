"""Keys trickling in are gathered for a few milliseconds into one batch; a lone key or a burst never waits.

The keys lane costs about 1 ms of CPU per job whatever its size, so when keys
arrive one by one (routers registering through the broker, ~300 keys/s per
gateway) the worker holds the next batch until ``coalesce`` seconds after the
previous batch started. The pool is held by hand (``ManualPool``) and time is a
``Clock``, so "waiting" and "handed to the lane" are states a test can see.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import FakeKernel, ManualPool, backends_for, key, make_config
from wgkex.worker.domains import domain_interfaces
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.peers import KeyApplier

WELT = "wireguard/ffmuc_welt/all"
INTERVAL = 0.008


class CoalescingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.kernel.add_domain("ost", address="fe80::2")
        backends, self.wg, _ = backends_for(self.kernel)
        self.pool = ManualPool(backends)
        self.config = make_config(max_batch=4)
        self.applier = self.make_applier(self.pool, INTERVAL)

    def make_applier(self, pool: object, coalesce: float | None) -> KeyApplier:
        return KeyApplier(self.config, domain_interfaces(self.config), pool,  # type: ignore[arg-type]
                          KnownKeys(self.config.domains), WorkerMetrics(self.config.domains), self.clock,
                          coalesce=coalesce)

    def message(self, n: int) -> Deferred[None]:
        d = self.applier.on_message(WELT, key(n).encode(), False)
        assert d is not None, "a valid key gives a Deferred"
        return d

    def batch_sizes(self) -> list[int]:
        """Keys per add_peers call, in order (one call per batch here)."""
        return [c[2] for c in self.wg.calls if c[0] == "add_peers"]

    def test_lone_key_goes_at_once(self) -> None:
        """A key after a quiet spell is handed to the lane at once and applied without waiting."""
        done = self.message(0)
        self.assertEqual(len(self.pool.queue), 1)
        self.pool.release()
        self.assertTrue(self.kernel.has("welt", key(0)))
        self.successResultOf(done)

    def test_trickle_gathered_into_one_batch(self) -> None:
        """Keys arriving within the interval after a batch started wait and then go together."""
        self.message(0)
        self.pool.release()
        later = []
        for n in (1, 2, 3):
            self.clock.advance(0.002)
            later.append(self.message(n))
        self.assertEqual(self.pool.queue, [], "held: the previous batch started 6 ms ago")
        self.clock.advance(0.0021)  # just over 8 ms after the first batch started
        self.pool.release()
        self.assertEqual(self.batch_sizes(), [1, 3])
        self.assertTrue(all(self.kernel.has("welt", key(n)) for n in (1, 2, 3)))
        for d in later:
            self.successResultOf(d)

    def test_held_key_not_done_before_applied(self) -> None:
        """A key waiting for its batch is not acknowledged until the batch has installed it."""
        self.message(0)
        self.pool.release()
        held = self.message(1)
        self.clock.advance(INTERVAL)
        self.assertNoResult(held)
        self.assertFalse(self.kernel.has("welt", key(1)))
        self.pool.release()
        self.successResultOf(held)

    def test_wait_bounded_by_the_interval(self) -> None:
        """No key waits longer than the interval: the held batch starts exactly when it ends."""
        self.message(0)
        self.pool.release()
        self.clock.advance(0.001)
        self.message(1)
        self.clock.advance(INTERVAL - 0.001 - 1e-6)
        self.assertEqual(self.pool.queue, [])
        self.clock.advance(2e-6)
        self.assertEqual(len(self.pool.queue), 1)

    def test_key_after_the_interval_goes_at_once(self) -> None:
        """A key arriving once the interval since the last batch start is over is not held."""
        self.message(0)
        self.pool.release()
        self.clock.advance(INTERVAL)
        self.message(1)
        self.assertEqual(len(self.pool.queue), 1)

    def test_full_batch_not_held(self) -> None:
        """As soon as a whole batch (max_batch keys) is waiting it goes, interval or not."""
        self.message(0)
        self.pool.release()
        for n in range(1, 5):
            self.message(n)
        self.assertEqual(len(self.pool.queue), 1)
        self.pool.release()
        self.assertEqual(self.batch_sizes(), [1, 4])

    def test_burst_never_waits(self) -> None:
        """Keys queued behind a batch that took longer than the interval start as soon as it ends."""
        self.message(0)
        for n in (1, 2):
            self.message(n)
        self.clock.advance(0.05)  # the first batch ran for 50 ms
        self.pool.release(1)
        self.assertEqual(len(self.pool.queue), 1)

    def test_stop_applies_held_keys(self) -> None:
        """Stopping applies the keys still waiting for their batch before it fires."""
        self.message(0)
        self.pool.release()
        held = self.message(1)
        stopped = self.applier.stop()
        self.assertNoResult(stopped)
        self.clock.advance(INTERVAL)
        self.pool.release()
        self.successResultOf(held)
        self.successResultOf(stopped)
        self.assertTrue(self.kernel.has("welt", key(1)))

    def test_interval_from_the_lane(self) -> None:
        """Without an explicit interval the applier takes the lane's ``coalesce``; a lane without one never holds."""
        self.pool.coalesce = INTERVAL  # type: ignore[attr-defined]
        from_lane = self.make_applier(self.pool, None)
        from_lane.submit("ffmuc_welt", key(0))
        self.pool.release()
        from_lane.submit("ffmuc_welt", key(1))
        self.assertEqual(self.pool.queue, [])
        plain = ManualPool(self.pool.backends)
        never = self.make_applier(plain, None)
        never.submit("ffmuc_welt", key(2))
        plain.release()
        never.submit("ffmuc_welt", key(3))
        self.assertEqual(len(plain.queue), 1)
