"""The worker's kernel WireGuard backend against a real Linux kernel: Debian's, booted under QEMU.

This machine's kernel may have no WireGuard module, and every production
gateway uses the in-kernel one through generic netlink. So the first test that
runs boots a VM (:mod:`tests.support.kernelvm`: built once and cached, pure
emulation, this machine's ``/`` shared read-only) in which
:mod:`tests.kernel.guest_checks` runs the real ``twistd -n wgkex-worker`` with
``wireguard_backend: kernel`` against kernel ``wg-welt``/``vx-welt`` and
records what it observes, check by check. Each test method here judges one of
those observations, so the guest's results are ordinary trial results.

Every failure message carries the paths and tails of the guest's console, the
checks' output and the worker's log (all kept in ``_trial_temp/kernel-vm/``).
Where the VM cannot run (not root, no QEMU, no kernel package to download) the
tests skip saying why. Run just these with ``.venv/bin/trial tests.kernel``.
"""

from __future__ import annotations

import compileall
import ipaddress
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import log
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.kernel import guest_checks as guest
from tests.kernel import guest_setup as stage
from tests.support import kernelvm
from wgkex.keys import lladdr

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: QEMU is killed after this long; the whole guest run takes 1-4 minutes on a busy 2-core machine.
BOOT_TIMEOUT = 1500.0

LL_A = "fe80::2a6:8fff:fe21:5465"
LL_B = "fe80::25b:c1ff:fe61:e5bd"


def _tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as exc:
        return f"({exc})\n"


@dataclass
class GuestRun:
    """One boot of the VM: the checks' results, or why it could not run."""

    scratch: str
    skip: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    boot: kernelvm.BootResult | None = None

    def diagnostics(self) -> str:
        """Where the guest's logs are, with their last lines."""
        console = os.path.join(self.scratch, "console.log")
        checks = os.path.join(self.scratch, "guest.log")
        worker = os.path.join(self.scratch, "worker.log")
        head = ""
        if self.boot is not None:
            head = (f"VM ran {self.boot.seconds:.0f} s, run.sh exit status {self.boot.exit_status}"
                    f"{', killed at the timeout' if self.boot.timed_out else ''}\n")
        return (f"\n--- {head}--- guest console {console} (tail):\n{_tail(console, 25)}"
                f"--- checks' output {checks} (tail):\n{_tail(checks, 40)}"
                f"--- worker log {worker} (tail):\n{_tail(worker, 40)}")


def warm_imports() -> None:
    """Compile the project's modules and refresh twistd's plugin cache here, on the host.

    The guest mounts the checkout read-only and would compile every module of
    the project again on each start, under emulation (the venv's packages come
    compiled by pip): measured, the worker's twistd took 96 s from spawn to its
    first log line that way. Compiling here takes a second or two; the files
    go where Python itself puts them (``__pycache__``, ignored by git).
    """
    for folder in ("wgkex", "tests", "twisted"):
        compileall.compile_dir(os.path.join(REPO, folder), quiet=1)
    list(getPlugins(IServiceMaker))  # rewrites twisted/plugins/dropin.cache if it is stale


def run_guest(scratch: str) -> GuestRun:
    """Build (or take from the cache) the VM, boot it once, and read back the checks' results."""
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    run = GuestRun(scratch)
    try:
        images = kernelvm.build()
    except kernelvm.VMUnavailable as exc:
        run.skip = f"cannot build the kernel VM: {exc}"
        return run
    warm_imports()
    with open(os.path.join(scratch, "run.sh"), "w") as f:
        f.write(f"cd {REPO}\n"
                "echo \"run.sh: guest up $(cut -d' ' -f1 /proc/uptime) s\"\n"
                f"export PYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1\n"
                f"exec {sys.executable} -u -m tests.kernel.guest_checks {kernelvm.GUEST_SCRATCH}\n")
    run.boot = kernelvm.boot(images, scratch, BOOT_TIMEOUT, project=REPO)
    log.msg(f"kernel VM {images.version}: {run.boot.seconds:.1f} s, exit status {run.boot.exit_status}; "
            f"logs in {scratch}")
    try:
        with open(os.path.join(scratch, "results.json")) as f:
            run.results = json.load(f)
    except (OSError, ValueError):
        pass
    return run


class KernelBackendTests(SynchronousTestCase):
    """The checks of :mod:`tests.kernel.guest_checks`, one test each, judged here."""

    skip = kernelvm.why_unavailable()
    #: The one boot all tests of this class share (made by the first test that runs).
    guest_run: ClassVar[GuestRun | None] = None

    def observed(self, check: str) -> dict[str, Any]:
        """What the guest observed in ``check``; fails (with the guest's logs) if the check broke."""
        cls = type(self)
        if cls.guest_run is None:
            cls.guest_run = run_guest(os.path.abspath("kernel-vm"))
        run = cls.guest_run
        if run.skip:
            raise SkipTest(run.skip)
        result = run.results.get(check)
        if result is None:
            setup = run.results.get("setup", {}).get("error", "")
            self.fail(f"the guest reported nothing for the {check!r} check\n{setup}{run.diagnostics()}")
        if "error" in result:
            self.fail(f"the guest's {check!r} check failed:\n{result['error']}{run.diagnostics()}")
        observed: dict[str, Any] = result["observed"]
        return observed

    @contextmanager
    def judging(self, observed: dict[str, Any]) -> Iterator[None]:
        """Failed assertions inside carry the observation and the guest's logs."""
        try:
            yield
        except self.failureException as exc:
            run = type(self).guest_run
            raise self.failureException(
                f"{exc}\nobserved: {json.dumps(observed, indent=1)[:3000]}"
                f"{run.diagnostics() if run else ''}") from None

    def test_worker_online(self) -> None:
        """The worker starts on the kernel backend and publishes status 1."""
        seen = self.observed("online")
        with self.judging(seen):
            self.assertEqual(seen["status"], "1")

    def test_data_matches_wg_show(self) -> None:
        """The data message's public key, port and link address are those of wg-welt in the kernel."""
        seen = self.observed("data")
        with self.judging(seen):
            data = seen["data"]
            self.assertEqual(set(data), {"ExternalAddress", "Port", "PublicKey", "LinkAddress"})
            self.assertEqual(data["PublicKey"], seen["wg_public_key"])
            self.assertEqual(data["Port"], seen["wg_listen_port"])
            self.assertEqual(data["ExternalAddress"], seen["external_name"])
            self.assertEqual(ipaddress.IPv6Address(data["LinkAddress"]),
                             ipaddress.IPv6Address(lladdr(seen["wg_public_key"])))
            self.assertIn(f"{ipaddress.IPv6Address(data['LinkAddress'])}/64", seen["addresses"])

    def test_contract_vectors(self) -> None:
        """The contract's test vectors land as exactly that peer, /128 route and FDB entry via wg-welt."""
        seen = self.observed("vectors")
        with self.judging(seen):
            self.assertEqual(seen["peers"], {stage.KEY_A: [f"{LL_A}/128"], stage.KEY_B: [f"{LL_B}/128"]})
            self.assertEqual(set(seen["routes"]) - {"fe80::/64"}, {f"{LL_A}/128", f"{LL_B}/128"})
            self.assertEqual(seen["fdb"], sorted([{"dst": LL_A, "via": stage.WG}, {"dst": LL_B, "via": stage.WG}],
                                                 key=lambda e: e["dst"]))

    def test_burst_lands_completely(self) -> None:
        """A burst of 600 keys lands completely, and the worker's chunked dump counts every peer."""
        seen = self.observed("burst")
        with self.judging(seen):
            self.assertEqual(seen["missing"], [])
            self.assertEqual(seen["missing_count"], 0)
            self.assertEqual(seen["wrong_allowed_ips"], [])
            # The burst, the two vectors and the router's key (the stale key is gone by then).
            self.assertEqual(seen["wg_peer_count"], stage.BURST + 3)
            self.assertEqual(seen["fdb_count"], stage.BURST + 3)
            self.assertEqual(seen["worker_peer_gauge"], stage.BURST + 3)
            self.assertEqual(seen["wg_peer_count_then"], stage.BURST + 3)

    def test_connected_peers_follow_handshake(self) -> None:
        """Connected peers go from 0 to 1 when a router's kernel WireGuard shakes hands with the gateway."""
        seen = self.observed("handshake")
        with self.judging(seen):
            self.assertEqual(seen["before"], "0")
            self.assertGreater(seen["gateway_handshake"], 0)
            self.assertGreater(seen["router_handshake"], 0)
            self.assertIn("1", seen["after"])

    def test_gluon_connectivity_check(self) -> None:
        """Gluon's GET http://[LinkAddress%wg_mesh_vpn]/ from the router is answered 200 by the worker."""
        seen = self.observed("connectivity")
        with self.judging(seen):
            self.assertEqual(seen["result"].get("status"), 200)

    def test_ping_over_vxlan(self) -> None:
        """The router reaches the gateway's VXLAN address through the FDB entry the worker made."""
        seen = self.observed("vxlan")
        with self.judging(seen):
            self.assertRegex(seen["output"], r"3 packets transmitted, [1-3] received")

    def test_sweep_removes_stale_spares_kept(self) -> None:
        """The sweep removes a never-handshaken peer with route and FDB entry after peer_timeout; keep_keys stay."""
        seen = self.observed("sweep")
        with self.judging(seen):
            self.assertTrue(seen["seen_installed"])
            self.assertEqual(seen["stale"], {"allowed_ips": None, "route": False, "fdb_via": []})
            self.assertEqual(seen["kept"], {"allowed_ips": [f"{LL_B}/128"], "route": True, "fdb_via": [stage.WG]})
            self.assertGreaterEqual(seen["gone_after"], seen["peer_timeout"])
            self.assertGreaterEqual(seen["swept_total"], 1)

    def test_sigterm_says_goodbye(self) -> None:
        """SIGTERM: the worker publishes connected peers -1 and status 0, then exits with status 0."""
        seen = self.observed("sigterm")
        with self.judging(seen):
            self.assertTrue(seen["exited"])
            self.assertEqual(seen["exit_status"], 0)
            self.assertEqual(seen["last_metric"], "-1")
            self.assertEqual(seen["last_status"], "0")
