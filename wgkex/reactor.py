"""The one reactor type of wgkex: what its services need of Twisted's reactor.

Every object that schedules, listens, watches a socket or hands work to a
thread takes its reactor as an argument typed :class:`IReactor` (an object
that only needs time takes :class:`~twisted.internet.interfaces.IReactorTime`,
which :class:`twisted.internet.task.Clock` provides). :class:`IReactor` is the
intersection of Twisted's own reactor interfaces, so mypy (with the
``mypy_zope`` plugin) accepts it wherever one of them is expected, for example
``LoopingCall.clock``, ``deferToThreadPool`` or ``serverFromString``.

Twisted's global reactor provides every part but does not declare the
intersection; :func:`as_reactor` checks the parts at run time and declares it.
Tests pass their own fakes (``MemoryReactorClock`` with a synchronous
``callFromThread``, or a ``Clock``) the same way, or untyped.
"""

from __future__ import annotations

from zope.interface import alsoProvides
from zope.interface.interface import InterfaceClass

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)

__all__ = ["IReactor", "as_reactor", "installed_reactor"]


class IReactor(IReactorCore, IReactorTime, IReactorFDSet, IReactorTCP, IReactorUNIX, IReactorSocket, IReactorThreads):
    """Core (run, stop, triggers), time, file descriptors, TCP/UNIX listeners, adopted sockets, threads."""


#: The parts :func:`as_reactor` checks (the bases of :class:`IReactor`).
_PARTS: tuple[InterfaceClass, ...] = (
    IReactorCore,
    IReactorTime,
    IReactorFDSet,
    IReactorTCP,
    IReactorUNIX,
    IReactorSocket,
    IReactorThreads,
)


def as_reactor(candidate: object) -> IReactor:
    """``candidate`` typed as :class:`IReactor`, once it is checked to provide every part.

    Raises :class:`TypeError` naming the missing parts (a reactor without
    threads or UNIX sockets cannot run wgkex).
    """
    missing = [part.__name__ for part in _PARTS if not part.providedBy(candidate)]
    if missing:
        raise TypeError(f"{type(candidate).__name__} is not a usable reactor: it does not provide {', '.join(missing)}")
    if not IReactor.providedBy(candidate):
        alsoProvides(candidate, IReactor)
    return IReactor(candidate)


def installed_reactor() -> IReactor:
    """Twisted's global reactor (installing the default one if none is), as :class:`IReactor`.

    Only the taps call this, inside ``makeService``: library code gets its
    reactor passed in.
    """
    from twisted.internet import reactor

    return as_reactor(reactor)
