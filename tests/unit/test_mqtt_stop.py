"""MqttService stops: it waits for acknowledgements and connect attempts, bounded when the server is down.

The subject is the real service driving a real paho client. Only the edges are
stand-ins (:mod:`tests.support.mqtt_fakes`): time and the reactor's
file-descriptor bookkeeping are a ``MemoryReactorClock``, the connect thread pool
runs its work synchronously, and the MQTT server is the test speaking MQTT 3.1.1
by hand on the far end of a unix socket, so no network and no sleeps are involved.
"""

from __future__ import annotations

from tests.support.mqtt_fakes import CONNECT, DISCONNECT, PUBLISH, ManualThreadPool, MqttTestCase, puback
from wgkex.mqtt import MqttStopped


class StopTests(MqttTestCase):
    def test_stop_waits_for_acknowledgement_then_disconnects(self) -> None:
        """stopService waits for the PUBACK of an earlier publish, then sends DISCONNECT and closes."""
        service = self.make()
        conn = self.start_connected(service)
        published = service.publish("wireguard-worker/gw1/status", b"0", qos=1, retain=True)
        stopped = service.stopService()
        self.pump()
        packets = conn.packets()
        self.assertEqual([p.kind for p in packets], [PUBLISH])
        self.assertNoResult(stopped)
        conn.send(puback(packets[0].publish()[4]))
        self.pump()
        self.assertIsNone(self.successResultOf(published))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [DISCONNECT])
        self.assertFalse(service.connected)
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(self.pool.stopped)

    def test_disconnect_on_the_wire_before_anyone_hears_of_the_end(self) -> None:
        """DISCONNECT has left (writes are corked) by the time disconnect callbacks and the stop's Deferred run."""
        service = self.make()
        conn = self.start_connected(service)
        heard: list[list[int]] = []
        service.add_disconnect_callback(lambda: heard.append([p.kind for p in conn.packets()]))
        stopped = service.stopService()
        stopped.addCallback(lambda _: heard.append([p.kind for p in conn.packets()]))
        self.pump()
        self.successResultOf(stopped)
        self.assertEqual(heard, [[DISCONNECT], []])

    def test_stop_with_server_down_is_bounded(self) -> None:
        """With the server gone, stop gives up after 5 s and fails what it could not deliver."""
        self.server.stop_listening()
        service = self.make()
        service.startService()
        queued = service.publish("t", b"x", qos=1)
        stopped = service.stopService()
        self.reactor.advance(4.9)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertIsNone(self.successResultOf(stopped))
        self.failureResultOf(queued, MqttStopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        attempts = self.pool.calls
        self.reactor.advance(60)
        self.assertEqual(self.pool.calls, attempts)

    def test_stop_keeps_trying_to_deliver_while_waiting(self) -> None:
        """A publish queued while down is still delivered if the server returns during the stop wait."""
        self.server.stop_listening()
        service = self.make()
        service.startService()
        queued = service.publish("wireguard-worker/gw1/status", b"0", qos=1)
        stopped = service.stopService()
        self.server.listen()
        self.reactor.advance(0.5)
        conn = self.handshake()
        packet = conn.packets()[0]
        conn.send(puback(packet.publish()[4]))
        self.pump()
        self.assertIsNone(self.successResultOf(queued))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [DISCONNECT])

    def test_stop_during_connect_attempt_waits_then_disconnects(self) -> None:
        """A stop while the connect thread works waits for it, then says DISCONNECT on the new socket."""
        self.pool = ManualThreadPool()
        service = self.make()
        service.startService()
        stopped = service.stopService()
        self.assertNoResult(stopped)
        self.assertTrue(self.pool.waiting)
        self.pool.run_pending()
        conn = self.server.accept()
        self.pump()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [CONNECT, DISCONNECT])
        self.assertEqual(self.reactor.getReaders(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_during_failing_connect_attempt(self) -> None:
        """A connect attempt that fails after stop began schedules no retry."""
        self.pool = ManualThreadPool()
        self.server.stop_listening()
        service = self.make()
        service.startService()
        stopped = service.stopService()
        self.pool.run_pending()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.pool.waiting, [])

    def test_stop_with_unresponsive_server(self) -> None:
        """A server that never acknowledges delays the stop by 5 s, then gets DISCONNECT anyway."""
        service = self.make()
        conn = self.start_connected(service)
        unacked = service.publish("t", b"x", qos=1)
        stopped = service.stopService()
        self.pump()
        self.reactor.advance(5)
        self.pump()
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual([p.kind for p in conn.packets()], [PUBLISH, DISCONNECT])
        self.failureResultOf(unacked, MqttStopped)
