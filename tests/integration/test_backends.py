"""The worker's kernel side against the real thing: wireguard-go, rtnetlink, VXLAN, in a namespace.

Each test gets a network namespace of its own with a real ``wg-t``
(wireguard-go) carrying ``fe80::1`` and a ``vx-t`` VXLAN on top of it (id 1,
UDP 8472, local ``fe80::1``), and drives :class:`AutoWireGuard` (which finds
the UAPI socket) and :class:`PyrouteRtnl` (told the namespace with ``netns=``)
exactly as the worker's pool does. Results are read back with the standard
tools (``wg``, ``ip``, ``bridge``) inside the namespace.

wireguard-go's socket path ``/var/run/wireguard/<iface>.sock`` is shared by all
network namespaces, so the daemon runs in a private mount namespace whose
``/run/wireguard`` is a bind mount of a temporary directory of the test: the
socket shows up there, under a path that stays the same when the daemon is
restarted.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import shutil
import subprocess
import tempfile
import uuid

from twisted.trial.unittest import TestCase

from tests.support.mosquitto import wait_for
from tests.support.processes import terminate
from tests.support.skips import need_root_lab
from wgkex.keys import lladdr
from wgkex.worker.backend import InterfaceMissing
from wgkex.worker.rtnl import PyrouteRtnl
from wgkex.worker.wg_uapi import UapiWireGuard
from wgkex.worker.wireguard import AutoWireGuard

WG = "wg-t"
VX = "vx-t"
LINK_ADDRESS = "fe80::1"
# docs/protocol.md's vectors, and a third key.
KEY_1 = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
KEY_2 = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
KEY_3 = "qUOb3MNlJvHSU8kQ1xQ6IEXB1mGu3mwTwBVTqqN0ykA="
ADDRESS_1 = "fe80::2a6:8fff:fe21:5465"
ADDRESS_2 = "fe80::25b:c1ff:fe61:e5bd"


def run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True, timeout=10).stdout


class Namespace:
    """A network namespace with wireguard-go's ``wg-t`` and ``vx-t`` on top; removes all it made."""

    def __init__(self) -> None:
        self.name = f"wgkx-be-{uuid.uuid4().hex[:8]}"
        self.socket_dir = tempfile.mkdtemp(prefix="wgkex-uapi-")
        self.daemon: subprocess.Popen[bytes] | None = None
        self.private_key = run("wg", "genkey").strip()
        self.public_key = run("wg", "pubkey", stdin=self.private_key + "\n").strip()
        run("ip", "netns", "add", self.name)

    def start_daemon(self) -> None:
        """Start wireguard-go for wg-t in its own mount namespace and configure wg-t and vx-t."""
        script = (
            "mount -t tmpfs wgkex /run && mkdir /run/wireguard"
            f" && mount --bind {self.socket_dir} /run/wireguard && exec wireguard-go -f {WG}"
        )
        self.daemon = subprocess.Popen(
            ["ip", "netns", "exec", self.name, "unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        socket_path = os.path.join(self.socket_dir, f"{WG}.sock")
        wait_for(lambda: os.path.exists(socket_path), timeout=10, what="the wireguard-go socket")
        self.wg("set", WG, "listen-port", "51820", "private-key", "/dev/stdin", stdin=self.private_key + "\n")
        self.ip("address", "add", f"{LINK_ADDRESS}/64", "dev", WG)
        self.ip("link", "set", WG, "up")
        self.ip("link", "add", VX, "type", "vxlan", "id", "1", "dstport", "8472", "local", LINK_ADDRESS, "dev", WG)
        self.ip("link", "set", VX, "up")

    def stop_daemon(self) -> None:
        """Stop our wireguard-go (by PID) and wait until the kernel removed wg-t and vx-t."""
        if self.daemon is None:
            return
        daemon, self.daemon = self.daemon, None
        terminate(daemon, 10)
        wait_for(lambda: not self.has_link(WG) and not self.has_link(VX), timeout=10, what="wg-t and vx-t to vanish")

    def remove(self) -> None:
        try:
            self.stop_daemon()
        finally:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def has_link(self, name: str) -> bool:
        result = subprocess.run(["ip", "-n", self.name, "link", "show", name], capture_output=True, timeout=10)
        return result.returncode == 0

    def ip(self, *argv: str) -> str:
        return run("ip", "-n", self.name, *argv)

    def wg(self, *argv: str, stdin: str | None = None) -> str:
        assert self.daemon is not None
        # the daemon's mount namespace holds its socket at the standard path, where wg looks
        return run("nsenter", "-t", str(self.daemon.pid), "-m", "-n", "wg", *argv, stdin=stdin)

    # -- reading back ---------------------------------------------------------------------

    def wg_allowed_ips(self) -> dict[str, set[ipaddress.IPv6Network]]:
        out: dict[str, set[ipaddress.IPv6Network]] = {}
        for line in self.wg("show", WG, "allowed-ips").splitlines():
            key, _, ips = line.partition("\t")
            out[key] = {ipaddress.IPv6Network(ip) for ip in ips.split() if ip != "(none)"}
        return out

    def routes(self) -> set[ipaddress.IPv6Network]:
        out = set()
        for line in self.ip("-6", "route", "show", "dev", WG).splitlines():
            network = ipaddress.IPv6Network(line.split()[0])
            if network.prefixlen == 128:
                out.add(network)
        return out

    def fdb(self) -> list[tuple[str, ipaddress.IPv6Address, str]]:
        """``(mac, dst, via)`` of every FDB destination of vx-t."""
        out = []
        for line in run("ip", "netns", "exec", self.name, "bridge", "fdb", "show", "dev", VX).splitlines():
            words = line.split()
            if "dst" in words:
                via = words[words.index("via") + 1] if "via" in words else ""
                out.append((words[0], ipaddress.IPv6Address(words[words.index("dst") + 1]), via))
        return out


class BackendsTests(TestCase):
    skip = need_root_lab()

    def setUp(self) -> None:
        self.ns = Namespace()
        self.addCleanup(self.ns.remove)
        self.ns.start_daemon()
        self.wireguard = AutoWireGuard("auto", self.ns.socket_dir)
        self.addCleanup(self.wireguard.close)
        self.rtnl = PyrouteRtnl(netns=self.ns.name)
        self.addCleanup(self.rtnl.close)

    def apply(self, keys: list[str]) -> dict[str, str]:
        """What the worker does for a batch: peers, then routes and FDB entries; failures by address."""
        addresses = [lladdr(k) for k in keys]
        self.wireguard.add_peers(WG, [(k, a + "/128") for k, a in zip(keys, addresses)])
        failures = self.rtnl.replace_routes(WG, addresses)
        failures.update(self.rtnl.append_fdb(VX, WG, addresses))
        return failures

    def assert_installed(self, keys: list[str]) -> None:
        addresses = {ipaddress.IPv6Address(lladdr(k)) for k in keys}
        networks = {ipaddress.IPv6Network(f"{a}/128") for a in addresses}
        self.assertEqual(self.ns.wg_allowed_ips(), {k: {ipaddress.IPv6Network(f"{lladdr(k)}/128")} for k in keys})
        self.assertEqual(self.ns.routes(), networks)
        fdb = self.ns.fdb()
        self.assertEqual(sorted(d for _, d, _ in fdb), sorted(addresses))
        self.assertEqual({(mac, via) for mac, _, via in fdb}, {("00:00:00:00:00:00", WG)})

    def test_apply_read_repeat_remove(self) -> None:
        """Three keys become peers, /128 routes and FDB entries exactly as docs/protocol.md says; repeat and removal behave."""
        keys = [KEY_1, KEY_2, KEY_3]
        self.assertIsInstance(self.wireguard.backend_for(WG), UapiWireGuard)
        self.assertEqual(self.apply(keys), {})
        self.assert_installed(keys)
        allowed = self.ns.wg_allowed_ips()
        self.assertEqual(allowed[KEY_1], {ipaddress.IPv6Network(f"{ADDRESS_1}/128")})
        self.assertEqual(allowed[KEY_2], {ipaddress.IPv6Network(f"{ADDRESS_2}/128")})
        self.assertIn(ipaddress.IPv6Network(f"{ADDRESS_1}/128"), self.ns.routes())
        self.assertIn(ipaddress.IPv6Address(ADDRESS_2), {d for _, d, _ in self.ns.fdb()})

        # repeating changes nothing and is not an error
        self.assertEqual(self.apply(keys), {})
        self.assert_installed(keys)

        # read back through the backends
        peers = {p.public_key: p for p in self.wireguard.peers(WG)}
        self.assertEqual(set(peers), set(keys))
        self.assertEqual(peers[KEY_1].allowed_ips, (f"{ADDRESS_1}/128",))
        self.assertIsNone(peers[KEY_1].last_handshake)
        info = self.wireguard.interface(WG)
        self.assertEqual(info.public_key, self.ns.wg("show", WG, "public-key").strip())
        self.assertEqual(info.public_key, self.ns.public_key)
        self.assertEqual(info.listen_port, int(self.ns.wg("show", WG, "listen-port")))
        self.assertEqual(info.listen_port, 51820)
        self.assertEqual(self.rtnl.link_local_address(WG), LINK_ADDRESS)

        # removal, twice (absent things are fine)
        for _ in range(2):
            self.wireguard.remove_peers(WG, [KEY_2])
            self.rtnl.delete_routes(WG, [ADDRESS_2])
            self.rtnl.delete_fdb(VX, [ADDRESS_2], WG)  # the second time absent: found nowhere, fine
        self.assert_installed([KEY_1, KEY_3])

    def test_missing_interface_then_recreated(self) -> None:
        """With wireguard-go gone every key fails per key; once it is back the same objects work again."""
        self.assertEqual(self.apply([KEY_1]), {})
        self.ns.stop_daemon()

        with self.assertRaises(InterfaceMissing) as raised:
            self.wireguard.add_peers(WG, [(KEY_2, ADDRESS_2 + "/128")])
        self.assertIn(WG, str(raised.exception))
        self.assertEqual(self.rtnl.replace_routes(WG, [ADDRESS_2]), {ADDRESS_2: f"interface {WG} missing"})
        self.assertEqual(self.rtnl.append_fdb(VX, WG, [ADDRESS_2]), {ADDRESS_2: f"interfaces {VX} and {WG} missing"})
        self.assertIsNone(self.rtnl.link_local_address(WG))
        self.rtnl.delete_routes(WG, [ADDRESS_1])  # nothing left to delete: fine
        self.rtnl.delete_fdb(VX, [ADDRESS_1])

        self.ns.start_daemon()
        self.assertEqual(self.apply([KEY_1, KEY_2]), {})
        self.assert_installed([KEY_1, KEY_2])

    def test_batch_larger_than_one_netlink_send(self) -> None:
        """600 keys (several rtnetlink sends of 256) all land, each with its route and FDB entry."""
        keys = [base64.b64encode(hashlib.sha256(b"%d" % i).digest()).decode() for i in range(600)]
        self.assertEqual(self.apply(keys), {})
        self.assertEqual(len(self.ns.wg_allowed_ips()), 600)
        self.assertEqual(len(self.ns.routes()), 600)
        self.assertEqual(len(self.ns.fdb()), 600)
        self.assertEqual(len(self.wireguard.peers(WG)), 600)
        self.rtnl.delete_routes(WG, [lladdr(k) for k in keys[:300]])
        self.rtnl.delete_fdb(VX, [lladdr(k) for k in keys[:300]], WG)  # as appended: no dump
        self.wireguard.remove_peers(WG, keys[:300])
        self.assert_installed(keys[300:])
