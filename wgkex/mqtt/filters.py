"""MQTT topic filters: checking topics and filters, matching, and dispatching to subscriptions.

No paho here: :class:`TopicFilter` compiles a filter once and matches it per
message (paho's ``topic_matches_sub`` builds a matcher tree on every call), and
:class:`Subscriptions` hands a message to every callback whose filter matches,
so that one callback raising never keeps the message from the next, and says
when all of them are done with it (the service acknowledges it then).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from wgkex.bus import MessageCallback, Redeliver


def check_topic(topic: str) -> None:
    """Raise ``ValueError`` unless ``topic`` may be published to (no wildcards, not empty)."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic or len(topic.encode()) > 65535:
        raise ValueError(f"invalid MQTT topic to publish to: {topic!r}")


def check_filter(topic_filter: str) -> None:
    """Raise ``ValueError`` unless ``topic_filter`` is a valid MQTT 3.1.1 topic filter."""
    levels = topic_filter.split("/")
    ok = bool(topic_filter) and "\0" not in topic_filter and len(topic_filter.encode()) <= 65535
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            ok = False
        if "+" in level and level != "+":
            ok = False
    if not ok:
        raise ValueError(f"invalid MQTT topic filter: {topic_filter!r}")


class TopicFilter:
    """An MQTT topic filter compiled once, matched per message."""

    def __init__(self, topic_filter: str) -> None:
        self.text = topic_filter
        self._levels = topic_filter.split("/")
        self._exact = "+" not in topic_filter and "#" not in topic_filter
        # MQTT 3.1.1, 4.7.2: a filter starting with a wildcard does not match topics starting with "$".
        self._skips_system = self._levels[0] in ("+", "#")

    def matches(self, topic: str) -> bool:
        if self._exact:
            return topic == self.text
        if self._skips_system and topic.startswith("$"):
            return False
        levels = topic.split("/")
        for i, want in enumerate(self._levels):
            if want == "#":
                return True  # also the parent level itself: "a/#" matches "a"
            if i >= len(levels) or (want != "+" and want != levels[i]):
                return False
        return len(levels) == len(self._levels)


class Subscriptions:
    """The subscriptions of one connection: what to ask the server for, whom to call per message."""

    log = Logger()

    def __init__(self) -> None:
        self._entries: list[tuple[TopicFilter, int, MessageCallback]] = []

    def add(self, topic_filter: str, qos: int, callback: MessageCallback) -> None:
        """Register ``callback`` for ``topic_filter``; ``ValueError`` for a bad filter or QoS."""
        check_filter(topic_filter)
        if qos not in (0, 1, 2):
            raise ValueError(f"MQTT QoS must be 0, 1 or 2, got {qos!r}")
        self._entries.append((TopicFilter(topic_filter), qos, callback))

    def wanted(self) -> list[tuple[str, int]]:
        """Each distinct filter once, with the highest QoS asked for it: one SUBSCRIBE's worth."""
        qos_by_filter: dict[str, int] = {}
        for topic_filter, qos, _ in self._entries:
            qos_by_filter[topic_filter.text] = max(qos, qos_by_filter.get(topic_filter.text, 0))
        return list(qos_by_filter.items())

    def dispatch(self, topic: str, payload: bytes, retained: bool) -> Deferred[bool] | None:
        """Call every matching callback; one raising is logged with its topic, the rest still run.

        Returns None when every callback is done with the message; otherwise a Deferred that
        fires once the Deferreds they returned have: True to acknowledge the message, False when
        one failed with :class:`~wgkex.bus.Redeliver`. Any other failure is logged and counts as
        done, so a message that breaks a subscriber is not delivered to it over and over.
        """
        waits: list[Deferred[bool]] = []
        for topic_filter, _, callback in list(self._entries):
            if not topic_filter.matches(topic):
                continue
            try:
                result = callback(topic, payload, retained)
            except Exception:
                self.log.failure(
                    "MQTT message callback for topic {topic} failed (subscription {filter}); "
                    "later messages are still delivered",
                    topic=topic,
                    filter=topic_filter.text,
                )
                continue
            if isinstance(result, Deferred):
                waits.append(result.addCallbacks(lambda _: True, self._failed, errbackArgs=(topic, topic_filter.text)))
        if not waits:
            return None
        if len(waits) == 1:
            return waits[0]
        return gatherResults(waits).addCallback(all)

    def _failed(self, failure: Failure, topic: str, topic_filter: str) -> bool:
        if failure.check(Redeliver):
            return False
        self.log.failure(
            "MQTT message callback for topic {topic} failed later (subscription {filter}); "
            "the message is acknowledged all the same",
            failure,
            topic=topic,
            filter=topic_filter,
        )
        return True
