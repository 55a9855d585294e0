"""The site's body limit, driven byte by byte through a real HTTPChannel on a StringTransport."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from wgkex.broker.site import make_site

LIMIT = 4096


class Echo(Resource):
    """Answers with what the request carried: body length, args, content type of the body store."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Request] = []

    def render_POST(self, request: Request) -> bytes:
        self.seen.append(request)
        content = request.content.read() if request.content is not None else b""
        return json.dumps({"length": len(content), "args": len(request.args or {})}).encode()


class SiteCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.resource = Echo()
        self.too_large: list[bytes] = []
        self.clock = MemoryReactorClock()
        self.site = make_site(self.resource, LIMIT, self.clock, on_too_large=self.too_large.append,
                              discard_limit=100_000)
        self.proto = self.site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        assert self.proto is not None
        self.proto.makeConnection(self.transport)
        self.addCleanup(self.proto.connectionLost, None)

    def send(self, data: bytes) -> None:
        assert self.proto is not None
        self.proto.dataReceived(data)

    def head(self, *lines: str) -> bytes:
        return ("\r\n".join(["POST /api/v1/wg/key/exchange HTTP/1.1", "Host: broker", *lines]) + "\r\n\r\n").encode()

    def chunk(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)


class BodyLimitTests(SiteCase):
    def test_small_chunked_body_passes(self) -> None:
        """A chunked body under the limit reaches the resource whole, from memory."""
        self.send(self.head("Transfer-Encoding: chunked", "Content-Type: application/x-www-form-urlencoded"))
        self.send(self.chunk(b'{"domain": "a",') + self.chunk(b'"public_key": "b"}') + b"0\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK"), out)
        reply = json.loads(out.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(reply, {"length": 33, "args": 0})

    def test_form_body_not_parsed_into_args(self) -> None:
        """A form-labelled body is left alone: no args, content readable raw."""
        data = b"domain=x&public_key=y"
        self.send(self.head("Content-Type: application/x-www-form-urlencoded", f"Content-Length: {len(data)}"))
        self.send(data)
        self.assertIn(b'"args": 0', self.transport.value())
        self.assertIn(b'"length": 21', self.transport.value())

    def test_content_length_over_limit_answered_before_body(self) -> None:
        """A Content-Length over the limit gets the 413 as soon as the headers are in."""
        self.send(self.head(f"Content-Length: {1_000_000}"))
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertIn(b"Content-Type: application/json", out)
        self.assertIn(b"Connection: close", out)
        body = json.loads(out.split(b"\r\n\r\n", 1)[1])
        self.assertIn("larger than 4096 bytes", body["error"]["message"])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.too_large, [b"/api/v1/wg/key/exchange"])

    def test_rest_discarded_then_closed(self) -> None:
        """After the 413 the body is read and dropped (not stored), then the connection closes."""
        self.send(self.head(f"Content-Length: {50_000}"))
        answered = self.transport.value()
        for _ in range(49):
            self.send(b"x" * 1000)
            self.assertFalse(self.transport.disconnecting)
        self.send(b"x" * 1000)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), answered)  # nothing else was written
        self.assertEqual(self.resource.seen, [])

    def test_chunk_crossing_limit(self) -> None:
        """Chunked (as Gluon sends): the 413 goes out at the chunk that crosses the limit."""
        self.send(self.head("Transfer-Encoding: chunked"))
        self.send(self.chunk(b"a" * 4000))
        self.assertEqual(self.transport.value(), b"")
        self.send(self.chunk(b"a" * 200))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertFalse(self.transport.disconnecting)
        for _ in range(100):
            self.send(self.chunk(b"b" * 500))
        self.assertFalse(self.transport.disconnecting)
        self.send(b"0\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.resource.seen, [])

    def test_exactly_at_limit_passes(self) -> None:
        """A body of exactly the limit is accepted."""
        self.send(self.head(f"Content-Length: {LIMIT}"))
        self.send(b"z" * LIMIT)
        self.assertIn(b'"length": 4096', self.transport.value())

    def test_discard_limit_cuts(self) -> None:
        """A client that keeps sending past the discard limit is cut off."""
        self.send(self.head("Transfer-Encoding: chunked"))
        for _ in range(30):
            self.send(self.chunk(b"c" * 5000))
        self.assertTrue(self.transport.disconnected)

    def test_expect_continue_over_limit(self) -> None:
        """With Expect: 100-continue, the 413 replaces the 100 and the connection closes at once."""
        self.send(self.head(f"Content-Length: {100_000}", "Expect: 100-continue"))
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out)
        self.assertNotIn(b"100 Continue", out)
        self.assertTrue(self.transport.disconnecting)

    def test_no_access_log(self) -> None:
        """The site keeps no per-request access log (metrics count requests instead)."""
        self.assertIsNone(self.site.log(None))  # type: ignore[func-returns-value]
        self.assertFalse(self.site.displayTracebacks)

    def test_malformed_request_gets_json_400(self) -> None:
        """A request twisted.web's parser refuses (NUL in a header) still gets a JSON error."""
        self.send(self.head("X-Bad: a\x00b", "Content-Length: 2"))
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertIn(b"Content-Type: application/json", out)
        self.assertIn("malformed", json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["message"])
        self.assertTrue(self.transport.disconnecting)

    def test_overlong_header_line_gets_json_400(self) -> None:
        """A header line longer than twisted.web's line limit gets the JSON 400 too, not a silent close."""
        self.send(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:200])
        self.assertIn(b"Content-Type: application/json", out)
        self.assertIn("malformed", json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["message"])
        self.assertTrue(self.transport.disconnecting)
