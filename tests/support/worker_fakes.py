"""Fakes at the worker's boundaries (kernel, pool, MQTT), shared by the worker unit tests.

* :class:`FakeKernel` holds what a network namespace would: interfaces with an
  index, WireGuard peers, /128 routes, FDB entries, link-local addresses.
  :class:`FakeWireGuard` and :class:`FakeRtnl` implement the ``WireGuard`` and
  ``Rtnl`` protocols of :mod:`wgkex.worker.backend` on top of it, with knobs
  to make single keys or addresses fail the way real backends do.
* :class:`SyncPool` runs jobs at once; :class:`ManualPool` holds them until
  the test releases them (to see what arrives while a batch is applied).
* :class:`LazyExecutor` stands in for the pool's WireGuard thread: it runs
  submitted work only when its result is asked for, so a test sees what a job
  did while that work was "running".
* The bus is :class:`tests.support.bus.FakeBus`, shared with the broker's tests
  (its own tests are in ``test_fake_bus``).

Their own tests are in ``tests/unit/test_worker_fakes.py``, so that the
tests built on them rest on something checked.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from wgkex.config import Config, parse_config
from wgkex.keys import lladdr
from wgkex.worker.backend import BackendError, InterfaceInfo, InterfaceMissing, PeerInfo, PeersFailed
from wgkex.worker.pool import Backends, GcPause

#: The test vectors of docs/protocol.md.
KEY_A = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
LL_A = "fe80::2a6:8fff:fe21:5465"
KEY_B = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
LL_B = "fe80::25b:c1ff:fe61:e5bd"

GATEWAY_KEY = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="


def key(n: int) -> str:
    """A distinct valid public key for ``n`` (canonical base64 of 32 bytes)."""
    import base64

    raw = bytearray(32)
    raw[0:4] = (n + 7).to_bytes(4, "big")
    raw[31] = 0x40
    return base64.b64encode(bytes(raw)).decode()


def make_config(**overrides: Any) -> Config:
    """Two domains (welt, ost), worker ``gw1``; ``overrides`` are top-level YAML keys."""
    data: dict[str, Any] = {
        "domains": ["ffmuc_welt", "ffmuc_ost"],
        "domain_prefixes": ["ffmuc_"],
        "worker_name": "gw1",
        "externalName": "gw1.example.net",
    }
    data.update(overrides)
    return parse_config(data, "test.yaml", hostname=lambda: "host")


@dataclass
class FakeKernel:
    """The state of one network namespace, as the worker sees it."""

    indexes: dict[str, int] = field(default_factory=dict)
    info: dict[str, InterfaceInfo] = field(default_factory=dict)
    link_local: dict[str, str] = field(default_factory=dict)
    peers: dict[str, dict[str, PeerInfo]] = field(default_factory=dict)
    routes: dict[str, set[str]] = field(default_factory=dict)
    fdb: dict[str, set[tuple[str, str]]] = field(default_factory=dict)
    next_index: int = 10

    def add_domain(self, short: str, port: int = 51820, address: str = "fe80::1") -> None:
        """Create ``wg-<short>`` (with key, port, link-local address) and ``vx-<short>``."""
        for name in (f"wg-{short}", f"vx-{short}"):
            self.next_index += 1
            self.indexes[name] = self.next_index
        wg = f"wg-{short}"
        self.info[wg] = InterfaceInfo(public_key=GATEWAY_KEY, listen_port=port)
        self.link_local[wg] = address
        self.peers[wg] = {}
        self.routes[wg] = set()
        self.fdb[f"vx-{short}"] = set()

    def delete(self, name: str) -> None:
        """Delete an interface with everything on it (as the kernel does)."""
        self.indexes.pop(name, None)
        self.info.pop(name, None)
        self.link_local.pop(name, None)
        self.peers.pop(name, None)
        self.routes.pop(name, None)
        self.fdb.pop(name, None)
        for vx, entries in self.fdb.items():
            self.fdb[vx] = {e for e in entries if e[1] != name}

    def ifindex(self, name: str) -> int | None:
        return self.indexes.get(name)

    def has(self, short: str, k: str) -> bool:
        """True when key ``k`` is fully installed on domain ``short`` (peer, route, FDB)."""
        wg, vx = f"wg-{short}", f"vx-{short}"
        peer = self.peers.get(wg, {}).get(k)
        return (
            peer is not None
            and peer.allowed_ips == (lladdr(k) + "/128",)
            and lladdr(k) in self.routes.get(wg, set())
            and (lladdr(k), wg) in self.fdb.get(vx, set())
        )

    def nothing_on(self, short: str, k: str) -> bool:
        """True when no trace of key ``k`` is on domain ``short``."""
        wg, vx = f"wg-{short}", f"vx-{short}"
        return (
            k not in self.peers.get(wg, {})
            and lladdr(k) not in self.routes.get(wg, set())
            and all(e[0] != lladdr(k) for e in self.fdb.get(vx, set()))
        )


class FakeWireGuard:
    """``WireGuard`` on a :class:`FakeKernel`; ``refuse`` keys sink a whole ``add_peers`` call."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[str, str, int]] = []  # (method, iface, number of keys)
        #: A batch containing one of these raises BackendError (outcome unknown).
        self.refuse: set[str] = set()
        #: These are refused individually with PeersFailed (all others applied).
        self.refuse_partially: set[str] = set()
        self.fail_peers_dump: Exception | None = None
        self.closed = False
        #: gc.isenabled() at every peers() call (dumps are read with the collector paused).
        self.gc_during_dump: list[bool] = []

    def _iface(self, iface: str) -> dict[str, PeerInfo]:
        if iface not in self.kernel.peers:
            raise InterfaceMissing(f"interface {iface} does not exist")
        return self.kernel.peers[iface]

    def add_peers(self, iface: str, peers: Sequence[tuple[str, str]]) -> None:
        self.calls.append(("add_peers", iface, len(peers)))
        table = self._iface(iface)
        if any(k in self.refuse for k, _ in peers):
            raise BackendError(f"{iface}: set=1 failed: errno=-22")
        partial = {k: "errno=-22" for k, _ in peers if k in self.refuse_partially}
        for k, allowed in peers:
            if k in partial:
                continue
            old = table.get(k)
            table[k] = PeerInfo(k, old.last_handshake if old else None, (allowed,))
        if partial:
            raise PeersFailed(iface, partial)

    def remove_peers(self, iface: str, keys: Sequence[str]) -> None:
        self.calls.append(("remove_peers", iface, len(keys)))
        table = self._iface(iface)
        for k in keys:
            table.pop(k, None)

    def peers(self, iface: str) -> list[PeerInfo]:
        self.calls.append(("peers", iface, 0))
        self.gc_during_dump.append(gc.isenabled())
        if self.fail_peers_dump is not None:
            raise self.fail_peers_dump
        return list(self._iface(iface).values())

    def interface(self, iface: str) -> InterfaceInfo:
        self.calls.append(("interface", iface, 0))
        if iface not in self.kernel.info:
            raise InterfaceMissing(f"interface {iface} does not exist")
        return self.kernel.info[iface]

    def close(self) -> None:
        self.closed = True

    def handshake(self, iface: str, k: str, when: float | None) -> None:
        """Set the last handshake of peer ``k`` (test helper)."""
        peer = self.kernel.peers[iface][k]
        self.kernel.peers[iface][k] = PeerInfo(k, when, peer.allowed_ips)


class FakeRtnl:
    """``Rtnl`` on a :class:`FakeKernel`; ``refuse_routes`` addresses fail one by one."""

    def __init__(self, kernel: FakeKernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[str, str, int]] = []
        self.refuse_routes: set[str] = set()
        self.refuse_fdb: set[str] = set()
        self.closed = False

    def _need(self, iface: str, table: dict[str, Any]) -> Any:
        if iface not in self.kernel.indexes or iface not in table:
            raise InterfaceMissing(f"interface {iface} does not exist")
        return table[iface]

    def replace_routes(self, iface: str, addresses: Sequence[str]) -> dict[str, str]:
        self.calls.append(("replace_routes", iface, len(addresses)))
        routes = self._need(iface, self.kernel.routes)
        failures = {a: "Network is unreachable" for a in addresses if a in self.refuse_routes}
        routes.update(a for a in addresses if a not in failures)
        return failures

    def append_fdb(self, vx_iface: str, wg_iface: str, addresses: Sequence[str]) -> dict[str, str]:
        self.calls.append(("append_fdb", vx_iface, len(addresses)))
        entries = self._need(vx_iface, self.kernel.fdb)
        if wg_iface not in self.kernel.indexes:
            raise InterfaceMissing(f"interface {wg_iface} does not exist")
        failures = {a: "Invalid argument" for a in addresses if a in self.refuse_fdb}
        entries.update((a, wg_iface) for a in addresses if a not in failures)
        return failures

    def delete_routes(self, iface: str, addresses: Sequence[str]) -> None:
        self.calls.append(("delete_routes", iface, len(addresses)))
        self._need(iface, self.kernel.routes).difference_update(addresses)

    def delete_fdb(self, vx_iface: str, addresses: Sequence[str], via_iface: str | None = None) -> None:
        self.calls.append(("delete_fdb", vx_iface, len(addresses)))
        entries = self._need(vx_iface, self.kernel.fdb)
        self.kernel.fdb[vx_iface] = {e for e in entries if e[0] not in addresses}

    def link_local_address(self, iface: str) -> str | None:
        self.calls.append(("link_local_address", iface, 0))
        if iface not in self.kernel.indexes:
            raise InterfaceMissing(f"interface {iface} does not exist")
        return self.kernel.link_local.get(iface)

    def close(self) -> None:
        self.closed = True


def slow_dumps(wg: FakeWireGuard, seconds: float) -> list[float]:
    """Make each of ``wg``'s dumps take ``seconds`` of a fake monotonic clock; returns that clock.

    The clock is a one-element list (``clock[0]`` is now): pass ``lambda: clock[0]`` as a monotonic.
    """
    clock = [0.0]
    peers = wg.peers

    def slow(iface: str) -> list[PeerInfo]:
        clock[0] += seconds
        return peers(iface)

    wg.peers = slow  # type: ignore[method-assign]
    return clock


def backends_for(kernel: FakeKernel) -> tuple[Backends, FakeWireGuard, FakeRtnl]:
    wg, rtnl = FakeWireGuard(kernel), FakeRtnl(kernel)
    return Backends(wireguard=wg, rtnl=rtnl, gc_pause=GcPause()), wg, rtnl


class SyncPool:
    """A pool that runs each job at once, on the caller's thread."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.jobs: list[str] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        self.jobs.append(fn.__name__)
        try:
            return succeed(fn(self.backends, *args, **kwargs))
        except Exception:
            return fail()


class ManualPool:
    """A pool that holds jobs until :meth:`release` runs them in order."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queue.append((fn, args, kwargs, d))
        return d

    def jobs(self) -> list[str]:
        return [fn.__name__ for fn, _, _, _ in self.queue]

    def release(self, count: int | None = None) -> int:
        """Run up to ``count`` queued jobs (all, including ones queued meanwhile, by default)."""
        done = 0
        while self.queue and (count is None or done < count):
            fn, args, kwargs, d = self.queue.pop(0)
            try:
                result = fn(self.backends, *args, **kwargs)
            except Exception as exc:
                d.errback(exc)
            else:
                d.callback(result)
            done += 1
        return done


class LazyExecutor(Executor):
    """An executor on the caller's thread that runs work only when its result is wanted.

    ``log`` records ("submit", name) when work is handed over and ("run", name)
    when it runs; ``shut_down`` tells whether :meth:`shutdown` was called.
    """

    def __init__(self, log: list[tuple[str, str]] | None = None) -> None:
        self.log: list[tuple[str, str]] = log if log is not None else []
        self.queue: list[tuple[_LazyFuture, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.shut_down = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: _LazyFuture = _LazyFuture(self)
        self.queue.append((future, fn, args, kwargs))
        self.log.append(("submit", getattr(fn, "__name__", "?")))
        return future

    def run_next(self) -> None:
        future, fn, args, kwargs = self.queue.pop(0)
        self.log.append(("run", getattr(fn, "__name__", "?")))
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        while self.queue:
            self.run_next()
        self.shut_down = True


class _LazyFuture(Future[Any]):
    def __init__(self, executor: LazyExecutor) -> None:
        super().__init__()
        self._executor = executor

    def result(self, timeout: float | None = None) -> Any:
        while not self.done():
            self._executor.run_next()  # work is run in order, like a one-thread executor
        return super().result(timeout)

