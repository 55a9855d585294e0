"""BackendPool: backends created, used and closed inside the pool; jobs refused when stopped.

A fake ThreadPool runs each job at once but records it, so the tests see what
ran "in the thread" and in which order; a fake reactor's ``callFromThread``
calls straight back; a :class:`~tests.support.worker_fakes.LazyExecutor`
stands in for the WireGuard thread. One test runs the apply pipeline on real
threads, to show that peers and rtnetlink work really overlap.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.support.worker_fakes import FakeKernel, FakeRtnl, FakeWireGuard, LazyExecutor, key
from wgkex.worker.backend import InterfaceMissing
from wgkex.worker.apply import apply_domain
from wgkex.worker.domains import Interfaces
from wgkex.worker.pool import Backends, BackendPool, GcPause, PoolStopped, WireGuardThread


class FakeThreadPool:
    """Runs jobs synchronously and records their names; ``hold`` queues them instead."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.started = False
        self.stopped = False
        self.hold = False
        self.held: list[tuple[Callable[..., Any], Callable[..., Any], tuple[Any, ...]]] = []

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def callInThreadWithCallback(self, onResult: Callable[..., Any], func: Callable[..., Any], *args: Any) -> None:
        if self.hold:
            self.held.append((onResult, func, args))
            return
        self._run(onResult, func, args)

    def _run(self, onResult: Callable[..., Any], func: Callable[..., Any], args: tuple[Any, ...]) -> None:
        name = getattr(func, "__name__", "?")
        if name == "_call":
            name = args[0].__name__
        self.ran.append(name)
        try:
            result = func(*args)
        except BaseException as exc:
            onResult(False, exc)
        else:
            onResult(True, result)

    def release(self) -> None:
        held, self.held, self.hold = self.held, [], False
        for onResult, func, args in held:
            self._run(onResult, func, args)


class ImmediateReactor:
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def peer_count(backends: Backends, iface: str) -> int:
    return len(backends.wireguard.peers(iface))


class BackendPoolTests(SynchronousTestCase):
    """BackendPool with a recording fake thread pool."""

    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.threads = FakeThreadPool()
        self.made: list[object] = []

        def make_wg() -> FakeWireGuard:
            wg = FakeWireGuard(self.kernel)
            self.made.append(wg)
            return wg

        def make_rtnl() -> FakeRtnl:
            rtnl = FakeRtnl(self.kernel)
            self.made.append(rtnl)
            return rtnl

        self.executor = LazyExecutor()
        self.pool = BackendPool(
            ImmediateReactor(),  # type: ignore[arg-type]
            make_wg,
            make_rtnl,
            threadpool_factory=lambda name: self.threads,  # type: ignore[arg-type,return-value]
            wireguard_executor_factory=lambda: self.executor,
        )

    def test_nothing_before_start(self) -> None:
        """Constructing the pool creates no thread and no backend."""
        self.assertFalse(self.threads.started)
        self.assertEqual(self.made, [])

    def test_backends_created_in_pool(self) -> None:
        """startService starts the thread and creates the backends there as its first job."""
        self.pool.startService()
        self.assertTrue(self.threads.started)
        self.assertEqual(self.threads.ran, ["_create", "_create"])
        self.assertEqual(len(self.made), 4)  # a WireGuard backend and an rtnetlink socket per lane

    def test_run_passes_backends(self) -> None:
        """run(fn, *args) calls fn(backends, *args) in the pool and fires with its result."""
        self.pool.startService()
        self.assertEqual(self.successResultOf(self.pool.keys.run(peer_count, "wg-welt")), 0)
        self.assertEqual(self.threads.ran[-1], "peer_count")

    def test_errors_travel_back(self) -> None:
        """An exception in a job fails its Deferred."""
        self.pool.startService()
        failure = self.failureResultOf(self.pool.keys.run(peer_count, "wg-nope"))
        self.assertIn("wg-nope", failure.getErrorMessage())

    def test_stop_closes_backends_in_pool_then_joins(self) -> None:
        """stopService closes both backends in the pool thread after queued jobs, then stops the threads."""
        self.pool.startService()
        self.threads.hold = True
        job = self.pool.keys.run(peer_count, "wg-welt")
        d = self.pool.stopService()
        self.assertFalse(self.threads.stopped)
        self.threads.release()
        self.successResultOf(job)
        self.successResultOf(d)
        self.assertEqual(self.threads.ran, ["_create", "_create", "peer_count", "_close", "_close"])
        self.assertTrue(all(b.closed for b in self.made))  # type: ignore[attr-defined]
        self.assertTrue(self.threads.stopped)

    def test_run_after_stop_refused(self) -> None:
        """A job submitted after stop fails with PoolStopped."""
        self.pool.startService()
        self.successResultOf(self.pool.stopService())
        self.failureResultOf(self.pool.keys.run(peer_count, "wg-welt"), PoolStopped)

    def test_creation_failure_reported(self) -> None:
        """If a backend cannot be created, it is logged and every job fails saying why."""

        def broken() -> FakeWireGuard:
            raise OSError("no such socket directory")

        executor = LazyExecutor()
        pool = BackendPool(
            ImmediateReactor(),  # type: ignore[arg-type]
            broken,
            lambda: FakeRtnl(self.kernel),
            threadpool_factory=lambda name: FakeThreadPool(),  # type: ignore[arg-type,return-value]
            wireguard_executor_factory=lambda: executor,
        )
        pool.startService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)  # once per lane
        failure = self.failureResultOf(pool.keys.run(peer_count, "wg-welt"), PoolStopped)
        self.assertIn("no such socket directory", failure.getErrorMessage())
        self.assertTrue(executor.shut_down)
        self.successResultOf(pool.stopService())

    def test_rtnl_creation_failure_ends_wireguard_thread(self) -> None:
        """If rtnetlink cannot be created, the WireGuard backend already made is closed and its thread ended."""

        def broken() -> FakeRtnl:
            raise OSError("netlink refused")

        made: list[FakeWireGuard] = []

        def make_wg() -> FakeWireGuard:
            made.append(FakeWireGuard(self.kernel))
            return made[-1]

        executor = LazyExecutor()
        pool = BackendPool(
            ImmediateReactor(),  # type: ignore[arg-type]
            make_wg,
            broken,
            threadpool_factory=lambda name: FakeThreadPool(),  # type: ignore[arg-type,return-value]
            wireguard_executor_factory=lambda: executor,
        )
        pool.startService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)  # once per lane
        self.assertTrue(all(wg.closed for wg in made))
        self.assertTrue(executor.shut_down)
        self.failureResultOf(pool.keys.run(peer_count, "wg-welt"), PoolStopped)
        self.successResultOf(pool.stopService())

    def test_wireguard_lives_in_its_thread(self) -> None:
        """The WireGuard backend is made, called and closed through its executor; the thread ends at stop."""
        self.pool.startService()
        self.assertEqual(self.executor.log, [("submit", "make_wg"), ("run", "make_wg")])
        self.executor.log.clear()
        self.successResultOf(self.pool.keys.run(peer_count, "wg-welt"))
        self.assertEqual(self.executor.log, [("submit", "peers"), ("run", "peers")])
        self.successResultOf(self.pool.stopService())
        self.assertEqual(self.executor.log[-2:], [("submit", "close"), ("run", "close")])
        self.assertTrue(self.executor.shut_down)
        self.assertTrue(self.made[0].closed)  # type: ignore[attr-defined]

    def test_backend_exceptions_keep_their_type(self) -> None:
        """An exception in the WireGuard thread reaches the job as itself (InterfaceMissing stays one)."""
        self.pool.startService()
        self.failureResultOf(self.pool.keys.run(peer_count, "wg-nope"), InterfaceMissing)


class LanesTests(SynchronousTestCase):
    """The keys lane and the housekeeping lane: a thread and backends each."""

    def setUp(self) -> None:
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt")
        self.threads: dict[str, FakeThreadPool] = {}
        self.gc_pause = GcPause()
        self.pool = BackendPool(
            ImmediateReactor(),  # type: ignore[arg-type]
            lambda: FakeWireGuard(self.kernel),
            lambda: FakeRtnl(self.kernel),
            threadpool_factory=lambda name: self.threads.setdefault(name, FakeThreadPool()),  # type: ignore[arg-type,return-value]
            wireguard_executor_factory=lambda: LazyExecutor(),
            gc_pause=self.gc_pause,
        )
        self.pool.startService()
        self.addCleanup(self.pool.stopService)

    def test_key_job_runs_while_housekeeping_is_busy(self) -> None:
        """A job in the keys lane completes while a housekeeping job (a long dump) still holds its thread."""
        self.threads["wgkex-housekeeping"].hold = True
        dump = self.pool.housekeeping.run(peer_count, "wg-welt")
        self.assertEqual(self.successResultOf(self.pool.keys.run(peer_count, "wg-welt")), 0)
        self.assertNoResult(dump)
        self.threads["wgkex-housekeeping"].release()
        self.assertEqual(self.successResultOf(dump), 0)

    def test_lanes_have_their_own_backends(self) -> None:
        """Each lane's jobs get that lane's backends; only the keys lane has a WireGuard thread."""

        def backends(b: Backends) -> Backends:
            return b

        keys = self.successResultOf(self.pool.keys.run(backends))
        housekeeping = self.successResultOf(self.pool.housekeeping.run(backends))
        self.assertIsInstance(keys.wireguard, WireGuardThread)
        self.assertIsInstance(housekeeping.wireguard, FakeWireGuard)
        self.assertIs(keys.gc_pause, self.gc_pause)
        self.assertIs(housekeeping.gc_pause, self.gc_pause)
        self.assertIsNot(keys.rtnl, housekeeping.rtnl)


class GcPauseTests(SynchronousTestCase):
    def test_nested_pause_restores_on_outermost_exit(self) -> None:
        """The collector is off inside (nested too) and on again only after the outermost exit."""
        pause = GcPause()
        self.assertTrue(gc.isenabled())
        with pause:
            self.assertFalse(gc.isenabled())
            with pause:
                self.assertFalse(gc.isenabled())
            self.assertFalse(gc.isenabled())
        self.assertTrue(gc.isenabled())

    def test_leaves_a_disabled_collector_disabled(self) -> None:
        """If the collector was off before (someone else's choice), it stays off after."""
        gc.disable()
        self.addCleanup(gc.enable)
        with GcPause():
            pass
        self.assertFalse(gc.isenabled())

    def test_exception_restores(self) -> None:
        """An exception inside still turns the collector on again."""
        with self.assertRaises(ZeroDivisionError):
            with GcPause():
                1 / 0
        self.assertTrue(gc.isenabled())


class PipelineOnThreadsTests(SynchronousTestCase):
    """apply_domain with a real WireGuard thread: peers of the next chunk overlap rtnetlink of this one."""

    def test_peers_and_routes_overlap(self) -> None:
        """The routes of chunk 1 are installed while chunk 2's peers are being added in the other thread."""
        kernel = FakeKernel()
        kernel.add_domain("welt")
        second_chunk_adding = threading.Event()
        routes_seen_overlap: list[bool] = []

        class SlowWireGuard(FakeWireGuard):
            def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
                if self.calls:  # the second chunk
                    second_chunk_adding.set()
                super().add_peers(iface, peers)

        class WaitingRtnl(FakeRtnl):
            def replace_routes(self, iface: str, addresses: Sequence[str]) -> dict[str, str]:
                if not self.calls:  # chunk 1: only goes on once chunk 2's peers are under way
                    routes_seen_overlap.append(second_chunk_adding.wait(5))
                return super().replace_routes(iface, addresses)

        wireguard = WireGuardThread(ThreadPoolExecutor(1), lambda: SlowWireGuard(kernel))
        self.addCleanup(wireguard.close)
        backends = Backends(wireguard=wireguard, rtnl=WaitingRtnl(kernel))
        keys = [key(n) for n in range(8)]
        result = apply_domain(backends, Interfaces("wg-welt", "vx-welt"), keys, chunk=4)
        self.assertEqual(routes_seen_overlap, [True])
        self.assertEqual(sorted(result.applied), sorted(keys))
        self.assertEqual(result.failed, {})
        self.assertTrue(all(kernel.has("welt", k) for k in keys))
