"""Listening on a configured endpoint; a failure to listen stops the daemon with one line.

:class:`ListenService` is Twisted's stock
:class:`~twisted.application.internet.StreamServerEndpointService` with the
endpoint wrapped so that *every* failure to listen is turned into the daemon's
configuration error (file, key, problem; exit status 1), whether the endpoint
fails while the service starts (a TCP port in use, an address not on this
machine, a host name that does not resolve) or later, asynchronously (the stock
service would only log such a failure and the daemon would run without its
listener). It listens in ``privilegedStartService``, which twistd calls on the
whole tree before any ``startService``: a port that cannot be bound stops the
process before MQTT connects or threads start.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from wgkex.config import ConfigError
from wgkex.reactor import IReactor
from wgkex.startup import exit_at_start, exit_when_running

_BACKLOG_KINDS = ("tcp", "tcp6", "ssl", "unix")

_HINTS = {
    errno.EADDRINUSE: "another process already listens there",
    errno.EADDRNOTAVAIL: "the address is not on this machine",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE",
}


def with_backlog(description: str, backlog: int) -> str:
    """``description`` with ``backlog=N`` added for endpoint kinds that take one."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind not in _BACKLOG_KINDS or "backlog=" in description:
        return description
    return f"{description}:backlog={backlog}"


def listen_problem(failure: Failure, description: str) -> str:
    """Why listening failed, in words an operator can act on."""
    exc = failure.value
    if isinstance(exc, CannotListenError):
        reason = exc.socketError
        where = f"{exc.interface or '*'}:{exc.port}"
        if isinstance(reason, socket.gaierror):
            return f"cannot listen on {where}: the host name does not resolve ({reason.strerror})"
        if isinstance(reason, OSError) and reason.errno is not None:
            hint = _HINTS.get(reason.errno)
            text = reason.strerror or str(reason)
            return f"cannot listen on {where}: {text}" + (f" ({hint})" if hint else "")
        return f"cannot listen on {where}: {reason}"
    return f"cannot listen on {description!r}: {failure.getErrorMessage()}"


@implementer(IStreamServerEndpoint)
class _ReportingEndpoint:
    """An endpoint whose failures go to ``failed`` instead of down the Deferred chain."""

    def __init__(self, endpoint: IStreamServerEndpoint, failed: Callable[[Failure], None],
                 listening: Callable[[IListeningPort], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed
        self._listening = listening

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = self._endpoint.listen(factory)

        def ok(port: IListeningPort) -> IListeningPort:
            self._listening(port)
            return port

        def failed(failure: Failure) -> Failure | None:
            if failure.check(CancelledError):
                return failure
            self._failed(failure)
            return None  # reported; the stock service then has no port to stop

        return d.addCallbacks(ok, failed)


class ListenService(StreamServerEndpointService):
    """Listens on ``description`` (a Twisted endpoint string) with ``factory``.

    ``config_path`` and ``key`` name where the description came from, for the
    error line. ``reactor`` is the one the endpoint listens with and, after an
    asynchronous failure, the one that is stopped.
    """

    log = Logger()

    def __init__(self, reactor: IReactor, description: str, factory: IProtocolFactory, config_path: str, key: str,
                 name: str = "http") -> None:
        super().__init__(None, factory)
        self.setName(name)
        self._reactor = reactor
        self.description = description
        self.config_path = config_path
        self.key = key
        self.port: IListeningPort | None = None
        self._starting = False
        self._listen_called = False
        self._early: ConfigError | None = None

    def privilegedStartService(self) -> None:
        if self._listen_called:
            return
        self._listen_called = True
        try:
            endpoint = serverFromString(self._reactor, self.description)
        except Exception as exc:  # Twisted's parsers raise many kinds for a bad description
            exit_at_start(self._error(f"is not a usable endpoint description ({exc}): {self.description!r}"))
        self.endpoint = _ReportingEndpoint(endpoint, self._failed, self._listening)
        self._starting = True
        try:
            super().privilegedStartService()
        finally:
            self._starting = False
        if self._early is not None:
            exit_at_start(self._early)

    def _error(self, problem: str) -> ConfigError:
        return ConfigError(self.config_path, self.key, problem)

    def _failed(self, failure: Failure) -> None:
        error = self._error(listen_problem(failure, self.description))
        if self._starting:
            self._early = error  # raised by privilegedStartService, synchronously
        else:
            exit_when_running(self._reactor, error)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self.log.info("Listening on {address} ({key})", address=port.getHost(), key=self.key)

    def stopService(self) -> Deferred[None] | None:
        self.port = None
        if not self._listen_called:  # never started listening (the stock service would fail)
            self.running = False
            return None
        d: Deferred[None] = super().stopService()
        return d
