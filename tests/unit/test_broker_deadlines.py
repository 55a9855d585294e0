"""Deadlines: the key exchange's publish timeouts, many waits of one length on one timer."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wgkex.broker.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock, 5.0)
        self.expired: list[str] = []

    def wait(self, name: str) -> object:
        return self.deadlines.wait(lambda: self.expired.append(name))

    def test_expires_at_its_deadline(self) -> None:
        """A wait expires exactly its length after it began, not before."""
        self.clock.advance(1.0)
        self.wait("a")
        self.clock.advance(4.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, ["a"])

    def test_each_at_its_own_deadline_in_order(self) -> None:
        """Waits begun at different times expire at their own deadlines, oldest first, on one timer."""
        self.wait("a")
        self.clock.advance(2.0)
        self.wait("b")
        self.clock.advance(1.0)
        self.wait("c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(2.0)
        self.assertEqual(self.expired, ["a"])
        self.clock.advance(2.0)
        self.assertEqual(self.expired, ["a", "b"])
        self.clock.advance(1.0)
        self.assertEqual(self.expired, ["a", "b", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_waits_do_not_expire(self) -> None:
        """A cancelled wait is never expired; the others still are, on time."""
        a = self.deadlines.wait(lambda: self.expired.append("a"))
        self.clock.advance(1.0)
        self.wait("b")
        a.cancel()
        self.assertFalse(a.active)
        self.clock.advance(4.0)
        self.assertEqual(self.expired, [])
        self.clock.advance(1.0)
        self.assertEqual(self.expired, ["b"])

    def test_answered_waits_do_not_pile_up(self) -> None:
        """Waits cancelled in order (acknowledged in time) leave the queue as new ones arrive."""
        for _ in range(10_000):
            self.deadlines.wait(lambda: self.expired.append("x")).cancel()
            self.clock.advance(0.001)
        self.assertLessEqual(len(self.deadlines), 1)
        self.clock.advance(10.0)
        self.assertEqual(self.expired, [])

    def test_wait_begun_while_expiring(self) -> None:
        """A wait begun by an expiring one gets its full length too."""
        self.deadlines.wait(lambda: self.wait("second"))
        self.clock.advance(5.0)
        self.assertEqual(self.expired, [])
        self.clock.advance(5.0)
        self.assertEqual(self.expired, ["second"])
