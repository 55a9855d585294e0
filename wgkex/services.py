"""Service-tree building blocks shared by the broker and the worker."""

from __future__ import annotations

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure


class OrderedMultiService(MultiService):
    """Starts its children in the order they were added; stops them in reverse, one after the other.

    Each child's ``stopService`` is called only once the one started after it
    has stopped (its Deferred fired), so the tree's order *is* the stop order:
    whatever must still work while another part shuts down is added before it.
    A child that fails to stop is logged; the next one stops anyway.
    """

    log = Logger()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        done: Deferred[None] = succeed(None)
        for child in reversed(list(self)):
            done.addCallback(self._stop, child)
        return done

    def _stop(self, _: None, child: IService) -> Deferred[None]:
        stopped: Deferred[object] = maybeDeferred(child.stopService)

        def failed(failure: Failure) -> None:
            self.log.failure("stopping {name} failed", failure, name=child.name)

        return stopped.addCallbacks(lambda _: None, failed)


class LaterTimerService(TimerService):
    """A :class:`TimerService` whose first call comes one ``step`` after start, not at once."""

    def startService(self) -> None:
        Service.startService(self)
        call, args, kwargs = self.call
        self._loop = LoopingCall(call, *args, **kwargs)
        if self.clock is not None:
            self._loop.clock = self.clock
        self._loopFinished = self._loop.start(self.step, now=False)
        self._loopFinished.addErrback(self._failed)


__all__ = ["LaterTimerService", "OrderedMultiService"]
