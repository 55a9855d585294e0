"""twistd plugin ``wgkex-worker``: builds the worker's service tree from the configuration."""

from __future__ import annotations

from twisted.application.service import IService, MultiService

from wgkex.options import Options

__all__ = ["Options", "makeService"]


def makeService(options: Options) -> IService:
    """Build (not start) the worker's services. Placeholder until the worker lands."""
    return MultiService()
