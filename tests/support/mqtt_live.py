"""Helpers for MqttService's integration tests against a real mosquitto on the real reactor.

Where a test must cut one client's connection without touching the server, the
service talks to mosquitto through :class:`CuttableProxy`, a port forwarder in
the test that can abort its connections (both directions reset, no DISCONNECT)
and stop or resume listening. Independent observers are plain paho clients on
their own network thread (:class:`PahoWatcher`). Waiting is by polling with
deadlines (:func:`until`), never sleeps; :func:`deferred_test` runs a coroutine
test method as a Deferred.
"""

from __future__ import annotations

import functools
import threading
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import connectionDone
from twisted.internet.task import deferLater
from twisted.protocols.portforward import ProxyFactory, ProxyServer
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase


reactor: Any = _reactor


def deferred_test(f: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred[None]]:
    """Let trial run an ``async def`` test method."""

    @functools.wraps(f)
    def wrapper(self: TestCase) -> Deferred[None]:
        return Deferred.fromCoroutine(f(self))

    return wrapper


async def until(predicate: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` on the reactor until it is true; fail after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class _TrackedProxyServer(ProxyServer):
    noisy = False

    def connectionMade(self) -> None:
        self.factory.live.add(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.live.discard(self)  # type: ignore[attr-defined]
        super().connectionLost(reason)


class CuttableProxy:
    """A TCP forwarder to mosquitto whose connections the test can cut like a failing network."""

    def __init__(self, testcase: TestCase, target_port: int) -> None:
        self.factory = ProxyFactory("127.0.0.1", target_port)
        self.factory.protocol = _TrackedProxyServer
        self.factory.noisy = False
        self.factory.live = set()  # type: ignore[attr-defined]
        self.listening: IListeningPort | None = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        assert self.listening is not None
        self.port: int = self.listening.getHost().port
        testcase.addCleanup(self.close)

    def cut(self) -> int:
        """Abort every forwarded connection, both sides, without a goodbye; return how many."""
        live = list(self.factory.live)  # type: ignore[attr-defined]
        for server in live:
            if server.peer is not None:
                server.peer.transport.abortConnection()
            server.transport.abortConnection()
        return len(live)

    def freeze(self) -> None:
        """Make every forwarded connection go silent, like a dead NAT entry: nothing is relayed,
        nothing is closed, neither side hears from the other again."""
        for server in list(self.factory.live):  # type: ignore[attr-defined]
            client, server.peer = server.peer, None
            server.transport.pauseProducing()
            if client is not None:
                client.peer = None
                client.transport.pauseProducing()

    async def close(self) -> None:
        """Stop accepting and cut what is open (the client's reconnects are refused)."""
        self.cut()
        if self.listening is not None:
            port, self.listening = self.listening, None
            await maybeDeferred(port.stopListening)

    def resume(self) -> None:
        """Accept connections again, on the same port."""
        self.listening = reactor.listenTCP(self.port, self.factory, interface="127.0.0.1")


class PahoWatcher:
    """An independent subscriber: a plain paho client with its own network thread."""

    def __init__(self, testcase: TestCase, port: int, topic_filter: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=unique("watcher"))
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic_filter, 1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        testcase.addCleanup(self.stop)

    def payloads(self) -> list[bytes]:
        return [payload for _, payload, _ in list(self.messages)]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
