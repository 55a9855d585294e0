"""The site's per-connection bounds, driven through a real BrokerChannel on memory transports.

A :class:`BufferedTransport` behaves like Twisted's TCP transport in the one
way that matters here: once more than 64 KiB of replies wait unsent (the
client does not read), it pauses the channel, and resumes it when the client
has read them.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from wgkex.broker.channel import ABORT_AFTER, HELD_BYTES, MAX_PIPELINED, BrokerChannel
from wgkex.broker.site import BrokerSite, make_site

PAGE = b"m" * 10_000
SEND_BUFFER = 64 * 1024


class Pages(Resource):
    """``/big`` answers 10 kB at once; ``/later`` answers when the test says so."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered = 0
        self.waiting: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.rendered += 1
        if request.path == b"/later":
            self.waiting.append(request)
            return NOT_DONE_YET
        return PAGE

    def render_POST(self, request: Request) -> int:
        self.rendered += 1
        self.waiting.append(request)
        return NOT_DONE_YET


class BufferedTransport(StringTransport):
    """A StringTransport that pauses its producer while more than 64 KiB wait unread."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if len(self.value()) > SEND_BUFFER and self.producer is not None and not getattr(self, "_full", False):
            self._full = True
            self.producer.pauseProducing()

    def client_reads(self) -> bytes:
        """The client takes everything; the transport resumes its producer as the reactor would."""
        data: bytes = self.value()
        self.clear()
        if getattr(self, "_full", False) and self.producer is not None:
            self._full = False
            self.producer.resumeProducing()
        return data


class ConnectionCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.pages = Pages()
        self.site = make_site(self.pages, 4096, self.clock, idle_timeout=30, request_timeout=20,
                              max_per_address=3, max_connections=5)

    def connect(self, host: str = "192.0.2.1") -> tuple[BrokerChannel, BufferedTransport]:
        addr = IPv4Address("TCP", host, 40000)
        channel = self.site.buildProtocol(addr)
        assert isinstance(channel, BrokerChannel)
        transport = BufferedTransport(peerAddress=addr)
        channel.makeConnection(transport)
        return channel, transport


class PipeliningTests(ConnectionCase):
    def test_unread_replies_stop_parsing(self) -> None:
        """1000 pipelined GETs from a client that never reads: only replies up to the send buffer are made, reading stops."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n" * 1000)
        self.assertLessEqual(self.pages.rendered, SEND_BUFFER // len(PAGE) + 1)
        self.assertLess(len(transport.value()), SEND_BUFFER + 2 * len(PAGE))
        self.assertEqual(transport.producerState, "paused")

    def test_reading_resumes_when_client_reads(self) -> None:
        """Once the client reads its replies the next requests are answered, all of them in the end, in order."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n" * 30)
        replies = b""
        for _ in range(30):
            replies += transport.client_reads()
            if self.pages.rendered == 30:
                break
        replies += transport.client_reads()
        self.assertEqual(self.pages.rendered, 30)
        self.assertEqual(replies.count(b"HTTP/1.1 200 OK"), 30)
        self.assertEqual(transport.producerState, "producing")

    def test_pipelined_requests_held_are_capped(self) -> None:
        """While a reply is pending, at most MAX_PIPELINED further requests are held before the broker stops reading."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /later HTTP/1.1\r\nHost: b\r\n\r\n")
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n" * (MAX_PIPELINED + 1))
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(self.pages.rendered, 1)
        self.pages.waiting.pop().finish()
        for _ in range(MAX_PIPELINED + 2):
            transport.client_reads()
        self.assertEqual(self.pages.rendered, MAX_PIPELINED + 2)
        self.assertEqual(transport.producerState, "producing")

    def test_held_bytes_are_capped(self) -> None:
        """A pending reply plus more than HELD_BYTES of unparsed data stops reading from the connection."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /later HTTP/1.1\r\nHost: b\r\n\r\n")
        channel.dataReceived(b"GET /big HTTP/1.1\r\nX-Pad: " + b"p" * (HELD_BYTES + 10))
        self.assertEqual(transport.producerState, "paused")


class DeadlineTests(ConnectionCase):
    def test_slow_request_gets_408(self) -> None:
        """A request still incomplete request_timeout seconds after its first byte gets a JSON 408 and is closed."""
        channel, transport = self.connect()
        for _ in range(19):
            channel.dataReceived(b"x")  # a byte a second: the idle timeout alone never fires
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 408 "), out)
        self.assertIn("20 s", json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["message"])
        self.assertTrue(transport.disconnecting)

    def test_deadline_per_request(self) -> None:
        """Requests that each arrive in time on a long-lived connection are never cut."""
        channel, transport = self.connect()
        for _ in range(5):
            channel.dataReceived(b"GET /big HTTP/1.1\r\n")
            self.clock.advance(15)
            channel.dataReceived(b"Host: b\r\n\r\n")
            transport.client_reads()
        self.assertEqual(self.pages.rendered, 5)
        self.assertFalse(transport.disconnecting)

    def test_idle_connection_closed_quietly(self) -> None:
        """A connection with nothing to do is closed after idle_timeout, and cut if it does not go."""
        channel, transport = self.connect()
        self.clock.advance(29)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(ABORT_AFTER)
        self.assertTrue(getattr(transport, "aborting", False) or transport.disconnected)

    def test_waiting_for_the_answer_is_not_slow(self) -> None:
        """A complete request whose answer takes long (MQTT acknowledgement) is not cut by either timeout."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /later HTTP/1.1\r\nHost: b\r\n\r\n")
        self.clock.advance(45)
        self.assertFalse(transport.disconnecting)
        self.pages.waiting.pop().finish()
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))


class HalfCloseTests(ConnectionCase):
    def test_reply_after_client_shut_its_sending_side(self) -> None:
        """A POST followed by the client's half-close still gets its reply; then the connection closes."""
        channel, transport = self.connect()
        channel.dataReceived(b"POST /k HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\n{}")
        channel.readConnectionLost()
        self.assertFalse(transport.disconnecting)
        request = self.pages.waiting.pop()
        request.write(b'{"Message": "OK"}')
        request.finish()
        self.assertIn(b'{"Message": "OK"}', transport.value())
        self.assertTrue(transport.disconnecting)

    def test_pipelined_then_half_close(self) -> None:
        """Requests pipelined before the half-close are all answered before the connection closes."""
        channel, transport = self.connect()
        channel.dataReceived(b"GET /big HTTP/1.1\r\nHost: b\r\n\r\n" * 3)
        channel.readConnectionLost()
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertTrue(transport.disconnecting)


class ConnectionLimitTests(ConnectionCase):
    def test_per_address_cap(self) -> None:
        """Beyond max_per_address connections from one address are refused; other addresses are not; closing frees a slot."""
        first, _ = self.connect("192.0.2.1")
        self.connect("192.0.2.1")
        self.connect("192.0.2.1")
        self.assertIsNone(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)))
        self.assertIsInstance(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1)), BrokerChannel)
        first.connectionLost(None)  # type: ignore[arg-type]
        self.assertIsInstance(self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1)), BrokerChannel)

    def test_full_site_replaces_longest_waiting(self) -> None:
        """At max_connections a new connection cuts the one that has waited longest, never one being answered."""
        busy, busy_transport = self.connect("192.0.2.1")
        busy.dataReceived(b"GET /later HTTP/1.1\r\nHost: b\r\n\r\n")
        self.clock.advance(1)
        oldest, oldest_transport = self.connect("192.0.2.2")
        self.clock.advance(1)
        others = [self.connect(f"192.0.2.{i}")[1] for i in (3, 4, 5)]
        self.assertEqual(self.site.open_connections, 5)
        self.clock.advance(1)
        self.connect("192.0.2.9")
        self.assertTrue(getattr(oldest_transport, "aborting", False) or oldest_transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        self.assertFalse(any(t.disconnecting for t in others))
        self.assertEqual(self.site.open_connections, 5)


class FairReplacementTests(SynchronousTestCase):
    def test_address_holding_most_loses_first(self) -> None:
        """At max_connections the address holding the most connections loses one first, even a newer one."""
        clock = MemoryReactorClock()
        site = make_site(Pages(), 4096, clock, max_per_address=10, max_connections=4)
        transports = {}
        for name, host in (("single", "192.0.2.1"), ("flood1", "192.0.2.66"), ("flood2", "192.0.2.66"),
                           ("flood3", "192.0.2.66")):
            clock.advance(1)
            channel = site.buildProtocol(IPv4Address("TCP", host, 1))
            assert channel is not None
            transports[name] = StringTransport()
            channel.makeConnection(transports[name])
        site.buildProtocol(IPv4Address("TCP", "192.0.2.2", 1))
        self.assertTrue(transports["flood1"].disconnecting)
        self.assertFalse(transports["single"].disconnecting)

    def test_fresh_connections_replaced_last(self) -> None:
        """A connection that arrived less than a second ago is replaced only when no older one waits, even a flood's."""
        clock = MemoryReactorClock()
        site = make_site(Pages(), 4096, clock, max_per_address=10, max_connections=3)
        transports = []
        for host in ("192.0.2.1", "192.0.2.66", "192.0.2.66"):
            channel = site.buildProtocol(IPv4Address("TCP", host, 1))
            assert channel is not None
            transports.append(StringTransport())
            channel.makeConnection(transports[-1])
            clock.advance(0.6 if host == "192.0.2.1" else 0.3)
        site.buildProtocol(IPv4Address("TCP", "192.0.2.3", 1))
        self.assertEqual([t.disconnecting for t in transports], [True, False, False])


class ConnectionMetricsTests(SynchronousTestCase):
    def test_cuts_are_counted_in_metrics(self) -> None:
        """/metrics shows open connections and those closed by the per-address cap and the request deadline."""
        from tests.support.broker_fakes import make_config
        from wgkex.broker.service import build_broker

        reactor: Any = MemoryReactorClock()
        config = make_config(broker={"request_timeout": 5, "max_connections_per_address": 1})
        broker = build_broker(config, reactor)
        addr = IPv4Address("TCP", "192.0.2.1", 1)
        channel = broker.site.buildProtocol(addr)
        assert channel is not None
        channel.makeConnection(StringTransport(peerAddress=addr))
        self.assertIsNone(broker.site.buildProtocol(addr))
        channel.dataReceived(b"GET / HTTP/1.1\r\n")
        reactor.advance(5)
        text = broker.metrics.render().decode()
        self.assertIn("wgkex_broker_http_connections 1.0", text)
        self.assertIn('wgkex_broker_http_connections_cut_total{reason="refused"} 1.0', text)
        self.assertIn('wgkex_broker_http_connections_cut_total{reason="request_timeout"} 1.0', text)
        self.assertIn('wgkex_broker_http_connections_cut_total{reason="replaced"} 0.0', text)


class SiteSettingsTests(SynchronousTestCase):
    def test_config_reaches_the_site(self) -> None:
        """broker.request_timeout, idle_timeout and the connection caps reach the running site."""
        from tests.support.broker_fakes import make_config
        from wgkex.broker.service import build_broker, connection_limit

        reactor: Any = MemoryReactorClock()
        config = make_config(broker={"request_timeout": 7, "idle_timeout": 9, "max_connections_per_address": 11})
        site = build_broker(config, reactor).site
        self.assertIsInstance(site, BrokerSite)
        self.assertEqual((site.request_timeout, site.timeOut, site.max_per_address), (7, 9, 11))
        self.assertEqual(connection_limit(1024), 960)
        self.assertEqual(connection_limit(20), 16)
