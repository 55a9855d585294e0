"""wgkex.worker.retry: the ledger of keys waiting for a retry."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.apply import KeyFailure
from wgkex.worker.retry import RetryLedger

D = "ffmuc_welt"


class RetryLedgerTests(SynchronousTestCase):
    """Counted retries for kernel refusals, uncounted ones for a missing interface."""

    def setUp(self) -> None:
        self.ledger = RetryLedger([D], max_retries=2)

    def test_given_up_after_max_retries(self) -> None:
        """A key refused three times in a row (max_retries 2) is given up and no longer waits."""
        refused = {"k": KeyFailure("wireguard", "errno=-22")}
        self.assertEqual(self.ledger.failed(D, refused), [])
        self.assertEqual(self.ledger.failed(D, refused), [])
        self.assertEqual(self.ledger.failed(D, refused), ["k"])
        self.assertEqual(self.ledger.waiting(D), frozenset())

    def test_missing_interface_never_given_up(self) -> None:
        """A key failing because its interface is missing waits however often it fails."""
        missing = {"k": KeyFailure("interface_missing", "wg-welt missing")}
        for _ in range(5):
            self.assertEqual(self.ledger.failed(D, missing), [])
        self.assertEqual(self.ledger.waiting(D), frozenset({"k"}))

    def test_registration_restores_retries(self) -> None:
        """A fresh registration from the bus earns a key its retries again."""
        refused = {"k": KeyFailure("wireguard", "errno=-22")}
        self.ledger.failed(D, refused)
        self.ledger.failed(D, refused)
        self.ledger.registered(D, "k")
        self.assertEqual(self.ledger.failed(D, refused), [])

    def test_due_forgets_swept_keys(self) -> None:
        """Keys no longer known (swept meanwhile) are dropped; applied keys stop waiting."""
        self.ledger.failed(D, {k: KeyFailure("route", "x") for k in ("a", "b", "c")})
        self.ledger.applied(D, ["c"])
        self.assertEqual(self.ledger.due(lambda domain, key: key != "b"), {D: ["a"]})
        self.assertEqual(self.ledger.waiting(D), frozenset({"a"}))
