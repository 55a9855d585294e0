"""The broker as it runs, for integration tests: ``twistd -n wgkex-broker`` and the MQTT clients around it.

:class:`BrokerProcess` runs one broker with its own config file, port and log.
Fake workers are real MQTT clients (paho, in this process, or :class:`FakeWorker`
in a subprocess that the test kills to fire its last will); keys are observed by
a real :class:`Subscriber`. Every wait polls with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.trial.unittest import SynchronousTestCase

from tests.support.mosquitto import free_port, wait_for


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
