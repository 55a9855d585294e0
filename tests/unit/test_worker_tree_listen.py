"""The whole worker tree's listeners: the connectivity check on each domain and worker.listen."""

from __future__ import annotations

import dataclasses
import errno
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.logger import LogLevel, capturedLogs

from tests.support.reactors import ThreadedMemoryReactor
from tests.support.worker_fakes import KEY_A, make_config
from tests.support.worker_tree import START, WorkerTreeCase
from wgkex.worker.http import STATUS_RETRY_INTERVAL
from wgkex.worker.service import WATCH_INTERVAL


class WorkerTreeListenTests(WorkerTreeCase):
    """build_worker + WorkerRoot with a fake bus, kernel and pool: the ports it listens on."""

    def test_connectivity_check_binds_each_domain(self) -> None:
        """The check listens on each domain's link-local address, scoped to wg-<D>, port 80."""
        self.start()
        self.assertEqual(
            self.listening(),
            {("fe80::1", self.kernel.indexes["wg-welt"], 80), ("fe80::2", self.kernel.indexes["wg-ost"], 80)},
        )

    def test_connectivity_check_rebinds(self) -> None:
        """A recreated interface (new index) or a new address gets a new listener; the old one closes."""
        self.start()
        self.kernel.delete("wg-welt")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertEqual(self.listening(), {("fe80::2", self.kernel.indexes["wg-ost"], 80)})
        self.kernel.add_domain("welt", address="fe80::9")
        self.reactor.advance(WATCH_INTERVAL)
        self.assertIn(("fe80::9", self.kernel.indexes["wg-welt"], 80), self.listening())
        self.assertEqual(len(self.listening()), 2)

    def test_connectivity_check_retries_bind(self) -> None:
        """A failed bind is logged once and retried at every check until it works."""
        self.bind_error = OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
        with capturedLogs() as events:
            self.start()
            self.reactor.advance(WATCH_INTERVAL)
            self.reactor.advance(WATCH_INTERVAL)
        warnings = [e for e in events if e.get("error") == "Cannot assign requested address"]
        self.assertEqual(len(warnings), 2)  # once per domain
        self.assertEqual(self.listening(), set())
        self.bind_error = None
        self.reactor.advance(WATCH_INTERVAL)
        self.assertEqual(len(self.listening()), 2)

    def test_connectivity_check_off(self) -> None:
        """connectivity_check: false binds nothing."""
        self.start(make_config(connectivity_check=False))
        self.reactor.advance(WATCH_INTERVAL)
        self.assertEqual(self.ports, [])

    def test_stop_closes_connectivity_listeners(self) -> None:
        """Stopping closes the connectivity listeners."""
        root = self.start()
        self.successResultOf(root.stopService())
        self.assertEqual(self.listening(), set())

    def test_worker_listen_off(self) -> None:
        """worker_listen: off serves no /metrics."""
        self.start(make_config(worker_listen="off"))
        self.assertEqual(self.reactor.tcpServers, [])

    def test_worker_listen_busy_is_not_fatal(self) -> None:
        """A busy worker_listen address is logged (naming the key and the reason) and retried; keys still land."""

        class BusyReactor(ThreadedMemoryReactor):
            busy = True

            def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
                if self.busy:
                    raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
                return super().listenTCP(port, factory, backlog, interface)

        self.reactor = BusyReactor()
        self.reactor.advance(START)
        root = self.build()
        with capturedLogs() as events:
            root.privilegedStartService()  # as twistd calls it, before startService
            root.startService()
        self.addCleanup(lambda: root.running and root.stopService())
        errors = [e for e in events if e.get("log_level") == LogLevel.error and "worker_listen" in e["log_format"]]
        self.assertEqual(len(errors), 1)
        self.assertIn("Address already in use", errors[0]["error"])
        self.assertEqual(self.reactor.tcpServers, [])
        self.bus.connect()
        self.bus.deliver("wireguard/ffmuc_welt/all", KEY_A.encode())
        self.assertTrue(self.kernel.has("welt", KEY_A))
        # Still busy at the next try: not logged again.
        with capturedLogs() as again:
            self.reactor.advance(STATUS_RETRY_INTERVAL)
        self.assertEqual([e for e in again if "worker_listen" in e.get("log_format", "")], [])
        self.reactor.busy = False
        self.reactor.advance(STATUS_RETRY_INTERVAL)
        self.assertEqual([(p, i) for p, _, _, i in self.reactor.tcpServers], [(9101, "127.0.0.1")])
        self.successResultOf(root.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_worker_listen_retry_cancelled_on_stop(self) -> None:
        """Stopping while worker_listen waits for its next try leaves no timer behind."""

        class BusyReactor(ThreadedMemoryReactor):
            def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
                raise CannotListenError(interface, port, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))

        self.reactor = BusyReactor()
        root = self.build()
        root.privilegedStartService()
        root.startService()
        self.successResultOf(root.stopService())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_malformed_worker_listen_fails_while_building(self) -> None:
        """A malformed worker_listen endpoint stops the start while building (before threads exist), not later.

        The configuration already refuses it; this pins the tree's own check for a Config built in code.
        """
        config = make_config()
        config = dataclasses.replace(config, worker=dataclasses.replace(config.worker, listen="tcp:notaport"))
        self.assertRaises(ValueError, self.build, config)
