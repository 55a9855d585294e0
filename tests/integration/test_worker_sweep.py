"""The real worker's sweep removes a peer whose handshake is too old, from real wireguard-go.

Each test builds its own gateway (:class:`tests.support.worker_gateway.Gateway`):
a namespace, wireguard-go serving ``wg-x``, ``vx-x`` on top, a mosquitto, and the
worker as a subprocess in the daemon's mount and network namespace. Everything is
checked in the kernel and on the bus; waits are polls with deadlines. Needs root.
"""

from __future__ import annotations

import ipaddress

from tests.support.worker_gateway import KEY_B, TOPIC, WorkerTestCase
from wgkex.keys import lladdr
from wgkex.lab.netns import Namespace, add_address, add_veth
from wgkex.lab.proc import wait_until
from wgkex.lab.wggo import genkey, pubkey


class SweepTests(WorkerTestCase):
    def test_sweep_removes_peer_with_old_handshake(self) -> None:
        """A peer whose handshake is older than peer_timeout loses peer, route and FDB entry; keep_keys stay."""
        gw = self.gateway(cleanup_interval=1, peer_timeout=4, keep_keys=[KEY_B])
        # A router in a namespace of its own, joined to the gateway by a veth.
        router_ns = Namespace.create(f"wgkex-wr-{gw.id}")
        self.addCleanup(router_ns.delete)
        add_veth(gw.ns, "eth0", router_ns, "eth0")
        add_address(gw.ns, "eth0", "2001:db8::1/64")
        add_address(router_ns, "eth0", "2001:db8::2/64")
        router = gw._daemon(router_ns, "wg-r")
        router_private = genkey()
        router_key = pubkey(router_private)
        router.configure(router_private)
        gw.bus.publish(TOPIC, [router_key, KEY_B])
        wait_until(lambda: gw.installed(router_key) and gw.installed(KEY_B), 20, "router key installed")
        router.add_peer(gw.public_key, [f"{gw.link_address}/128"], endpoint="[2001:db8::1]:51820",
                        persistent_keepalive=1)
        wait_until(lambda: gw.wg.handshake_age(router_key) is not None, 30, "a handshake (wireguard-go retries every 5 s)")
        router.stop()  # no more handshakes from now on
        wait_until(lambda: router_key not in gw.peers(), 30, f"the stale peer swept\n{gw.log_tail()}")
        ll = lladdr(router_key)
        self.assertNotIn(ipaddress.IPv6Network(f"{ll}/128"), gw.routes())
        self.assertNotIn(ipaddress.IPv6Address(ll), gw.fdb_dsts())
        # The never-handshaked key on the keep list survives sweeps past peer_timeout.
        self.assertTrue(gw.installed(KEY_B))
        with open(gw.log) as f:
            self.assertIn("Stale-peer sweep removed 1 peer(s)", f.read())
