"""The key exchange's own dispatch (not Klein's router), byte by byte through the broker's site.

POST on the two key exchange paths skips Klein (wgkex.broker.api); these pin
that it still behaves as the Klein route did: a client gone while its key waits,
an unexpected exception, a Host werkzeug cannot bind, and path variants.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import _DataLoss

from tests.support.broker_fakes import KEY, Broker
from wgkex.broker.site import make_site

PEER = IPv4Address("TCP", "192.0.2.1", 1234)


def request(path: str = "/api/v2/wg/key/exchange", host: str = "broker", method: str = "POST") -> bytes:
    """One request as Gluon sends it (chunked JSON labelled as a form)."""
    data = ('{"domain": "ffmuc_welt","public_key": "' + KEY + '"}').encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    return head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


class DispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.b = Broker()
        self.b.worker("gw-a")
        self.site = make_site(self.b.api.resource(), self.b.config.broker.max_body_size, self.b.clock)

    def connect(self) -> tuple[Any, StringTransport]:
        proto = self.site.buildProtocol(PEER)
        assert proto is not None
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        return proto, transport

    def exchange(self, data: bytes) -> tuple[int, dict[str, Any]]:
        """Send ``data``, acknowledge what was published, and return the status and JSON body."""
        proto, transport = self.connect()
        proto.dataReceived(data)
        self.b.bus.ack()
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 "), out)
        head, _, content = out.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Type: application/json", head)
        proto.connectionLost(Failure(_DataLoss()))
        return int(out[9:12]), json.loads(content)

    def counted(self, endpoint: str, status: int) -> bool:
        text = self.b.metrics.render().decode()
        return f'wgkex_broker_requests_total{{endpoint="{endpoint}",status="{status}"}} 1.0' in text

    def test_answer_waits_for_the_acknowledgement(self) -> None:
        """The 200 with the worker's endpoint goes out once the MQTT server has the key, not before."""
        proto, transport = self.connect()
        proto.dataReceived(request())
        self.assertEqual(transport.value(), b"")
        self.b.bus.ack()
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertEqual(json.loads(out.partition(b"\r\n\r\n")[2])["Endpoint"]["Address"], "gw-a.example.net")
        self.assertTrue(self.counted("v2", 200))
        proto.connectionLost(Failure(_DataLoss()))

    def test_client_gone_while_waiting(self) -> None:
        """A client that leaves before the acknowledgement gets nothing written; counted 499, the key still goes out."""
        proto, transport = self.connect()
        proto.dataReceived(request())
        proto.connectionLost(Failure(_DataLoss()))
        self.b.bus.ack()
        self.assertEqual(transport.value(), b"")
        self.assertTrue(self.counted("v2", 499))
        self.assertEqual([key for _, key in self.b.bus.keys()], [KEY.encode()])

    def test_unexpected_exception_is_a_json_500(self) -> None:
        """An exception inside the key exchange is a JSON 500 without a traceback, as on Klein's routes."""
        def broken(*args: Any, **kw: Any) -> Any:
            raise RuntimeError("the bus exploded")

        self.b.bus.publish = broken  # type: ignore[method-assign]
        status, reply = self.exchange(request(path="/api/v1/wg/key/exchange"))
        self.assertEqual(status, 500)
        self.assertIn("internal error", reply["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_host_werkzeug_cannot_bind(self) -> None:
        """A Host name that is not IDNA-encodable (a 64-byte label) is a JSON 400; nothing is published."""
        status, reply = self.exchange(request(host="a" * 64 + ".example"))
        self.assertEqual(status, 400)
        self.assertIn("error", reply)
        self.assertEqual(self.b.bus.keys(), [])

    def test_path_variants_still_routed(self) -> None:
        """A percent-encoded path or a query string reaches the same key exchange."""
        for path in ("/api/v2/wg/key/%65xchange", "/api/v2/wg/key/exchange?via=proxy"):
            status, reply = self.exchange(request(path=path))
            self.assertEqual(status, 200, path)
            self.assertIn("Endpoint", reply)

    def test_other_methods_and_paths_unchanged(self) -> None:
        """A trailing slash is a 404 and PUT a 405, JSON as before."""
        self.assertEqual(self.exchange(request(path="/api/v2/wg/key/exchange/"))[0], 404)
        self.assertEqual(self.exchange(request(method="PUT"))[0], 405)
