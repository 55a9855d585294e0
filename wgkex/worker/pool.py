"""The threads where all netlink and UAPI work happens, as a Twisted service.

:class:`BackendPool` owns two *lanes* (:class:`Lane`): each is one thread with
backends of its own (a WireGuard backend and an rtnetlink socket, created in
that thread when the service starts, reused by every job, closed there when it
stops; pyroute2 keeps one socket per thread). Callers on the reactor use
``lane.run(fn, *args)``, which hands ``fn(backends, *args)`` to the lane's
thread and returns a :class:`~twisted.internet.defer.Deferred` of its result.

* ``keys``: new keys, re-applies, interface checks: short jobs, where a router
  waits for the result.
* ``housekeeping``: whole peer dumps (connected-peer counts, the start-up dump,
  stale-peer sweeps). A dump of 100,000 peers takes about a second; in a lane
  of its own it never delays a key (the sweep also removes in chunks, see
  :mod:`wgkex.worker.sweep`, which gives the measured effect).

Within a lane jobs run one after the other, in order; that is the order the
apply path relies on (a re-apply queued after a batch runs after it).
Throughput comes from batching (one UAPI transaction and one netlink send per
interface and chunk of keys), not from parallel jobs.

The key lane's WireGuard backend lives in a thread of its own
(:class:`WireGuardThread`): within one job, adding peers (wireguard-go spends
about 80 µs of its own CPU per new peer) and installing routes and FDB entries
(the kernel works inside our ``send()``) can overlap, so a burst costs about
the longer of the two rather than their sum. A job asks for that with
:meth:`Backends.start_wireguard` and waits for what it started before it
returns, so jobs stay strictly one after the other. A plain
``backends.wireguard.add_peers(...)`` call simply waits for the WireGuard
thread.

Anything that only needs "run this with the backends" depends on the
:class:`Pool` protocol, so tests use a synchronous fake.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from wgkex.worker.backend import InterfaceInfo, PeerInfo, Rtnl, WireGuard

P = ParamSpec("P")
T = TypeVar("T")


class GcPause(AbstractContextManager[None]):
    """Context manager: Python's cyclic garbage collector is off inside (nesting and threads allowed).

    For pool jobs that create, hold and drop hundreds of thousands of objects
    (peer dumps): none of them form cycles, reference counting frees them, and a
    collection in the middle would only walk them, holding the GIL. Garbage
    cycles made elsewhere meanwhile are collected once the collector is back on.

    The collector is process-wide, so a process has one pause, shared by every
    job that uses it: the tap makes it with the rest of the process-wide tuning
    (:func:`wgkex.worker.tap.tune_process`) and hands it down to
    :class:`BackendPool`, whose jobs find it as :attr:`Backends.gc_pause`.
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
    """The kernel-facing objects of the pool, and how a job holding a whole peer dump pauses the collector."""

    wireguard: WireGuard
    rtnl: Rtnl
    #: ``with backends.gc_pause:`` around a dump of 100,000 peers (a :class:`GcPause`; by
    #: default nothing is paused).
    gc_pause: AbstractContextManager[None] = field(default_factory=nullcontext)

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


def _wireguard_executor() -> Executor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="wgkex-wireguard")


#: The keys lane's :attr:`Lane.coalesce`, seconds: the longest a key that arrives right after
#: a batch started waits to share the next one (see :mod:`wgkex.worker.peers`).
KEYS_COALESCE = 0.008


class Lane:
    """One thread with its own backends; its jobs run one after the other, in order (a :class:`Pool`)."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        name: str,
        make_backends: Callable[[], Backends],
        threadpool_factory: Callable[[str], ThreadPool],
        coalesce: float = 0.0,
    ) -> None:
        self.name = name
        #: Seconds a steady trickle of small jobs is worth gathering into one before the next
        #: starts (a job here costs about 1 ms of CPU whatever its size); 0: start each at once.
        self.coalesce = coalesce
        self._reactor = reactor
        self._make_backends = make_backends
        self._threadpool_factory = threadpool_factory
        self._threadpool: ThreadPool | None = None
        # Touched only inside the lane's thread.
        self._backends: Backends | None = None
        self._create_error: BaseException | None = None

    def start(self) -> None:
        """Start the thread; its first job creates the backends."""
        self._threadpool = self._threadpool_factory(f"wgkex-{self.name}")
        self._threadpool.start()
        d = deferToThreadPool(self._reactor, self._threadpool, self._create)
        d.addErrback(
            lambda f: self.log.failure("cannot create the WireGuard/rtnetlink backends of the {lane} lane", f, lane=self.name)
        )

    def _create(self) -> None:
        try:
            self._backends = self._make_backends()
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
        if self._threadpool is None:
            return fail(PoolStopped("the netlink pool is stopped"))
        return deferToThreadPool(self._reactor, self._threadpool, self._call, fn, args, kwargs)

    def _close(self) -> None:
        backends, self._backends = self._backends, None
        if backends is None:
            return
        for name, backend in (("wireguard", backends.wireguard), ("rtnl", backends.rtnl)):
            try:
                backend.close()
            except Exception:
                self.log.failure("closing the {name} backend of the {lane} lane failed", name=name, lane=self.name)

    def stop(self) -> Deferred[None]:
        """Close the backends in the thread after the queued jobs, then join the (idle) thread."""
        threadpool, self._threadpool = self._threadpool, None
        if threadpool is None:
            return succeed(None)
        d: Deferred[None] = deferToThreadPool(self._reactor, threadpool, self._close)
        d.addErrback(lambda f: self.log.failure("closing the backends of the {lane} lane failed", f, lane=self.name))
        d.addBoth(lambda _: threadpool.stop())
        return d


def _one_thread(name: str) -> ThreadPool:
    return ThreadPool(minthreads=1, maxthreads=1, name=name)


class BackendPool(Service):
    """A service owning the two lanes (``keys`` and ``housekeeping``) and the backends living in them."""

    def __init__(
        self,
        reactor: IReactorFromThreads,
        make_wireguard: Callable[[], WireGuard],
        make_rtnl: Callable[[], Rtnl],
        name: str = "netlink-pool",
        threadpool_factory: Callable[[str], ThreadPool] = _one_thread,
        wireguard_executor_factory: Callable[[], Executor] = _wireguard_executor,
        gc_pause: AbstractContextManager[None] | None = None,
    ) -> None:
        """``gc_pause``: the process's :class:`GcPause` (from the tap), for the jobs that hold whole dumps."""
        self.setName(name)
        #: Handed to both lanes' :class:`Backends`.
        self.gc_pause: AbstractContextManager[None] = gc_pause if gc_pause is not None else nullcontext()
        pause = self.gc_pause

        def key_backends() -> Backends:
            # The WireGuard thread starts here, in the lane's thread, not on the reactor.
            wireguard = WireGuardThread(wireguard_executor_factory(), make_wireguard)
            try:
                return Backends(wireguard=wireguard, rtnl=make_rtnl(), gc_pause=pause)
            except BaseException:
                wireguard.close()
                raise

        def housekeeping_backends() -> Backends:
            wireguard = make_wireguard()
            try:
                return Backends(wireguard=wireguard, rtnl=make_rtnl(), gc_pause=pause)
            except BaseException:
                wireguard.close()
                raise

        #: New keys and re-applies, interface checks.
        self.keys = Lane(reactor, "keys", key_backends, threadpool_factory, coalesce=KEYS_COALESCE)
        #: Whole peer dumps: counts, the start-up dump, sweeps.
        self.housekeeping = Lane(reactor, "housekeeping", housekeeping_backends, threadpool_factory)

    def startService(self) -> None:
        super().startService()
        self.keys.start()
        self.housekeeping.start()

    def stopService(self) -> Deferred[None]:
        """Close both lanes' backends after their queued jobs, then join their threads."""
        super().stopService()
        both = DeferredList([self.keys.stop(), self.housekeeping.stop()], consumeErrors=True)
        return both.addCallback(lambda _: None)
