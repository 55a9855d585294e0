"""The rules for names, addresses and numbers that travel on the bus (and in the configuration).

Each ``*_problem`` function takes any value and returns why it breaks its rule,
or None: the configuration uses them to refuse a file, the codecs to refuse a
message, the encoders to refuse to publish.
"""

from __future__ import annotations

import ipaddress
import re

#: Longest DNS name (RFC 1123) and worker name.
MAX_NAME = 253
_WORKER_NAME = re.compile(r"[A-Za-z0-9._-]{1,253}", re.ASCII)
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.ASCII)
#: Longest text form of an IPv6 address (with an embedded IPv4 address).
_MAX_IPV6_TEXT = 45

#: The connected-peers value meaning "not eligible for this domain" (shutdown, interface missing).
NOT_ELIGIBLE = -1
MAX_CONNECTED_PEERS = 10_000_000


def worker_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a worker name on the bus (1-253 of ``A-Z a-z 0-9 . _ -``), or None."""
    if not isinstance(name, str):
        return "a worker name must be a string"
    if _WORKER_NAME.fullmatch(name) is None:
        return "a worker name must be 1 to 253 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
    return None


def host_problem(host: object) -> str | None:
    """Why ``host`` is neither a DNS host name (RFC 1123) nor an IP address literal, or None."""
    if not isinstance(host, str):
        return "must be a string"
    if not host or len(host) > MAX_NAME:
        return f"must be a host name or IP address of 1 to {MAX_NAME} characters"
    if "%" not in host:
        try:
            ipaddress.ip_address(host)
            return None
        except ValueError:
            pass
    if _HOST_NAME.fullmatch(host) is not None and not host.rsplit(".", 1)[-1].isdigit():
        return None
    return "must be a DNS host name (letters, digits, '-' in dot-separated labels) or an IP address without zone"


def link_address_problem(address: object) -> str | None:
    """Why ``address`` is not an IPv6 link-local address (fe80::/10) without zone, or None."""
    if not isinstance(address, str):
        return "must be a string"
    if len(address) > _MAX_IPV6_TEXT or "%" in address:
        return "must be an IPv6 link-local address without zone"
    try:
        parsed = ipaddress.IPv6Address(address)
    except ValueError:
        return "must be an IPv6 link-local address without zone"
    if not parsed.is_link_local:
        return "must be an IPv6 link-local address (fe80::/10)"
    return None


def port_problem(port: object) -> str | None:
    """Why ``port`` is not an integer in 1..65535 (booleans and strings are not), or None."""
    if isinstance(port, bool) or not isinstance(port, int):
        return "must be an integer"
    if not 1 <= port <= 65535:
        return "must be in 1..65535"
    return None
