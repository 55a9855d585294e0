"""Listening addresses (``broker_listen``, ``worker_listen``) as Twisted endpoint descriptions.

The original file format gives ``{host, port}``; this implementation also takes
``"host:port"`` and any Twisted server endpoint description (``tcp:``, ``ssl:``,
``unix:``, ...), which is checked here so that a bad one is a configuration
error at start rather than a failure when the listener binds.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping

from wgkex.config.reader import Reader, as_int, describe

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

#: Endpoint description prefixes taken as they are (after a check) rather than as host:port.
_ENDPOINT_TYPES = ("tcp", "tcp6", "ssl", "unix", "systemd", "tls")


def tcp_endpoint(host: str, port: int) -> str:
    """A Twisted TCP server endpoint description for ``host``/``port``.

    ``host`` is an IP address (IPv6 with or without brackets) or, as the
    original implementation allowed, a host name such as ``localhost``, which
    the listener resolves when it binds.
    """
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not _HOSTNAME.match(host):
            raise ValueError(f"must be an IP address or a host name, got {host!r}") from None
        return f"tcp:{port}:interface={host}"
    # Endpoint descriptions use ':' as separator, so IPv6 colons are escaped.
    escaped = str(address).replace(":", "\\:")
    return f"tcp:{port}:interface={escaped}"


def endpoint_problem(description: str) -> str | None:
    """Why Twisted cannot use ``description`` as a server endpoint, or None.

    Parsed against a reactor that listens nowhere, so nothing is opened; an
    ``ssl:`` description reads its certificate files here, which is what an
    operator wants to hear about at start.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), description)
    except Exception as exc:  # Twisted's parsers raise many kinds for a bad description
        detail = str(exc) or type(exc).__name__
        return f"is not a usable Twisted endpoint description ({detail}): {description!r}"
    return None


def read_listen(reader: Reader, name: str, default_host: str, default_port: int) -> str:
    """``broker_listen``/``worker_listen``: {host, port}, "host:port", or an endpoint string."""
    value = reader.data.get(name)
    if value is None:
        return tcp_endpoint(default_host, default_port)
    if isinstance(value, str):
        text = value.strip()
        if text.split(":", 1)[0] in _ENDPOINT_TYPES:
            problem = endpoint_problem(text)
            if problem is not None:
                raise reader.fail(name, problem)
            return text
        host, sep, port = text.rpartition(":")
        port_value = as_int(port) if sep else None
        if port_value is None or not 1 <= port_value <= 65535:
            raise reader.fail(name, f"must be host:port, {{host, port}} or an endpoint like tcp:5000, got {text!r}")
        try:
            return tcp_endpoint(host or default_host, port_value)
        except ValueError as exc:
            raise reader.fail(name, f"host {exc}") from None
    if isinstance(value, Mapping):
        sub = reader.section(name)
        listen_host = sub.string("host", default_host)
        listen_port = sub.integer("port", default_port, 1, 65535)
        try:
            return tcp_endpoint(listen_host, listen_port)
        except ValueError as exc:
            raise sub.fail("host", str(exc)) from None
    raise reader.fail(name, f"must be a mapping {{host, port}} or an endpoint string, got {describe(value)}")
