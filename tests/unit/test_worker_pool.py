"""BackendPool: backends created, used and closed inside the pool; jobs refused when stopped.

A fake ThreadPool runs each job at once but records it, so the tests see what
ran "in the thread" and in which order; a fake reactor's ``callFromThread``
calls straight back.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests.unit.test_worker_fakes import FakeKernel, FakeRtnl, FakeWireGuard
from wgkex.worker.pool import Backends, BackendPool, PoolStopped


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

        self.pool = BackendPool(
            ImmediateReactor(), make_wg, make_rtnl, threadpool_factory=lambda: self.threads  # type: ignore[arg-type,return-value]
        )

    def test_nothing_before_start(self) -> None:
        """Constructing the pool creates no thread and no backend."""
        self.assertFalse(self.threads.started)
        self.assertEqual(self.made, [])

    def test_backends_created_in_pool(self) -> None:
        """startService starts the thread and creates the backends there as its first job."""
        self.pool.startService()
        self.assertTrue(self.threads.started)
        self.assertEqual(self.threads.ran, ["_create"])
        self.assertEqual(len(self.made), 2)

    def test_run_passes_backends(self) -> None:
        """run(fn, *args) calls fn(backends, *args) in the pool and fires with its result."""
        self.pool.startService()
        self.assertEqual(self.successResultOf(self.pool.run(peer_count, "wg-welt")), 0)
        self.assertEqual(self.threads.ran[-1], "peer_count")

    def test_errors_travel_back(self) -> None:
        """An exception in a job fails its Deferred."""
        self.pool.startService()
        failure = self.failureResultOf(self.pool.run(peer_count, "wg-nope"))
        self.assertIn("wg-nope", failure.getErrorMessage())

    def test_stop_closes_backends_in_pool_then_joins(self) -> None:
        """stopService closes both backends in the pool thread after queued jobs, then stops the threads."""
        self.pool.startService()
        self.threads.hold = True
        job = self.pool.run(peer_count, "wg-welt")
        d = self.pool.stopService()
        self.assertFalse(self.threads.stopped)
        self.threads.release()
        self.successResultOf(job)
        self.successResultOf(d)
        self.assertEqual(self.threads.ran, ["_create", "peer_count", "_close"])
        self.assertTrue(all(b.closed for b in self.made))  # type: ignore[attr-defined]
        self.assertTrue(self.threads.stopped)

    def test_run_after_stop_refused(self) -> None:
        """A job submitted after stop fails with PoolStopped."""
        self.pool.startService()
        self.successResultOf(self.pool.stopService())
        self.failureResultOf(self.pool.run(peer_count, "wg-welt"), PoolStopped)

    def test_creation_failure_reported(self) -> None:
        """If a backend cannot be created, it is logged and every job fails saying why."""

        def broken() -> FakeWireGuard:
            raise OSError("no such socket directory")

        pool = BackendPool(
            ImmediateReactor(), broken, lambda: FakeRtnl(self.kernel), threadpool_factory=lambda: FakeThreadPool()  # type: ignore[arg-type,return-value]
        )
        pool.startService()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        failure = self.failureResultOf(pool.run(peer_count, "wg-welt"), PoolStopped)
        self.assertIn("no such socket directory", failure.getErrorMessage())
        self.successResultOf(pool.stopService())
