"""The UAPI WireGuard backend's connection: missing or stale sockets, restarts, drops, a silent daemon.

The fake daemon (:mod:`tests.support.uapi_daemon`) listens on a real unix socket
in a temporary directory (as wireguard-go does in ``/var/run/wireguard``) and
behaves like wireguard-go where it matters.
"""

from __future__ import annotations

import os
import socket

from tests.support.uapi_daemon import IFACE, KEY_A, KEY_B, UapiTestCase, hexkey
from wgkex.worker.backend import BackendError, InterfaceMissing
from wgkex.worker.wg_uapi import UapiWireGuard


class ConnectionTests(UapiTestCase):
    def test_missing_socket_is_interface_missing(self) -> None:
        """No socket file: InterfaceMissing naming the interface and path, for every operation."""
        for call in (
            lambda: self.wg.add_peers("wg-none", [(KEY_A, "fe80::1/128")]),
            lambda: self.wg.remove_peers("wg-none", [KEY_A]),
            lambda: self.wg.peers("wg-none"),
            lambda: self.wg.interface("wg-none"),
        ):
            with self.assertRaises(InterfaceMissing) as raised:
                call()
            self.assertIn("wg-none", str(raised.exception))
            self.assertIn(os.path.join(self.directory, "wg-none.sock"), str(raised.exception))

    def test_stale_socket_file_is_interface_missing(self) -> None:
        """A socket file nobody listens on (daemon killed hard) is a missing interface."""
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(os.path.join(self.directory, "wg-dead.sock"))
        stale.close()
        with self.assertRaises(InterfaceMissing):
            self.wg.peers("wg-dead")

    def test_restarted_daemon_is_reconnected(self) -> None:
        """After the daemon restarts, the dead cached connection is replaced transparently."""
        self.wg.add_peers(IFACE, [(KEY_A, "fe80::1/128")])
        self.daemon.stop()
        with self.assertRaises(InterfaceMissing):
            self.wg.peers(IFACE)
        self.daemon = self.start_daemon()
        self.wg.add_peers(IFACE, [(KEY_B, "fe80::2/128")])
        self.assertEqual(list(self.daemon.peers), [hexkey(KEY_B)])

    def test_connection_dropped_between_calls_is_replaced(self) -> None:
        """A daemon that closed our idle connection (and still runs) gets a fresh one, no error."""
        self.wg.peers(IFACE)
        with self.daemon.lock:
            client = self.daemon._clients[0]
        client.shutdown(socket.SHUT_RDWR)
        self.assertEqual(self.wg.peers(IFACE), [])
        self.assertEqual(self.daemon.connections, 2)

    def test_close_then_use_reconnects(self) -> None:
        """close() drops the connection; the next call opens a new one."""
        self.wg.peers(IFACE)
        self.wg.close()
        self.wg.peers(IFACE)
        self.assertEqual(self.daemon.connections, 2)

    def test_silent_daemon_times_out(self) -> None:
        """A daemon that never answers gives a BackendError after the timeout, not a hang."""
        self.daemon.silent = True
        wg = UapiWireGuard(self.directory, timeout=0.05)
        self.addCleanup(wg.close)
        with self.assertRaises(BackendError) as raised:
            wg.peers(IFACE)
        self.assertIn("no reply", str(raised.exception))
