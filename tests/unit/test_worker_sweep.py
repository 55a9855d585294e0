"""Stale-peer sweeps: the rules (handshake age, first-seen age, keep list) and their effect."""

from __future__ import annotations

import gc
from collections.abc import Sequence

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import (
    KEY_A,
    KEY_B,
    FakeKernel,
    ManualPool,
    SyncPool,
    backends_for,
    key,
    make_config,
    slow_dumps,
)
from wgkex.worker.backend import PeerInfo
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.domains import Interfaces, domain_interfaces
from wgkex.worker.peers import KeyApplier
from wgkex.worker.sweep import SWEEP_CHUNK, DomainKeys, Sweeper, dump_keys, find_stale, stale_keys

TIMEOUT = 3 * 3600.0
START = 1_700_000_000.0


class StaleKeysTests(SynchronousTestCase):
    """The pure decision."""

    def test_old_handshake_stale(self) -> None:
        """A handshake older than the timeout is stale; one within it is not."""
        now = START + 10 * TIMEOUT
        peers = [PeerInfo(KEY_A, now - TIMEOUT - 1), PeerInfo(KEY_B, now - TIMEOUT + 1)]
        self.assertEqual(stale_keys(peers, {}, frozenset(), now, TIMEOUT), ([KEY_A], []))

    def test_never_handshaked(self) -> None:
        """Never-handshaked: stale only when known longer than the timeout; unknown ones are reported unseen."""
        now = START + 10 * TIMEOUT
        peers = [PeerInfo(KEY_A, None), PeerInfo(KEY_B, None), PeerInfo(key(1), None)]
        first_seen = {KEY_A: now - TIMEOUT - 1, KEY_B: now - 60}
        self.assertEqual(stale_keys(peers, first_seen, frozenset(), now, TIMEOUT), ([KEY_A], [key(1)]))

    def test_zero_handshake_means_never(self) -> None:
        """A handshake time of 0 (WireGuard's 'never') counts as never, not as 1970."""
        now = START
        self.assertEqual(stale_keys([PeerInfo(KEY_A, 0)], {KEY_A: now - 5}, frozenset(), now, TIMEOUT), ([], []))

    def test_keep_list(self) -> None:
        """Keys on the keep list are never stale."""
        now = START + 10 * TIMEOUT
        peers = [PeerInfo(KEY_A, 1.0), PeerInfo(KEY_B, None)]
        self.assertEqual(stale_keys(peers, {KEY_B: 0.0}, frozenset({KEY_A, KEY_B}), now, TIMEOUT), ([], []))


class SweeperTests(SynchronousTestCase):
    """Sweeps with a Clock, fake backends and a synchronous pool."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.kernel.add_domain("ost")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.pool = SyncPool(self.backends)
        self.config = make_config(keep_keys=[key(99)])
        self.metrics = WorkerMetrics(self.config.domains)
        self.known = KnownKeys(self.config.domains)
        self.applier = KeyApplier(self.config, domain_interfaces(self.config), self.pool, self.known, self.metrics, self.clock)
        self.sweeper = Sweeper(self.config, domain_interfaces(self.config), self.pool, self.known, self.metrics, self.clock)

    def add(self, k: str, domain: str = "ffmuc_welt") -> None:
        self.applier.submit(domain, k)
        self.assertTrue(self.kernel.has(domain.removeprefix("ffmuc_"), k))

    def test_old_handshake_removed(self) -> None:
        """A peer whose last handshake is older than peer_timeout loses peer, route and FDB entry."""
        self.add(KEY_A)
        self.add(KEY_B)
        self.wg.handshake("wg-welt", KEY_A, self.clock.seconds() - TIMEOUT - 1)
        self.wg.handshake("wg-welt", KEY_B, self.clock.seconds() - 10)
        with capturedLogs() as events:
            result = self.successResultOf(self.sweeper.sweep())
        self.assertEqual(result["ffmuc_welt"].removed, [KEY_A])
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))
        self.assertTrue(self.kernel.has("welt", KEY_B))
        self.assertIsNone(self.known.first_seen("ffmuc_welt", KEY_A))
        summary = [e for e in events if "total" in e]
        self.assertEqual(len(summary), 1)
        self.assertEqual(summary[0]["total"], 1)
        self.assertEqual(
            self.metrics.registry.get_sample_value("wgkex_worker_swept_peers_total", {"domain": "ffmuc_welt"}), 1
        )
        self.assertEqual(self.metrics.registry.get_sample_value("wgkex_worker_sweep_seconds_count"), 1)

    def test_fresh_never_handshaked_kept(self) -> None:
        """A key that never shook hands and is younger than peer_timeout stays."""
        self.add(KEY_A)
        self.clock.advance(TIMEOUT - 1)
        result = self.successResultOf(self.sweeper.sweep())
        self.assertEqual(result["ffmuc_welt"].removed, [])
        self.assertTrue(self.kernel.has("welt", KEY_A))

    def test_old_never_handshaked_removed(self) -> None:
        """A key that never shook hands is removed once known longer than peer_timeout."""
        self.add(KEY_A)
        self.clock.advance(TIMEOUT + 1)
        self.successResultOf(self.sweeper.sweep())
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))

    def test_keep_list_honoured(self) -> None:
        """A key on keep_keys survives with an ancient handshake and with none."""
        self.add(key(99))
        self.add(key(99), "ffmuc_ost")
        self.wg.handshake("wg-welt", key(99), 1.0)
        self.clock.advance(10 * TIMEOUT)
        self.successResultOf(self.sweeper.sweep())
        self.assertTrue(self.kernel.has("welt", key(99)))
        self.assertTrue(self.kernel.has("ost", key(99)))

    def test_restart_does_not_sweep_fresh_keys(self) -> None:
        """Peers found at start-up count as first seen at that dump, not as ancient."""
        self.add(KEY_A)
        # A new worker process: empty memory, the peer is already on the interface.
        known = KnownKeys(self.config.domains)
        sweeper = Sweeper(self.config, domain_interfaces(self.config), self.pool, known, self.metrics, self.clock)
        self.clock.advance(TIMEOUT - 10)
        self.successResultOf(sweeper.seed())
        self.clock.advance(TIMEOUT - 10)
        self.successResultOf(sweeper.sweep())
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.clock.advance(20)
        self.successResultOf(sweeper.sweep())
        self.assertTrue(self.kernel.nothing_on("welt", KEY_A))

    def test_unknown_peer_gets_first_seen(self) -> None:
        """A never-handshaked peer the worker never saw is kept and remembered from this sweep on."""
        self.wg.add_peers("wg-welt", [(KEY_A, "fe80::1/128")])
        self.clock.advance(10 * TIMEOUT)
        self.successResultOf(self.sweeper.sweep())
        self.assertIn(KEY_A, self.kernel.peers["wg-welt"])
        self.assertEqual(self.known.first_seen("ffmuc_welt", KEY_A), self.clock.seconds())
        self.clock.advance(TIMEOUT + 1)
        self.successResultOf(self.sweeper.sweep())
        self.assertNotIn(KEY_A, self.kernel.peers["wg-welt"])

    def test_missing_interface_other_domain_swept(self) -> None:
        """A missing interface is logged and counted; the other domain is still swept."""
        self.add(KEY_A)
        self.kernel.delete("wg-ost")
        self.clock.advance(TIMEOUT + 1)
        with capturedLogs() as events:
            result = self.successResultOf(self.sweeper.sweep())
        self.assertEqual(result["ffmuc_welt"].removed, [KEY_A])
        self.assertIsNotNone(result["ffmuc_ost"].error)
        self.assertTrue(any(e["log_level"] == LogLevel.error and e.get("domain") == "ffmuc_ost" for e in events))
        self.assertEqual(
            self.metrics.registry.get_sample_value("wgkex_worker_sweep_errors_total", {"domain": "ffmuc_ost"}), 1
        )

    def test_key_received_during_sweep_stays_known(self) -> None:
        """A key that arrives again while a sweep runs is re-added after it and stays remembered."""
        pool = ManualPool(self.backends)
        applier = KeyApplier(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        sweeper = Sweeper(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        applier.submit("ffmuc_welt", KEY_A)
        pool.release()
        self.clock.advance(TIMEOUT + 1)
        d = sweeper.sweep()
        applier.submit("ffmuc_welt", KEY_A)
        pool.release()
        self.successResultOf(d)
        self.assertTrue(self.kernel.has("welt", KEY_A))
        self.assertIsNotNone(self.known.first_seen("ffmuc_welt", KEY_A))

    def test_one_sweep_at_a_time(self) -> None:
        """A sweep requested while one runs does not start a second job."""
        pool = ManualPool(self.backends)
        sweeper = Sweeper(self.config, domain_interfaces(self.config), pool, self.known, self.metrics, self.clock)
        first = sweeper.sweep()
        second = sweeper.sweep()
        self.assertEqual(pool.jobs(), ["find_stale"])
        pool.release()
        self.successResultOf(first)
        self.successResultOf(second)
        sweeper.sweep()
        self.assertEqual(pool.jobs(), ["find_stale"])

    def test_long_dump_paces_the_next_sweep(self) -> None:
        """After a sweep whose dump held the device 0.6 s, the next sweep waits 120 s (dumps at most 0.5 % of the time)."""
        now = slow_dumps(self.wg, 0.6)
        config = make_config(cleanup_interval=1)
        sweeper = Sweeper(config, domain_interfaces(config), self.pool, self.known, self.metrics, self.clock,
                          monotonic=lambda: now[0])
        with capturedLogs() as events:
            self.successResultOf(sweeper.sweep())
        self.assertIn("Next sweep in 120 s rather than 1 s", " ".join(e["log_format"].format(**e) for e in events))
        self.pool.jobs.clear()
        now[0] = 119.0
        self.assertEqual(self.successResultOf(sweeper.sweep()), {})
        self.assertEqual(self.pool.jobs, [])
        now[0] = 120.1
        self.successResultOf(sweeper.sweep())
        self.assertEqual(self.pool.jobs, ["find_stale"])

    def test_kernel_backend_never_paces(self) -> None:
        """With wireguard_backend kernel (chunked dumps, keys go in between) long dumps do not pace sweeps."""
        now = slow_dumps(self.wg, 0.6)
        config = make_config(cleanup_interval=1, wireguard_backend="kernel")
        sweeper = Sweeper(config, domain_interfaces(config), self.pool, self.known, self.metrics, self.clock,
                          monotonic=lambda: now[0])
        for _ in range(3):
            self.successResultOf(sweeper.sweep())
        self.assertEqual(self.pool.jobs, ["find_stale"] * 3)

    def test_short_dumps_never_pace(self) -> None:
        """Dumps of 150 ms leave back-to-back sweeps alone."""
        now = slow_dumps(self.wg, 0.15)
        sweeper = Sweeper(self.config, domain_interfaces(self.config), self.pool, self.known, self.metrics, self.clock,
                          monotonic=lambda: now[0])
        for _ in range(3):
            self.successResultOf(sweeper.sweep())
        self.assertEqual(self.pool.jobs, ["find_stale"] * 3)

    def test_dumps_read_with_gc_paused(self) -> None:
        """The sweep's dump and the start-up dump hold whole dumps with the garbage collector off, and turn it on again."""
        self.kernel.peers["wg-welt"][KEY_A] = PeerInfo(KEY_A, START - 2 * TIMEOUT, ("fe80::1/128",))
        interfaces = {"ffmuc_welt": Interfaces("wg-welt", "vx-welt")}
        result = find_stale(self.backends, interfaces, {}, frozenset(), START, TIMEOUT)
        self.assertEqual(result["ffmuc_welt"].stale, [KEY_A])
        dumped = dump_keys(self.backends, {"ffmuc_welt": "wg-welt"}, START)["ffmuc_welt"]
        self.assertEqual(dumped.keys if isinstance(dumped, DomainKeys) else dumped, [KEY_A])
        self.assertEqual(self.wg.gc_during_dump, [False, False])
        self.assertTrue(gc.isenabled())

    def test_gc_back_on_after_a_failed_dump(self) -> None:
        """A dump that fails still leaves the garbage collector on."""
        self.wg.fail_peers_dump = OSError("boom")
        interfaces = {"ffmuc_welt": Interfaces("wg-welt", "vx-welt")}
        result = find_stale(self.backends, interfaces, {}, frozenset(), START, TIMEOUT)
        self.assertIn("boom", result["ffmuc_welt"].error or "")
        self.assertIn("boom", str(dump_keys(self.backends, {"ffmuc_welt": "wg-welt"}, START)["ffmuc_welt"]))
        self.assertTrue(gc.isenabled())


class SweepLanesTests(SynchronousTestCase):
    """The sweep runs in the housekeeping lane, in chunks; keys go through the keys lane and never wait for it."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.config = make_config(domains=["ffmuc_welt"])
        interfaces = domain_interfaces(self.config)
        self.metrics = WorkerMetrics(self.config.domains)
        self.known = KnownKeys(self.config.domains)
        self.keys_lane = SyncPool(self.backends)
        self.housekeeping = ManualPool(self.backends)
        self.applier = KeyApplier(self.config, interfaces, self.keys_lane, self.known, self.metrics, self.clock)
        self.sweeper = Sweeper(
            self.config, interfaces, self.housekeeping, self.known, self.metrics, self.clock, self.applier.reapply
        )
        # Two and a half chunks of peers that have been silent for longer than peer_timeout.
        self.stale = [key(n) for n in range(SWEEP_CHUNK * 5 // 2)]
        for k in self.stale:
            self.applier.submit("ffmuc_welt", k)
        self.clock.advance(TIMEOUT + 1)

    def present(self, keys: list[str]) -> int:
        return sum(1 for k in keys if self.kernel.has("welt", k))

    def test_key_applied_before_remaining_chunks(self) -> None:
        """A key arriving during a sweep is installed at once, while the sweep's remaining chunks still wait."""
        done = self.sweeper.sweep()
        self.assertEqual(self.housekeeping.jobs(), ["find_stale"])
        self.housekeeping.release(2)  # the dump, then the first chunk
        self.assertEqual(self.housekeeping.jobs(), ["remove_chunk"])
        self.assertEqual(self.present(self.stale), len(self.stale) - SWEEP_CHUNK)
        new = key(10_000)
        self.applier.submit("ffmuc_welt", new)
        self.assertTrue(self.kernel.has("welt", new))
        self.assertEqual(self.housekeeping.jobs(), ["remove_chunk"])
        self.housekeeping.release()
        result = self.successResultOf(done)
        self.assertEqual(sorted(result["ffmuc_welt"].removed), sorted(self.stale))
        self.assertEqual(self.present(self.stale), 0)
        self.assertTrue(all(self.kernel.nothing_on("welt", k) for k in self.stale))
        self.assertTrue(self.kernel.has("welt", new))

    def test_removal_in_chunks_then_fdb_once(self) -> None:
        """Stale peers and routes go SWEEP_CHUNK at a time; their FDB entries in one job at the end."""
        self.sweeper.sweep()
        jobs = []
        while self.housekeeping.queue:
            jobs.extend(self.housekeeping.jobs())
            self.housekeeping.release(1)
        self.assertEqual(jobs, ["find_stale", "remove_chunk", "remove_chunk", "remove_chunk", "delete_fdb_entries"])
        self.assertEqual(
            [n for method, _, n in self.wg.calls if method == "remove_peers"], [SWEEP_CHUNK, SWEEP_CHUNK, SWEEP_CHUNK // 2]
        )

    def test_key_received_again_is_spared(self) -> None:
        """A stale key whose router registers again during the sweep keeps its peer, route and FDB entry."""
        back = self.stale[-1]
        done = self.sweeper.sweep()
        self.housekeeping.release(1)  # decided: every key is stale
        self.applier.submit("ffmuc_welt", back)
        self.housekeeping.release()
        result = self.successResultOf(done)
        self.assertNotIn(back, result["ffmuc_welt"].removed)
        self.assertTrue(self.kernel.has("welt", back))
        self.assertEqual(self.present(self.stale), 1)

    def test_key_received_while_its_chunk_runs_is_reapplied(self) -> None:
        """A key that arrives while the job removing it runs is installed again right after that job."""
        back = self.stale[0]
        remove = self.wg.remove_peers

        def arrives_meanwhile(iface: str, keys: Sequence[str]) -> None:
            if back in keys:
                self.applier.submit("ffmuc_welt", back)
            remove(iface, keys)

        self.wg.remove_peers = arrives_meanwhile  # type: ignore[method-assign]
        done = self.sweeper.sweep()
        self.housekeeping.release()
        self.successResultOf(done)
        self.assertTrue(self.kernel.has("welt", back))
        self.assertIsNotNone(self.known.first_seen("ffmuc_welt", back))
        self.assertEqual(self.present(self.stale), 1)

    def test_stop_ends_the_sweep_after_its_current_job(self) -> None:
        """Once the worker stops, a running sweep submits no more chunks (FDB entries of removed peers still go)."""
        done = self.sweeper.sweep()
        self.housekeeping.release(2)  # the dump and the first chunk; the second is submitted
        self.sweeper.stop()
        self.housekeeping.release()
        result = self.successResultOf(done)
        self.assertEqual(len(result["ffmuc_welt"].removed), 2 * SWEEP_CHUNK)
        self.assertEqual(self.present(self.stale), len(self.stale) - 2 * SWEEP_CHUNK)
        self.assertTrue(all(self.kernel.nothing_on("welt", k) for k in result["ffmuc_welt"].removed))
