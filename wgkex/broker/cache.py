"""Read-only pages rendered at most once per interval, whatever the request rate.

``/metrics``, ``/api/v1/status`` and ``/`` walk the whole worker picture and
the metrics registry; a client asking for them thousands of times a second
(pipelined on a few connections) would keep the reactor busy rendering. Served
from :class:`RenderCache`, each costs one render per second at most, and a
flood of requests costs little more than the bytes it sends.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime


class RenderCache:
    """Keeps each page's bytes for ``max_age`` seconds of ``clock``."""

    def __init__(self, clock: IReactorTime, max_age: float = 1.0) -> None:
        self._clock = clock
        self._max_age = max_age
        self._pages: dict[str, tuple[float, bytes]] = {}

    def get(self, name: str, render: Callable[[], bytes]) -> bytes:
        """The page ``name``: cached if rendered less than ``max_age`` ago, else rendered now."""
        now = self._clock.seconds()
        cached = self._pages.get(name)
        if cached is not None and 0 <= now - cached[0] < self._max_age:
            return cached[1]
        body = render()
        self._pages[name] = (now, body)
        return body
