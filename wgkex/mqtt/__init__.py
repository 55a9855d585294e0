"""MQTT on the Twisted reactor: a paho-mqtt 2.x client without paho's network thread.

:class:`MqttService` (a Twisted service providing :class:`wgkex.bus.Bus`) is
built from a handful of pieces, each in its own module:

- :mod:`~wgkex.mqtt.service`: the service; starts, stops, and routes paho's callbacks;
- :mod:`~wgkex.mqtt.connect`: connect attempts in a thread, backoff between them;
- :mod:`~wgkex.mqtt.servers`: which server to try next (``mqtt.servers``) and how to name it;
- :mod:`~wgkex.mqtt.backoff`: capped exponential backoff with jitter;
- :mod:`~wgkex.mqtt.paho_socket`: paho's socket on the reactor (read, write, keepalive);
- :mod:`~wgkex.mqtt.outbox`: the queue, in-flight window and acknowledgements of publishes;
- :mod:`~wgkex.mqtt.filters`: topic filters and the subscriptions' dispatch;
- :mod:`~wgkex.mqtt.acks`: received messages acknowledged once their subscribers are done;
- :mod:`~wgkex.mqtt.client`: the paho client configured from ``mqtt:``.

A key published by the broker goes ``MqttService.publish`` -> ``Outbox.publish``
-> paho's ``publish`` -> ``ReactorSocket.write``; its PUBACK comes back through
``ReactorSocket.read`` -> ``Outbox.acknowledged`` and fires the publish's Deferred.
A key received by the worker goes ``ReactorSocket.read`` -> ``MqttService._on_message``
-> ``Subscriptions.dispatch`` -> ``KeyApplier.on_message``; its PUBACK waits in
``Acknowledgements`` until the Deferred that returned has fired (the key is applied).
"""

from wgkex.bus import MqttStopped, QueueFull
from wgkex.mqtt.backoff import Backoff
from wgkex.mqtt.client import Will
from wgkex.mqtt.filters import TopicFilter
from wgkex.mqtt.servers import describe_server
from wgkex.mqtt.service import MqttService

__all__ = ["Backoff", "MqttService", "MqttStopped", "QueueFull", "TopicFilter", "Will", "describe_server"]
