"""twistd plugins for wgkex.

Kept import-light on purpose: twistd imports every plugin module to list them
in ``twistd --help``, so this file names the tap modules by string and imports
nothing from wgkex, klein or prometheus (klein would install the reactor).
"""

from twisted.application.service import ServiceMaker

wgkexBroker = ServiceMaker(
    "wgkex broker",
    "wgkex.broker.tap",
    "WireGuard key exchange broker: HTTP API for routers, publishes keys on MQTT.",
    "wgkex-broker",
)

wgkexWorker = ServiceMaker(
    "wgkex worker",
    "wgkex.worker.tap",
    "WireGuard key exchange worker: installs peers, routes and FDB entries from MQTT.",
    "wgkex-worker",
)
