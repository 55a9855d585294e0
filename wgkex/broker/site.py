"""The twisted.web site of the broker: which connections it takes, and how it reads them.

:func:`make_site` builds a :class:`BrokerSite` that serves the API's resource
through two kinds of bounds:

- each connection is a :class:`~wgkex.broker.channel.BrokerChannel`
  (:mod:`wgkex.broker.channel`: pipelining, read deadlines, idle timeout,
  half-close, JSON 400 for what the HTTP parser refuses);
- each request is a :class:`~wgkex.broker.body_limit.LimitedRequest`
  (:mod:`wgkex.broker.body_limit`: the body in memory, 413 as soon as it is over
  ``broker.max_body_size``).

Form bodies are not parsed into ``request.args`` (Gluon sends JSON labelled
``application/x-www-form-urlencoded``): resources read ``request.content``.

The site itself counts connections: at most ``broker.max_connections_per_address``
at once from one address (new ones are closed at once), and at most
``max_connections`` in all: at that limit a new connection replaces one that
is waiting for a request (preferably one waiting :data:`REPLACE_AFTER` seconds or
more, of the address holding the most connections, the longest waiting), so file
descriptors never run out and fresh clients are served.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress
from twisted.web import server
from twisted.web.resource import IResource

from wgkex.broker.body_limit import DISCARD_LIMIT, LimitedRequestFactory
from wgkex.broker.channel import BrokerChannel

#: A connection must have waited this long (seconds) before a full site replaces it.
REPLACE_AFTER = 1.0


class BrokerSite(server.Site):
    """A Site speaking plain HTTP/1.1 through :class:`BrokerChannel`, without an access log.

    It also counts connections: per client address (``max_per_address``) and in
    all (``max_connections``, see the module docstring). One access log line per
    request at thousands of requests per second helps nobody; the metrics count
    requests by endpoint and status instead.
    """

    protocol = BrokerChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(self, *args: Any, request_timeout: float, max_per_address: int, max_connections: int,
                 **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.request_timeout = request_timeout
        self.max_per_address = max_per_address
        self.max_connections = max_connections
        self.per_address: Counter[str] = Counter()
        self._open: dict[BrokerChannel, str] = {}
        self.refused_connections = 0
        self.replaced_connections = 0
        self.timed_out_requests = 0

    def log(self, request: object) -> None:
        pass

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = str(getattr(addr, "host", "local"))
        if self.max_per_address and self.per_address[host] >= self.max_per_address:
            self.refused_connections += 1
            return None  # Twisted closes the socket at once
        if self.max_connections and len(self._open) >= self.max_connections:
            self._replace_one()
        channel = super().buildProtocol(addr)
        if isinstance(channel, BrokerChannel):
            channel.request_timeout = self.request_timeout
            channel.since = self.reactor.seconds()
            channel.ledger = self
            self._open[channel] = host
            self.per_address[host] += 1
        return channel

    def _replace_one(self) -> None:
        """Cut a connection waiting for a request, chosen so that normal clients are spared.

        First those that have waited :data:`REPLACE_AFTER` seconds or more (a client
        that has just connected is sending its request); among them, those of the
        address holding the most connections (a flood of many connections per address
        does not push out clients holding one); then the one waiting longest.
        """
        fresh = self.reactor.seconds() - REPLACE_AFTER
        idle = [c for c in self._open if not c.busy]
        if not idle:
            return
        victim = min(idle, key=lambda c: (c.since > fresh, -self.per_address[self._open[c]], c.since))
        self.replaced_connections += 1
        self.forget(victim)
        transport: Any = victim.transport
        if transport is not None:
            transport.abortConnection()

    # -- the channels' ledger (wgkex.broker.channel.Ledger) --------------------------------------

    def waiting(self, channel: BrokerChannel) -> None:
        """``channel`` has answered a request: it waits for the next one from now on."""
        channel.since = self.reactor.seconds()

    def timed_out(self, channel: BrokerChannel) -> None:
        """A request on ``channel`` did not arrive whole in time."""
        self.timed_out_requests += 1

    def forget(self, channel: BrokerChannel) -> None:
        """``channel`` is closed (or being cut): stop counting it."""
        host = self._open.pop(channel, None)
        if host is not None:
            self.per_address[host] -= 1
            if self.per_address[host] <= 0:
                del self.per_address[host]

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        return len(self._open)


def make_site(
    resource: IResource,
    max_body: int,
    reactor: Any = None,
    on_too_large: Callable[[bytes], None] | None = None,
    discard_limit: int = DISCARD_LIMIT,
    idle_timeout: float = 60.0,
    request_timeout: float = 20.0,
    max_per_address: int = 0,
    max_connections: int = 0,
) -> BrokerSite:
    """The broker's site: limited bodies in memory, no form parsing, JSON protocol errors.

    ``max_per_address`` and ``max_connections`` of 0 mean no limit.
    """
    return BrokerSite(
        resource,
        requestFactory=LimitedRequestFactory(max_body, discard_limit, on_too_large),
        parsePOSTFormSubmission=False,
        timeout=idle_timeout,
        reactor=reactor,
        request_timeout=request_timeout,
        max_per_address=max_per_address,
        max_connections=max_connections,
    )
