"""The real worker applies keys from the bus to real wireguard-go: vectors, garbage, restarts, signals, a burst.

Each test builds its own gateway (:class:`tests.support.worker_gateway.Gateway`):
a namespace, wireguard-go serving ``wg-x``, ``vx-x`` on top, a mosquitto, and the
worker as a subprocess in the daemon's mount and network namespace. Everything is
checked in the kernel and on the bus; waits are polls with deadlines. Needs root.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import time

from tests.support.worker_gateway import (
    DOMAIN, KEY_A, KEY_B, LL_A, LL_B, TOPIC, WorkerTestCase, distinct_keys,
)
from wgkex.keys import lladdr
from wgkex.lab.netns import add_vxlan, fdb_entries, routes
from wgkex.lab.proc import wait_until
from wgkex.lab.wggo import genkey


class KeysTests(WorkerTestCase):
    def test_key_lands_with_contract_vectors(self) -> None:
        """A key on the bus is a peer with lladdr/128, a route and an FDB entry within 5 s (both vectors)."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A, KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "both keys installed")
        self.assertEqual(gw.peers(), {KEY_A: (f"{LL_A}/128",), KEY_B: (f"{LL_B}/128",)})
        self.assertEqual(
            gw.routes() - {ipaddress.IPv6Network("fe80::/64")},
            {ipaddress.IPv6Network(f"{LL_A}/128"), ipaddress.IPv6Network(f"{LL_B}/128")},
        )
        self.assertEqual(gw.fdb_dsts(), {ipaddress.IPv6Address(LL_A), ipaddress.IPv6Address(LL_B)})
        self.assertTrue(all(e.get("viaIf") == "wg-x" for e in gw.fdb()))

    def test_repeated_keys_harmless(self) -> None:
        """Publishing one key many times leaves exactly one peer, one route, one FDB entry."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A] * 20)
        gw.bus.publish(TOPIC, [KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "keys installed")
        self.assertEqual(set(gw.peers()), {KEY_A, KEY_B})
        self.assertEqual(len(gw.fdb()), 2)
        self.assertEqual(len(gw.routes()), 3)  # two /128 and fe80::/64
        self.assertTrue(gw.worker is not None and gw.worker.is_ours())

    def test_sighup_is_harmless(self) -> None:
        """SIGHUP (systemctl reload, log rotation) is logged; the worker keeps running and applying keys."""
        gw = self.gateway()
        assert gw.worker is not None
        gw.worker.send(signal.SIGHUP)
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, f"key installed after SIGHUP\n{gw.log_tail()}")
        self.assertTrue(gw.worker.is_ours())
        wait_until(lambda: "Received SIGHUP" in gw.log_tail(), 5, "the SIGHUP log line")

    def test_garbage_changes_nothing(self) -> None:
        """Garbage payloads change nothing in the kernel, are counted, and a valid key afterwards lands."""
        gw = self.gateway()
        garbage: list[bytes | str] = [
            b"garbage", b"", b"\xff\xfe\x00", b"x" * 5000, KEY_A[:42] + "B=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", KEY_A + KEY_B, "../../etc/passwd",
        ]
        gw.bus.publish(TOPIC, garbage)
        gw.bus.publish(f"wireguard/{DOMAIN}/other", [b"still garbage"])
        # Same publisher, same QoS: the valid key arrives after all the garbage.
        gw.bus.publish(TOPIC, [KEY_B])
        wait_until(lambda: gw.installed(KEY_B), 5, "the valid key installed")
        self.assertEqual(set(gw.peers()), {KEY_B})
        self.assertEqual(gw.fdb_dsts(), {ipaddress.IPv6Address(LL_B)})
        self.assertEqual(gw.routes(), {ipaddress.IPv6Network(f"{LL_B}/128"), ipaddress.IPv6Network("fe80::/64")})
        invalid = sum(gw.metric(f'wgkex_worker_keys_invalid_total{{reason="{r}"}}') or 0 for r in ("key", "payload"))
        self.assertEqual(invalid, len(garbage) + 1)
        self.assertEqual(gw.metric(f'wgkex_worker_keys_applied_total{{domain="{DOMAIN}"}}'), 1)
        self.assertTrue(gw.worker is not None and gw.worker.is_ours())

    def test_restart_receives_keys_published_while_down(self) -> None:
        """Worker stopped, 50 keys published, worker restarted: all 50 land (persistent session)."""
        gw = self.gateway()
        self.assertEqual(gw.stop_worker(), 0)
        keys = distinct_keys(50, 7)
        gw.bus.publish(TOPIC, keys)
        gw.start_worker()
        wait_until(lambda: gw.all_installed(keys), 10, f"all 50 keys installed\n{gw.log_tail()}")
        self.assertEqual(len(gw.peers()), 50)

    def test_vxlan_recreated_entries_restored(self) -> None:
        """vx-x deleted and recreated (its FDB gone with it): the worker re-applies its keys without restart."""
        gw = self.gateway()
        gw.bus.publish(TOPIC, [KEY_A, KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "keys installed")
        gw.ns.ip("link", "del", "vx-x")
        add_vxlan(gw.ns, "vx-x", vni=4242, local=gw.link_address, dev="wg-x")
        self.assertEqual(gw.fdb(), [])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 10,
                   f"keys re-applied on the new vx-x\n{gw.log_tail()}")

    def test_wireguard_go_restarted_keys_reapplied(self) -> None:
        """wireguard-go restarted (wg-x, vx-x and their entries gone): keys, data and the check come back, no restart."""
        gw = self.gateway()
        data_topic = f"wireguard-worker/{gw.name}/{DOMAIN}/data"
        gw.bus.subscribe(data_topic)
        gw.bus.publish(TOPIC, [KEY_A, KEY_B])
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 5, "keys installed")
        wait_until(lambda: gw.bus.all(data_topic), 5, "the first data message")
        published = len(gw.bus.all(data_topic))
        gw.wg.stop()
        wait_until(lambda: not gw.ns.link_exists("vx-x"), 5, "the kernel to drop vx-x with wg-x")
        # The operator's tooling brings the interfaces back, with the same key.
        gw.wg = gw.daemon_beside_worker("wg-x")
        gw.wg.configure(gw.private_key, listen_port=51820)
        add_vxlan(gw.ns, "vx-x", vni=4242, local=gw.link_address, dev="wg-x")
        self.assertEqual(gw.peers(), {})
        wait_until(lambda: gw.installed(KEY_A) and gw.installed(KEY_B), 10,
                   f"keys re-applied on the new wg-x and vx-x\n{gw.log_tail()}")
        wait_until(lambda: len(gw.bus.all(data_topic)) > published, 5, "the data published again")
        data = json.loads(gw.bus.all(data_topic)[-1])
        self.assertEqual((data["PublicKey"], data["Port"]), (gw.public_key, 51820))
        self.check_answers(gw, gw.link_address)
        self.assertTrue(gw.worker is not None and gw.worker.is_ours())

    def test_domain_with_missing_interface(self) -> None:
        """Two domains, wg-y missing: x's keys land, y reports -1 and no data; once wg-y exists its keys land."""
        gw = self.gateway(domains=[DOMAIN, "ffmuc_y"])
        metric_y = f"wireguard-metrics/ffmuc_y/{gw.name}/connected_peers"
        data_y = f"wireguard-worker/{gw.name}/ffmuc_y/data"
        gw.bus.subscribe(metric_y)
        gw.bus.subscribe(data_y)
        gw.bus.publish("wireguard/ffmuc_y/all", [KEY_B])
        gw.bus.publish(TOPIC, [KEY_A])
        wait_until(lambda: gw.installed(KEY_A), 5, "the key of the domain whose interfaces exist")
        wait_until(lambda: gw.bus.last(metric_y) == b"-1", 5, "metric -1 for the missing domain")
        self.assertEqual(gw.bus.all(data_y), [])
        wg_y = gw.daemon_beside_worker("wg-y")
        public_y = wg_y.configure(genkey(), listen_port=51821)
        add_vxlan(gw.ns, "vx-y", vni=4243, local=lladdr(public_y), dev="wg-y")
        ll_b = ipaddress.IPv6Address(LL_B)

        def landed() -> bool:
            fdb = {ipaddress.IPv6Address(e["dst"]) for e in fdb_entries(gw.ns, "vx-y") if "dst" in e}
            return (wg_y.peers().get(KEY_B) is not None and ll_b in fdb
                    and ipaddress.IPv6Network(f"{LL_B}/128") in {ipaddress.IPv6Network(r) for r in routes(gw.ns, "wg-y")})

        wait_until(landed, 10, f"the key on wg-y once it exists\n{gw.log_tail()}")
        wait_until(lambda: gw.bus.last(data_y), 10, "data for the domain once its interface exists")
        self.assertEqual(json.loads(gw.bus.last(data_y) or b"{}")["PublicKey"], public_y)
        self.assertEqual(set(gw.peers()), {KEY_A})

    def test_sigterm_during_a_large_batch(self) -> None:
        """SIGTERM while thousands of keys are being applied: goodbye, exit 0, and no key is lost."""
        gw = self.gateway()
        status_topic = f"wireguard-worker/{gw.name}/status"
        metric_topic = f"wireguard-metrics/{DOMAIN}/{gw.name}/connected_peers"
        gw.bus.subscribe(metric_topic)
        keys = distinct_keys(5000, 13)
        gw.bus.publish(TOPIC, keys)
        wait_until(lambda: gw.peers(), 10, "the first peers", interval=0.01)
        self.assertEqual(gw.stop_worker(signal.SIGTERM), 0)
        wait_until(lambda: gw.bus.last(status_topic) == b"0" and gw.bus.last(metric_topic) == b"-1", 5,
                   "goodbye messages")
        with open(gw.log) as f:
            self.assertNotIn("Traceback", f.read())
        # Keys it had received were applied before it exited; the others wait in its session.
        gw.start_worker()
        wait_until(lambda: gw.all_installed(keys), 15, f"all 5,000 keys installed\n{gw.log_tail()}", interval=0.2)

    def test_burst_of_2000(self) -> None:
        """2,000 keys published at once are all installed quickly (the figure is printed)."""
        gw = self.gateway()
        keys = distinct_keys(2000, 11)
        started = time.monotonic()
        gw.bus.publish(TOPIC, keys)
        published = time.monotonic() - started

        def count() -> bool:
            return len(gw.peers()) == 2000

        wait_until(count, 15, f"2000 peers\n{gw.log_tail()}", interval=0.05)
        peers_done = time.monotonic() - started
        wait_until(lambda: gw.all_installed(keys), 10, "2000 routes and FDB entries", interval=0.05)
        done = time.monotonic() - started
        batches = gw.metric("wgkex_worker_batch_size_count")
        print(f"\n2,000-key burst: published (all PUBACKs) in {published:.2f} s, all peers in {peers_done:.2f} s, "
              f"peers+routes+FDB all installed within {done:.2f} s of the first publish, {batches:.0f} batches")
        self.assertLess(done, 15)
