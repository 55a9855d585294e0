"""What the worker needs from the MQTT service (:class:`wgkex.mqtt.MqttService` provides it).

A protocol rather than the class itself, so the worker's logic is typed against
the few calls it makes and unit tests can hand it a small in-memory fake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import Deferred


class Bus(Protocol):
    """The subset of ``MqttService`` the worker uses."""

    @property
    def connected(self) -> bool:
        """True while connected (CONNACK received)."""
        ...

    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes, bool], None]) -> None: ...

    def add_connect_callback(self, cb: Callable[[], None]) -> None: ...

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None: ...

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False) -> Deferred[None]: ...
