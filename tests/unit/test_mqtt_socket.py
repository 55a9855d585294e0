"""BufferedSocket: paho's many small reads are served from few large recvs, on a stub socket."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from wgkex.mqtt.buffered_socket import READ_BUFFER, BufferedSocket


class StubSocket:
    """A non-blocking socket stand-in: hands out ``chunks`` one per recv, then would block."""

    def __init__(self, chunks: list[bytes], inner_pending: int = 0) -> None:
        self.chunks = chunks
        self.asked: list[int] = []
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
