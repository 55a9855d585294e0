"""Whole peer dumps: counted once, shared by the sweep and the peer count, paced after long ones."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from tests.support.worker_fakes import KEY_A, KEY_B, FakeKernel, SyncPool, backends_for, key, make_config, slow_dumps
from tests.support.worker_tree import WorkerTreeCase
from wgkex.worker.domains import domain_interfaces
from wgkex.worker.dumps import MAX_DUMP_SHARE, DumpPacing, PeerCount, count_peers_of
from wgkex.worker.known import KnownKeys
from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.report import Reporter
from wgkex.worker.service import WATCH_INTERVAL
from wgkex.worker.sweep import Sweeper

START = 1_700_000_000.0
METRIC_WELT = "wireguard-metrics/ffmuc_welt/gw1/connected_peers"
METRIC_OST = "wireguard-metrics/ffmuc_ost/gw1/connected_peers"


class CountTests(SynchronousTestCase):
    """What a dump counts."""

    def test_connected_means_a_handshake_within_180_s(self) -> None:
        """Never (None or 0) and 181 s ago do not count; exactly 180 s ago and 5 s ago do."""
        now = START
        count = count_peers_of([None, 0, now - 181, now - 180, now - 5], now)
        self.assertEqual(count, PeerCount(total=5, connected=2))


class PacingTests(SynchronousTestCase):
    """DumpPacing on its own, with a fake monotonic clock."""

    def setUp(self) -> None:
        self.now = [100.0]
        self.pacing = DumpPacing(paced=True, monotonic=lambda: self.now[0])

    def test_long_dump_holds_dumps_back(self) -> None:
        """A 0.6 s dump keeps the next one 120 s after its start (0.5 % of the time), and says so."""
        pause = self.pacing.dumped(100.0, {"ffmuc_welt": (0.6, 100_000)}, {"ffmuc_welt": PeerCount(100_000, 7)})
        self.assertEqual(0.6 / MAX_DUMP_SHARE, 120.0)
        self.assertEqual((pause.seconds, pause.peers, pause.held) if pause else None, (120.0, 100_000, 0.6))
        self.now[0] = 219.9
        self.assertFalse(self.pacing.allows_dump())
        self.assertEqual(self.pacing.cached_counts(), {"ffmuc_welt": PeerCount(100_000, 7)})
        self.now[0] = 220.0
        self.assertTrue(self.pacing.allows_dump())
        self.assertEqual(self.pacing.cached_counts(), {})

    def test_short_dumps_never_hold_back(self) -> None:
        """Dumps under 0.2 s pace nothing: the next count reads afresh."""
        self.assertIsNone(self.pacing.dumped(100.0, {"ffmuc_welt": (0.19, 5000)}, {"ffmuc_welt": PeerCount(5000, 1)}))
        self.assertTrue(self.pacing.allows_dump())
        self.assertEqual(self.pacing.cached_counts(), {})

    def test_kernel_backend_never_paced(self) -> None:
        """Unpaced (the kernel's chunked dumps): even a 5 s dump lets the next one start at once."""
        pacing = DumpPacing(paced=False, monotonic=lambda: self.now[0])
        self.assertIsNone(pacing.dumped(100.0, {"ffmuc_welt": (5.0, 100_000)}, {"ffmuc_welt": PeerCount(100_000, 7)}))
        self.assertTrue(pacing.allows_dump())

    def test_forget_drops_one_domain(self) -> None:
        """A forgotten domain is no longer in the cached counts; the others stay."""
        self.pacing.dumped(100.0, {"ffmuc_welt": (0.6, 9)}, {"ffmuc_welt": PeerCount(9, 1), "ffmuc_ost": PeerCount(3, 0)})
        self.pacing.forget("ffmuc_ost")
        self.assertEqual(self.pacing.cached_counts(), {"ffmuc_welt": PeerCount(9, 1)})


class SharedDumpTests(SynchronousTestCase):
    """A sweeper and a reporter sharing one pacing, as build_worker wires them."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt", address="fe80::1")
        self.kernel.add_domain("ost", address="fe80::2")
        self.backends, self.wg, _ = backends_for(self.kernel)
        self.wg.add_peers("wg-welt", [(KEY_A, "fe80::a/128"), (KEY_B, "fe80::b/128")])
        self.wg.handshake("wg-welt", KEY_A, START - 10)
        self.now = slow_dumps(self.wg, 0.6)
        self.config = make_config(cleanup_interval=1)
        self.pool = SyncPool(self.backends)
        self.bus = FakeBus()
        self.bus.connect()
        metrics = WorkerMetrics(self.config.domains)
        self.pacing = DumpPacing(paced=True, monotonic=lambda: self.now[0])
        self.reporter = Reporter(self.config, self.bus, self.pool, metrics, self.clock, pacing=self.pacing)
        self.sweeper = Sweeper(self.config, domain_interfaces(self.config), self.pool, KnownKeys(self.config.domains),
                               metrics, self.clock, monotonic=lambda: self.now[0], pacing=self.pacing)

    def dumped(self) -> list[str]:
        return [iface for call, iface, _ in self.wg.calls if call == "peers"]

    def dump_jobs(self) -> list[str]:
        """The pool jobs that dump (reading an interface's own data is not one)."""
        return [job for job in self.pool.jobs if job in ("count_peers", "find_stale")]

    def test_count_after_a_sweep_reads_nothing(self) -> None:
        """The sweep's dump gives the count its figures: no second dump, the same connected peers published."""
        self.successResultOf(self.sweeper.sweep())
        self.assertEqual(self.dumped(), ["wg-welt", "wg-ost"])
        self.pool.jobs.clear()
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.dump_jobs(), [])
        self.assertEqual((self.bus.last(METRIC_WELT), self.bus.last(METRIC_OST)), (b"1", b"0"))
        self.assertEqual(self.dumped(), ["wg-welt", "wg-ost"])

    def test_count_holds_the_sweep_back(self) -> None:
        """A count whose dump took 0.6 s keeps a due sweep from dumping until 120 s later."""
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.successResultOf(self.sweeper.sweep()), {})
        self.assertEqual(self.dump_jobs(), ["count_peers"])
        self.now[0] += 120.0
        self.assertIn("ffmuc_welt", self.successResultOf(self.sweeper.sweep()))
        self.assertEqual(self.dump_jobs(), ["count_peers", "find_stale"])

    def test_count_reads_afresh_once_the_pause_is_over(self) -> None:
        """After the pause a count dumps again and sees a handshake made meanwhile."""
        self.successResultOf(self.reporter.publish_counts())
        self.wg.handshake("wg-welt", KEY_B, START + 1)
        self.clock.advance(2)
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.bus.last(METRIC_WELT), b"1")  # the cached count
        self.now[0] += 120.0
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.bus.last(METRIC_WELT), b"2")
        self.assertEqual(self.dump_jobs(), ["count_peers", "count_peers"])

    def test_a_domain_not_read_by_the_last_dump_is_read_alone(self) -> None:
        """While paced, only the domain the last dump could not read is dumped for the count."""
        self.kernel.delete("wg-ost")
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.bus.last(METRIC_OST), b"-1")
        self.kernel.add_domain("ost", address="fe80::2")
        self.wg.add_peers("wg-ost", [(key(1), "fe80::c/128")])
        del self.wg.calls[:]
        self.successResultOf(self.reporter.publish_counts())
        self.assertEqual(self.dumped(), ["wg-ost"])
        self.assertEqual((self.bus.last(METRIC_WELT), self.bus.last(METRIC_OST)), (b"1", b"0"))


class WorkerTreeDumpTests(WorkerTreeCase):
    """build_worker wires one pacing; an interface that changes is read afresh."""

    def test_missing_interface_reported_despite_the_pause(self) -> None:
        """wg-ost vanishes while counts are cached: the next metrics tick publishes -1 for it, welt from the cache."""
        self.wg.add_peers("wg-welt", [(KEY_A, "fe80::a/128")])
        self.wg.handshake("wg-welt", KEY_A, START - 10)
        now = slow_dumps(self.wg, 0.6)
        self.start(monotonic=lambda: now[0])  # the start-up dump (1.2 s over two domains) paces dumps
        self.bus.connect()
        self.assertNotIn("count_peers", self.pool.jobs)
        self.assertEqual((self.bus.last(METRIC_WELT), self.bus.last(METRIC_OST)), (b"1", b"0"))
        self.kernel.delete("wg-ost")
        self.reactor.advance(WATCH_INTERVAL)
        del self.wg.calls[:]
        self.reactor.advance(60 - WATCH_INTERVAL)
        self.assertEqual([iface for call, iface, _ in self.wg.calls if call == "peers"], ["wg-ost"])
        self.assertEqual((self.bus.last(METRIC_WELT), self.bus.last(METRIC_OST)), (b"1", b"-1"))
