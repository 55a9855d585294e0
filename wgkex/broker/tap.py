"""twistd plugin ``wgkex-broker``: builds the broker's service tree from the configuration."""

from __future__ import annotations

from twisted.application.service import IService, MultiService

from wgkex.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    """Build (not start) the broker's services. Placeholder until the broker lands."""
    return MultiService()
