"""wgkex.services: the ordered multi-service (its order is the stop order) and the timer that waits a step."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wgkex.services import LaterTimerService, OrderedMultiService


class _Recorded(Service):
    """Records start and stop; ``stopping`` (when set) is what its stopService returns."""

    def __init__(self, name: str, events: list[str], stopping: Deferred[None] | None = None) -> None:
        self.setName(name)
        self.events = events
        self.stopping = stopping

    def startService(self) -> None:
        super().startService()
        self.events.append(f"start {self.name}")

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.events.append(f"stop {self.name}")
        return self.stopping if self.stopping is not None else succeed(None)


class OrderedMultiServiceTests(SynchronousTestCase):
    """Children start in order and stop in reverse, each after the later one has finished stopping."""

    def test_stop_waits_for_each_child(self) -> None:
        """The second child is asked to stop only once the third has finished stopping."""
        events: list[str] = []
        slow: Deferred[None] = Deferred()
        root = OrderedMultiService()
        for name, stopping in (("a", None), ("b", None), ("c", slow)):
            _Recorded(name, events, stopping).setServiceParent(root)
        root.startService()
        self.assertEqual(events, ["start a", "start b", "start c"])
        done = root.stopService()
        self.assertEqual(events[3:], ["stop c"])
        self.assertNoResult(done)
        slow.callback(None)
        self.assertEqual(events[3:], ["stop c", "stop b", "stop a"])
        self.successResultOf(done)

    def test_failed_stop_logged_and_next_stops(self) -> None:
        """A child whose stop fails is logged; the children before it still stop."""
        events: list[str] = []
        root = OrderedMultiService()
        _Recorded("a", events).setServiceParent(root)
        _Recorded("b", events, fail(RuntimeError("stuck"))).setServiceParent(root)
        root.startService()
        self.successResultOf(root.stopService())
        self.assertEqual(events[2:], ["stop b", "stop a"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class LaterTimerServiceTests(SynchronousTestCase):
    """LaterTimerService calls one step after start, then every step."""

    def test_first_call_after_one_step(self) -> None:
        """Nothing at start; a call at each step; none after stop."""
        clock = Clock()
        calls: list[float] = []
        timer = LaterTimerService(10, lambda: calls.append(clock.seconds()))
        timer.clock = clock
        timer.startService()
        self.assertEqual(calls, [])
        clock.advance(10)
        clock.advance(10)
        self.assertEqual(calls, [10, 20])
        self.successResultOf(timer.stopService())
        clock.advance(10)
        self.assertEqual(calls, [10, 20])
