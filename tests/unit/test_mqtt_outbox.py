"""The outbox alone, on a ``task.Clock``: queue, window, acknowledgements, drain, abandon.

The sender stands in for paho: it records what it was handed and returns a
message id, as paho's ``publish`` does.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from wgkex.bus import MqttStopped, QueueFull
from wgkex.mqtt.outbox import Outbox, Publish


class Sender:
    """Records the publishes handed over; refuses while ``refusing``."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes]] = []
        self.refusing = False
        self._mid = 0

    def __call__(self, entry: Publish) -> int | None:
        if self.refusing:
            return None
        self._mid += 1
        self.sent.append((self._mid, entry.payload))
        return self._mid

    def payloads(self) -> list[bytes]:
        return [payload for _, payload in self.sent]


class OutboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.sender = Sender()

    def test_queued_while_closed_then_sent_in_order(self) -> None:
        """Publishes made while no connection is open wait, and go out in order when one opens."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883")
        for i in range(3):
            outbox.publish("t", f"k{i}", qos=1)
        self.assertEqual(outbox.pending, 3)
        outbox.open(self.sender)
        self.assertEqual(self.sender.payloads(), [b"k0", b"k1", b"k2"])
        self.assertEqual(outbox.pending, 0)

    def test_full_queue_refuses_with_the_setting_named(self) -> None:
        """Beyond the limit publish raises QueueFull naming mqtt.queue_limit; nothing is queued."""
        outbox = Outbox(self.clock, limit=2, server="mq:1883")
        outbox.publish("t", "a", qos=1)
        outbox.publish("t", "b", qos=1)
        with self.assertRaises(QueueFull) as ctx:
            outbox.publish("t", "c", qos=1)
        self.assertIn("mqtt.queue_limit is 2", str(ctx.exception))
        self.assertEqual(outbox.pending, 2)

    def test_window_and_acknowledgements(self) -> None:
        """At most ``window`` publishes are in flight; each acknowledgement lets the next one go."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883", window=2)
        outbox.open(self.sender)
        deferreds = [outbox.publish("t", f"k{i}", qos=1) for i in range(4)]
        self.assertEqual(self.sender.payloads(), [b"k0", b"k1"])
        outbox.acknowledged(2)
        self.assertNoResult(deferreds[1])  # fired only when the I/O bout is over
        outbox.settle()
        self.assertIsNone(self.successResultOf(deferreds[1]))
        self.assertNoResult(deferreds[0])
        self.assertEqual(self.sender.payloads(), [b"k0", b"k1", b"k2"])

    def test_close_puts_in_flight_back_in_front(self) -> None:
        """When the connection ends, what was in flight is re-sent first, in the original order."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883")
        outbox.open(self.sender)
        outbox.publish("t", "a", qos=1)
        outbox.publish("t", "b", qos=1)
        outbox.close()
        outbox.publish("t", "c", qos=1)
        self.assertEqual(outbox.pending, 3)
        resend = Sender()
        outbox.open(resend)
        self.assertEqual(resend.payloads(), [b"a", b"b", b"c"])

    def test_refused_hand_over_stays_queued(self) -> None:
        """A publish the client refuses stays first in the queue and goes out on the next fill."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883")
        self.sender.refusing = True
        outbox.open(self.sender)
        outbox.publish("t", "a", qos=1)
        self.assertEqual(outbox.pending, 1)
        self.sender.refusing = False
        outbox.fill()
        self.assertEqual(self.sender.payloads(), [b"a"])

    def test_drain_fires_when_everything_earlier_is_acknowledged(self) -> None:
        """drain fires with 0 once every publish made before it is acknowledged."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883")
        outbox.open(self.sender)
        outbox.publish("t", "a", qos=1)
        drained = outbox.drain(5.0)
        outbox.publish("t", "later", qos=1)  # not waited for
        self.assertNoResult(drained)
        outbox.acknowledged(1)
        outbox.settle()
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_gives_up_after_timeout(self) -> None:
        """drain fires after the timeout with the number still unacknowledged."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883")
        outbox.publish("t", "a", qos=1)
        outbox.publish("t", "b", qos=1)
        drained = outbox.drain(5.0)
        self.clock.advance(4.9)
        self.assertNoResult(drained)
        self.clock.advance(0.1)
        self.assertEqual(self.successResultOf(drained), 2)

    def test_abandon_fails_the_rest(self) -> None:
        """abandon fires what was acknowledged and fails every other publish; it counts the failed."""
        outbox = Outbox(self.clock, limit=10, server="mq:1883")
        outbox.open(self.sender)
        acked = outbox.publish("t", "a", qos=1)
        lost = outbox.publish("t", "b", qos=1)
        outbox.acknowledged(1)
        self.assertEqual(outbox.abandon(lambda entry: MqttStopped(entry.topic)), 1)
        self.assertIsNone(self.successResultOf(acked))
        self.failureResultOf(lost, MqttStopped)
