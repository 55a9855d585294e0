"""Garbage on every topic broker and worker read, with the real processes of a lab.

A lab (:class:`wgkex.lab.lab.Lab`: mosquitto, ``twistd -n wgkex-broker``, one
gateway with wireguard-go and ``twistd -n wgkex-worker``) gets a flood of
hostile messages from an ordinary MQTT client: random bytes, 1 MB payloads,
invalid UTF-8, huge numbers, wrong JSON shapes, hostile endpoint data,
retained garbage, extra topic levels, unknown domains and worker names that
must never become labels. Then: no page answers 5xx (also after a broker
restart that re-reads the retained garbage), the broker's picture holds the
real gateway and nothing else, v2 still sends a router to it, and the kernel
holds exactly the one key that was registered properly. Needs root.
"""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.trial.unittest import SynchronousTestCase

from tests.support.skips import need_root_lab
from wgkex.lab.lab import Lab
from wgkex.lab.proc import wait_until
from wgkex.lab.router import post_key

KEEPALIVE = 3
METRICS_INTERVAL = 2.0
ROUTER_KEY = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
OTHER_KEY = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
GOOD_DATA = {"ExternalAddress": "2001:db8::66", "Port": 51820, "PublicKey": OTHER_KEY, "LinkAddress": "fe80::66"}
PAGES = ("/", "/api/v1/status", "/metrics", "/healthz", "/readyz")


def data(**changes: object) -> bytes:
    d: dict[str, object] = dict(GOOD_DATA)
    d.update(changes)
    return json.dumps(d).encode()


def http(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


class Attacker:
    """A plain MQTT client on the lab's mosquitto that publishes whatever it is given."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{os.getpid()}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_until(self.client.is_connected, 5, "the attacker's MQTT client to connect")

    def publish(self, messages: list[tuple[str, bytes, bool]]) -> None:
        """Publish at QoS 1 and wait until mosquitto acknowledged each one."""
        infos = [self.client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
        for info in infos:
            info.wait_for_publish(timeout=20)
            assert info.is_published(), "mosquitto did not acknowledge a publish"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def garbage(domain: str, gateway: str, gateway_key: str) -> list[tuple[str, bytes, bool]]:
    """Hostile messages on every topic broker and worker read, retained and not."""
    rng = random.Random(7)
    noise = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (1, 17, 300, 5000)]
    huge = b"9" * 309
    megabyte = b"\xff" * (1 << 20)
    weak = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    messages: list[tuple[str, bytes, bool]] = []
    # What the worker reads: keys.
    for payload in [*noise, megabyte, b"\xc3\x28", weak.encode(), ROUTER_KEY[:-2].encode() + b"==",
                    gateway_key.encode(), (ROUTER_KEY[:42] + "B=").encode(), b""]:
        messages.append((f"wireguard/{domain}/all", payload, False))
    messages += [
        (f"wireguard/{domain}/all/extra", OTHER_KEY.encode(), False),
        (f"wireguard/{domain}/all", weak.encode(), True),
    ]
    # What the broker reads, under made-up workers: each gets a valid status so that only
    # the bad part can keep it out.
    for name in ("evil1", "evil2", "evil3", "evil4"):
        messages.append((f"wireguard-worker/{name}/status", b"1", True))
    messages += [
        (f"wireguard-metrics/{domain}/evil1/connected_peers", huge, True),
        (f"wireguard-worker/evil1/{domain}/data", data(), True),
        (f"wireguard-metrics/{domain}/evil2/connected_peers", b"0", True),
        (f"wireguard-worker/evil2/{domain}/data", data(ExternalAddress="$(reboot)"), True),
        (f"wireguard-metrics/{domain}/evil3/connected_peers", b"0", True),
        (f"wireguard-worker/evil3/{domain}/data", data(LinkAddress="fe80::1%x y"), True),
        (f"wireguard-metrics/{domain}/evil4/connected_peers", b"1e400", True),
        (f"wireguard-worker/evil4/{domain}/data", data(ExternalAddress="<script>alert(1)</script>"), True),
    ]
    for payload in [*noise, megabyte, b"\xc3\x28", b"[1, 2]", b"[" * 5000, b'{"Port": 1e999}', b"null"]:
        messages.append((f"wireguard-worker/evil5/{domain}/data", payload, True))
        messages.append((f"wireguard-metrics/{domain}/evil5/connected_peers", payload, True))
        messages.append(("wireguard-worker/evil5/status", payload, True))
    messages += [
        # Names that must never become a label or a log line.
        ("wireguard-worker/ev il\u202e/status", b"1", True),
        ("wireguard-worker/$(reboot)/status", b"1", True),
        (f"wireguard-worker/{'x' * 300}/status", b"1", True),
        # Extra levels and unknown domains, also about the real gateway.
        (f"wireguard-worker/{gateway}/extra/status", b"0", True),
        (f"wireguard-worker/{gateway}/ffmuc_unknown/data", data(), True),
        (f"wireguard-metrics/ffmuc_unknown/{gateway}/connected_peers", b"5", True),
        (f"wireguard-metrics/{domain}/{gateway}/connected_peers/extra", b"-1", True),
        (f"wireguard-worker/{gateway}/{domain}/data/extra", b"{}", True),
    ]
    return messages


class BusGarbageTests(SynchronousTestCase):
    skip = need_root_lab()

    def setUp(self) -> None:
        self.lab = Lab.for_test(gateways={"gw1": 1}, keepalive=KEEPALIVE, metrics_interval=METRICS_INTERVAL)
        self.addCleanup(self.lab.down)
        self.lab.up()
        assert self.lab.mosquitto is not None
        self.attacker = Attacker(self.lab.mosquitto.port)
        self.addCleanup(self.attacker.close)
        self.gw = self.lab.gateways["gw1"]

    def assert_pages_answer(self) -> None:
        for path in PAGES:
            status, body = http("GET", self.lab.broker_url + path)
            self.assertLess(status, 500, f"{path}: {status} {body[:300]!r}")
            if path == "/readyz":
                self.assertEqual(status, 200)

    def assert_only_the_gateway_is_eligible(self) -> None:
        rows = self.lab.worker_rows()
        eligible = sorted(name for name, row in rows.items() if row.get("eligible"))
        self.assertEqual(eligible, ["gw1"], rows)
        endpoints = {json.dumps(row.get("endpoint")) for row in rows.values()}
        self.assertFalse(any("reboot" in e or "script" in e or "%" in e for e in endpoints), endpoints)

    def invalid_counts(self) -> dict[tuple[str, str], float]:
        _, body = http("GET", self.lab.broker_url + "/metrics")
        found: dict[tuple[str, str], float] = {}
        pattern = r'^wgkex_broker_bus_messages_invalid_total\{kind="(\w+)",reason="(\w+)"\} (\S+)$'
        for m in re.finditer(pattern, body.decode(), re.M):
            found[(m.group(1), m.group(2))] = float(m.group(3))
        return found

    def test_garbage_on_every_topic(self) -> None:
        """Hostile bus messages: no 5xx anywhere, only the real gateway eligible, nothing invalid in the kernel."""
        lab, gw = self.lab, self.gw
        self.attacker.publish(garbage(lab.domain, gw.name, gw.public_key))
        # The worker keeps working: a router registered through v2 lands on the real gateway.
        status, _headers, body, _ = post_key(lab.broker_url + "/api/v2/wg/key/exchange", lab.domain, ROUTER_KEY)
        self.assertEqual(status, 200, body)
        reply: dict[str, Any] = json.loads(body)
        self.assertEqual(reply["Endpoint"]["PublicKey"], gw.public_key)
        lab.wait_installed(gw, ROUTER_KEY, timeout=20)

        wait_until(lambda: self.invalid_counts().get(("metric", "too_large"), 0) >= 1, 15,
                   "the broker to count the 309-digit metric")
        counts = self.invalid_counts()
        for kind, reason in [("data", "address"), ("data", "link_address"), ("metric", "syntax"),
                             ("status", "worker_name"), ("data", "too_large"), ("data", "encoding"),
                             ("data", "domain"), ("metric", "domain")]:
            self.assertGreaterEqual(counts.get((kind, reason), 0), 1, f"{kind}/{reason} not counted: {counts}")
        self.assert_pages_answer()
        self.assert_only_the_gateway_is_eligible()
        _, page = http("GET", lab.broker_url + "/")
        self.assertNotIn(b"reboot", page)
        self.assertNotIn(b"\xe2\x80\xae", page)  # the right-to-left override, UTF-8

        # Nothing but the registered key reached the kernel: no garbage key, not the gateway's own.
        self.assertEqual(sorted(gw.peers()), [ROUTER_KEY])
        self.assertTrue(gw.worker is not None and gw.worker.is_ours(), "the worker died")

        # Retained garbage is read again by a restarted broker: still no 5xx, same picture.
        lab.stop_broker()
        lab.start_broker()
        lab.wait_broker_ready(20)
        lab.wait_eligible(["gw1"], 20)
        self.assert_pages_answer()
        self.assert_only_the_gateway_is_eligible()

    def test_invalid_report_of_a_real_worker_until_it_reports_again(self) -> None:
        """Garbage on the gateway's own count makes it ineligible until its next valid count."""
        lab, gw = self.lab, self.gw
        self.attacker.publish([(f"wireguard-metrics/{lab.domain}/{gw.name}/connected_peers", b"9" * 309, True)])
        # The broker drops the count it had (pinned in tests/unit/test_broker_workers.py; the
        # window is too short to watch through the cached status page); the worker's next
        # report (every METRICS_INTERVAL seconds) replaces the garbage.
        wait_until(lambda: self.invalid_counts().get(("metric", "too_large"), 0) >= 1, 20,
                   "the broker to count the garbage count")
        # Poll v2 itself (the status page is cached for a second and may still show the
        # view from before the garbage): it answers 503 until the worker's next valid count.
        replies: list[tuple[int, bytes]] = []

        def v2_answers() -> bool:
            status, _headers, body, _ = post_key(lab.broker_url + "/api/v2/wg/key/exchange", lab.domain, OTHER_KEY)
            replies.append((status, body))
            return status == 200

        wait_until(v2_answers, 20, "v2 to name the gateway again after its next valid count", interval=0.1)
        self.assert_pages_answer()
        self.assertEqual(json.loads(replies[-1][1])["Endpoint"]["Address"], gw.address)

