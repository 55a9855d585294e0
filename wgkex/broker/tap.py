"""twistd plugin ``wgkex-broker``: builds the broker's service tree from the configuration.

``twistd -n wgkex-broker [--config PATH]``. Options are parsed (and the
configuration validated) by :class:`wgkex.options.Options`; ``makeService``
only builds :class:`wgkex.broker.service.BrokerService`, which opens nothing
until twistd starts it. Klein is imported here, inside ``makeService``, never
at plugin-scan time: importing it installs the reactor.
"""

from __future__ import annotations

from twisted.application.service import IService

from wgkex.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    """Build (not start) the broker's services."""
    from twisted.internet import reactor

    from wgkex.broker.service import BrokerService

    return BrokerService(reactor, options.config)
