"""Hostile HTTP clients against the real ``twistd -n wgkex-broker`` with a real mosquitto.

Each test attacks the broker the way the hardening issue describes (pipelining
flood, slow-loris, idle connections, file descriptor exhaustion under a low
``ulimit -n``) while a well-behaved client keeps asking ``GET /healthz`` on
fresh connections. Throughout, the broker's resident memory must stay within
20 MB of what it was before the attack, the normal client's requests must stay
fast, and the broker must stay connected to MQTT (no reconnect, a key still
reaches a subscriber afterwards). Measured figures are written to the test log
(``_trial_temp/test.log``) as one JSON line per test, prefixed ``hostile-http``.

Latency on this kind of machine (2 cores shared with other work) is noisy, so
the assertion is on the median of many samples (< 100 ms, the target) and a
generous bound on the 95th percentile; every sample is logged.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable

from twisted.python import log
from twisted.trial.unittest import SynchronousTestCase

from tests.support.broker_process import BrokerProcess, Subscriber, fresh_key, read_until_closed, v1_body
from tests.support.mosquitto import start_mosquitto, wait_for
from tests.support.skips import need_mosquitto

RSS_BUDGET = 20 * 1024 * 1024
MEDIAN_TARGET = 0.100
P95_BOUND = 1.0


def rss_bytes(pid: int) -> int:
    """The resident set size of ``pid``, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def healthz_once(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> float:
    """One GET /healthz on a fresh connection from ``source``; the seconds it took (raises if it failed)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")
        reply = read_until_closed(s)
    took = time.monotonic() - start
    if not reply.startswith(b"HTTP/1.1 200 "):
        raise AssertionError(f"/healthz answered {reply[:100]!r}")
    return took


class Probe:
    """A normal client asking /healthz every 20 ms in a thread, and the broker's RSS sampled alongside."""

    def __init__(self, port: int, pid: int, source: str = "127.0.0.1") -> None:
        self.port, self.pid, self.source = port, pid, source
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.rss: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.latencies.append(healthz_once(self.port, self.source))
            except (OSError, AssertionError) as e:
                self.failures.append(repr(e))
            try:
                self.rss.append(rss_bytes(self.pid))
            except (OSError, AssertionError):
                pass
            self._stop.wait(0.02)


class HostileHttpTests(SynchronousTestCase):
    skip = need_mosquitto()
    timeout = 180

    def setUp(self) -> None:
        self.mosquitto = start_mosquitto(self)  # type: ignore[arg-type]
        self.sockets: list[socket.socket] = []
        self.addCleanup(self._close_sockets)

    def _close_sockets(self) -> None:
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass

    def broker(self, extra: str = "", limit_files: int | None = None) -> BrokerProcess:
        broker = BrokerProcess(self, self.mosquitto.port, extra=extra, limit_files=limit_files)
        wait_for(lambda: broker.get("/readyz")[0] == 200, 15, what="broker connected to MQTT")
        # Warm up what the attack will touch, so the baseline includes it.
        for path in ("/metrics", "/api/v1/status", "/", "/healthz"):
            broker.get(path)
        for _ in range(20):
            healthz_once(broker.port)
        return broker

    def attack(self, broker: BrokerProcess, name: str, run: Callable[[], None], seconds: float,
               source: str = "127.0.0.1", probe_during_set_up: bool = True,
               max_failures: int = 0) -> dict[str, object]:
        """Run ``run`` (the attack's set-up), then probe for ``seconds``; check and log the figures.

        The probe starts before ``run`` unless ``probe_during_set_up`` is false.
        """
        base = rss_bytes(broker.proc.pid)
        if not probe_during_set_up:
            run()
        with Probe(broker.port, broker.proc.pid, source) as probe:
            if probe_during_set_up:
                run()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.1)
                self.assertIsNone(broker.proc.poll(), broker.log()[-2000:])
        lat = sorted(probe.latencies)
        figures = {
            "test": name,
            "rss_start_mb": round(base / 2**20, 1),
            "rss_max_growth_mb": round((max(probe.rss, default=base) - base) / 2**20, 1),
            "samples": len(lat),
            "failures": len(probe.failures),
            "latency_median_ms": round(statistics.median(lat) * 1000, 1) if lat else -1,
            "latency_p95_ms": round(lat[int(len(lat) * 0.95) - 1] * 1000, 1) if lat else -1,
            "latency_max_ms": round(lat[-1] * 1000, 1) if lat else -1,
        }
        log.msg("hostile-http " + json.dumps(figures))
        # max_failures: when the site is full a new connection replaces a waiting one, and
        # on an idle machine one probe in ~200 was that one (reset; a retry is served).
        self.assertLessEqual(len(probe.failures), max_failures, f"normal client failed during {name}: {probe.failures} {figures}")
        self.assertGreaterEqual(len(lat), 20, figures)
        self.assertLess(max(probe.rss, default=base) - base, RSS_BUDGET, figures)
        self.assertLess(statistics.median(lat), MEDIAN_TARGET, figures)
        self.assertLess(lat[int(len(lat) * 0.95) - 1], P95_BOUND, figures)
        self.assertStillOnMqtt(broker)
        return figures

    def assertStillOnMqtt(self, broker: BrokerProcess) -> None:
        """Never dropped off MQTT: no reconnect counted, and a key still reaches a subscriber."""
        sub = Subscriber(self, self.mosquitto.port)
        self.assertEqual(broker.get("/readyz")[0], 200)
        key = fresh_key(4242)
        self.assertEqual(broker.post("/api/v1/wg/key/exchange", v1_body(key))[0], 200)
        wait_for(lambda: (("wireguard/ffmuc_welt/all", key.encode()) in sub.keys()), 10, what="key at subscriber")
        time.sleep(1.1)  # /metrics is rendered at most once a second
        metrics = broker.get("/metrics")[1].decode()
        self.assertIn("wgkex_broker_mqtt_reconnects_total 0.0", metrics)

    def connect(self, port: int, source: str = "127.0.0.1") -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        self.sockets.append(s)
        return s

    def test_pipelining_flood(self) -> None:
        """10 connections pipelining thousands of GET /metrics and never reading: memory flat, others served fast."""
        broker = self.broker()
        request = b"GET /metrics HTTP/1.1\r\nHost: broker\r\n\r\n"
        flood = request * 5000
        senders: list[threading.Thread] = []

        def send_without_reading(s: socket.socket) -> None:
            s.settimeout(10)
            try:
                s.sendall(flood)
            except OSError:
                pass  # the broker stopped reading, as it should

        def start() -> None:
            for _ in range(10):
                s = self.connect(broker.port, "127.0.0.2")
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                t = threading.Thread(target=send_without_reading, args=(s,), daemon=True)
                t.start()
                senders.append(t)

        self.attack(broker, "pipelining_flood", start, 8)

    def test_slow_loris(self) -> None:
        """50 connections trickling a header byte every 0.3 s get a 408 and are closed after request_timeout."""
        broker = self.broker("broker: {request_timeout: 2, idle_timeout: 30}\n")
        trickling = [self.connect(broker.port, "127.0.0.3") for _ in range(50)]
        replies: dict[int, bytes] = {}
        stop = threading.Event()

        def trickle() -> None:
            for s in trickling:
                s.setblocking(False)
            text = b"POST /api/v1/wg/key/exchange HTTP/1.1\r\nHost: broker\r\nX-Slow: " + b"a" * 1000
            for i in range(len(text)):
                if stop.is_set():
                    return
                for n, s in enumerate(trickling):
                    if n in replies:
                        continue
                    try:
                        s.send(text[i:i + 1])
                        data = s.recv(4096)
                        replies[n] = data or b"<closed>"
                    except BlockingIOError:
                        pass
                    except OSError:
                        replies[n] = b"<reset>"
                if len(replies) == len(trickling):
                    return
                stop.wait(0.3)

        thread = threading.Thread(target=trickle, daemon=True)
        self.addCleanup(stop.set)
        figures = self.attack(broker, "slow_loris", thread.start, 6)
        wait_for(lambda: len(replies) == len(trickling), 15, what="every trickling connection closed by the broker")
        answered = [r for r in replies.values() if r.startswith(b"HTTP/1.1 408 ")]
        self.assertGreaterEqual(len(answered), 45, (figures, list(replies.values())[:3]))

    def test_idle_connections_and_per_address_cap(self) -> None:
        """Idle connections are closed after idle_timeout; one address gets at most its cap, others are served."""
        broker = self.broker("broker: {idle_timeout: 2, max_connections_per_address: 40}\n")
        idle: list[socket.socket] = []

        def open_idle() -> None:
            for _ in range(60):
                idle.append(self.connect(broker.port, "127.0.0.4"))

        self.attack(broker, "idle_connections", open_idle, 4, source="127.0.0.5")
        closed = 0
        for s in idle:
            s.settimeout(5)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass  # still open: counted as a failure below
        self.assertEqual(closed, 60, "every idle connection (and each one over the cap) was closed by the broker")

    def test_per_address_cap_refuses_at_once(self) -> None:
        """Beyond max_connections_per_address a new connection from that address is closed at once; others are not."""
        broker = self.broker("broker: {max_connections_per_address: 10}\n")
        held = [self.connect(broker.port, "127.0.0.6") for _ in range(10)]
        wait_for(lambda: broker.get("/healthz")[0] == 200, 5, what="broker serving")
        extra = self.connect(broker.port, "127.0.0.6")
        extra.settimeout(5)
        try:
            self.assertEqual(extra.recv(1), b"")
        except ConnectionResetError:
            pass
        self.assertLess(healthz_once(broker.port, "127.0.0.7"), 1.0)
        for s in held:
            s.close()
        wait_for(lambda: self._healthz_from(broker.port, "127.0.0.6"), 10, what="address served again after closing")

    def _healthz_from(self, port: int, source: str) -> bool:
        try:
            healthz_once(port, source)
            return True
        except (OSError, AssertionError):
            return False

    def test_fd_exhaustion_low_ulimit(self) -> None:
        """With ulimit -n 256, once 400 idle connections from many addresses took every slot, a normal client is still served.

        Probing starts after the connections are open: while they arrive in one burst,
        faster than a request takes, the newest connections push out the oldest, and a
        normal client's connection can be among them (a client that retries is served).
        """
        broker = self.broker(limit_files=256)

        def open_many() -> None:
            for i in range(400):
                try:
                    self.connect(broker.port, f"127.0.1.{i % 200 + 1}")
                except OSError:
                    pass

        self.attack(broker, "fd_exhaustion", open_many, 5, probe_during_set_up=False, max_failures=2)
        accept_errors = broker.log().count("Could not accept new connection")
        self.assertEqual(accept_errors, 0, "the broker ran out of file descriptors")
