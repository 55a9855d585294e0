"""BufferedSocket: paho's many small reads are served from few large recvs, its many sends leave in few, on a stub socket."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.support.reactors import ThreadedMemoryReactor
from wgkex.mqtt.buffered_socket import READ_BUFFER, BufferedSocket
from wgkex.mqtt.paho_socket import ReactorSocket


class StubSocket:
    """A non-blocking socket stand-in: hands out ``chunks`` one per recv, then would block."""

    def __init__(self, chunks: list[bytes], inner_pending: int = 0) -> None:
        self.chunks = chunks
        self.asked: list[int] = []
        #: Each send's bytes, as the socket took them.
        self.sent: list[bytes] = []
        #: Bytes the socket takes per send from now on (None: all; 0: would block).
        self.room: int | None = None
        self.broken = False
        self.inner_pending = inner_pending
        self.closed = False
        self.timeout: float | None = None

    def recv(self, size: int) -> bytes:
        self.asked.append(size)
        if not self.chunks:
            raise BlockingIOError()
        return self.chunks.pop(0)[:size]

    def pending(self) -> int:
        return self.inner_pending

    def send(self, data: bytes) -> int:
        if self.broken:
            raise BrokenPipeError()
        taken = bytes(data) if self.room is None else bytes(data[: self.room])
        if not taken and data:
            raise BlockingIOError()
        self.sent.append(taken)
        return len(taken)

    def close(self) -> None:
        self.closed = True

    def settimeout(self, timeout: float) -> None:
        self.timeout = timeout


class BufferedSocketTests(SynchronousTestCase):
    def test_one_recv_serves_many_small_reads(self) -> None:
        """Paho's small reads are served from one large recv; the rest counts as pending."""
        stub = StubSocket([b"\x30\x05hello\x30"])
        sock = BufferedSocket(stub)
        self.assertEqual(sock.recv(1), b"\x30")
        self.assertEqual(sock.pending(), 7)
        self.assertEqual(sock.recv(1), b"\x05")
        self.assertEqual(sock.recv(5), b"hello")
        self.assertEqual(sock.recv(1), b"\x30")
        self.assertEqual(stub.asked, [READ_BUFFER])
        self.assertEqual(sock.pending(), 0)
        self.assertRaises(BlockingIOError, sock.recv, 1)

    def test_large_read_passes_through(self) -> None:
        """A read of more than the buffer size asks the socket for that much and buffers nothing."""
        stub = StubSocket([b"x" * (READ_BUFFER + 10)])
        sock = BufferedSocket(stub)
        self.assertEqual(len(sock.recv(READ_BUFFER + 10)), READ_BUFFER + 10)
        self.assertEqual(stub.asked, [READ_BUFFER + 10])
        self.assertEqual(sock.pending(), 0)

    def test_end_of_file(self) -> None:
        """The peer closing (recv gives b'') reaches paho as b''."""
        sock = BufferedSocket(StubSocket([b""]))
        self.assertEqual(sock.recv(1), b"")

    def test_pending_includes_the_ssl_object(self) -> None:
        """Decrypted bytes inside an SSL object count as pending too."""
        sock = BufferedSocket(StubSocket([b"ab"], inner_pending=3))
        sock.recv(1)
        self.assertEqual(sock.pending(), 4)
        self.assertEqual(BufferedSocket(object()).pending(), 0)  # a plain socket has no pending()

    def test_other_calls_reach_the_socket(self) -> None:
        """close() drops the buffer and closes the socket; anything else goes straight through."""
        stub = StubSocket([b"abc"])
        sock = BufferedSocket(stub)
        sock.recv(1)
        sock.settimeout(3.0)
        self.assertEqual(stub.timeout, 3.0)
        sock.close()
        self.assertTrue(stub.closed)
        self.assertEqual(sock.pending(), 0)


class CorkTests(SynchronousTestCase):
    def test_corked_sends_leave_together(self) -> None:
        """Packets sent while corked leave in one send, in order; paho is told each went out whole."""
        stub = StubSocket([])
        sock = BufferedSocket(stub)
        sock.cork()
        self.assertEqual([sock.send(p) for p in (b"\x30\x03abc", b"\x30\x01d", b"\xc0\x00")], [5, 3, 2])
        self.assertEqual(stub.sent, [])
        self.assertEqual(sock.unsent, 10)
        self.assertTrue(sock.uncork())
        self.assertEqual(stub.sent, [b"\x30\x03abc\x30\x01d\xc0\x00"])
        self.assertEqual(sock.unsent, 0)

    def test_uncorked_sends_pass_through(self) -> None:
        """Without a cork every send goes straight to the socket."""
        stub = StubSocket([])
        sock = BufferedSocket(stub)
        sock.send(b"ab")
        sock.send(b"cd")
        self.assertEqual(stub.sent, [b"ab", b"cd"])

    def test_what_the_socket_refuses_goes_first_later(self) -> None:
        """Bytes the socket has no room for wait; later sends block until they are out, so the order holds."""
        stub = StubSocket([])
        sock = BufferedSocket(stub)
        stub.room = 3
        sock.cork()
        sock.send(b"12345")
        sock.send(b"678")
        self.assertFalse(sock.uncork())
        self.assertEqual(sock.unsent, 5)
        stub.room = 0
        self.assertRaises(BlockingIOError, sock.send, b"9")
        sock.cork()
        sock.send(b"9")  # corked: collected behind what waits
        stub.room = None
        self.assertTrue(sock.uncork())
        self.assertEqual(sock.send(b"0"), 1)
        self.assertEqual(b"".join(stub.sent), b"1234567890")
        self.assertEqual(sock.unsent, 0)

    def test_close_sends_the_last_packets(self) -> None:
        """close() while corked (paho closes right after writing DISCONNECT) sends what was collected first."""
        stub = StubSocket([])
        sock = BufferedSocket(stub)
        sock.cork()
        sock.send(b"\xe0\x00")
        sock.close()
        self.assertEqual(stub.sent, [b"\xe0\x00"])
        self.assertTrue(stub.closed)

    def test_broken_connection_drops_what_waits(self) -> None:
        """On a broken connection the collected bytes are dropped (paho notices when it reads), not raised."""
        stub = StubSocket([])
        sock = BufferedSocket(stub)
        sock.cork()
        sock.send(b"abc")
        stub.broken = True
        self.assertTrue(sock.uncork())
        self.assertEqual(sock.unsent, 0)


class _PahoWriting:
    """Paho as ReactorSocket sees it when writing: ``loop_write`` sends every queued packet."""

    def __init__(self, sock: BufferedSocket) -> None:
        self.sock = sock
        self.queued: list[bytes] = []

    def loop_write(self) -> None:
        while self.queued:
            self.sock.send(self.queued.pop(0))

    def want_write(self) -> bool:
        return bool(self.queued)


class CorkedWritingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.stub = StubSocket([])
        self.stub.fileno = lambda: 7  # type: ignore[attr-defined]
        self.sock = BufferedSocket(self.stub)
        self.io = ReactorSocket(self.reactor, "mqtt", lambda: None, lambda reason: None)
        self.paho = _PahoWriting(self.sock)
        self.io.attach(self.paho, self.sock, "test")  # type: ignore[arg-type]

    def writable(self) -> None:
        assert self.io.descriptor is not None
        self.io.descriptor.doWrite()

    def test_one_send_per_writable_event(self) -> None:
        """Everything paho writes on one writable event leaves in one send; then nothing is watched."""
        self.paho.queued = [b"p1", b"p2", b"p3"]
        self.io.want_write()
        self.writable()
        self.assertEqual(self.stub.sent, [b"p1p2p3"])
        self.assertEqual(self.reactor.getWriters(), [])

    def test_rest_waits_for_the_next_writable_event(self) -> None:
        """Bytes the socket had no room for keep the socket watched and leave on the next writable event."""
        self.paho.queued = [b"abcd", b"efgh"]
        self.io.want_write()
        self.stub.room = 3
        self.writable()
        self.assertEqual(len(self.reactor.getWriters()), 1)
        self.io.written()  # paho has nothing queued: the waiting bytes still keep the socket watched
        self.assertEqual(len(self.reactor.getWriters()), 1)
        self.stub.room = None
        self.writable()
        self.assertEqual(b"".join(self.stub.sent), b"abcdefgh")
        self.assertEqual(self.reactor.getWriters(), [])
