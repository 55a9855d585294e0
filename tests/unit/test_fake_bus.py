"""The shared in-memory bus behaves like the real one where broker and worker tests rely on it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.bus import FakeBus
from wgkex.bus import QueueFull


class FakeBusTests(SynchronousTestCase):
    """Delivery, publishing and connection callbacks of :class:`FakeBus`."""

    def test_delivers_by_mqtt_filter_rules(self) -> None:
        """A message reaches the subscriptions whose filter matches it, by the real topic filter."""
        got: list[str] = []
        bus = FakeBus()
        bus.subscribe("wireguard/ffmuc_welt/+", 1, lambda t, p, r: got.append("key " + t))
        bus.subscribe("wireguard-worker/#", 1, lambda t, p, r: got.append("worker " + t))
        for topic in ("wireguard/ffmuc_welt/all", "wireguard/ffmuc_ost/all", "wireguard/ffmuc_welt/all/extra",
                      "wireguard-worker/gw1/status", "wireguard-worker"):
            bus.deliver(topic, b"x")
        self.assertEqual(got, ["key wireguard/ffmuc_welt/all", "worker wireguard-worker/gw1/status",
                               "worker wireguard-worker"])

    def test_refuses_what_the_server_would(self) -> None:
        """An invalid filter or a wildcard topic raises ValueError, as on the real bus."""
        bus = FakeBus()
        self.assertRaises(ValueError, bus.subscribe, "wireguard/#/all", 1, lambda t, p, r: None)
        self.assertRaises(ValueError, bus.publish, "wireguard/+/all", b"x")

    def test_queue_limit_while_disconnected(self) -> None:
        """Disconnected, unacknowledged publishes beyond the limit raise QueueFull; connected, they do not."""
        bus = FakeBus(acks=False, queue_limit=2)
        bus.publish("a", b"1")
        bus.publish("a", b"2")
        self.assertEqual(bus.pending, 2)
        self.assertRaises(QueueFull, bus.publish, "a", b"3")
        bus.ack()
        bus.publish("a", b"3")
        bus.connect()
        bus.publish("a", b"4")
        bus.publish("a", b"5")
        self.assertEqual(bus.keys(), [("a", b"1"), ("a", b"2"), ("a", b"3"), ("a", b"4"), ("a", b"5")])
        self.assertEqual(bus.last("a"), b"5")

    def test_acks_at_once_or_on_demand(self) -> None:
        """With acks a publish's Deferred has fired on return; without, only after ack()."""
        self.assertIsNone(self.successResultOf(FakeBus().publish("a", b"1")))
        bus = FakeBus(acks=False)
        d = bus.publish("a", b"1")
        self.assertNoResult(d)
        bus.ack()
        self.assertIsNone(self.successResultOf(d))

    def test_connection_callbacks(self) -> None:
        """connect() and disconnect() flip connected and run the callbacks registered for them."""
        bus = FakeBus()
        seen: list[tuple[str, bool]] = []
        bus.add_connect_callback(lambda: seen.append(("up", bus.connected)))
        bus.add_disconnect_callback(lambda: seen.append(("down", bus.connected)))
        bus.connect()
        bus.disconnect()
        self.assertEqual(seen, [("up", True), ("down", False)])
