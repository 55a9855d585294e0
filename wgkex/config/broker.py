"""The broker's settings: the ``broker:`` section and ``broker_listen``."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from wgkex.config.endpoints import read_listen
from wgkex.config.reader import Reader, describe


@dataclass(frozen=True)
class BrokerConfig:
    """Settings only the broker reads."""

    #: Twisted server endpoint description, e.g. ``tcp:5000:interface=127.0.0.1``.
    listen: str = "tcp:5000:interface=127.0.0.1"
    backlog: int = 1024
    max_body_size: int = 4096
    #: Token bucket per client address: requests per second and burst.
    rate_limit: float = 10.0
    rate_burst: int = 200
    #: Addresses/networks whose ``X-Forwarded-For`` is believed.
    trusted_proxies: tuple[str, ...] = ()
    key_blocklist: str | None = None
    key_allowlist: str | None = None
    #: Seconds to wait for the MQTT server to acknowledge a key before answering anyway.
    publish_timeout: float = 5.0
    #: Seconds a request may take to arrive whole (headers and body) from its first byte.
    request_timeout: float = 20.0
    #: Seconds a connection may stay open with nothing to do.
    idle_timeout: float = 30.0
    #: Connections open at once from one client address (0: no limit).
    max_connections_per_address: int = 256
    #: Connections open at once in all (0: from the open-files limit, see wgkex.broker.service).
    max_connections: int = 0
    #: Where keys not yet acknowledged by the MQTT server are kept across restarts.
    state_dir: str = "/var/lib/wgkex"
    #: Seconds the keys acknowledged by the MQTT server are kept to re-publish for a worker
    #: back on the bus (an MQTT server that crashed may have lost them); 0: none kept.
    replay_window: float = 120.0
    #: Keys kept for that at most (32 bytes each).
    replay_limit: int = 100_000


def read_broker(top: Reader) -> BrokerConfig:
    """The broker's settings of the document read by ``top``."""
    b = top.section("broker")
    return BrokerConfig(
        listen=read_listen(top, "broker_listen", "127.0.0.1", 5000),
        backlog=b.integer("backlog", 1024, 1),
        max_body_size=b.integer("max_body_size", 4096, 64),
        rate_limit=b.number("rate_limit", 10.0, 0),
        rate_burst=b.integer("rate_burst", 200, 1),
        trusted_proxies=_networks(b, "trusted_proxies"),
        key_blocklist=b.opt_string("key_blocklist"),
        key_allowlist=b.opt_string("key_allowlist"),
        publish_timeout=b.number("publish_timeout", 5.0, 0),
        request_timeout=b.number("request_timeout", 20.0, 0),
        idle_timeout=b.number("idle_timeout", 30.0, 0),
        max_connections_per_address=b.integer("max_connections_per_address", 256, 0),
        max_connections=b.integer("max_connections", 0, 0),
        state_dir=_state_dir(b),
        replay_window=b.number("replay_window", 120.0, 0, positive=False),
        replay_limit=b.integer("replay_limit", 100_000, 0),
    )


def _state_dir(reader: Reader) -> str:
    """``broker.state_dir``: an absolute path that is a directory if it exists."""
    value = reader.data.get("state_dir", "/var/lib/wgkex")
    if not isinstance(value, str) or not value.strip():
        raise reader.fail("state_dir", f"must be a directory path (quoted), got {describe(value)}")
    if not os.path.isabs(value):
        raise reader.fail("state_dir", f"must be an absolute path, got {value!r}")
    if os.path.exists(value) and not os.path.isdir(value):
        raise reader.fail("state_dir", f"{value!r} exists and is not a directory")
    return value


def _networks(reader: Reader, name: str) -> tuple[str, ...]:
    values = reader.string_list(name)
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise reader.fail(name, f"{value!r} is not an IP address or network") from None
    return values
