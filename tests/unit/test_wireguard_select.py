"""Which WireGuard backend an interface goes to: ``uapi``, ``kernel`` or ``auto``.

The two backends are replaced by recording fakes; ``auto`` looks for
``<socket_dir>/<iface>.sock`` in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence

from twisted.trial.unittest import SynchronousTestCase

from wgkex.worker.backend import BackendError, InterfaceInfo, InterfaceMissing, PeerInfo, PeersFailed
from wgkex.worker.wg_kernel import KernelModuleMissing
from wgkex.worker.wireguard import AutoWireGuard

KEY = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="


class FakeBackend:
    """Records calls; ``failure`` (an exception) is raised by every call while set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str]] = []
        self.failure: Exception | None = None
        self.closed = 0

    def _record(self, what: str, iface: str) -> None:
        self.calls.append((what, iface))
        if self.failure is not None:
            raise self.failure

    def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
        self._record("add_peers", iface)

    def remove_peers(self, iface: str, keys: Sequence[str]) -> None:
        self._record("remove_peers", iface)

    def peers(self, iface: str) -> list[PeerInfo]:
        self._record("peers", iface)
        return [PeerInfo(KEY, None, (self.name,))]

    def interface(self, iface: str) -> InterfaceInfo:
        self._record("interface", iface)
        return InterfaceInfo(self.name, 1)

    def close(self) -> None:
        self.closed += 1


class SelectTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="wgkex-select-")
        self.addCleanup(shutil.rmtree, self.directory)
        self.uapi = FakeBackend("uapi")
        self.kernel = FakeBackend("kernel")

    def make(self, mode: str) -> AutoWireGuard:
        return AutoWireGuard(mode, self.directory, uapi=self.uapi, kernel=self.kernel)

    def socket_appears(self, iface: str = "wg-a") -> None:
        with open(os.path.join(self.directory, f"{iface}.sock"), "w"):
            pass

    def socket_vanishes(self, iface: str = "wg-a") -> None:
        os.unlink(os.path.join(self.directory, f"{iface}.sock"))


class FixedModeTests(SelectTestCase):
    def test_uapi_mode_always_uses_uapi(self) -> None:
        """mode uapi sends everything to the UAPI backend, socket or not."""
        wg = self.make("uapi")
        wg.add_peers("wg-a", [(KEY, "fe80::1/128")])
        self.assertEqual(wg.interface("wg-a").public_key, "uapi")
        self.assertEqual(self.kernel.calls, [])

    def test_kernel_mode_always_uses_kernel(self) -> None:
        """mode kernel sends everything to the kernel backend even when a socket exists."""
        self.socket_appears()
        wg = self.make("kernel")
        self.assertEqual(wg.peers("wg-a")[0].allowed_ips, ("kernel",))
        self.assertEqual(self.uapi.calls, [])

    def test_fixed_mode_passes_failures_through(self) -> None:
        """Without auto, a missing interface is reported as such and nothing is retried elsewhere."""
        self.uapi.failure = InterfaceMissing("wg-a missing")
        wg = self.make("uapi")
        self.assertRaises(InterfaceMissing, wg.peers, "wg-a")
        self.assertEqual(self.kernel.calls, [])

    def test_unknown_mode_is_refused(self) -> None:
        """A mode other than auto/kernel/uapi is a ValueError naming the choices."""
        with self.assertRaises(ValueError) as raised:
            self.make("netlink")
        self.assertIn("auto, kernel, uapi", str(raised.exception))


class AutoModeTests(SelectTestCase):
    def test_socket_means_uapi(self) -> None:
        """auto picks UAPI for an interface whose socket exists and the kernel for one without."""
        self.socket_appears("wg-a")
        wg = self.make("auto")
        wg.add_peers("wg-a", [(KEY, "fe80::1/128")])
        wg.add_peers("wg-b", [(KEY, "fe80::1/128")])
        self.assertEqual(self.uapi.calls, [("add_peers", "wg-a")])
        self.assertEqual(self.kernel.calls, [("add_peers", "wg-b")])

    def test_choice_is_kept_while_it_works(self) -> None:
        """Once chosen, a working backend keeps the interface even if the socket appears."""
        wg = self.make("auto")
        wg.peers("wg-a")
        self.socket_appears()
        wg.peers("wg-a")
        self.assertEqual(self.kernel.calls, [("peers", "wg-a"), ("peers", "wg-a")])
        self.assertEqual(self.uapi.calls, [])

    def test_failure_reevaluates_and_retries_on_the_new_backend(self) -> None:
        """The kernel says missing, a daemon's socket appeared: the same call goes to UAPI at once."""
        wg = self.make("auto")
        wg.peers("wg-a")
        self.kernel.failure = InterfaceMissing("wg-a missing")
        self.socket_appears()
        self.assertEqual(wg.interface("wg-a").public_key, "uapi")
        wg.peers("wg-a")
        self.assertEqual(self.kernel.calls, [("peers", "wg-a"), ("interface", "wg-a")])
        self.assertEqual(self.uapi.calls, [("interface", "wg-a"), ("peers", "wg-a")])

    def test_daemon_gone_falls_back_to_kernel(self) -> None:
        """The daemon went away (socket gone): the failing call is retried on the kernel."""
        self.socket_appears()
        wg = self.make("auto")
        wg.peers("wg-a")
        self.uapi.failure = InterfaceMissing("wg-a missing")
        self.socket_vanishes()
        self.assertEqual(wg.peers("wg-a")[0].allowed_ips, ("kernel",))

    def test_same_choice_again_raises_the_original_failure(self) -> None:
        """When re-evaluation lands on the same backend, its failure is raised (no second call)."""
        wg = self.make("auto")
        self.kernel.failure = BackendError("wg-a: something broke")
        with self.assertRaises(BackendError) as raised:
            wg.peers("wg-a")
        self.assertEqual(str(raised.exception), "wg-a: something broke")
        self.assertEqual(self.kernel.calls, [("peers", "wg-a")])

    def test_peers_failed_is_not_a_reason_to_switch(self) -> None:
        """Some keys failing is the backend working: no re-evaluation, no retry elsewhere."""
        wg = self.make("auto")
        wg.peers("wg-a")
        self.socket_appears()
        self.kernel.failure = PeersFailed("wg-a", {KEY: "refused"})
        self.assertRaises(PeersFailed, wg.add_peers, "wg-a", [(KEY, "fe80::1/128")])
        self.assertEqual(self.uapi.calls, [])

    def test_no_socket_and_no_module_is_a_missing_interface(self) -> None:
        """auto with neither a socket nor the kernel module reports the interface missing, saying both."""
        self.kernel.failure = KernelModuleMissing("no module")
        wg = self.make("auto")
        with self.assertRaises(InterfaceMissing) as raised:
            wg.add_peers("wg-a", [(KEY, "fe80::1/128")])
        self.assertIn("wg-a missing", str(raised.exception))
        self.assertIn(os.path.join(self.directory, "wg-a.sock"), str(raised.exception))
        self.socket_appears()
        wg.add_peers("wg-a", [(KEY, "fe80::1/128")])
        self.assertEqual(self.uapi.calls, [("add_peers", "wg-a")])

    def test_kernel_mode_keeps_module_missing_an_error(self) -> None:
        """In kernel mode a missing module stays a BackendError that says what to do."""
        self.kernel.failure = KernelModuleMissing("no module: modprobe wireguard")
        wg = self.make("kernel")
        self.assertRaises(KernelModuleMissing, wg.peers, "wg-a")

    def test_close_closes_both(self) -> None:
        """close() closes both backends."""
        wg = self.make("auto")
        wg.close()
        self.assertEqual((self.uapi.closed, self.kernel.closed), (1, 1))

    def test_default_backends_are_real(self) -> None:
        """Without fakes, auto builds a UAPI backend on the socket directory and a kernel backend."""
        from wgkex.worker.wg_kernel import KernelWireGuard
        from wgkex.worker.wg_uapi import UapiWireGuard

        wg = AutoWireGuard("auto", self.directory)
        self.assertIsInstance(wg.uapi, UapiWireGuard)
        self.assertIsInstance(wg.kernel, KernelWireGuard)
        self.assertEqual(wg.uapi.socket_path("wg-a"), os.path.join(self.directory, "wg-a.sock"))  # type: ignore[attr-defined]
        wg.close()
