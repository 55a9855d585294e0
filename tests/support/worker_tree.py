"""The whole worker tree with fakes at the boundaries, for the worker's unit tests.

:class:`WorkerTreeCase` builds the worker (``build_worker``) on a memory reactor,
a :class:`~tests.support.bus.FakeBus` and a :class:`~tests.support.worker_fakes.FakeKernel`;
:class:`SyncPoolService` and :class:`ManualPoolService` are the pool fakes as
services of the tree; :class:`FakePort` stands in for a listening port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tests.support.bus import FakeBus
from tests.support.reactors import ThreadedMemoryReactor
from tests.support.worker_fakes import FakeKernel, ManualPool, SyncPool, backends_for, make_config
from wgkex.config import Config
from wgkex.services import OrderedMultiService
from wgkex.worker.pool import Backends
from wgkex.worker.service import build_worker


START = 1_700_000_000.0
STATUS = "wireguard-worker/gw1/status"
DATA_WELT = "wireguard-worker/gw1/ffmuc_welt/data"
METRIC_WELT = "wireguard-metrics/ffmuc_welt/gw1/connected_peers"
METRIC_OST = "wireguard-metrics/ffmuc_ost/gw1/connected_peers"


class _ServiceBits:
    """Enough of IService for a pool fake to sit in the tree; records start/stop in ``events``."""

    name = "netlink-pool"
    running = 0
    parent: Any = None
    events: list[tuple[Any, ...]]

    def setServiceParent(self, parent: Any) -> None:
        self.parent = parent
        parent.addService(self)

    def privilegedStartService(self) -> None:
        pass

    def startService(self) -> None:
        self.running = 1
        self.events.append(("pool-start",))

    def stopService(self) -> Deferred[None]:
        self.running = 0
        self.events.append(("pool-stop",))
        return succeed(None)


class SyncPoolService(_ServiceBits, SyncPool):
    """Both lanes run their jobs at once."""

    def __init__(self, backends: Backends, events: list[tuple[Any, ...]]) -> None:
        SyncPool.__init__(self, backends)
        self.events = events
        self.keys = self.housekeeping = self


class ManualPoolService(_ServiceBits, ManualPool):
    """Both lanes share one queue of held jobs, released in order."""

    def __init__(self, backends: Backends, events: list[tuple[Any, ...]]) -> None:
        ManualPool.__init__(self, backends)
        self.events = events
        self.keys = self.housekeeping = self


@implementer(IListeningPort)
class FakePort:
    def __init__(self, address: str, ifindex: int, port: int) -> None:
        self.where = (address, ifindex, port)
        self.listening = True

    def startListening(self) -> None:
        self.listening = True

    def stopListening(self) -> None:
        self.listening = False

    def getHost(self) -> IPv6Address:
        return IPv6Address("TCP", self.where[0], self.where[2])


class WorkerTreeCase(SynchronousTestCase):
    """build_worker + WorkerRoot with a fake bus, kernel and pool (no tests here; the test classes derive from it)."""

    def setUp(self) -> None:
        self.reactor = ThreadedMemoryReactor()
        self.reactor.advance(START)
        self.kernel = FakeKernel()
        self.kernel.add_domain("welt", address="fe80::1")
        self.kernel.add_domain("ost", address="fe80::2")
        self.backends, self.wg, self.rtnl = backends_for(self.kernel)
        self.bus = FakeBus()
        self.ports: list[FakePort] = []
        self.bind_error: OSError | None = None

    def listen(self, address: str, ifindex: int, port: int, factory: object) -> FakePort:
        if self.bind_error is not None:
            raise self.bind_error
        p = FakePort(address, ifindex, port)
        self.ports.append(p)
        return p

    def build(
        self, config: Config | None = None, manual: bool = False, monotonic: Callable[[], float] = time.monotonic
    ) -> OrderedMultiService:
        self.config = config or make_config(metrics_interval=60, cleanup_interval=3600, peer_timeout=10800)
        pool: Any = (ManualPoolService if manual else SyncPoolService)(self.backends, self.bus.events)
        self.pool = pool
        root = build_worker(
            self.config, self.reactor, bus=self.bus, pool=pool, support=(), ifindex=self.kernel.ifindex, listen=self.listen,
            monotonic=monotonic,
        )
        self.root = root
        return root

    def start(
        self, config: Config | None = None, manual: bool = False, monotonic: Callable[[], float] = time.monotonic
    ) -> OrderedMultiService:
        root = self.build(config, manual, monotonic)
        root.startService()
        self.addCleanup(lambda: root.running and root.stopService())
        return root

    def listening(self) -> set[tuple[str, int, int]]:
        return {p.where for p in self.ports if p.listening}
