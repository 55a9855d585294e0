"""Configuration parsing: the original file format loads unchanged and every bad file gets one clear line."""

from __future__ import annotations

import os
import textwrap

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from wgkex.config import (
    DEFAULT_PATH,
    ConfigError,
    config_path,
    load_config,
    parse_config,
)

ORIGINAL = textwrap.dedent(
    """\
    # wgkex.yaml.example as shipped by the original implementation
    domains:
      - ffmuc_muc_cty
      - ffmuc_muc_nord
      - ffmuc_welt
      - ffdon_mitte
    domain_prefixes:
      - ffmuc_
      - ffdon_
      - ffwert_
    workers:
      gw04.in.ffmuc.net:
        weight: 30
      gw05.in.ffmuc.net:
        weight: 20
    externalName: gw04.ext.ffmuc.net
    mqtt:
      broker_url: broker.hivemq.com
      broker_port: 1883
      username: user
      password: SECRET
      keepalive: 5
      tls: False
    broker_listen:
      host: 0.0.0.0
      port: 5000
    logging_config:
      formatters:
        standard:
          format: '%(asctime)s %(name)s %(levelname)s %(message)s'
      handlers:
        console:
          class: logging.StreamHandler
          formatter: standard
      root:
        handlers:
          - console
        level: DEBUG
      version: 1
    """
)

MINIMAL = {"domains": ["ffmuc_welt"], "domain_prefixes": ["ffmuc_"]}


class OriginalFormatTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        FilePath(self.path).setContent(ORIGINAL.encode())

    def test_loads_unchanged(self) -> None:
        """A file in the original format loads with every value where the original put it."""
        c = load_config(self.path, hostname=lambda: "gw04")
        self.assertEqual(c.domains, ("ffmuc_muc_cty", "ffmuc_muc_nord", "ffmuc_welt", "ffdon_mitte"))
        self.assertEqual(dict(c.workers), {"gw04.in.ffmuc.net": 30, "gw05.in.ffmuc.net": 20})
        self.assertEqual(c.worker.external_name, "gw04.ext.ffmuc.net")
        self.assertEqual(c.mqtt.broker_url, "broker.hivemq.com")
        self.assertEqual((c.mqtt.broker_port, c.mqtt.keepalive, c.mqtt.tls), (1883, 5, False))
        self.assertEqual((c.mqtt.username, c.mqtt.password), ("user", "SECRET"))
        self.assertEqual(c.broker.listen, "tcp:5000:interface=0.0.0.0")
        self.assertEqual(c.logging_config["root"]["level"], "DEBUG")  # type: ignore[index]

    def test_interfaces(self) -> None:
        """The first matching prefix is stripped to name wg-/vx- interfaces."""
        c = load_config(self.path)
        self.assertEqual(c.wg_interface("ffmuc_muc_cty"), "wg-muc_cty")
        self.assertEqual(c.vx_interface("ffdon_mitte"), "vx-mitte")

    def test_defaults(self) -> None:
        """New settings take their documented defaults, names come from the host name."""
        c = load_config(self.path, hostname=lambda: "gw09")
        self.assertEqual(c.worker.name, "gw09")
        self.assertEqual(c.worker.listen, "tcp:9101:interface=127.0.0.1")
        self.assertTrue(c.worker.connectivity_check)
        self.assertEqual(c.worker.wireguard_backend, "auto")
        self.assertEqual((c.worker.cleanup_interval, c.worker.peer_timeout, c.worker.metrics_interval), (3600, 10800, 60))
        self.assertEqual((c.broker.max_body_size, c.broker.rate_limit, c.broker.rate_burst), (4096, 10, 200))
        self.assertEqual((c.mqtt.queue_limit, c.mqtt.reconnect_max_delay), (10_000, 30))
        self.assertEqual((c.broker.request_timeout, c.broker.idle_timeout), (20, 30))
        self.assertEqual((c.broker.max_connections_per_address, c.broker.max_connections), (256, 0))
        self.assertEqual((c.broker.replay_window, c.broker.replay_limit), (120, 100_000))
        self.assertEqual(c.weight("unknown-worker"), 1)
        self.assertEqual(c.log_level, "info")

    def test_example_file_loads(self) -> None:
        """The shipped wgkex.yaml.example is a valid configuration."""
        example = os.path.join(os.path.dirname(__file__), "..", "..", "wgkex.yaml.example")
        c = load_config(example)
        self.assertTrue(c.domains)


class ListenTests(SynchronousTestCase):
    def parse(self, value: object) -> str:
        return parse_config({**MINIMAL, "broker_listen": value}).broker.listen

    def test_default(self) -> None:
        """Without broker_listen the broker listens on 127.0.0.1:5000."""
        self.assertEqual(parse_config(MINIMAL).broker.listen, "tcp:5000:interface=127.0.0.1")

    def test_ipv6_literal(self) -> None:
        """An IPv6 host is escaped for Twisted's endpoint syntax."""
        self.assertEqual(self.parse({"host": "::1", "port": 8080}), "tcp:8080:interface=\\:\\:1")
        self.assertEqual(self.parse("[::]:443"), "tcp:443:interface=\\:\\:")

    def test_host_name(self) -> None:
        """A host name, as the original accepted, is passed to the listener to resolve."""
        self.assertEqual(self.parse({"host": "localhost"}), "tcp:5000:interface=localhost")
        self.assertEqual(self.parse("localhost:8080"), "tcp:8080:interface=localhost")

    def test_bad_host(self) -> None:
        """Something that is neither an address nor a host name is refused, naming the key."""
        exc = self.assertRaises(ConfigError, self.parse, {"host": "no such/host"})
        self.assertIn("broker_listen.host: must be an IP address or a host name", str(exc))

    def test_endpoint_string(self) -> None:
        """An endpoint description is taken as it is."""
        ep = "tcp6:5000:interface=\\:\\:1:backlog=2048"
        self.assertEqual(self.parse(ep), ep)

    def test_bad_endpoint_string(self) -> None:
        """A malformed endpoint, or a TLS one whose certificate is missing, is one config error line."""
        for ep in ("tcp:abc", "ssl:443:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem"):
            exc = self.assertRaises(ConfigError, self.parse, ep)
            self.assertIn("broker_listen: is not a usable Twisted endpoint description", str(exc))
            self.assertNotIn("\n", str(exc))

    def test_worker_listen_off(self) -> None:
        """worker_listen can be switched off."""
        self.assertIsNone(parse_config({**MINIMAL, "worker_listen": None}).worker.listen)
        self.assertIsNone(parse_config({**MINIMAL, "worker_listen": "off"}).worker.listen)


class ErrorTests(SynchronousTestCase):
    def error(self, data: object) -> str:
        exc = self.assertRaises(ConfigError, parse_config, data, "/etc/wgkex.yaml")
        text = str(exc)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith("/etc/wgkex.yaml: "), text)
        return text

    def file_error(self, content: bytes | None, mode: int | None = None) -> str:
        path = self.mktemp()
        if content is not None:
            FilePath(path).setContent(content)
        if mode is not None:
            os.chmod(path, mode)
        exc = self.assertRaises(ConfigError, load_config, path)
        text = str(exc)
        self.assertNotIn("\n", text)
        self.assertIn(path, text)
        return text

    def test_missing_file(self) -> None:
        """A missing file is named and the way to give another is said."""
        self.assertIn("not found", self.file_error(None))

    def test_unreadable_file(self) -> None:
        """An unreadable file (or a directory) is reported as such."""
        if os.geteuid() == 0:
            # root reads anything; a directory exercises the same branch family
            path = self.mktemp()
            os.mkdir(path)
            self.assertIn("directory", str(self.assertRaises(ConfigError, load_config, path)))
        else:  # pragma: no cover - CI runs as root
            self.assertIn("not readable", self.file_error(b"domains: []", 0))

    def test_yaml_syntax(self) -> None:
        """A YAML syntax error names the line."""
        text = self.file_error(b"domains: [ffmuc_welt\nmqtt: {\n")
        self.assertIn("YAML syntax error at line", text)

    def test_not_utf8(self) -> None:
        """Binary garbage is refused as not UTF-8."""
        self.assertIn("UTF-8", self.file_error(b"\xff\xfe\x00garbage"))

    def test_top_level_not_mapping(self) -> None:
        """A list at the top level is refused."""
        self.assertIn("mapping", self.error(["a"]))

    def test_wrong_types(self) -> None:
        """Wrong types name the dotted key."""
        self.assertIn("mqtt.broker_port: must be an integer", self.error({**MINIMAL, "mqtt": {"broker_port": "abc"}}))
        self.assertIn("mqtt.tls: must be true or false", self.error({**MINIMAL, "mqtt": {"tls": "maybe"}}))
        self.assertIn("domains: must be a list", self.error({**MINIMAL, "domains": {"a": 1}}))
        self.assertIn("mqtt: must be a mapping", self.error({**MINIMAL, "mqtt": "localhost"}))
        self.assertIn("workers.gw1.weight: must be an integer", self.error({**MINIMAL, "workers": {"gw1": {"weight": "x"}}}))
        self.assertIn("mqtt.keepalive", self.error({**MINIMAL, "mqtt": {"keepalive": [1]}}))

    def test_bad_port(self) -> None:
        """Ports outside 1..65535 are refused, in mqtt and in broker_listen."""
        self.assertIn("mqtt.broker_port: must be an integer in 1..65535, got 70000",
                      self.error({**MINIMAL, "mqtt": {"broker_port": 70000}}))
        self.assertIn("broker_listen.port", self.error({**MINIMAL, "broker_listen": {"port": 0}}))
        self.assertIn("broker_listen", self.error({**MINIMAL, "broker_listen": "localhost:http"}))

    def test_unknown_prefix(self) -> None:
        """A domain with no configured prefix is named."""
        text = self.error({"domains": ["ffmuc_welt", "ffhh_nord"], "domain_prefixes": ["ffmuc_"]})
        self.assertIn("domains: domain 'ffhh_nord' starts with none of domain_prefixes", text)

    def test_duplicate_stripped_names(self) -> None:
        """Two domains stripping to the same name are refused, both named."""
        text = self.error({"domains": ["ffmuc_welt", "ffdon_welt"], "domain_prefixes": ["ffmuc_", "ffdon_"]})
        self.assertIn("'ffmuc_welt' and 'ffdon_welt' both strip to 'welt'", text)

    def test_interface_name_too_long(self) -> None:
        """An interface name over 15 bytes is refused."""
        text = self.error({"domains": ["ffmuc_muenchen_sued"], "domain_prefixes": ["ffmuc_"]})
        self.assertIn("'wg-muenchen_sued'", text)
        self.assertIn("longer than 15 bytes", text)

    def test_domain_unusable_in_topics_or_interface_names(self) -> None:
        """A domain with MQTT wildcards, '/', ':' or whitespace is refused at start (not a traceback later)."""
        for domain in ("ffmuc_a+b", "ffmuc_a#", "ffmuc_c/d", "ffmuc_x y", "ffmuc_a:b", "ffmuc_tab\t"):
            text = self.error({"domains": [domain], "domain_prefixes": ["ffmuc_"]})
            self.assertIn(f"domains: domain {domain!r}", text)
            self.assertIn("may not contain", text)

    def test_missing_domains(self) -> None:
        """At least one domain and prefix are required."""
        self.assertIn("domains: must list at least one domain", self.error({"domain_prefixes": ["ffmuc_"]}))
        self.assertIn("domain_prefixes", self.error({"domains": ["ffmuc_welt"]}))

    def test_bad_choice(self) -> None:
        """Enumerated settings list their choices."""
        self.assertIn("wireguard_backend: must be one of auto, kernel, uapi",
                      self.error({**MINIMAL, "wireguard_backend": "magic"}))
        self.assertIn("log_level: must be one of", self.error({**MINIMAL, "log_level": "loud"}))

    def test_bad_keep_key(self) -> None:
        """An invalid key in keep_keys is refused with the reason."""
        self.assertIn("keep_keys: 'abc'", self.error({**MINIMAL, "keep_keys": ["abc"]}))

    def test_bad_trusted_proxy(self) -> None:
        """trusted_proxies entries must be addresses or networks."""
        self.assertIn("broker.trusted_proxies", self.error({**MINIMAL, "broker": {"trusted_proxies": ["x"]}}))

    def test_replay_bounds(self) -> None:
        """broker.replay_window and replay_limit take 0 (off) and refuse negatives or text in one line."""
        c = parse_config({**MINIMAL, "broker": {"replay_window": 0, "replay_limit": 0}})
        self.assertEqual((c.broker.replay_window, c.broker.replay_limit), (0, 0))
        self.assertIn("broker.replay_window", self.error({**MINIMAL, "broker": {"replay_window": -1}}))
        self.assertIn("broker.replay_limit", self.error({**MINIMAL, "broker": {"replay_limit": "lots"}}))

    def test_missing_ca_file(self) -> None:
        """A TLS CA file that does not exist is refused at start."""
        self.assertIn("mqtt.ca_file", self.error({**MINIMAL, "mqtt": {"tls": True, "ca_file": "/nonexistent/ca.pem"}}))


class BusValueTests(SynchronousTestCase):
    """What the worker publishes is checked against the wire contract at start (docs/protocol.md)."""

    def error(self, data: object) -> str:
        text = str(self.assertRaises(ConfigError, parse_config, data, "/etc/wgkex.yaml", hostname=lambda: "gw1"))
        self.assertNotIn("\n", text)
        return text

    def test_worker_name_rule(self) -> None:
        """worker_name must be 1-253 of A-Z a-z 0-9 . _ -, the rule brokers apply to names on the bus."""
        for name in ("gw 1", "gw/1", "gw+", "$(reboot)", "g\u00e4teway", "x" * 254):
            self.assertIn("worker_name: a worker name must be", self.error({**MINIMAL, "worker_name": name}))
        self.assertEqual(parse_config({**MINIMAL, "worker_name": "gw04.in_ffmuc-net"}).worker.name, "gw04.in_ffmuc-net")

    def test_host_name_default_names_its_source(self) -> None:
        """A host name that cannot be a worker name says that it came from the host name."""
        text = str(self.assertRaises(ConfigError, parse_config, MINIMAL, "/etc/wgkex.yaml", hostname=lambda: "my host"))
        self.assertIn("(the host name; set worker_name)", text)

    def test_external_name_rule(self) -> None:
        """externalName must be a DNS host name or an IP address literal, as brokers require of the data message."""
        for name in ("$(reboot)", "http://gw1/", "gw1.example.net.", "gw_1.example.net", "fe80::1%eth0"):
            self.assertIn("externalName: must be a DNS host name", self.error({**MINIMAL, "externalName": name}))
        for name in ("gw04.ext.ffmuc.net", "192.0.2.1", "2001:db8::1"):
            self.assertEqual(parse_config({**MINIMAL, "externalName": name}).worker.external_name, name)


class PathTests(SynchronousTestCase):
    def test_order(self) -> None:
        """--config wins over $WGKEX_CONFIG_FILE, which wins over /etc/wgkex.yaml."""
        self.assertEqual(config_path("/a.yaml", {"WGKEX_CONFIG_FILE": "/b.yaml"}), "/a.yaml")
        self.assertEqual(config_path(None, {"WGKEX_CONFIG_FILE": "/b.yaml"}), "/b.yaml")
        self.assertEqual(config_path(None, {}), DEFAULT_PATH)


class SecretTests(SynchronousTestCase):
    def test_password_value_never_printed(self) -> None:
        """A password of the wrong type is reported by key and type; its value appears nowhere in the line."""
        for value in (["hunter2"], {"hunter2": 1}, 20240101.5):
            exc = self.assertRaises(ConfigError, parse_config, {**MINIMAL, "mqtt": {"password": value}}, "/etc/w.yaml")
            text = str(exc)
            self.assertIn("/etc/w.yaml: mqtt.password: must be a string", text)
            self.assertIn(type(value).__name__, text)
            self.assertNotIn("hunter2", text)
            self.assertNotIn("20240101", text)

    def test_secret_names(self) -> None:
        """password, secret and token settings count as secret; user names and hosts do not."""
        from wgkex.config import is_secret

        self.assertEqual([is_secret(n) for n in ("password", "api_token", "client_secret", "username", "broker_url")],
                         [True, True, True, False, False])


class YamlQuotingTests(SynchronousTestCase):
    def load(self, text: str) -> str:
        path = self.mktemp()
        FilePath(path).setContent(("domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\n" + text).encode())
        exc = self.assertRaises(ConfigError, load_config, path)
        line = str(exc)
        self.assertNotIn("\n", line)
        self.assertIn(path, line)
        return line

    def test_unquoted_numbers_refused_for_strings(self) -> None:
        """YAML 1.1 numbers (octal 0123, 1_000, sexagesimal 12:30) in string settings are refused with a hint to quote."""
        cases = {
            "mqtt:\n  password: 0123\n": "mqtt.password",
            "mqtt:\n  username: 1_000\n": "mqtt.username",
            "worker_name: 12:30\n": "worker_name",
            "externalName: 1234\n": "externalName",
            "mqtt:\n  client_id: 0x1f\n": "mqtt.client_id",
            "mqtt:\n  broker_url: 10\n": "mqtt.broker_url",
        }
        for text, key in cases.items():
            line = self.load(text)
            self.assertIn(f"{key}: must be a string", line)
            self.assertIn("quote the value", line)

    def test_password_hint_without_value(self) -> None:
        """The quoting hint for a password does not reveal what YAML made of it (83 from 0123)."""
        line = self.load("mqtt:\n  password: 0123\n")
        self.assertNotIn("83", line)

    def test_booleans_refused_for_strings(self) -> None:
        """yes/no/on/off become booleans in YAML 1.1; a string setting refuses them with the same hint."""
        line = self.load("worker_name: yes\n")
        self.assertIn("worker_name: must be a string, got bool True; quote the value", line)

    def test_quoted_values_kept_exactly(self) -> None:
        """Quoted, the same texts load unchanged."""
        path = self.mktemp()
        FilePath(path).setContent(b'domains: [ffmuc_welt]\ndomain_prefixes: [ffmuc_]\n'
                                  b'mqtt: {password: "0123", username: "1_000"}\nworker_name: "0123"\n')
        c = load_config(path)
        self.assertEqual((c.mqtt.password, c.mqtt.username, c.worker.name), ("0123", "1_000", "0123"))
