"""The broker as it runs: ``twistd -n wgkex-broker`` against a real mosquitto, real TCP clients.

Fake workers are real MQTT clients (paho, in this process or in a subprocess
that the test kills to fire its last will); keys are observed by a real
subscriber. Every wait polls with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.trial.unittest import SynchronousTestCase

from tests.support.mosquitto import Mosquitto, free_port, process_gone, start_mosquitto, wait_for
from tests.support.skips import need_mosquitto

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")

KEY = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
KEY2 = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
GW_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GW_KEY2 = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
GLUON_HEADERS = {
    "Content-Type": "application/x-www-form-urlencoded",
    "User-Agent": "gluon/2023.2.3",
    "X-Gluon-Version": "v2023.2.3",
    "X-Board-Name": "tplink,archer-c7-v2",
}


def fresh_key(i: int) -> str:
    """A valid, distinct public key per index (canonical: last char before '=' is 'A')."""
    import base64

    raw = bytes([(i >> 8) & 0xFF, i & 0xFF, 7] + [(i * 7 + j) & 0xFF for j in range(28)] + [0x40])
    return base64.b64encode(raw).decode()


class BrokerProcess:
    """One ``twistd -n wgkex-broker`` with its own config file, port and log."""

    def __init__(self, testcase: SynchronousTestCase, mqtt_port: int, extra: str = "", mqtt_extra: str = "",
                 limit_files: int | None = None,
                 broker: dict[str, Any] | None = None) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgkex-broker-")
        testcase.addCleanup(shutil.rmtree, self.dir, True)
        # A spool of its own, so that no other test's broker replays its keys (or it theirs).
        broker_settings = json.dumps({"state_dir": os.path.join(self.dir, "state"), **(broker or {})})
        self.port = free_port()
        self.config = os.path.join(self.dir, "wgkex.yaml")
        with open(self.config, "w") as f:
            f.write(textwrap.dedent(f"""\
                domains: [ffmuc_welt, ffmuc_muc]
                domain_prefixes: [ffmuc_]
                workers:
                  gw-a: {{weight: 3}}
                  gw-b: {{weight: 1}}
                mqtt: {{broker_url: 127.0.0.1, broker_port: {mqtt_port}, reconnect_max_delay: 1{mqtt_extra}}}
                broker_listen: {{host: 127.0.0.1, port: {self.port}}}
                broker: {broker_settings}
                """) + extra)
        self.log_path = os.path.join(self.dir, "broker.log")
        log = open(self.log_path, "wb")

        def limit() -> None:
            if limit_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit_files, limit_files))

        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wgkex-broker", "--config", self.config],
            cwd=self.dir, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit,
        )
        log.close()
        testcase.addCleanup(self.kill)
        wait_for(self._serving, 60, what=f"broker on port {self.port}")  # generous: a loaded CI machine starts Python slowly

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _serving(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        """Stop the process this object started (by PID), forcefully if it lingers."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connection()
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def post(self, path: str, body: bytes, chunked: bool = True,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """POST like Gluon's uclient-fetch: form content type, Gluon headers (plus ``headers``), chunked body."""
        conn = self.connection()
        sent = {**GLUON_HEADERS, **(headers or {})}
        try:
            if chunked:
                conn.request("POST", path, body=iter([body]), headers=sent, encode_chunked=True)
            else:
                conn.request("POST", path, body=body, headers=sent)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        code, body = self.get("/api/v1/status")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result


class Subscriber:
    """A real MQTT client collecting every key published on wireguard/+/all."""

    def __init__(self, testcase: SynchronousTestCase, port: int, persistent: bool = False) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        client_id = f"test-sub-{uuid.uuid4().hex[:8]}" if persistent else ""
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        testcase.addCleanup(self.close)
        wait_for(self.subscribed.is_set, 10, what="subscription")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe("wireguard/+/all", qos=1)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def keys(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_retained(port: int, messages: list[tuple[str, str]]) -> None:
    """Publish retained QoS 1 messages and wait until the server has them."""
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
        for info in infos:
            info.wait_for_publish(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()


def worker_messages(name: str, address: str, key: str, peers: int = 0, domain: str = "ffmuc_welt",
                    port: int = 51820, link: str = "fe80::1") -> list[tuple[str, str]]:
    data = json.dumps({"ExternalAddress": address, "Port": port, "PublicKey": key, "LinkAddress": link})
    return [
        (f"wireguard-worker/{name}/status", "1"),
        (f"wireguard-worker/{name}/{domain}/data", data),
        (f"wireguard-metrics/{domain}/{name}/connected_peers", str(peers)),
    ]


FAKE_WORKER = """
import json, sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, name, messages = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
c = paho.Client(CallbackAPIVersion.VERSION2, client_id="fake-" + name)
c.will_set(f"wireguard-worker/{name}/status", "0", qos=1, retain=True)
c.connect("127.0.0.1", port, keepalive=2)
c.loop_start()
for topic, payload in messages:
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(timeout=5)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


class FakeWorker:
    """A fake worker in a subprocess with a last will; ``cut()`` kills it so the will fires."""

    def __init__(self, testcase: SynchronousTestCase, port: int, name: str, messages: list[tuple[str, str]]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", FAKE_WORKER, str(port), name, json.dumps(messages)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        testcase.addCleanup(self.cut)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise AssertionError(f"fake worker {name} failed: {line!r} {self.proc.stdout.read()!r}")

    def cut(self) -> None:
        """SIGKILL: the connection drops without DISCONNECT, so mosquitto publishes the will."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends on ``s`` until it closes the connection."""
    reply = b""
    while True:
        data = s.recv(65536)
        if not data:
            return reply
        reply += data


def v1_body(key: str = KEY, domain: str = "ffmuc_welt") -> bytes:
    return ('{"domain": "' + domain + '","public_key": "' + key + '"}').encode()


class BrokerIntegrationTests(SynchronousTestCase):
    skip = need_mosquitto()

    def setUp(self) -> None:
        self.mosquitto: Mosquitto = start_mosquitto(self)  # type: ignore[arg-type]

    def test_gluon_v1_publishes_exact_key(self) -> None:
        """A Gluon-shaped v1 request (chunked, form content type) publishes exactly the key on the domain topic."""
        sub = Subscriber(self, self.mosquitto.port)
        broker = BrokerProcess(self, self.mosquitto.port)
        wait_for(lambda: broker.get("/readyz")[0] == 200, 10, what="broker connected to MQTT")
        status, headers, body = broker.post("/api/v1/wg/key/exchange", v1_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body), {"Message": "OK"})
        # The reply came after the server acknowledged: the key is there (or about to be delivered).
        wait_for(sub.keys, 5, what="key at subscriber")
        self.assertEqual(sub.keys(), [("wireguard/ffmuc_welt/all", KEY.encode())])

    def test_v2_from_retained_worker_messages(self) -> None:
        """Workers that published before the broker started are known from retained messages; v2 returns their endpoint."""
        publish_retained(self.mosquitto.port, worker_messages(
            "gw-a", "gw-a.ffmuc.net", GW_KEY, peers=10, port=40001, link="fe80::27c:16ff:fec0:6c74"))
        broker = BrokerProcess(self, self.mosquitto.port)
        wait_for(lambda: broker.status()["domains"]["ffmuc_welt"]["next"] == "gw-a", 10, what="worker known")
        status, headers, body = broker.post("/api/v2/wg/key/exchange", v1_body())
        self.assertEqual(status, 200, body)
        self.assertEqual(headers["content-type"], "application/json")
        endpoint = json.loads(body)["Endpoint"]
        self.assertEqual(
            (endpoint["Address"], endpoint["Port"], endpoint["PublicKey"], endpoint["AllowedIPs"][0]),
            ("gw-a.ffmuc.net", "40001", GW_KEY, "fe80::27c:16ff:fec0:6c74"),
        )
        code, _, body = broker.post("/api/v2/wg/key/exchange", v1_body(domain="ffmuc_muc"))
        self.assertEqual(code, 503)
        self.assertIn("no gateway", json.loads(body)["error"]["message"])

    def test_last_will_stops_choice(self) -> None:
        """When a worker's connection dies its last will marks it offline and v2 stops choosing it."""
        broker = BrokerProcess(self, self.mosquitto.port)
        a = FakeWorker(self, self.mosquitto.port, "gw-a", worker_messages("gw-a", "a.example", GW_KEY, peers=0))
        FakeWorker(self, self.mosquitto.port, "gw-b", worker_messages("gw-b", "b.example", GW_KEY2, peers=500))
        wait_for(lambda: broker.status()["domains"]["ffmuc_welt"]["online"] == 2, 10, what="both workers online")
        code, _, body = broker.post("/api/v2/wg/key/exchange", v1_body())
        self.assertEqual((code, json.loads(body)["Endpoint"]["PublicKey"]), (200, GW_KEY))
        a.cut()
        wait_for(lambda: broker.status()["domains"]["ffmuc_welt"]["online"] == 1, 10, what="last will of gw-a")
        for _ in range(3):
            code, _, body = broker.post("/api/v2/wg/key/exchange", v1_body())
            self.assertEqual((code, json.loads(body)["Endpoint"]["PublicKey"]), (200, GW_KEY2))

    def test_keys_accepted_while_mqtt_down_arrive(self) -> None:
        """mosquitto restarted under a running broker: keys accepted meanwhile (200) arrive after reconnect."""
        sub = Subscriber(self, self.mosquitto.port, persistent=True)
        broker = BrokerProcess(self, self.mosquitto.port)
        wait_for(lambda: broker.get("/readyz")[0] == 200, 10, what="broker connected")
        self.mosquitto.stop()
        wait_for(lambda: broker.get("/readyz")[0] == 503, 10, what="broker noticing the outage")
        keys = [fresh_key(i) for i in range(5)]
        for key in keys:
            status, _, body = broker.post("/api/v1/wg/key/exchange", v1_body(key))
            self.assertEqual(status, 200, body)
        self.mosquitto.start()
        wait_for(lambda: broker.get("/readyz")[0] == 200, 15, what="broker reconnected")
        wait_for(lambda: len(sub.keys()) >= len(keys), 15, what="queued keys at subscriber")
        self.assertEqual([p for _, p in sub.keys()], [k.encode() for k in keys])
        self.assertIn("wgkex_broker_mqtt_reconnects_total 1.0", broker.get("/metrics")[1].decode())

    def test_readyz_follows_mqtt(self) -> None:
        """/readyz is 503 while the broker cannot reach MQTT, 200 once it can; /healthz stays 200."""
        self.mosquitto.stop()
        broker = BrokerProcess(self, self.mosquitto.port)
        self.assertEqual(broker.get("/readyz")[0], 503)
        self.assertEqual(broker.get("/healthz")[0], 200)
        self.mosquitto.start()
        wait_for(lambda: broker.get("/readyz")[0] == 200, 15, what="ready after MQTT came up")

    def test_sigterm_exits_cleanly(self) -> None:
        """SIGTERM: the broker stops listening, flushes, and exits with status 0 without a traceback."""
        broker = BrokerProcess(self, self.mosquitto.port)
        wait_for(lambda: broker.get("/readyz")[0] == 200, 10, what="broker connected")
        self.assertEqual(broker.post("/api/v1/wg/key/exchange", v1_body())[0], 200)
        broker.proc.send_signal(signal.SIGTERM)
        self.assertEqual(broker.proc.wait(timeout=15), 0, broker.log()[-3000:])
        wait_for(lambda: process_gone(broker.proc.pid), 5, what="process gone")
        self.assertNotIn("Traceback", broker.log())
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", broker.port), timeout=1).close()

    def test_413_reaches_a_real_client(self) -> None:
        """A 1 MB chunked body gets a 413 the client actually reads; the server closes afterwards."""
        broker = BrokerProcess(self, self.mosquitto.port)
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
            s.sendall(b"POST /api/v1/wg/key/exchange HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"x" * 16384
            for _ in range(64):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
            reply = read_until_closed(s)
        self.assertTrue(reply.startswith(b"HTTP/1.1 413 "), reply[:200])
        head, body = reply.split(b"\r\n\r\n", 1)
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn("larger than 4096", json.loads(body)["error"]["message"])

    def test_413_from_content_length(self) -> None:
        """A Content-Length over the limit is answered 413 before the body is sent."""
        broker = BrokerProcess(self, self.mosquitto.port)
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
            s.sendall(b"POST /api/v2/wg/key/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
            first = s.recv(4096)
            self.assertTrue(first.startswith(b"HTTP/1.1 413 "), first)
            s.sendall(b"y" * 1_000_000)
            while s.recv(65536):
                pass

    def test_half_closed_post_gets_its_reply(self) -> None:
        """A POST whose client then shuts its sending side (SHUT_WR) gets its 200 after the key is acknowledged."""
        sub = Subscriber(self, self.mosquitto.port)
        broker = BrokerProcess(self, self.mosquitto.port)
        wait_for(lambda: broker.get("/readyz")[0] == 200, 10, what="broker connected to MQTT")
        payload = v1_body(KEY2)
        with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as s:
            s.sendall(b"POST /api/v1/wg/key/exchange HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/x-www-form-urlencoded\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            s.shutdown(socket.SHUT_WR)
            reply = read_until_closed(s)
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:200])
        self.assertEqual(json.loads(reply.split(b"\r\n\r\n", 1)[1]), {"Message": "OK"})
        wait_for(sub.keys, 5, what="key at subscriber")
        self.assertEqual(sub.keys(), [("wireguard/ffmuc_welt/all", KEY2.encode())])

    def test_blocklist_reloaded_on_sighup(self) -> None:
        """A blocked key is refused with 403; after editing the list and SIGHUP it is accepted."""
        blocklist = os.path.join(tempfile.mkdtemp(prefix="wgkex-list-"), "blocked")
        self.addCleanup(shutil.rmtree, os.path.dirname(blocklist), True)
        with open(blocklist, "w") as f:
            f.write(f"# abusive\n{KEY2}\n")
        sub = Subscriber(self, self.mosquitto.port)
        broker = BrokerProcess(self, self.mosquitto.port, broker={"key_blocklist": blocklist})
        wait_for(lambda: broker.get("/readyz")[0] == 200, 10, what="broker connected")
        status, _, body = broker.post("/api/v1/wg/key/exchange", v1_body(KEY2))
        self.assertEqual(status, 403, body)
        with open(blocklist, "w") as f:
            f.write("# nothing blocked\n")
        broker.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: broker.post("/api/v1/wg/key/exchange", v1_body(KEY2))[0] == 200, 10,
                 what="key accepted after SIGHUP")
        wait_for(sub.keys, 5, what="key at subscriber")
        self.assertEqual(sub.keys(), [("wireguard/ffmuc_welt/all", KEY2.encode())])

    def test_sighup_without_key_lists_keeps_serving(self) -> None:
        """SIGHUP to a broker without key lists is logged and ignored; the process keeps serving."""
        broker = BrokerProcess(self, self.mosquitto.port)
        broker.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "no key lists" in broker.log() or broker.proc.poll() is not None, 10, what="SIGHUP logged")
        self.assertIsNone(broker.proc.poll(), f"broker died of SIGHUP:\n{broker.log()[-2000:]}")
        self.assertEqual(broker.get("/healthz")[0], 200)

    def test_two_brokers_side_by_side(self) -> None:
        """Two brokers on one bus hold the same picture (from MQTT only) and both publish keys."""
        publish_retained(self.mosquitto.port, worker_messages("gw-b", "b.example", GW_KEY2, peers=3))
        sub = Subscriber(self, self.mosquitto.port)
        one = BrokerProcess(self, self.mosquitto.port)
        two = BrokerProcess(self, self.mosquitto.port)
        for broker in (one, two):
            wait_for(lambda: broker.status()["domains"]["ffmuc_welt"]["next"] == "gw-b", 10, what="worker")
            code, _, body = broker.post("/api/v2/wg/key/exchange", v1_body(KEY))
            self.assertEqual((code, json.loads(body)["Endpoint"]["Address"]), (200, "b.example"))
        wait_for(lambda: len(sub.keys()) == 2, 5, what="both keys")
