"""twistd plugin ``wgkex-worker``: builds the worker's service tree from the configuration.

``twistd -n wgkex-worker [--config PATH]``. Options are parsed (and the
configuration validated) by :class:`wgkex.options.Options`. ``makeService``
only *builds* the tree of :func:`wgkex.worker.service.build_worker`: the MQTT
service (fixed client id, persistent session, last will ``status = 0``) and the
netlink pool whose backends are created later, in the pool thread, when
twistd starts the services. Heavy imports (paho, pyroute2) happen here, never
at plugin-scan time.
"""

from __future__ import annotations

from twisted.application.service import IService

from wgkex.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    """Build (not start) the worker's services."""
    from wgkex.logs import LoggingService
    from wgkex.mqtt import MqttService, Will
    from wgkex.worker.backend import Rtnl, WireGuard
    from wgkex.worker.pool import BackendPool
    from wgkex.contract import encode_status, status_topic
    from wgkex.worker.service import build_worker
    from wgkex.sigterm import CleanSigterm

    from wgkex.reactor import installed_reactor

    reactor = installed_reactor()
    config = options.config
    worker = config.worker

    def make_wireguard() -> WireGuard:
        from wgkex.worker.wireguard import AutoWireGuard

        return AutoWireGuard(worker.wireguard_backend, worker.uapi_socket_dir)

    def make_rtnl() -> Rtnl:
        from wgkex.worker.rtnl import PyrouteRtnl

        return PyrouteRtnl()

    bus = MqttService(
        reactor,
        config.mqtt,
        client_id=config.mqtt.client_id or worker.name,
        clean_session=False,
        will=Will(status_topic(worker.name), encode_status(False), qos=1, retain=True),
        name="mqtt",
    )
    pool = BackendPool(reactor, make_wireguard, make_rtnl)
    return build_worker(
        config,
        reactor,
        bus,
        pool,
        support=[
            LoggingService(config.log_level, config.logging_config, config_path=config.path),
            CleanSigterm(reactor, hangup="the worker has nothing to reload; restart it to apply a changed configuration"),
        ],
    )
