"""The thread where all netlink and UAPI work happens, as a Twisted service.

:class:`BackendPool` owns a one-thread :class:`~twisted.python.threadpool.ThreadPool`.
Its WireGuard and rtnetlink backends are created *in* that thread when the
service starts (pyroute2 keeps one socket per thread), reused by every job and
closed in that thread when the service stops. Callers on the reactor use
:meth:`BackendPool.run`, which hands ``fn(backends, *args)`` to the thread and
returns a :class:`~twisted.internet.defer.Deferred` of its result.

Why one thread: the backends hold per-thread sockets, and running jobs one
after the other gives the order the worker relies on (a key queued after a
sweep is applied after that sweep's removals). Throughput comes from batching
(one UAPI transaction and one netlink send per interface and batch), not from
parallel threads.

Anything that only needs "run this with the backends" depends on the
:class:`Pool` protocol, so tests use a synchronous fake.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from wgkex.worker.backend import Rtnl, WireGuard

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Backends:
    """The kernel-facing objects that live in the pool thread."""

    wireguard: WireGuard
    rtnl: Rtnl


class PoolStopped(Exception):
    """A job was submitted while the pool is not running (the worker is stopping)."""


class Pool(Protocol):
    """Run blocking functions with the backends, off the reactor thread."""

    def run(
        self, fn: Callable[Concatenate[Backends, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Call ``fn(backends, *args, **kwargs)`` in the pool; the Deferred fires on the reactor."""
        ...


class BackendPool(Service):
    """A service owning the netlink/UAPI thread and the backends living in it."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads,
        make_wireguard: Callable[[], WireGuard],
        make_rtnl: Callable[[], Rtnl],
        name: str = "netlink-pool",
        threadpool_factory: Callable[[], ThreadPool] | None = None,
    ) -> None:
        self._reactor = reactor
        self._make_wireguard = make_wireguard
        self._make_rtnl = make_rtnl
        self._threadpool_factory = threadpool_factory or (
            lambda: ThreadPool(minthreads=1, maxthreads=1, name="wgkex-netlink")
        )
        self.setName(name)
        self._threadpool: ThreadPool | None = None
        # Touched only inside the pool thread.
        self._backends: Backends | None = None
        self._create_error: BaseException | None = None

    def startService(self) -> None:
        super().startService()
        self._threadpool = self._threadpool_factory()
        self._threadpool.start()
        # The first job: every later job runs after it in the same thread.
        d = deferToThreadPool(self._reactor, self._threadpool, self._create)
        d.addErrback(lambda f: self.log.failure("cannot create the WireGuard/rtnetlink backends", f))

    def _create(self) -> None:
        try:
            self._backends = Backends(wireguard=self._make_wireguard(), rtnl=self._make_rtnl())
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
        """Close the backends in their thread after the queued jobs, then join the (idle) thread."""
        super().stopService()
        threadpool, self._threadpool = self._threadpool, None
        if threadpool is None:
            return succeed(None)
        d: Deferred[None] = deferToThreadPool(self._reactor, threadpool, self._close)
        d.addErrback(lambda f: self.log.failure("closing the backends failed", f))

        def join(_: object) -> None:
            threadpool.stop()

        d.addBoth(join)
        return d

