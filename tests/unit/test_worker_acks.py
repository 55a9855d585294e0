"""When the worker is done with a key message (the MQTT service acknowledges it then).

:meth:`KeyApplier.on_message` returns None for a message refused as invalid,
else a Deferred that fires once the key's batch has run (applied, or failed
and handed to the retry ledger), or fails with :class:`~wgkex.bus.Redeliver`
when the worker stops before applying it. The pool is held by hand
(``ManualPool``), so "not yet applied" is a state the test can look at.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import KEY_A, KEY_B, FakeKernel, ManualPool, backends_for, make_config
from wgkex.bus import Redeliver
from wgkex.worker.domains import domain_interfaces
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.peers import KeyApplier
from wgkex.worker.pool import PoolStopped

WELT = "wireguard/ffmuc_welt/all"
OST = "wireguard/ffmuc_ost/all"


class KeyDoneTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.kernel.add_domain("ost", address="fe80::2")
        backends, _, _ = backends_for(self.kernel)
        self.pool = ManualPool(backends)
        config = make_config()
        self.applier = KeyApplier(config, domain_interfaces(config), self.pool, KnownKeys(config.domains),
                                  WorkerMetrics(config.domains), self.clock)

    def message(self, topic: str, payload: bytes) -> Deferred[None]:
        d = self.applier.on_message(topic, payload, False)
        assert d is not None, "a valid key gives a Deferred"
        return d

    def test_done_only_after_the_key_is_applied(self) -> None:
        """The Deferred of a key fires after its batch has installed it, not before."""
        d = self.message(WELT, KEY_A.encode())
        self.assertNoResult(d)
        self.assertFalse(self.kernel.has("welt", KEY_A))
        self.pool.release()
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertIsNone(self.successResultOf(d))

    def test_keys_waiting_for_the_next_batch_are_not_done(self) -> None:
        """Keys queued behind a running batch are done with their own batch."""
        first = self.message(WELT, KEY_A.encode())
        second = self.message(OST, KEY_B.encode())
        self.pool.release(1)
        self.successResultOf(first)
        self.assertNoResult(second)
        self.pool.release()
        self.successResultOf(second)

    def test_duplicate_is_done_with_the_waiting_key(self) -> None:
        """A repeat of a key still waiting shares its batch: both messages are done when it ran."""
        self.message(WELT, KEY_B.encode())  # occupies the pool
        waiting = self.message(WELT, KEY_A.encode())
        repeat = self.message(WELT, KEY_A.encode())
        self.pool.release(1)
        self.assertNoResult(waiting)
        self.assertNoResult(repeat)
        self.pool.release()
        self.successResultOf(waiting)
        self.successResultOf(repeat)

    def test_invalid_message_done_at_once(self) -> None:
        """A message refused as invalid (or the gateway's own key) needs no work: None."""
        self.assertIsNone(self.applier.on_message(WELT, b"garbage", False))
        self.assertIsNone(self.applier.on_message("wireguard/ffmuc_nord/all", KEY_A.encode(), False))
        self.assertEqual(self.pool.queue, [])

    def test_failed_key_done_and_left_to_the_retries(self) -> None:
        """A key whose interface is missing is done after its attempt (no stalled MQTT window) and
        waits in the retry ledger."""
        self.kernel.delete("wg-ost")
        d = self.message(OST, KEY_A.encode())
        self.pool.release()
        self.successResultOf(d)
        self.assertEqual(self.applier.failed_keys("ffmuc_ost"), {KEY_A})

    def test_stopped_lane_leaves_keys_to_the_server(self) -> None:
        """A batch the keys lane refuses (it is stopping) fails its messages with Redeliver."""
        d = self.message(WELT, KEY_A.encode())
        _, _, _, job = self.pool.queue.pop(0)
        job.errback(PoolStopped("stopping"))
        self.flushLoggedErrors(PoolStopped)
        self.failureResultOf(d, Redeliver)

    def test_keys_dropped_at_stop_are_left_to_the_server(self) -> None:
        """stop() gives up on queued keys after its timeout: their messages fail with Redeliver,
        and so does a key arriving after the stop."""
        running = self.message(WELT, KEY_A.encode())
        queued = self.message(WELT, KEY_B.encode())
        stopped = self.applier.stop(timeout=10)
        self.clock.advance(10)
        self.failureResultOf(queued, Redeliver)
        self.pool.release()
        self.successResultOf(running)
        self.successResultOf(stopped)
        self.failureResultOf(self.message(OST, KEY_B.encode()), Redeliver)
