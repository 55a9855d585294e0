"""The outbox alone, on a ``task.Clock``: queue, window, acknowledgements, drain, abandon, spool.

The sender stands in for paho: it records what it was handed and returns a
message id, as paho's ``publish`` does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from wgkex.bus import MqttStopped, QueueFull
from wgkex.mqtt.outbox import Outbox, Publish
from wgkex.mqtt.spool import Spool


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


class SpooledOutboxTests(SynchronousTestCase):
    """The outbox with the broker's spool, on a temporary directory: what a restart finds again."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = tempfile.mkdtemp(prefix="wgkex-outbox-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def outbox(self, limit: int = 10) -> Outbox:
        outbox = Outbox(self.clock, limit=limit, server="mq:1883", spool=Spool(self.dir))
        outbox.log = Logger(observer=cast(ILogObserver, self.events.append))
        outbox.start()
        return outbox

    events: list[LogEvent]

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_stop_with_server_down_keeps_everything_for_the_next_start(self) -> None:
        """Publishes queued while down survive a stop: one line says so, the next start sends them in order."""
        self.events = []
        first = self.outbox()
        for i in range(5):
            first.publish("wireguard/ffmuc_welt/all", f"k{i}", qos=1).addErrback(lambda f: f.trap(MqttStopped))
        self.assertEqual(first.abandon(lambda entry: MqttStopped(entry.topic)), 5)
        self.assertEqual(len(self.texts()), 1)
        self.assertIn("stopped with 5 publishes not acknowledged by mq:1883; they stay in", self.texts()[0])
        second = self.outbox()
        self.assertEqual(second.pending, 5)
        sender = Sender()
        second.open(sender)
        self.assertEqual(sender.payloads(), [b"k0", b"k1", b"k2", b"k3", b"k4"])

    def test_acknowledged_publishes_leave_the_spool(self) -> None:
        """Once acknowledged, a publish is not sent again by the next start."""
        self.events = []
        first = self.outbox()
        sender = Sender()
        first.open(sender)
        first.publish("t", "acked", qos=1)
        first.publish("t", "unacked", qos=1).addErrback(lambda f: f.trap(MqttStopped))
        first.acknowledged(1)
        first.settle()
        first.abandon(lambda entry: MqttStopped(entry.topic))
        second = self.outbox()
        resend = Sender()
        second.open(resend)
        self.assertEqual(resend.payloads(), [b"unacked"])

    def test_replayed_publishes_leave_the_spool_when_acknowledged(self) -> None:
        """What a start replays is removed from the spool by its acknowledgement: a third start sends nothing."""
        self.events = []
        first = self.outbox()
        first.publish("t", "k", qos=1).addErrback(lambda f: f.trap(MqttStopped))
        first.abandon(lambda entry: MqttStopped(entry.topic))
        second = self.outbox()
        sender = Sender()
        second.open(sender)
        second.acknowledged(sender.sent[0][0])
        second.settle()
        second.abandon(lambda entry: MqttStopped(entry.topic))
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.outbox().pending, 0)

    def test_full_queue_writes_nothing(self) -> None:
        """A publish refused with QueueFull is not spooled (it must not come back after a restart)."""
        self.events = []
        first = self.outbox(limit=1)
        first.publish("t", "kept", qos=1).addErrback(lambda f: f.trap(MqttStopped))
        self.assertRaises(QueueFull, first.publish, "t", "refused", qos=1)
        first.abandon(lambda entry: MqttStopped(entry.topic))
        second = self.outbox()
        sender = Sender()
        second.open(sender)
        self.assertEqual(sender.payloads(), [b"kept"])

    def test_unwritable_spool_refuses_with_queue_full(self) -> None:
        """When the spool cannot be written the publish is refused (503 upstream), logged once."""
        self.events = []
        outbox = self.outbox()
        assert outbox.spool is not None
        for segment in outbox.spool._segments.values():
            os.close(segment.fd)
        outbox.spool._segments.clear()
        outbox.spool.directory = os.path.join(self.dir, "missing", "deeper")
        with self.assertRaises(QueueFull) as ctx:
            outbox.publish("t", "k", qos=1)
        self.assertIn("cannot be kept", str(ctx.exception))
        self.assertRaises(QueueFull, outbox.publish, "t", "k2", qos=1)
        self.assertEqual(len([t for t in self.texts() if "cannot spool" in t]), 1)
        self.assertEqual(outbox.pending, 0)
