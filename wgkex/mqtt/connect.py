"""Connecting: the blocking attempt in a thread, then the next one after a backoff delay.

Paho's ``reconnect()`` blocks (DNS, TCP connect, TLS handshake, websocket
upgrade), so :class:`Connector` runs it in a one-thread pool it owns; while that
thread works, the reactor thread does not touch the client. A failed attempt, or
a lost connection reported by the service, schedules the next attempt on the
next server of the :class:`~wgkex.mqtt.servers.ServerList` after
:meth:`Backoff.next <wgkex.mqtt.backoff.Backoff.next>` seconds, forever, until
:meth:`Connector.stop`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from wgkex.mqtt.backoff import Backoff
from wgkex.mqtt.servers import ServerList
from wgkex.reactor import IReactor

#: ``opened(client, sock)``: an attempt opened a socket and queued CONNECT.
Opened = Callable[[paho.Client, Any], None]


class Connector:
    """Connect attempts for one client: one at a time, in a thread, with backoff between them."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactor,
        servers: ServerList,
        backoff: Backoff,
        keepalive: int,
        opened: Opened,
        make_pool: Callable[[], ThreadPool],
    ) -> None:
        self._reactor = reactor
        self.servers = servers
        self.backoff = backoff
        self._keepalive = keepalive
        self._opened = opened
        self._make_pool = make_pool
        self._client: paho.Client | None = None
        self._pool: ThreadPool | None = None
        self._retry: IDelayedCall | None = None
        self._waiters: list[Deferred[None]] = []
        #: True while ``reconnect()`` runs in the pool (the client belongs to that thread).
        self.attempting = False

    def start(self, client: paho.Client) -> None:
        """Start the pool and the first attempt with ``client``."""
        self._client = client
        self._pool = self._make_pool()
        self._pool.start()
        self.connect()

    def connect(self) -> None:
        """Attempt to connect to the current server now."""
        self._retry = None
        client, pool = self._client, self._pool
        if client is None or pool is None:
            return
        host, port = self.servers.current
        self.log.debug("MQTT connecting to {server}", server=self.servers.name)
        # Only records where to connect; the blocking part is reconnect(), in the pool.
        client.connect_async(host, port, self._keepalive)
        self.attempting = True
        d = deferToThreadPool(self._reactor, pool, client.reconnect)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(client,))

    def retry_later(self, what: str) -> None:
        """Log ``what`` happened; attempt again on the next server after the backoff delay."""
        if self._client is None or (self._retry is not None and self._retry.active()):
            return
        self.servers.advance()
        delay = self.backoff.next()
        self.log.warn("MQTT {what}; reconnecting in {delay:.1f} s", what=what, delay=delay)
        self._retry = self._reactor.callLater(delay, self.connect)

    def settled(self) -> Deferred[None]:
        """Fires once no attempt is running (at once if none is)."""
        d: Deferred[None] = Deferred()
        if self.attempting:
            self._waiters.append(d)
        else:
            d.callback(None)
        return d

    def stop(self) -> None:
        """No more attempts: cancel the next one (one running still finishes, see :meth:`settled`)."""
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._client = None

    def close(self) -> None:
        """Stop the pool (after :meth:`stop` and :meth:`settled`)."""
        self.stop()
        if self._pool is not None:
            self._pool.stop()
        self._pool = None

    def _sent(self, rc: MQTTErrorCode, client: paho.Client) -> None:
        """Back on the reactor: the socket is open and CONNECT is queued; CONNACK comes later."""
        self.attempting = False
        sock = client.socket()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or sock is None:
            self.retry_later(f"connection to {self.servers.name} failed ({paho.error_string(rc)})")
        else:
            self._opened(client, sock)
        self._over()

    def _failed(self, failure: Failure) -> None:
        self.attempting = False
        exc = failure.value
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.retry_later(f"connection to {self.servers.name} failed ({reason})")
        self._over()

    def _over(self) -> None:
        self.attempting = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
