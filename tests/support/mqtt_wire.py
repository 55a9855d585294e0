"""MQTT 3.1.1 wire encoding for tests and benchmarks that speak the protocol by hand."""

from __future__ import annotations

import socket
import struct
import threading
import time


def remaining_length(n: int) -> bytes:
    """The variable-length "remaining length" field of a fixed header."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def str16(text: str | bytes) -> bytes:
    """A length-prefixed (two bytes, big endian) UTF-8 string."""
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


class RawPublisher:
    """Publishes pre-encoded QoS 1 messages over one TCP connection and counts the PUBACKs.

    Written for the benchmark: all PUBLISH packets go out in large writes while
    a reader thread counts acknowledgements, so the publisher is never what
    limits the rate.
    """

    def __init__(self, host: str, port: int, client_id: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = str16(b"MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + str16(client_id.encode())
        self.sock.sendall(b"\x10" + remaining_length(len(body)) + body)
        connack = self._read_exact(4)
        if connack[0] != 0x20 or connack[3] != 0:
            raise RuntimeError(f"MQTT CONNACK refused: {connack!r}")
        self.acked = 0
        self.all_acked = threading.Event()
        self._expected = 0

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("mosquitto closed the publisher's connection")
            data += chunk
        return data

    def _count_acks(self) -> None:
        buffer = b""
        while self.acked < self._expected:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return
            buffer += chunk
            usable = len(buffer) - len(buffer) % 4  # PUBACK: 0x40 0x02 id id
            self.acked += usable // 4
            buffer = buffer[usable:]
        self.all_acked.set()

    def _start(self, topic: str, payloads: list[bytes]) -> list[bytes]:
        """The encoded PUBLISH packets; the acknowledgement counter is running."""
        encoded_topic = str16(topic.encode())
        packets = []
        for i, payload in enumerate(payloads):
            body = encoded_topic + struct.pack("!H", i % 65535 + 1) + payload
            packets.append(b"\x32" + remaining_length(len(body)) + body)
        self._expected = len(packets)
        reader = threading.Thread(target=self._count_acks, name="pubacks", daemon=True)
        reader.start()
        return packets

    def publish_paced(self, topic: str, payloads: list[bytes], rate: float) -> list[float]:
        """Send the payloads at QoS 1 evenly at ``rate`` per second; returns each one's send time (monotonic).

        Payload ``i`` is due ``i / rate`` seconds after the first; whatever is due is
        written in one go, so a late wake-up never lowers the rate.
        """
        packets = self._start(topic, payloads)
        sent_at: list[float] = []
        started = time.monotonic()
        while len(sent_at) < len(packets):
            now = time.monotonic()
            due = min(len(packets), int((now - started) * rate) + 1)
            if due > len(sent_at):
                self.sock.sendall(b"".join(packets[len(sent_at) : due]))
                sent_at += [now] * (due - len(sent_at))
            else:
                time.sleep(max(0.0, started + len(sent_at) / rate - now))
        return sent_at

    def publish_all(self, topic: str, payloads: list[bytes]) -> float:
        """Send every payload at QoS 1; returns when all are written (acks are counted in a thread)."""
        packets = self._start(topic, payloads)
        started = time.monotonic()
        for start in range(0, len(packets), 500):
            self.sock.sendall(b"".join(packets[start : start + 500]))
        return started

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()
