"""The threads where all netlink and UAPI work happens, as a Twisted service.

:class:`BackendPool` owns a one-thread :class:`~twisted.python.threadpool.ThreadPool`
(the *job thread*) and a second thread that holds the WireGuard backend
(:class:`WireGuardThread`). The rtnetlink backend is created *in* the job
thread when the service starts (pyroute2 keeps one socket per thread), reused
by every job and closed in that thread when the service stops; the WireGuard
backend likewise lives, is called and is closed only in its own thread.
Callers on the reactor use :meth:`BackendPool.run`, which hands
``fn(backends, *args)`` to the job thread and returns a
:class:`~twisted.internet.defer.Deferred` of its result.

Why one job thread: the backends hold per-thread sockets, and running jobs one
after the other gives the order the worker relies on (a key queued after a
sweep is applied after that sweep's removals). Throughput comes from batching
(one UAPI transaction and one netlink send per interface and chunk of keys),
not from parallel jobs.

Why a WireGuard thread: within one job, adding peers (wireguard-go spends
about 80 µs of its own CPU per new peer) and installing routes and FDB entries
(the kernel works inside our ``send()``) can overlap, so a burst costs about
the longer of the two rather than their sum. A job asks for that with
:meth:`Backends.start_wireguard` and waits for what it started before it
returns, so jobs stay strictly one after the other. A plain
``backends.wireguard.add_peers(...)`` call simply waits for the WireGuard
thread.

While it runs, the pool sets Python's thread switch interval to
:data:`SWITCH_INTERVAL` (1 ms instead of 5): when the reactor wakes up (a
request, a key) while a pool thread runs Python code, it waits up to one
interval for the GIL, several times per request. Measured with 100,000 peers
counted and swept every second: ``/healthz`` p99 27 ms -> 8 ms, max 38 ms ->
22 ms; a 20,000-key burst is as fast as before.

Jobs that hold a whole peer dump (100,000 :class:`~wgkex.worker.backend.PeerInfo`
on a big gateway) run inside :data:`gc_paused`: reference counting frees
the dump when the job ends, while the cyclic garbage collector would otherwise
run two or three full collections per dump (30-45 ms each, measured with
100,000 peers), and the reactor cannot run during a collection.

Anything that only needs "run this with the backends" depends on the
:class:`Pool` protocol, so tests use a synchronous fake.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from wgkex.worker.backend import InterfaceInfo, PeerInfo, Rtnl, WireGuard

P = ParamSpec("P")
T = TypeVar("T")


class GcPause:
    """Context manager: Python's cyclic garbage collector is off inside (nesting and threads allowed).

    For pool jobs that create, hold and drop hundreds of thousands of objects
    (peer dumps): none of them form cycles, reference counting frees them, and a
    collection in the middle would only walk them, holding the GIL. Garbage
    cycles made elsewhere meanwhile are collected once the collector is back on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0 and self._was_enabled:
                gc.enable()


#: The one :class:`GcPause` of the process (the collector is process-wide).
gc_paused = GcPause()


class WireGuardThread:
    """A :class:`~wgkex.worker.backend.WireGuard` backend living in a thread of its own.

    ``make`` runs in that thread, and so does every call and the final
    :meth:`close`: the backend never sees another thread (pyroute2's generic
    netlink socket of the kernel backend is per thread). The WireGuard methods
    wait for their call; :meth:`submit` does not.
    """

    def __init__(self, executor: Executor, make: Callable[[], WireGuard]) -> None:
        self._executor = executor
        try:
            self._backend = executor.submit(make).result()
        except BaseException:
            executor.shutdown(wait=True)
            raise

    def submit(self, fn: Callable[[WireGuard], T]) -> Future[T]:
        """Start ``fn(backend)`` in the WireGuard thread; returns at once."""
        return self._executor.submit(fn, self._backend)

    def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
        self._executor.submit(self._backend.add_peers, iface, peers).result()

    def remove_peers(self, iface: str, keys: Sequence[str]) -> None:
        self._executor.submit(self._backend.remove_peers, iface, keys).result()

    def peers(self, iface: str) -> list[PeerInfo]:
        return self._executor.submit(self._backend.peers, iface).result()

    def interface(self, iface: str) -> InterfaceInfo:
        return self._executor.submit(self._backend.interface, iface).result()

    def close(self) -> None:
        """Close the backend in its thread, then end the thread."""
        try:
            self._executor.submit(self._backend.close).result()
        finally:
            self._executor.shutdown(wait=True)


@dataclass(frozen=True)
class Backends:
    """The kernel-facing objects of the pool."""

    wireguard: WireGuard
    rtnl: Rtnl

    def start_wireguard(self, fn: Callable[[WireGuard], T]) -> Future[T]:
        """Start ``fn(wireguard)`` alongside the calling job; ``.result()`` waits for it.

        With a :class:`WireGuardThread` it runs there while the job goes on;
        with any other backend (the fakes of the unit tests) it runs here and
        now. Either way the job must wait for it before it returns.
        """
        if isinstance(self.wireguard, WireGuardThread):
            return self.wireguard.submit(fn)
        future: Future[T] = Future()
        try:
            future.set_result(fn(self.wireguard))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class PoolStopped(Exception):
    """A job was submitted while the pool is not running (the worker is stopping)."""


class Pool(Protocol):
    """Run blocking functions with the backends, off the reactor thread."""

    def run(
        self, fn: Callable[Concatenate[Backends, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Call ``fn(backends, *args, **kwargs)`` in the pool; the Deferred fires on the reactor."""
        ...


#: Python's thread switch interval while the pool runs (seconds); see the module docstring.
SWITCH_INTERVAL = 0.001


def _wireguard_executor() -> Executor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="wgkex-wireguard")


class BackendPool(Service):
    """A service owning the netlink/UAPI threads and the backends living in them."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        make_wireguard: Callable[[], WireGuard],
        make_rtnl: Callable[[], Rtnl],
        name: str = "netlink-pool",
        threadpool_factory: Callable[[], ThreadPool] | None = None,
        wireguard_executor_factory: Callable[[], Executor] = _wireguard_executor,
        switch_interval: float | None = SWITCH_INTERVAL,
    ) -> None:
        self._reactor = reactor
        self._make_wireguard = make_wireguard
        self._make_rtnl = make_rtnl
        self._threadpool_factory = threadpool_factory or (
            lambda: ThreadPool(minthreads=1, maxthreads=1, name="wgkex-netlink")
        )
        self._wireguard_executor_factory = wireguard_executor_factory
        self._switch_interval = switch_interval
        self._previous_switch_interval: float | None = None
        self.setName(name)
        self._threadpool: ThreadPool | None = None
        # Touched only inside the pool thread.
        self._backends: Backends | None = None
        self._create_error: BaseException | None = None

    def startService(self) -> None:
        super().startService()
        if self._switch_interval is not None:
            self._previous_switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(self._switch_interval)
        self._threadpool = self._threadpool_factory()
        self._threadpool.start()
        # The first job: every later job runs after it in the same thread.
        d = deferToThreadPool(self._reactor, self._threadpool, self._create)
        d.addErrback(lambda f: self.log.failure("cannot create the WireGuard/rtnetlink backends", f))

    def _create(self) -> None:
        try:
            # The WireGuard thread starts here, in the job thread, not on the reactor.
            wireguard = WireGuardThread(self._wireguard_executor_factory(), self._make_wireguard)
            try:
                rtnl = self._make_rtnl()
            except BaseException:
                wireguard.close()
                raise
            self._backends = Backends(wireguard=wireguard, rtnl=rtnl)
        except BaseException as exc:
            self._create_error = exc
            raise

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        if self._backends is None:
            raise PoolStopped(f"the WireGuard/rtnetlink backends are not available: {self._create_error!r}")
        return fn(self._backends, *args, **kwargs)

    def run(
        self, fn: Callable[Concatenate[Backends, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        if self._threadpool is None or not self.running:
            return fail(PoolStopped("the netlink pool is stopped"))
        return deferToThreadPool(
            self._reactor, self._threadpool, self._call, fn, args, kwargs
        )

    def _close(self) -> None:
        backends, self._backends = self._backends, None
        if backends is None:
            return
        for name, backend in (("wireguard", backends.wireguard), ("rtnl", backends.rtnl)):
            try:
                backend.close()
            except Exception:
                self.log.failure("closing the {name} backend failed", name=name)

    def stopService(self) -> Deferred[None]:
        """Close the backends in their threads after the queued jobs, then join the (idle) threads."""
        super().stopService()
        threadpool, self._threadpool = self._threadpool, None
        if threadpool is None:
            return succeed(None)
        d: Deferred[None] = deferToThreadPool(self._reactor, threadpool, self._close)
        d.addErrback(lambda f: self.log.failure("closing the backends failed", f))

        def join(_: object) -> None:
            threadpool.stop()
            if self._previous_switch_interval is not None:
                sys.setswitchinterval(self._previous_switch_interval)
                self._previous_switch_interval = None

        d.addBoth(join)
        return d

