"""The wgkex configuration file: YAML in, typed immutable objects out.

A file written for the original wgkex (keys ``domains``, ``domain_prefixes``,
``workers``, ``externalName``, ``mqtt``, ``broker_listen``, ``logging_config``)
loads unchanged; settings new in this implementation have defaults and are
documented in ``wgkex.yaml.example``.

Everything here is pure: :func:`parse_config` turns an already-loaded mapping
into a :class:`Config`, :func:`load_config` reads and parses a file. Any
problem raises :class:`ConfigError`, whose text is one line naming the file,
the key and what is wrong, so that an operator can fix it at 3 a.m.

The modules of this package, each imported from here by the rest of wgkex:

- :mod:`~wgkex.config.file`: the document (:class:`Config`, domains, worker
  weights) and reading it from disk;
- :mod:`~wgkex.config.mqtt`, :mod:`~wgkex.config.broker`,
  :mod:`~wgkex.config.worker`: one section each, its dataclass and its reader;
- :mod:`~wgkex.config.endpoints`: listening addresses as Twisted endpoints;
- :mod:`~wgkex.config.reader`: typed, error-naming access to a YAML mapping.
"""

from wgkex.config.broker import BrokerConfig
from wgkex.config.file import DEFAULT_PATH, ENV_VAR, Config, config_path, load_config, parse_config
from wgkex.config.mqtt import MqttConfig
from wgkex.config.reader import ConfigError, is_secret
from wgkex.config.worker import WorkerConfig

__all__ = [
    "DEFAULT_PATH",
    "ENV_VAR",
    "BrokerConfig",
    "Config",
    "ConfigError",
    "MqttConfig",
    "WorkerConfig",
    "config_path",
    "is_secret",
    "load_config",
    "parse_config",
]
