"""Which MQTT servers to try, in order, and how log lines name them.

``mqtt.servers`` (or the original ``mqtt.broker_url`` / ``broker_port``) gives
one or more servers. :class:`ServerList` starts with the first; whenever an
attempt fails or an established connection is lost it moves on to the next,
round the list, so a client ends up on the first server that answers and
leaves a server that went away.
"""

from __future__ import annotations

from paho.mqtt.reasoncodes import ReasonCode

from wgkex.config import MqttConfig


def describe_server(settings: MqttConfig, host: str | None = None, port: int | None = None) -> str:
    """The server (``host``/``port``, else the first configured) as an operator would write it."""
    if host is None or port is None:
        host, port = settings.server_list()[0]
    if settings.transport == "unix":
        return f"unix socket {host}"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if settings.transport == "websockets":
        return f"{'wss' if settings.tls else 'ws'}://{host}:{port}/mqtt"
    return f"{host}:{port}{' (TLS)' if settings.tls else ''}"


class ServerList:
    """The configured servers and the one to try (or use) now."""

    def __init__(self, settings: MqttConfig) -> None:
        self._servers = settings.server_list()
        self._names = [describe_server(settings, host, port) for host, port in self._servers]
        self._index = 0

    @property
    def current(self) -> tuple[str, int]:
        """``(host, port)`` of the server to connect to (for unix sockets the host is the path)."""
        return self._servers[self._index]

    @property
    def name(self) -> str:
        """The current server, as log lines name it."""
        return self._names[self._index]

    @property
    def names(self) -> list[str]:
        """Every configured server, in order, as log lines name them."""
        return list(self._names)

    def advance(self) -> None:
        """Move on to the next server (round the list); a single server stays where it is."""
        self._index = (self._index + 1) % len(self._servers)


def disconnect_reason(reason: ReasonCode, keepalive: int) -> str:
    """Paho's reason for a lost connection, in words an operator understands."""
    name = str(reason)
    if name == "Keep alive timeout":
        return f"no answer from the server within the keepalive of {keepalive} s"
    if name == "Unspecified error":
        return "connection closed by the server or the network"
    return name
