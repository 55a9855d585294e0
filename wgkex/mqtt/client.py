"""The paho client, configured from ``mqtt:`` in the configuration (nothing connects here)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from wgkex.config import MqttConfig
from wgkex.mqtt.outbox import WINDOW
from wgkex.mqtt.buffered_socket import BufferedSocket

#: Timeout of the blocking TCP connect and TLS handshake, seconds.
CONNECT_TIMEOUT = 5.0

#: What paho hands ``on_publish`` for every PUBACK of MQTT 3.1.1 (no reason code, no properties).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


@dataclass(frozen=True)
class Will:
    """The last will: what the server publishes when this client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class _BufferedClient(paho.Client):
    """paho's client, reading through :class:`~wgkex.mqtt.buffered_socket.BufferedSocket`,
    with a lean PUBACK.

    Paho offers no public way to wrap the socket that ``reconnect()`` opens (the
    ``on_socket_open`` callback only reports it), so this overrides paho 2.x's
    private ``_create_socket``, the one place that socket is made. Should paho
    drop it, only the buffers are lost: everything still works unbuffered.

    A broker gets one PUBACK per key it publishes. Paho decodes each into a
    packet object with a fresh ``ReasonCode`` and an empty ``Properties``
    (MQTT 3.1.1 has neither) before it looks the message id up: about a fifth
    of the MQTT side's CPU per key. :meth:`_handle_pubackcomp` (private too)
    reads the two-byte id itself and hands paho's own ``_do_on_publish`` one
    shared success code; anything else -- PUBCOMP, MQTT 5, a malformed packet,
    or a paho without these methods -- takes paho's way.
    """

    def _create_socket(self) -> Any:
        return BufferedSocket(super()._create_socket())

    def _handle_pubackcomp(self, cmd: Any) -> Any:
        packet = self._in_packet["packet"]
        done = getattr(self, "_do_on_publish", None)
        if cmd != "PUBACK" or self._protocol != MQTTProtocolVersion.MQTTv311 or len(packet) != 2 or done is None:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return done(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


def make_client(settings: MqttConfig, client_id: str, clean_session: bool, will: Will | None) -> paho.Client:
    """A paho client for MQTT 3.1.1 without its own thread and without automatic reconnects.

    Raises ``ValueError`` (naming ``mqtt.ca_file``) when the CA file cannot be loaded.
    """
    client = _BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=MQTTProtocolVersion.MQTTv311,
        transport=settings.transport,  # type: ignore[arg-type]
        reconnect_on_failure=False,
        # Received messages are acknowledged by the service once handled (wgkex.mqtt.acks).
        manual_ack=True,
    )
    # Without this, one exception in any callback silently stops all reading.
    client.suppress_exceptions = True
    client.max_inflight_messages = WINDOW
    client.connect_timeout = CONNECT_TIMEOUT
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        try:
            client.tls_set(ca_certs=settings.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"mqtt.ca_file {settings.ca_file!r}: cannot load CA certificates: {exc}") from None
    if will is not None:
        client.will_set(will.topic, will.payload, will.qos, will.retain)
    return client
