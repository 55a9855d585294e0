"""wgkex.reactor: the one reactor type, checked when the tap takes Twisted's reactor."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.reactors import PartsMemoryReactor
from wgkex.reactor import IReactor, as_reactor, installed_reactor


class AsReactorTests(SynchronousTestCase):
    """as_reactor accepts what provides every part and names what is missing."""

    def test_memory_reactor_without_threads_refused(self) -> None:
        """A reactor without IReactorThreads is refused with a message naming that part."""
        with self.assertRaises(TypeError) as caught:
            as_reactor(MemoryReactorClock())
        self.assertIn("IReactorThreads", str(caught.exception))

    def test_complete_reactor_accepted_as_is(self) -> None:
        """A reactor with every part comes back as the same object, now providing IReactor."""
        candidate = PartsMemoryReactor()
        self.assertIs(as_reactor(candidate), candidate)
        self.assertTrue(IReactor.providedBy(candidate))

    def test_installed_reactor(self) -> None:
        """Twisted's global reactor passes the check."""
        self.assertTrue(IReactor.providedBy(installed_reactor()))
