"""MqttService over TLS against a real mosquitto, with a throwaway CA.

Each test starts its own mosquitto on a free 127.0.0.1 port. Waiting is by
polling with deadlines (:func:`tests.support.mqtt_live.until`), never sleeps.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_fakes import (
    CONNECT, DISCONNECT, SUBSCRIBE, connack, observe_logs, publish_packet, split_packets, suback,
)
from tests.support.mqtt_live import deferred_test, until
from tests.support.skips import need_mosquitto
from wgkex.config import MqttConfig
from wgkex.mqtt import MqttService


reactor: Any = _reactor


def make_test_certificates(directory: str) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) paths."""
    ca, cakey = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    key, cert = os.path.join(directory, "server.key"), os.path.join(directory, "server.pem")
    csr, ext = os.path.join(directory, "server.csr"), os.path.join(directory, "ext.cnf")
    run = functools.partial(subprocess.run, check=True, capture_output=True, cwd=directory)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=wgkex test CA",
         "-keyout", cakey, "-out", ca])
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr])
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", cakey, "-CAcreateserial", "-days", "2",
         "-extfile", ext, "-out", cert])
    return ca, cert, key


class _TlsMosquitto(Mosquitto):
    """mosquitto with a TLS listener only, using a throwaway CA made with openssl."""

    def __init__(self) -> None:
        super().__init__()
        self.ca, cert, key = make_test_certificates(self.dir)
        self.tls_lines = [f"cafile {self.ca}", f"certfile {cert}", f"keyfile {key}"]

    def write_config(self) -> str:
        path = super().write_config()
        with open(path, "a") as f:
            f.write("\n".join(self.tls_lines) + "\n")
        return path


class OneRecordTlsServer:
    """A minimal TLS MQTT server (stdlib ssl, one thread) that answers SUBSCRIBE with SUBACK and
    three PUBLISH packets in a single write, so they arrive in one TLS record."""

    def __init__(self, testcase: TestCase, cert: str, key: str) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen: list[int] = []
        self.thread = threading.Thread(target=self._serve, name="one-record-tls-server", daemon=True)
        self.thread.start()
        testcase.addCleanup(self.close)

    def _serve(self) -> None:
        try:
            raw, _ = self.listener.accept()
        except OSError:
            return
        raw.settimeout(15)
        with self.context.wrap_socket(raw, server_side=True) as tls:
            buffer = b""
            while True:
                try:
                    data = tls.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                packets, buffer = split_packets(buffer + data)
                for packet in packets:
                    self.seen.append(packet.kind)
                    if packet.kind == CONNECT:
                        tls.sendall(connack())
                    elif packet.kind == SUBSCRIBE:
                        mid, filters = packet.subscribe()
                        tls.sendall(suback(mid, len(filters)) + b"".join(
                            publish_packet("wgkex-test/record", f"m{i}".encode()) for i in range(3)))
                    elif packet.kind == DISCONNECT:
                        return

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


class MqttTlsIntegrationTests(TestCase):
    skip = need_mosquitto() or (None if shutil.which("openssl") else "needs the openssl command to make test certificates")
    timeout = 20

    @deferred_test
    async def test_tls_round_trip_many_messages(self) -> None:
        """Over TLS with a CA file, a burst of messages all arrive (data buffered inside TLS is read too)."""
        broker = _TlsMosquitto()
        self.addCleanup(broker.cleanup)
        broker.start()
        service = MqttService(
            reactor,
            MqttConfig(broker_url="127.0.0.1", broker_port=broker.port, tls=True, ca_file=broker.ca,
                       keepalive=5, reconnect_max_delay=0.5),
        )
        service.startService()
        self.addCleanup(service.stopService)
        got: list[bytes] = []
        service.subscribe("wgkex-test/tls", 1, lambda t, p, r: got.append(p))
        await until(lambda: service.connected, "the TLS connect")
        count = 2000
        await gatherResults([service.publish("wgkex-test/tls", str(i), qos=1) for i in range(count)])
        await until(lambda: len(got) >= count, f"{count} messages over TLS")
        self.assertEqual(got, [str(i).encode() for i in range(count)])

    @deferred_test
    async def test_tls_messages_sharing_one_record(self) -> None:
        """Messages that arrive together in one TLS record are all delivered at once, not at the next ping."""
        directory = tempfile.mkdtemp(prefix="wgkex-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        ca, cert, key = make_test_certificates(directory)
        server = OneRecordTlsServer(self, cert, key)
        service = MqttService(
            reactor,
            MqttConfig(broker_url="127.0.0.1", broker_port=server.port, tls=True, ca_file=ca,
                       keepalive=60, reconnect_max_delay=0.5),
        )
        got: list[bytes] = []
        service.subscribe("wgkex-test/record", 0, lambda t, p, r: got.append(p))
        service.startService()
        self.addCleanup(service.stopService)
        await until(lambda: len(got) >= 3, "three messages from one TLS record", timeout=5)
        self.assertEqual(got, [b"m0", b"m1", b"m2"])

    @deferred_test
    async def test_tls_wrong_ca_is_refused_and_retried(self) -> None:
        """A server certificate the CA file does not vouch for is refused; the service keeps retrying."""
        broker = _TlsMosquitto()
        self.addCleanup(broker.cleanup)
        broker.start()
        other = _TlsMosquitto()  # only its CA is used
        self.addCleanup(other.cleanup)
        service = MqttService(
            reactor,
            MqttConfig(broker_url="127.0.0.1", broker_port=broker.port, tls=True, ca_file=other.ca,
                       keepalive=5, reconnect_max_delay=0.2),
        )
        events: list[dict[str, Any]] = []
        observe_logs(service, events.append)
        service.startService()
        self.addCleanup(service.stopService)
        await until(lambda: len([e for e in events if "delay" in e]) >= 3, "three refused attempts")
        self.assertFalse(service.connected)
        self.assertIn("CERTIFICATE_VERIFY_FAILED", str([e.get("what") for e in events]))
