"""Packaging for wgkex: the library, both twistd plugins and the console-free entry points."""

from setuptools import find_packages, setup

setup(
    name="wgkex",
    version="0.1.0",
    description="WireGuard key exchange for Freifunk community mesh networks (broker and worker)",
    python_requires=">=3.11",
    # A flat layout: map the root explicitly so that `pip install -e .` keeps
    # `twisted/plugins/` importable and twistd finds our plugin file.
    package_dir={"": "."},
    # Every package under wgkex/ (a hand-kept list had lost wgkex.mqtt), and the plugin folder.
    packages=find_packages(include=["wgkex", "wgkex.*"]) + ["twisted.plugins"],
    package_data={"wgkex.broker": ["openapi.json"]},
    install_requires=[
        "twisted>=24.3",
        "klein>=23.12",
        "paho-mqtt>=2.1,<3",
        "pyroute2>=0.9",
        "pyyaml>=6",
        "treq>=24.9",
        "prometheus-client>=0.20",
        # X25519 for the public key of a wireguard-go interface (the UAPI reports only the
        # private key); already required through treq -> twisted[tls].
        "cryptography>=40",
    ],
    extras_require={
        "test": [
            "hypothesis>=6.100", "mypy>=1.10", "mypy-zope>=1.0", "types-PyYAML",
            # The OpenAPI document is checked by the reference validator of the spec (3.1
            # meta-schema and semantic rules), and real replies against its schemas.
            "openapi-spec-validator>=0.7", "jsonschema>=4.18",
        ]
    },
)
