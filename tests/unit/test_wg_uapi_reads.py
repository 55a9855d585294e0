"""The UAPI WireGuard backend reads peers and the interface: the dump, the derived public key, errors.

The fake daemon (:mod:`tests.support.uapi_daemon`) listens on a real unix socket
in a temporary directory (as wireguard-go does in ``/var/run/wireguard``) and
behaves like wireguard-go where it matters.
"""

from __future__ import annotations

import base64

from tests.support.uapi_daemon import (
    IFACE, KEY_A, KEY_B, RFC7748_PRIVATE, RFC7748_PUBLIC, UapiTestCase, hexkey,
)
from wgkex.worker.backend import BackendError, PeerInfo
from wgkex.worker.wg_uapi import public_key_from_private


class ReadTests(UapiTestCase):
    def test_peers_parses_the_dump(self) -> None:
        """peers() gives base64 keys, handshake times (None when 0) and allowed IPs."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128"), (KEY_B, "fe80::2/128")])
        self.daemon.peers[hexkey(KEY_B)]["handshake"] = (1700000000, 500000000)
        self.assertEqual(
            self.wg.peers(IFACE),
            [
                PeerInfo(KEY_A, None, ("fe80::1/128",)),
                PeerInfo(KEY_B, 1700000000.5, ("fe80::2/128",)),
            ],
        )

    def test_interface_derives_the_public_key(self) -> None:
        """interface() derives the public key from the private key (RFC 7748 vector) and reads the port."""
        info = self.wg.interface(IFACE)
        self.assertEqual(info.public_key, base64.b64encode(bytes.fromhex(RFC7748_PUBLIC)).decode())
        self.assertEqual(info.listen_port, 51820)

    def test_public_key_from_private(self) -> None:
        """The X25519 derivation matches RFC 7748 for Alice's key."""
        self.assertEqual(
            base64.b64decode(public_key_from_private(bytes.fromhex(RFC7748_PRIVATE))).hex(), RFC7748_PUBLIC
        )

    def test_interface_without_private_key(self) -> None:
        """A device without a private key is an error telling how to give it one."""
        self.daemon.private_key = None
        with self.assertRaises(BackendError) as raised:
            self.wg.interface(IFACE)
        self.assertIn("private-key", str(raised.exception))

    def test_malformed_dump_names_interface(self) -> None:
        """A dump with a broken key is a BackendError naming the interface."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128")])
        self.daemon.peers["nothex"] = self.daemon.peers.pop(hexkey(KEY_A))
        with self.assertRaises(BackendError) as raised:
            self.wg.peers(IFACE)
        self.assertIn(IFACE, str(raised.exception))
        self.assertIn("malformed", str(raised.exception))

    def test_get_failure_names_interface_and_errno(self) -> None:
        """A get answered with a non-zero errno raises naming the interface and the errno."""
        self.daemon.fail_gets = -22
        with self.assertRaises(BackendError) as raised:
            self.wg.peers(IFACE)
        self.assertIn(IFACE, str(raised.exception))
        self.assertIn("errno=-22", str(raised.exception))
