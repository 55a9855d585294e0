"""The apply path: bus messages validated, coalesced into batches, applied with failure isolation."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import (
    KEY_A, KEY_B, LL_A, LL_B, FakeKernel, ManualPool, SyncPool, backends_for, key, make_config,
)
from wgkex.worker.domains import domain_interfaces
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.peers import KeyApplier


WELT = "wireguard/ffmuc_welt/all"
OST = "wireguard/ffmuc_ost/all"


def sample(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


class ApplierTests(SynchronousTestCase):
    """KeyApplier with fake backends and a synchronous pool."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.kernel.add_domain("ost", address="fe80::2")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.pool = SyncPool(self.backends)
        self.config = make_config()
        self.metrics = WorkerMetrics(self.config.domains)
        self.known = KnownKeys(self.config.domains)
        self.applier = KeyApplier(self.config, domain_interfaces(self.config), self.pool, self.known, self.metrics, self.clock)

    def test_key_installed(self) -> None:
        """A key becomes a peer with lladdr/128, a route and an FDB entry (the vectors of docs/protocol.md)."""
        self.applier.on_message(WELT, KEY_A.encode(), False)
        self.applier.on_message(OST, KEY_B.encode(), False)
        self.assertEqual(self.kernel.peers["wg-welt"][KEY_A].allowed_ips, (LL_A + "/128",))
        self.assertEqual(self.kernel.routes["wg-welt"], {LL_A})
        self.assertEqual(self.kernel.fdb["vx-welt"], {(LL_A, "wg-welt")})
        self.assertEqual(self.kernel.peers["wg-ost"][KEY_B].allowed_ips, (LL_B + "/128",))
        self.assertEqual(self.kernel.routes["wg-ost"], {LL_B})
        self.assertEqual(self.kernel.fdb["vx-ost"], {(LL_B, "wg-ost")})
        self.assertEqual(sample(self.metrics, "wgkex_worker_keys_applied_total", domain="ffmuc_welt"), 1)
        self.assertEqual(sample(self.metrics, "wgkex_worker_keys_received_total"), 2)

    def test_repeated_key_harmless(self) -> None:
        """Applying the same key again changes nothing and is no error."""
        for _ in range(3):
            self.applier.on_message(WELT, KEY_A.encode(), False)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertEqual(len(self.kernel.peers["wg-welt"]), 1)
        self.assertEqual(sample(self.metrics, "wgkex_worker_keys_applied_total", domain="ffmuc_welt"), 3)
        self.assertEqual(sum(sample(self.metrics, "wgkex_worker_keys_failed_total", domain="ffmuc_welt",
                                    reason=r) for r in ("wireguard", "route", "fdb", "internal")), 0)

    def test_invalid_never_reaches_kernel(self) -> None:
        """Invalid messages are counted by reason and cause no backend call."""
        self.applier.on_message(WELT, b"garbage", False)
        self.applier.on_message("wireguard/ffmuc_nord/all", KEY_A.encode(), False)
        self.applier.on_message("wireguard/x", KEY_A.encode(), False)
        self.applier.on_message(WELT, b"\xff", False)
        self.assertEqual(self.wg.calls, [])
        self.assertEqual(self.rtnl.calls, [])
        for reason in ("key", "domain", "topic", "payload"):
            self.assertEqual(sample(self.metrics, "wgkex_worker_keys_invalid_total", reason=reason), 1, reason)
        self.assertEqual(self.known.count("ffmuc_welt"), 0)

    def test_valid_key_after_garbage(self) -> None:
        """A valid key after garbage still lands."""
        self.applier.on_message(WELT, b"garbage", False)
        self.applier.on_message(WELT, KEY_A.encode(), False)
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_invalid_logging_rate_limited(self) -> None:
        """Invalid messages log at most one line per 10 s, then a count of the suppressed ones."""
        with capturedLogs() as events:
            for _ in range(50):
                self.applier.on_message(WELT, b"garbage", False)
            self.clock.advance(10)
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(warnings[1]["count"], 49)
        self.assertEqual(sample(self.metrics, "wgkex_worker_keys_invalid_total", reason="key"), 50)

    def test_one_call_per_interface_per_batch(self) -> None:
        """A batch (up to CHUNK keys per interface) costs one add_peers, one replace_routes and one append_fdb each."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", key(0))  # first batch, in flight
        for n in range(1, 201):
            applier.submit("ffmuc_welt" if n % 2 else "ffmuc_ost", key(n))
        pool.release(1)
        self.wg.calls.clear()
        self.rtnl.calls.clear()
        pool.release(1)
        self.assertEqual(
            sorted(self.wg.calls), [("add_peers", "wg-ost", 100), ("add_peers", "wg-welt", 100)]
        )
        self.assertEqual(
            sorted(self.rtnl.calls),
            [
                ("append_fdb", "vx-ost", 100),
                ("append_fdb", "vx-welt", 100),
                ("replace_routes", "wg-ost", 100),
                ("replace_routes", "wg-welt", 100),
            ],
        )
        self.assertTrue(all(self.kernel.has("welt", key(n)) for n in range(1, 201, 2)))
        self.assertTrue(all(self.kernel.has("ost", key(n)) for n in range(2, 201, 2)))

    def test_coalescing_drops_duplicates(self) -> None:
        """Keys arriving while a batch is applied form the next batch; duplicates are dropped."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", KEY_A)
        self.assertEqual(pool.jobs(), ["apply_batch"])
        for k in (KEY_B, KEY_A, KEY_B, KEY_B, KEY_A):
            applier.submit("ffmuc_welt", k)
        # Still one job in the pool: the rest waits.
        self.assertEqual(pool.jobs(), ["apply_batch"])
        self.assertEqual(applier.pending, 2)
        self.assertEqual(sample(self.metrics, "wgkex_worker_keys_duplicate_total"), 3)
        pool.release(1)
        # The first batch done, the next one (both keys, once each) is in the pool.
        self.assertEqual(pool.jobs(), ["apply_batch"])
        self.assertEqual(pool.queue[0][1][0], {"ffmuc_welt": [KEY_B, KEY_A]})
        pool.release()
        self.assertEqual(applier.pending, 0)
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("welt", KEY_B))

    def test_same_key_other_domain_not_duplicate(self) -> None:
        """One key on two domains is two entries."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", key(1))
        applier.submit("ffmuc_welt", KEY_A)
        applier.submit("ffmuc_ost", KEY_A)
        pool.release()
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("ost", KEY_A))

    def test_batch_bounded(self) -> None:
        """No batch holds more than max_batch keys."""
        config = make_config(max_batch=3)
        pool = ManualPool(self.backends)
        applier = KeyApplier(config, domain_interfaces(config), pool, self.known, self.metrics, self.clock)
        for n in range(10):
            applier.submit("ffmuc_welt", key(n))
        sizes = []
        while pool.queue:
            sizes.append(sum(len(v) for v in pool.queue[0][1][0].values()))
            pool.release(1)
        self.assertEqual(sizes, [1, 3, 3, 3])
        self.assertEqual(sample(self.metrics, "wgkex_worker_batch_size_count"), 4)
        self.assertTrue(all(self.kernel.has("welt", key(n)) for n in range(10)))

    def test_missing_interface_isolated(self) -> None:
        """A missing interface fails only its domain's keys, logged with key and interface."""
        self.kernel.delete("wg-ost")
        self.kernel.delete("vx-ost")
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", key(0))
        applier.submit("ffmuc_ost", KEY_B)
        applier.submit("ffmuc_welt", KEY_A)
        with capturedLogs() as events:
            pool.release()
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("welt", key(0)))
        self.assertEqual(
            sample(self.metrics, "wgkex_worker_keys_failed_total", domain="ffmuc_ost", reason="interface_missing"), 1
        )
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn(KEY_B, errors[0]["sample"])
        self.assertEqual(errors[0]["wg"], "wg-ost")
        self.assertEqual(applier.failed_keys("ffmuc_ost"), {KEY_B})

    def test_bad_key_bisected(self) -> None:
        """A key that sinks a whole add_peers call fails alone; the rest of the batch lands."""
        keys = [key(n) for n in range(16)]
        self.wg.refuse.add(keys[5])
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", KEY_A)
        for k in keys:
            applier.submit("ffmuc_welt", k)
        pool.release()
        self.assertTrue(all(self.kernel.has("welt", k) for k in keys if k != keys[5]))
        self.assertTrue(self.kernel.nothing_on("welt", keys[5]))
        self.assertEqual(applier.failed_keys("ffmuc_welt"), {keys[5]})
        self.assertEqual(
            sample(self.metrics, "wgkex_worker_keys_failed_total", domain="ffmuc_welt", reason="wireguard"), 1
        )
        # Bisection: far fewer calls than one per key.
        self.assertLessEqual(len([c for c in self.wg.calls if c[0] == "add_peers"]), 1 + 2 * 4 + 1)

    def test_partial_failure_reported_by_backend(self) -> None:
        """PeersFailed fails exactly the named keys; the others get routes and FDB entries."""
        self.wg.refuse_partially.add(KEY_B)
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", key(1))
        applier.submit("ffmuc_welt", KEY_A)
        applier.submit("ffmuc_welt", KEY_B)
        pool.release()
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertTrue(self.kernel.nothing_on("welt", KEY_B))
        self.assertEqual(applier.failed_keys("ffmuc_welt"), {KEY_B})

    def test_route_failure_isolated(self) -> None:
        """One refused route fails its key only."""
        self.rtnl.refuse_routes.add(LL_B)
        self.applier.submit("ffmuc_welt", KEY_A)
        self.applier.submit("ffmuc_welt", KEY_B)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertNotIn(LL_B, self.kernel.routes["wg-welt"])
        self.assertEqual(
            sample(self.metrics, "wgkex_worker_keys_failed_total", domain="ffmuc_welt", reason="route"), 1
        )
        self.assertEqual(self.applier.failed_keys("ffmuc_welt"), {KEY_B})

    def test_fdb_failure_isolated(self) -> None:
        """One refused FDB entry fails its key only."""
        self.rtnl.refuse_fdb.add(LL_A)
        self.applier.submit("ffmuc_welt", KEY_A)
        self.applier.submit("ffmuc_welt", KEY_B)
        self.assertTrue(self.kernel.has("welt", KEY_B))
        self.assertEqual(
            sample(self.metrics, "wgkex_worker_keys_failed_total", domain="ffmuc_welt", reason="fdb"), 1
        )

    def test_unexpected_exception_isolated(self) -> None:
        """A bug in one domain's backend call fails that domain's keys, not the other domain's."""
        original = self.rtnl.replace_routes

        def broken(iface: str, addresses: object) -> dict[str, str]:
            if iface == "wg-ost":
                raise ZeroDivisionError("boom")
            return original(iface, addresses)  # type: ignore[arg-type]

        self.rtnl.replace_routes = broken  # type: ignore[method-assign]
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", key(1))
        applier.submit("ffmuc_ost", KEY_B)
        applier.submit("ffmuc_welt", KEY_A)
        pool.release()
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertEqual(
            sample(self.metrics, "wgkex_worker_keys_failed_total", domain="ffmuc_ost", reason="internal"), 1
        )

    def test_failed_pool_job(self) -> None:
        """A pool job failing as a whole fails its keys and the next batch still runs."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", KEY_A)
        applier.submit("ffmuc_welt", KEY_B)
        _, _, _, d = pool.queue.pop(0)
        d.errback(RuntimeError("pool exploded"))
        self.flushLoggedErrors(RuntimeError)
        pool.release()
        self.assertTrue(self.kernel.has("welt", KEY_B))
        self.assertEqual(applier.failed_keys("ffmuc_welt"), {KEY_A})

    def test_retry_after_interface_returns(self) -> None:
        """Keys that failed on a missing interface land on retry once it is back, without restart."""
        self.kernel.delete("wg-ost")
        self.applier.submit("ffmuc_ost", KEY_A)
        self.assertFalse(self.kernel.has("ost", KEY_A))
        self.kernel.add_domain("ost")
        self.assertEqual(self.applier.retry_failed(), 1)
        self.assertTrue(self.kernel.has("ost", KEY_A))
        self.assertEqual(self.applier.failed_keys("ffmuc_ost"), frozenset())
        self.assertEqual(self.applier.retry_failed(), 0)

    def test_swept_failed_key_not_retried(self) -> None:
        """A failed key that a sweep removed meanwhile is not brought back by the retry."""
        self.rtnl.refuse_routes.add(LL_A)
        self.applier.submit("ffmuc_welt", KEY_A)
        self.known.snapshot()
        self.known.sweep_done({"ffmuc_welt": [KEY_A]}, {}, 0.0)
        self.rtnl.refuse_routes.clear()
        self.assertEqual(self.applier.retry_failed(), 0)
        self.assertEqual(self.applier.failed_keys("ffmuc_welt"), frozenset())

    def test_reapply_all_known(self) -> None:
        """reapply() installs every known key of a domain again (after an interface was recreated)."""
        for k in (KEY_A, KEY_B):
            self.applier.submit("ffmuc_welt", k)
        self.kernel.delete("wg-welt")
        self.kernel.delete("vx-welt")
        self.kernel.add_domain("welt")
        self.assertEqual(self.applier.reapply("ffmuc_welt"), 2)
        self.assertTrue(self.kernel.has("welt", KEY_A) and self.kernel.has("welt", KEY_B))
        self.assertEqual(sample(self.metrics, "wgkex_worker_keys_reapplied_total", domain="ffmuc_welt"), 2)

    def test_known_remembers_first_seen(self) -> None:
        """Valid keys are remembered with the time first seen; repeats keep that time."""
        self.applier.submit("ffmuc_welt", KEY_A)
        self.clock.advance(100)
        self.applier.submit("ffmuc_welt", KEY_A)
        self.assertEqual(self.known.first_seen("ffmuc_welt", KEY_A), 0)

    def test_stop_drains_then_refuses(self) -> None:
        """stop() applies what is queued (and what still arrives), then refuses keys."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", KEY_A)
        applier.submit("ffmuc_welt", KEY_B)
        d = applier.stop(timeout=10)
        applier.submit("ffmuc_welt", key(3))
        self.assertNoResult(d)
        pool.release()
        self.successResultOf(d)
        self.assertTrue(all(self.kernel.has("welt", k) for k in (KEY_A, KEY_B, key(3))))
        self.assertFalse(applier.submit("ffmuc_welt", key(4)))
        self.assertEqual(pool.queue, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_gives_up_after_timeout(self) -> None:
        """stop() drops what is still queued after the timeout and fires once the pool is done."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", KEY_A)
        applier.submit("ffmuc_welt", KEY_B)
        d = applier.stop(timeout=10)
        self.clock.advance(10)
        self.assertNoResult(d)
        pool.release()
        self.successResultOf(d)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertFalse(self.kernel.has("welt", KEY_B))
