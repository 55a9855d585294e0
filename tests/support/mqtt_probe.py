"""Is an MQTT server answering? One CONNECT, read the CONNACK (no client library, no session left behind)."""

from __future__ import annotations

import secrets
import socket
import struct


def mqtt_connack(host: str, port: int, timeout: float = 2.0) -> int | None:
    """CONNECT with a fresh clean-session client id; the CONNACK return code, None if none came."""
    client_id = b"wgkex-probe-" + secrets.token_hex(4).encode()
    var = b"\x00\x04MQTT\x04\x02\x00\x0a"  # MQTT 3.1.1, clean session, keepalive 10 s
    body = var + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(body)]) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(packet)
            reply = b""
            while len(reply) < 4:
                chunk = s.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
            s.sendall(b"\xe0\x00")  # DISCONNECT
    except OSError:
        return None
    if reply[0] != 0x20:
        return None
    return int(struct.unpack("!BBBB", reply)[3])
