"""The configuration file as a whole: YAML in, a typed immutable :class:`Config` out.

:func:`load_config` reads a file and :func:`parse_config` turns the loaded
mapping into a :class:`Config`: the domains and worker weights both roles
share are read here, each role's own settings by its section module
(:mod:`wgkex.config.mqtt`, :mod:`wgkex.config.broker`, :mod:`wgkex.config.worker`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from wgkex.config.broker import BrokerConfig, read_broker
from wgkex.config.mqtt import MqttConfig, read_mqtt
from wgkex.config.reader import ConfigError, Reader, describe
from wgkex.config.worker import WorkerConfig, read_worker

DEFAULT_PATH = "/etc/wgkex.yaml"
ENV_VAR = "WGKEX_CONFIG_FILE"

#: Linux interface names are at most 15 bytes (IFNAMSIZ minus the NUL).
IFNAMSIZ = 15
#: Characters a domain cannot hold: MQTT topic separators and wildcards, and what
#: Linux refuses in interface names (besides whitespace).
_NOT_IN_DOMAINS = frozenset("/+#:\0")

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


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


def parse_config(
    data: object, path: str = "<config>", hostname: Callable[[], str] = socket.gethostname
) -> Config:
    """Validate a loaded YAML document and build a :class:`Config` from it."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, "", f"must be a YAML mapping at the top level, got {describe(data)}")
    top = Reader(path, data)

    domains, prefixes = _domains(top)
    workers = _workers(top)

    mqtt = read_mqtt(top)
    broker = read_broker(top)
    worker = read_worker(top, data, hostname())

    logging_config = data.get("logging_config")
    if logging_config is not None and not isinstance(logging_config, Mapping):
        raise top.fail("logging_config", f"must be a logging dictConfig mapping, got {describe(logging_config)}")

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


def _domains(top: Reader) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``domains`` and ``domain_prefixes``: each domain usable as a topic level and in interface names."""
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
    return domains, prefixes


def _workers(top: Reader) -> dict[str, int]:
    """``workers``: name -> v2 weight (an entry without ``weight`` weighs 1)."""
    workers_raw = top.data.get("workers") or {}
    if not isinstance(workers_raw, Mapping):
        raise top.fail("workers", f"must be a mapping of worker name to {{weight: N}}, got {describe(workers_raw)}")
    workers: dict[str, int] = {}
    workers_reader = top.section("workers")
    for wname, entry in workers_raw.items():
        if not isinstance(wname, str) or not wname:
            raise top.fail("workers", f"worker names must be non-empty strings, got {describe(wname)}")
        if entry is None:
            workers[wname] = 1
            continue
        if not isinstance(entry, Mapping):
            raise workers_reader.fail(wname, f"must be a mapping like {{weight: 30}}, got {describe(entry)}")
        workers[wname] = workers_reader.section(wname).integer("weight", 1, 0)
    return workers


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
