"""The ``mqtt:`` section: how both roles reach the MQTT server(s)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from wgkex.config.reader import Reader, describe

TRANSPORTS = ("tcp", "websockets", "unix")


@dataclass(frozen=True)
class MqttConfig:
    """How to reach the MQTT server (``mqtt:`` in the file)."""

    broker_url: str = "localhost"
    broker_port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive: int = 5
    tls: bool = False
    #: CA bundle to verify the server with when ``tls`` is on (None: system CAs).
    ca_file: str | None = None
    #: ``tcp``, ``websockets`` or ``unix`` (then ``broker_url`` is the socket path).
    transport: str = "tcp"
    #: Fixed client id; None lets each role choose (the worker uses its name).
    client_id: str | None = None
    #: Upper bound of the reconnect backoff, seconds.
    reconnect_max_delay: float = 30.0
    #: Publishes kept while disconnected; beyond this ``publish`` refuses.
    queue_limit: int = 10_000
    #: ``mqtt.servers``: several ``(host, port)`` to fail over between, in order; empty means
    #: the one server ``broker_url`` / ``broker_port``.
    servers: tuple[tuple[str, int], ...] = ()

    def server_list(self) -> tuple[tuple[str, int], ...]:
        """The servers to try, in order (``servers``, else ``broker_url``/``broker_port``)."""
        return self.servers or ((self.broker_url, self.broker_port),)


def read_mqtt(top: Reader) -> MqttConfig:
    """The ``mqtt:`` section of the document read by ``top``."""
    m = top.section("mqtt")
    transport = m.choice("transport", "tcp", TRANSPORTS)
    broker_port = m.integer("broker_port", 8883 if m.boolean("tls", False) else 1883, 1, 65535)
    mqtt = MqttConfig(
        broker_url=m.string("broker_url", "localhost"),
        broker_port=broker_port,
        servers=_servers(m, broker_port),
        username=m.opt_string("username"),
        password=m.opt_string("password"),
        keepalive=m.integer("keepalive", 5, 1, 65535),
        tls=m.boolean("tls", False),
        ca_file=m.opt_string("ca_file"),
        transport=transport,
        client_id=m.opt_string("client_id"),
        reconnect_max_delay=m.number("reconnect_max_delay", 30.0, 0),
        queue_limit=m.integer("queue_limit", 10_000, 0),
    )
    if mqtt.ca_file is not None and not os.path.isfile(mqtt.ca_file):
        raise m.fail("ca_file", f"file {mqtt.ca_file!r} does not exist")
    return mqtt


def _servers(reader: Reader, default_port: int) -> tuple[tuple[str, int], ...]:
    """``mqtt.servers``: ``[{host, port}, ...]`` to fail over between, in order (port: ``broker_port``)."""
    value = reader.data.get("servers")
    if value is None:
        return ()
    example = "{host: mq1.example.net, port: 1883}"
    if not isinstance(value, list) or not value:
        raise reader.fail("servers", f"must be a non-empty list of mappings like {example}, got {describe(value)}")
    servers = []
    for i, entry in enumerate(value):
        name = f"servers[{i}]"
        if not isinstance(entry, Mapping):
            raise reader.fail(name, f"must be a mapping like {example}, got {describe(entry)}")
        unknown = sorted(str(k) for k in entry if k not in ("host", "port"))
        if unknown:
            raise reader.fail(name, f"unknown key {unknown[0]!r}: a server has only host and port")
        item = Reader(reader.path, entry, reader.key(name) + ".")
        host = entry.get("host")
        if not isinstance(host, str) or not host.strip():
            raise item.fail("host", f"must be the server's host name, address or socket path (quoted), got {describe(host)}")
        servers.append((host.strip(), item.integer("port", default_port, 1, 65535)))
    return tuple(servers)
