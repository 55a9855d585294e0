"""The UAPI WireGuard backend adds and removes peers: one transaction in hex, failures per key.

The fake daemon (:mod:`tests.support.uapi_daemon`) listens on a real unix socket
in a temporary directory (as wireguard-go does in ``/var/run/wireguard``) and
behaves like wireguard-go where it matters.
"""

from __future__ import annotations

from tests.support.uapi_daemon import IFACE, KEY_A, KEY_B, KEY_C, RFC7748_PRIVATE, UapiTestCase, hexkey
from wgkex.keys import lladdr
from wgkex.worker.backend import PeersFailed


class AddPeersTests(UapiTestCase):
    def test_batch_is_one_transaction_in_hex(self) -> None:
        """All peers of a batch go into one set=1 with hex keys and replaced allowed IPs."""
        self.wg.add_peers(IFACE, [(KEY_A, lladdr(KEY_A) + "/128"), (KEY_B, lladdr(KEY_B) + "/128")])
        self.assertEqual(
            self.sets(),
            [
                [
                    f"public_key={hexkey(KEY_A)}",
                    "replace_allowed_ips=true",
                    "allowed_ip=fe80::2a6:8fff:fe21:5465/128",
                    f"public_key={hexkey(KEY_B)}",
                    "replace_allowed_ips=true",
                    "allowed_ip=fe80::25b:c1ff:fe61:e5bd/128",
                ]
            ],
        )
        self.assertEqual(self.daemon.peers[hexkey(KEY_A)]["allowed"], ["fe80::2a6:8fff:fe21:5465/128"])

    def test_repeat_changes_nothing(self) -> None:
        """Adding the same peer twice leaves one peer with one allowed IP."""
        for _ in range(2):
            self.wg.add_peers(IFACE, [(KEY_A, lladdr(KEY_A) + "/128")])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_A)])
        self.assertEqual(self.daemon.peers[hexkey(KEY_A)]["allowed"], ["fe80::2a6:8fff:fe21:5465/128"])

    def test_connection_is_reused(self) -> None:
        """Several calls share one connection to the daemon."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128")])
        self.wg.peers(IFACE)
        self.wg.interface(IFACE)
        self.wg.remove_peers(IFACE, [KEY_A])
        self.assertEqual(self.daemon.connections, 1)
        self.assertEqual(len(self.daemon.requests), 4)

    def test_errno_22_fails_only_the_bad_key(self) -> None:
        """An errno=-22 batch is retried peer by peer: only the refused key fails, the others land."""
        self.daemon.reject.add(hexkey(KEY_B))
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128"), (KEY_C, "fe80::3/128")])
        self.assertEqual(list(raised.exception.failed), [KEY_B])
        self.assertIn("errno=-22 (Invalid argument)", raised.exception.failed[KEY_B])
        self.assertIn(IFACE, raised.exception.failed[KEY_B])
        self.assertEqual(set(self.daemon.peers), {hexkey(KEY_A), hexkey(KEY_C)})
        # one batch, then one transaction per peer on a fresh connection
        self.assertEqual(len(self.sets()), 4)
        self.assertEqual(self.daemon.connections, 3)

    def test_daemon_refusing_everything_fails_every_key(self) -> None:
        """When every transaction fails, every key is reported with the errno."""
        self.daemon.fail_sets = -5
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {KEY_A, KEY_B})
        self.assertIn("errno=-5", str(raised.exception))
        self.assertIn(IFACE, str(raised.exception))

    def test_bad_input_never_reaches_the_socket(self) -> None:
        """A bad key or an allowed IP smuggling a line fails alone and is never sent."""
        sneaky = "fe80::1/128\nprivate_key=" + "00" * 32
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [("bad", "fe80::1/128"), (KEY_A, sneaky), (KEY_B, "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {"bad", KEY_A})
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])
        self.assertEqual(self.daemon.private_key, RFC7748_PRIVATE)

    def test_scoped_allowed_ip_never_reaches_the_socket(self) -> None:
        """An allowed IP with a scope (whose text Python's parser takes as it is) fails alone, unsent."""
        sneaky = "fe80::1%x\nprivate_key=" + "00" * 32 + "/128"
        with self.assertRaises(PeersFailed) as raised:
            self.wg.add_peers(IFACE, [(KEY_A, sneaky), (KEY_B, "fe80::2/128")])
        self.assertEqual(set(raised.exception.failed), {KEY_A})
        self.assertIn("is not an address/prefix", raised.exception.failed[KEY_A])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])
        self.assertEqual(self.daemon.private_key, RFC7748_PRIVATE)

    def test_allowed_ips_other_than_ipv6_hosts_are_rendered_parsed(self) -> None:
        """IPv6 /128s go out as given (inet_pton-checked); other prefixes and IPv4 are parsed and rendered."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "FE80::1:0:0:5/64"), (KEY_C, "192.0.2.7/32")])
        allowed = [line for line in self.sets()[0] if line.startswith("allowed_ip=")]
        self.assertEqual(allowed, ["allowed_ip=fe80::1/128", "allowed_ip=fe80::/64", "allowed_ip=192.0.2.7/32"])

    def test_empty_batch_sends_nothing(self) -> None:
        """No peers, no request."""
        self.wg.add_peers(IFACE, [])
        self.assertEqual(self.daemon.requests, [])


class RemovePeersTests(UapiTestCase):
    def test_remove_in_one_transaction(self) -> None:
        """Removal sends public_key + remove=true per key in one transaction; absent keys are fine."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128")])
        self.daemon.requests.clear()
        self.wg.remove_peers(IFACE, [KEY_A])
        self.assertEqual(self.sets(), [[f"public_key={hexkey(KEY_A)}", "remove=true"]])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])
