"""The wgkex configuration file: YAML in, typed immutable objects out.

A file written for the original wgkex (keys ``domains``, ``domain_prefixes``,
``workers``, ``externalName``, ``mqtt``, ``broker_listen``, ``logging_config``)
loads unchanged; settings new in this implementation have defaults and are
documented in ``wgkex.yaml.example``.

Everything here is pure: :func:`parse_config` turns an already-loaded mapping
into a :class:`Config`, :func:`load_config` reads and parses a file. Any
problem raises :class:`ConfigError`, whose text is one line naming the file,
the key and what is wrong, so that an operator can fix it at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import yaml

from wgkex.contract import host_problem, worker_name_problem
from wgkex.keys import key_problem

DEFAULT_PATH = "/etc/wgkex.yaml"
ENV_VAR = "WGKEX_CONFIG_FILE"

#: Linux interface names are at most 15 bytes (IFNAMSIZ minus the NUL).
IFNAMSIZ = 15
#: Characters a domain cannot hold: MQTT topic separators and wildcards, and what
#: Linux refuses in interface names (besides whitespace).
_NOT_IN_DOMAINS = frozenset("/+#:\0")

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
BACKENDS = ("auto", "kernel", "uapi")
TRANSPORTS = ("tcp", "websockets", "unix")


class ConfigError(Exception):
    """The configuration is unusable. ``str()`` is one line: file, key, problem."""

    def __init__(self, path: str, key: str, problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(f"{where}{problem}")


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


@dataclass(frozen=True)
class WorkerConfig:
    """Settings only the worker reads."""

    #: This worker's name on the bus (``worker_name``, else the host name).
    name: str = ""
    #: What routers are told to connect to (``externalName``, else the host name).
    external_name: str = ""
    #: Endpoint description for /metrics and /healthz, or None for none.
    listen: str | None = "tcp:9101:interface=127.0.0.1"
    connectivity_check: bool = True
    connectivity_check_port: int = 80
    wireguard_backend: str = "auto"
    uapi_socket_dir: str = "/var/run/wireguard"
    metrics_interval: float = 60.0
    cleanup_interval: float = 3600.0
    peer_timeout: float = 3 * 3600.0
    keep_keys: frozenset[str] = frozenset()
    #: Most keys applied in one batch (the rest wait for the next batch).
    max_batch: int = 10_000


@dataclass(frozen=True)
class Config:
    """The whole configuration, as both roles see it."""

    path: str
    domains: tuple[str, ...]
    domain_prefixes: tuple[str, ...]
    #: Configured worker weights for v2 selection (unconfigured workers weigh 1).
    workers: Mapping[str, int] = field(default_factory=dict)
    mqtt: MqttConfig = MqttConfig()
    broker: BrokerConfig = BrokerConfig()
    worker: WorkerConfig = WorkerConfig()
    log_level: str = "info"
    logging_config: Mapping[str, Any] | None = None

    def short_name(self, domain: str) -> str:
        """The domain with its first matching prefix stripped: ``ffmuc_welt`` -> ``welt``."""
        for prefix in self.domain_prefixes:
            if domain.startswith(prefix):
                return domain[len(prefix):]
        raise KeyError(domain)

    def wg_interface(self, domain: str) -> str:
        """The WireGuard interface of ``domain``: ``wg-<short name>``."""
        return "wg-" + self.short_name(domain)

    def vx_interface(self, domain: str) -> str:
        """The VXLAN interface of ``domain``: ``vx-<short name>``."""
        return "vx-" + self.short_name(domain)

    def weight(self, worker: str) -> int:
        """The configured weight of ``worker`` (1 when unconfigured)."""
        return self.workers.get(worker, 1)


T = TypeVar("T")


class _Reader:
    """Typed access to one mapping of the YAML document, with error context."""

    def __init__(self, path: str, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), problem)

    def section(self, name: str) -> _Reader:
        value = self.data.get(name)
        if value is None:
            return _Reader(self.path, {}, self.key(name) + ".")
        if not isinstance(value, Mapping):
            raise self.fail(name, f"must be a mapping, got {_describe(value)}")
        return _Reader(self.path, value, self.key(name) + ".")

    def get(self, name: str, kind: str, check: Callable[[Any], T | None], default: T) -> T:
        """The value of ``name`` converted by ``check`` (None from check: wrong type)."""
        if name not in self.data or self.data[name] is None:
            return default
        value = self.data[name]
        converted = check(value)
        if converted is None:
            raise self.fail(name, f"must be {kind}, got {_describe(value, secret=is_secret(name))}")
        return converted

    def string(self, name: str, default: str) -> str:
        return self._string(name, default)

    def opt_string(self, name: str) -> str | None:
        return self._string(name, None)

    def _string(self, name: str, default: T) -> str | T:
        """A string setting; anything else YAML made of the text is refused (see :data:`QUOTE_HINT`)."""
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            if isinstance(value, (bool, int, float)):
                raise self.fail(name, f"must be a string, got {_describe(value, secret=is_secret(name))}; {QUOTE_HINT}")
            raise self.fail(name, f"must be a string, got {_describe(value, secret=is_secret(name))}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return self.get(name, "true or false", _as_bool, default)

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.get(name, "an integer", _as_int, default)
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise self.fail(name, f"must be an integer in {bound}, got {value}")
        return value

    def number(self, name: str, default: float, low: float, positive: bool = True) -> float:
        value = self.get(name, "a number", _as_float, default)
        if value < low or (positive and value <= 0):
            raise self.fail(name, f"must be a number greater than {'0' if positive else low}, got {value}")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(name, default).lower()
        if value not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def string_list(self, name: str) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(name, f"must be a list of non-empty strings, got {_describe(value)}")
        return tuple(value)


#: The fix for a string setting that YAML read as a number or boolean (PyYAML is YAML 1.1).
QUOTE_HINT = (
    "quote the value in the file, e.g. \"0123\" (unquoted, YAML reads 0123, 1_000, 12:30"
    " as numbers and yes/no/on/off as booleans)"
)

#: Words in a setting's name that mark its value as secret: errors name its type, never its value.
_SECRET_WORDS = ("password", "secret", "token")


def is_secret(name: str) -> bool:
    """True when the setting ``name`` holds a secret whose value must never be printed."""
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _describe(value: object, secret: bool = False) -> str:
    """``value``'s type and (unless ``secret``) a short repr of it, for error lines."""
    if secret:
        return f"a value of type {type(value).__name__} (not shown: it is secret)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _as_bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
        return value.lower() in ("true", "yes", "on")
    return None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _as_float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _endpoint(host: str, port: int) -> str:
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


def _endpoint_problem(description: str) -> str | None:
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


def _listen(reader: _Reader, name: str, default_host: str, default_port: int) -> str:
    """``broker_listen``/``worker_listen``: {host, port}, "host:port", or an endpoint string."""
    value = reader.data.get(name)
    if value is None:
        return _endpoint(default_host, default_port)
    if isinstance(value, str):
        text = value.strip()
        if text.split(":", 1)[0] in ("tcp", "tcp6", "ssl", "unix", "systemd", "tls"):
            problem = _endpoint_problem(text)
            if problem is not None:
                raise reader.fail(name, problem)
            return text
        host, sep, port = text.rpartition(":")
        port_value = _as_int(port) if sep else None
        if port_value is None or not 1 <= port_value <= 65535:
            raise reader.fail(name, f"must be host:port, {{host, port}} or an endpoint like tcp:5000, got {text!r}")
        try:
            return _endpoint(host or default_host, port_value)
        except ValueError as exc:
            raise reader.fail(name, f"host {exc}") from None
    if isinstance(value, Mapping):
        sub = reader.section(name)
        listen_host = sub.string("host", default_host)
        listen_port = sub.integer("port", default_port, 1, 65535)
        try:
            return _endpoint(listen_host, listen_port)
        except ValueError as exc:
            raise sub.fail("host", str(exc)) from None
    raise reader.fail(name, f"must be a mapping {{host, port}} or an endpoint string, got {_describe(value)}")


def _read_key_list(reader: _Reader, name: str) -> frozenset[str]:
    keys = reader.string_list(name)
    for key in keys:
        problem = key_problem(key)
        if problem is not None:
            raise reader.fail(name, f"{key!r}: {problem}")
    return frozenset(keys)


def parse_config(
    data: object, path: str = "<config>", hostname: Callable[[], str] = socket.gethostname
) -> Config:
    """Validate a loaded YAML document and build a :class:`Config` from it."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, "", f"must be a YAML mapping at the top level, got {_describe(data)}")
    top = _Reader(path, data)

    domains = top.string_list("domains")
    if not domains:
        raise top.fail("domains", "must list at least one domain")
    prefixes = top.string_list("domain_prefixes") or top.string_list("domain_prefix")
    if not prefixes:
        raise top.fail("domain_prefixes", "must list at least one prefix (e.g. ffmuc_)")

    short: dict[str, str] = {}
    for domain in domains:
        prefix = next((p for p in prefixes if domain.startswith(p)), None)
        if prefix is None:
            raise top.fail("domains", f"domain {domain!r} starts with none of domain_prefixes {list(prefixes)}")
        name = domain[len(prefix):]
        if not name:
            raise top.fail("domains", f"domain {domain!r} is only its prefix; nothing is left for an interface name")
        if any(c in _NOT_IN_DOMAINS or c.isspace() for c in domain):
            # The domain is an MQTT topic level and part of the wg-/vx- interface names.
            raise top.fail(
                "domains",
                f"domain {domain!r} may not contain '/', '+', '#', ':' or whitespace"
                " (it is an MQTT topic level and part of interface names)",
            )
        if name in short:
            raise top.fail("domains", f"domains {short[name]!r} and {domain!r} both strip to {name!r}")
        if len(("wg-" + name).encode()) > IFNAMSIZ:
            raise top.fail(
                "domains",
                f"interface name 'wg-{name}' for domain {domain!r} is longer than {IFNAMSIZ} bytes",
            )
        short[name] = domain

    workers_raw = data.get("workers") or {}
    if not isinstance(workers_raw, Mapping):
        raise top.fail("workers", f"must be a mapping of worker name to {{weight: N}}, got {_describe(workers_raw)}")
    workers: dict[str, int] = {}
    workers_reader = top.section("workers")
    for wname, entry in workers_raw.items():
        if not isinstance(wname, str) or not wname:
            raise top.fail("workers", f"worker names must be non-empty strings, got {_describe(wname)}")
        if entry is None:
            workers[wname] = 1
            continue
        if not isinstance(entry, Mapping):
            raise workers_reader.fail(wname, f"must be a mapping like {{weight: 30}}, got {_describe(entry)}")
        workers[wname] = workers_reader.section(wname).integer("weight", 1, 0)

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

    b = top.section("broker")
    broker = BrokerConfig(
        listen=_listen(top, "broker_listen", "127.0.0.1", 5000),
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
    )

    host = hostname()
    worker_listen: str | None
    if "worker_listen" in data and data["worker_listen"] in (None, False, "", "off", "none"):
        worker_listen = None
    else:
        worker_listen = _listen(top, "worker_listen", "127.0.0.1", 9101)
    worker = WorkerConfig(
        name=top.string("worker_name", host),
        external_name=top.string("externalName", host),
        listen=worker_listen,
        connectivity_check=top.boolean("connectivity_check", True),
        connectivity_check_port=top.integer("connectivity_check_port", 80, 1, 65535),
        wireguard_backend=top.choice("wireguard_backend", "auto", BACKENDS),
        uapi_socket_dir=top.string("uapi_socket_dir", "/var/run/wireguard"),
        metrics_interval=top.number("metrics_interval", 60.0, 0),
        cleanup_interval=top.number("cleanup_interval", 3600.0, 0),
        peer_timeout=top.number("peer_timeout", 3 * 3600.0, 0),
        keep_keys=_read_key_list(top, "keep_keys"),
        max_batch=top.integer("max_batch", 10_000, 1),
    )
    # Both end up on the bus, where brokers refuse what breaks the wire contract.
    problem = worker_name_problem(worker.name)
    if problem is not None:
        source = "" if "worker_name" in data else " (the host name; set worker_name)"
        raise top.fail("worker_name", f"{problem}, got {worker.name!r}{source}")
    if data.get("externalName") is not None:
        # The host-name default is checked by the worker before it publishes (brokers
        # read this file too, and their host name need not be a DNS name).
        problem = host_problem(worker.external_name)
        if problem is not None:
            raise top.fail("externalName", f"{problem}, got {worker.external_name!r}")

    logging_config = data.get("logging_config")
    if logging_config is not None and not isinstance(logging_config, Mapping):
        raise top.fail("logging_config", f"must be a logging dictConfig mapping, got {_describe(logging_config)}")

    return Config(
        path=path,
        domains=domains,
        domain_prefixes=prefixes,
        workers=workers,
        mqtt=mqtt,
        broker=broker,
        worker=worker,
        log_level=top.choice("log_level", "info", LOG_LEVELS),
        logging_config=logging_config,
    )


def _servers(reader: _Reader, default_port: int) -> tuple[tuple[str, int], ...]:
    """``mqtt.servers``: ``[{host, port}, ...]`` to fail over between, in order (port: ``broker_port``)."""
    value = reader.data.get("servers")
    if value is None:
        return ()
    example = "{host: mq1.example.net, port: 1883}"
    if not isinstance(value, list) or not value:
        raise reader.fail("servers", f"must be a non-empty list of mappings like {example}, got {_describe(value)}")
    servers = []
    for i, entry in enumerate(value):
        name = f"servers[{i}]"
        if not isinstance(entry, Mapping):
            raise reader.fail(name, f"must be a mapping like {example}, got {_describe(entry)}")
        unknown = sorted(str(k) for k in entry if k not in ("host", "port"))
        if unknown:
            raise reader.fail(name, f"unknown key {unknown[0]!r}: a server has only host and port")
        item = _Reader(reader.path, entry, reader.key(name) + ".")
        host = entry.get("host")
        if not isinstance(host, str) or not host.strip():
            raise item.fail("host", f"must be the server's host name, address or socket path (quoted), got {_describe(host)}")
        servers.append((host.strip(), item.integer("port", default_port, 1, 65535)))
    return tuple(servers)


def _state_dir(reader: _Reader) -> str:
    """``broker.state_dir``: an absolute path that is a directory if it exists."""
    value = reader.data.get("state_dir", "/var/lib/wgkex")
    if not isinstance(value, str) or not value.strip():
        raise reader.fail("state_dir", f"must be a directory path (quoted), got {_describe(value)}")
    if not os.path.isabs(value):
        raise reader.fail("state_dir", f"must be an absolute path, got {value!r}")
    if os.path.exists(value) and not os.path.isdir(value):
        raise reader.fail("state_dir", f"{value!r} exists and is not a directory")
    return value


def _networks(reader: _Reader, name: str) -> tuple[str, ...]:
    values = reader.string_list(name)
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise reader.fail(name, f"{value!r} is not an IP address or network") from None
    return values


def config_path(option: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """Where the configuration lives: ``--config``, else ``$WGKEX_CONFIG_FILE``, else /etc."""
    return option or environ.get(ENV_VAR) or DEFAULT_PATH


def load_config(path: str, hostname: Callable[[], str] = socket.gethostname) -> Config:
    """Read, parse and validate the configuration file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "", "configuration file not found (give one with --config or $WGKEX_CONFIG_FILE)") from None
    except PermissionError:
        raise ConfigError(path, "", "configuration file is not readable by this user") from None
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a configuration file") from None
    except UnicodeDecodeError:
        raise ConfigError(path, "", "configuration file is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read configuration file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(path, "", f"YAML syntax error at {where}{problem}") from None
    return parse_config(data, path, hostname)
