"""A memory reactor that is a :class:`wgkex.reactor.IReactor`, for unit tests of whole service trees.

Twisted's ``MemoryReactorClock`` records listens and connects and drives time,
but has no threads, so it is not the reactor type wgkex's services take.
:class:`ThreadedMemoryReactor` adds the thread methods, running the work at
once on the calling thread (the tests hand their own synchronous pools to
the code that uses threads; nothing here starts one).
:class:`PartsMemoryReactor` provides every part of ``IReactor`` without
declaring the intersection, as Twisted's own reactors do.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from wgkex.reactor import IReactor


@implementer(IReactorThreads)
class PartsMemoryReactor(MemoryReactorClock):
    """``MemoryReactorClock`` plus synchronous ``callInThread`` / ``callFromThread``; not declared ``IReactor``."""

    def callInThread(self, callable: Callable[..., object], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)

    def callFromThread(self, callable: Callable[..., object], *args: object, **kwargs: object) -> None:
        callable(*args, **kwargs)

    def getThreadPool(self) -> ThreadPool:
        raise NotImplementedError("ThreadedMemoryReactor has no thread pool: hand the code under test a fake one")

    def suggestThreadPoolSize(self, size: int) -> None:
        pass


@implementer(IReactor)
class ThreadedMemoryReactor(PartsMemoryReactor):
    """:class:`PartsMemoryReactor` declared as :class:`wgkex.reactor.IReactor`: what wgkex's services take."""
