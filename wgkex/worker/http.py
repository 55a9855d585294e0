"""The worker's two small HTTP faces, on twisted.web.

* **Connectivity check** (:class:`ConnectivityCheck`): Gluon routers decide
  that their uplink works with ``GET http://[LinkAddress%wg-iface]/``. The
  worker answers 200 itself on ``[LinkAddress%wg-<D>]:connectivity_check_port``
  for every domain. The address is only known once read from the interface,
  and a link-local address needs its scope (the interface index), which
  ``listenTCP`` cannot express; so the socket is bound here with the full
  ``(address, port, 0, ifindex)`` and handed to the reactor with
  ``adoptStreamPort``. The service calls :meth:`ConnectivityCheck.sync` after
  every interface check: it binds when the address appears, re-binds when the
  interface is recreated (new index) and retries a failed bind on the next
  check.
* **Status** (:func:`status_site`): ``/metrics`` (Prometheus text),
  ``/healthz`` and ``/api/v1/status`` (what the worker holds per domain, see
  :mod:`wgkex.worker.status`) on ``worker_listen``, served by
  :class:`StatusListener`. They
  are a side job: when the address is taken (9101 is also the HAProxy
  exporter's port) or missing, the worker logs it, goes on installing keys
  and tries again every :data:`STATUS_RETRY_INTERVAL` seconds.

Neither site logs requests: thousands of routers check every minute.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorSocket, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.http import Request as HTTPRequest
from twisted.web.server import Request, Site

from wgkex.worker.metrics import WorkerMetrics
from wgkex.worker.watch import InterfaceState

#: ``IP_FREEBIND`` (Linux): bind before duplicate address detection has finished.
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

#: Seconds between tries to listen on ``worker_listen`` while it fails.
STATUS_RETRY_INTERVAL = 30.0


class QuietSite(Site):
    """A Site that writes no access log line per request (nor "starting factory" lines)."""

    noisy = False

    def log(self, request: HTTPRequest) -> None:
        pass


class _Ok(Resource):
    """200 for any path: all a router wants to know is that the gateway answers."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"OK\n"

    def render_POST(self, request: Request) -> bytes:
        return self.render_GET(request)


def connectivity_site() -> Site:
    """The site that answers the routers' connectivity check."""
    return QuietSite(_Ok())


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, metrics: WorkerMetrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self._metrics.render()


class _Json(Resource):
    """A JSON document made fresh for each GET."""

    isLeaf = True

    def __init__(self, document: Callable[[], Mapping[str, object]]) -> None:
        super().__init__()
        self._document = document

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self._document()).encode()


def status_site(
    metrics: WorkerMetrics,
    details: Callable[[], Mapping[str, object]],
    status: Callable[[], Mapping[str, object]] | None = None,
) -> Site:
    """``/metrics``, ``/healthz`` (200 while the process serves, with a few details) and ``/api/v1/status``."""
    root = Resource()
    root.putChild(b"metrics", _Metrics(metrics))
    root.putChild(b"healthz", _Json(lambda: {"status": "ok", **details()}))
    if status is not None:
        api = Resource()
        v1 = Resource()
        api.putChild(b"v1", v1)
        v1.putChild(b"status", _Json(status))
        root.putChild(b"api", api)
    return QuietSite(root)


class StatusListener(Service):
    """Serves ``site`` on the endpoint ``description``; a failing listen is logged and retried, never fatal.

    Listens in ``startService`` (not in ``privilegedStartService``, where a
    busy port would abort twistd's start with a traceback). The description is
    parsed here, when the tree is built (this opens nothing), so that a
    malformed one stops the process before any thread has started.
    """

    log = Logger()

    def __init__(
        self, reactor: IReactorTime, description: str, site: Site, retry_interval: float = STATUS_RETRY_INTERVAL
    ) -> None:
        self._reactor = reactor
        self._description = description
        self._endpoint = serverFromString(reactor, description)
        self._site = site
        self._retry_interval = retry_interval
        self._port: IListeningPort | None = None
        self._retry: IDelayedCall | None = None
        self._last_error: str | None = None

    def startService(self) -> None:
        super().startService()
        self._listen()

    def _listen(self) -> None:
        self._retry = None
        d: Deferred[IListeningPort] = self._endpoint.listen(self._site)
        d.addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        if not self.running:
            port.stopListening()
            return
        self._port = port
        if self._last_error is not None:
            self._last_error = None
            self.log.info("worker_listen ({where}): serving /metrics and /healthz now", where=self._description)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        error = failure.getErrorMessage().rstrip(".")
        if error != self._last_error:
            self._last_error = error
            self.log.error(
                "worker_listen ({where}): cannot serve /metrics and /healthz: {error}; the worker goes on"
                " without them and tries again every {interval:g} s (set worker_listen to a free"
                " address, or to off)",
                where=self._description,
                error=error,
                interval=self._retry_interval,
            )
        self._retry = self._reactor.callLater(self._retry_interval, self._listen)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening).addCallback(lambda _: None)


def listen_link_local(
    reactor: IReactorSocket, address: str, ifindex: int, port: int, factory: ServerFactory[Any], backlog: int = 1024
) -> IListeningPort:
    """Listen on ``[address%ifindex]:port`` (a scoped, e.g. link-local, IPv6 address)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        except OSError:
            pass
        sock.bind((address, port, 0, ifindex))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), socket.AF_INET6, factory)
    finally:
        # adoptStreamPort duplicated the descriptor.
        sock.close()


Listen = Callable[[str, int, int, Site], IListeningPort]


class ConnectivityCheck:
    """One listener per domain on its ``wg-<D>`` link-local address."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorSocket,
        port: int,
        interfaces: Mapping[str, str],
        listen: Listen | None = None,
    ) -> None:
        self._port = port
        self._interfaces = dict(interfaces)
        self._site = connectivity_site()
        self._listen: Listen = listen or (
            lambda address, ifindex, port, factory: listen_link_local(reactor, address, ifindex, port, factory)
        )
        #: domain -> ((ifindex, address), listening port or None while re-binding)
        self._bound: dict[str, tuple[tuple[int, str], IListeningPort | None]] = {}
        self._last_error: dict[str, str] = {}
        self._states: dict[str, InterfaceState] = {}
        self._stopped = False

    def bound(self, domain: str) -> tuple[int, str] | None:
        """``(ifindex, address)`` the check of ``domain`` listens on, or None."""
        entry = self._bound.get(domain)
        return entry[0] if entry is not None and entry[1] is not None else None

    def sync(self, states: Mapping[str, InterfaceState]) -> None:
        """Listen where each domain's interface state says; idempotent, called after every check."""
        if self._stopped:
            return
        self._states = dict(states)
        for domain, state in states.items():
            target = None
            if state.wg_index is not None and state.link_address is not None:
                target = (state.wg_index, state.link_address)
            entry = self._bound.get(domain)
            if entry is None:
                if target is not None:
                    self._bind(domain, target)
                continue
            current, port = entry
            if current == target or port is None:  # unchanged, or a re-bind is under way
                continue
            self._bound[domain] = (current, None)
            maybeDeferred(port.stopListening).addBoth(self._stopped_listening, domain)

    def _stopped_listening(self, _: object, domain: str) -> None:
        self._bound.pop(domain, None)
        self.sync(self._states)

    def _bind(self, domain: str, target: tuple[int, str]) -> None:
        ifindex, address = target
        wg = self._interfaces[domain]
        try:
            port = self._listen(address, ifindex, self._port, self._site)
        except OSError as exc:
            message = f"{exc.strerror or exc}"
            if self._last_error.get(domain) != message:
                self._last_error[domain] = message
                self.log.warn(
                    "Connectivity check cannot listen on [{address}%{wg}]:{port}: {error}; retrying",
                    address=address,
                    wg=wg,
                    port=self._port,
                    error=message,
                )
            return
        self._last_error.pop(domain, None)
        self._bound[domain] = (target, port)
        self.log.info(
            "Connectivity check listening on [{address}%{wg}]:{port}", address=address, wg=wg, port=self._port
        )

    def stop(self) -> Deferred[None]:
        """Close every listener."""
        self._stopped = True
        ports = [entry[1] for entry in self._bound.values() if entry[1] is not None]
        self._bound.clear()
        return DeferredList([maybeDeferred(p.stopListening) for p in ports], consumeErrors=True).addCallback(
            lambda _: None
        )
