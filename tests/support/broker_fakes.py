"""Fakes and builders shared by the broker's unit tests (no tests in here).

:class:`Broker` builds the API on :class:`tests.support.bus.FakeBus` (shared
with the worker's tests), connected and holding publishes until the test
calls :meth:`~tests.support.bus.FakeBus.ack`, with a queue of
:data:`QUEUE_LIMIT` while disconnected; messages reach subscribers with
:meth:`~tests.support.bus.FakeBus.deliver`.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.server import Site

from tests.support.bus import FakeBus
from wgkex.broker.api import BrokerApi
from wgkex.broker.keylists import KeyLists
from wgkex.broker.metrics import BrokerMetrics
from wgkex.broker.ratelimit import RateLimiter
from wgkex.broker.site import make_site
from wgkex.broker.workers import WorkerPicture, WorkerTracker
from wgkex.config import Config, parse_config

KEY = "o52Ge+Rpj4CUSitVag9mS7pSXUesNM0ESnvj/wwehkg="
KEY2 = "gP3VJnTTvnQut+z4O+m0N9RgMyXbgyUbUkF3E3TKX2w="
GW_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GW_KEY2 = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="

#: Publishes the fake bus keeps while disconnected (the broker's mqtt.queue_limit in these tests).
QUEUE_LIMIT = 10

#: The headers Gluon's checkuplink sends (uclient-fetch; no JSON content type).
GLUON_HEADERS = {
    b"Content-Type": [b"application/x-www-form-urlencoded"],
    b"User-Agent": [b"gluon/2023.2.3"],
    b"X-Gluon-Version": [b"v2023.2.3"],
    b"X-Board-Name": [b"tplink,archer-c7-v2"],
    b"X-Firmware-Version": [b"v2023.2.3+ffmuc"],
}


def make_config(**overrides: Any) -> Config:
    data: dict[str, Any] = {
        "domains": ["ffmuc_welt", "ffmuc_muc"],
        "domain_prefixes": ["ffmuc_"],
        "workers": {"gw-a": {"weight": 3}, "gw-b": {"weight": 1}},
        "broker": {},
    }
    broker = overrides.pop("broker", {})
    data["broker"].update(broker)
    data.update(overrides)
    return parse_config(data, "test.yaml", hostname=lambda: "testhost")


def endpoint_data(address: str, port: int = 51820, key: str = GW_KEY, link: str = "fe80::1") -> str:
    return json.dumps({"ExternalAddress": address, "Port": port, "PublicKey": key, "LinkAddress": link})


class Broker:
    """An API with fakes around it, and a StubTreq to talk to it."""

    def __init__(self, connected: bool = True, lists: KeyLists | None = None, **config: Any) -> None:
        self.config = make_config(**config)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.bus = FakeBus(connected=connected, acks=False, queue_limit=QUEUE_LIMIT)
        self.picture = WorkerPicture(self.config.domains, self.config.weight, self.clock)
        self.metrics = BrokerMetrics(self.picture, lambda: self.bus, process=False)
        self.tracker = WorkerTracker(self.picture, self.clock, on_invalid=self.metrics.count_bus_invalid)
        self.tracker.subscribe(self.bus)
        self.lists = lists or KeyLists(None, None)
        b = self.config.broker
        self.limiter = RateLimiter(b.rate_limit, b.rate_burst, self.clock)
        self.api = BrokerApi(self.config, self.bus, self.picture, self.lists, self.limiter, self.metrics, self.clock)
        # StubTreq's request methods are attached at run time: typed as Any.
        self.treq: Any = StubTreq(self.api.resource())
        # Serve through the broker's own site (body limit, no form parsing, JSON protocol
        # errors) rather than the plain Site StubTreq builds. treq offers no hook for
        # this; fail loudly if its internals move.
        agent = self.treq._agent
        assert isinstance(agent._serverFactory, Site), "treq internals changed"
        agent._serverFactory = make_site(self.api.resource(), b.max_body_size, agent._memoryReactor)

    def worker(self, name: str, domain: str = "ffmuc_welt", peers: int = 0, address: str | None = None,
               online: bool = True, key: str = GW_KEY, port: int = 51820, link: str = "fe80::1") -> None:
        """Publish a fake worker's retained status, data and metric."""
        self.bus.deliver(f"wireguard-worker/{name}/status", "1" if online else "0")
        self.bus.deliver(f"wireguard-worker/{name}/{domain}/data",
                         endpoint_data(address or f"{name}.example.net", port, key, link))
        self.bus.deliver(f"wireguard-metrics/{domain}/{name}/connected_peers", str(peers))
