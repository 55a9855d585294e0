"""The broker as it runs: ``twistd -n wgkex-broker`` against a real mosquitto, real TCP clients.

Fake workers are real MQTT clients (paho, in this process or in a subprocess
that the test kills to fire its last will); keys are observed by a real
subscriber (:mod:`tests.support.broker_process`). Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_process import (
    GW_KEY, GW_KEY2, KEY, KEY2, BrokerProcess, FakeWorker, Subscriber, fresh_key, publish_retained,
    read_until_closed, v1_body, worker_messages,
)
from tests.support.mosquitto import Mosquitto, process_gone, start_mosquitto, wait_for
from tests.support.skips import need_mosquitto


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
