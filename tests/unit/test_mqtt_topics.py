"""TopicFilter matches topics as MQTT 3.1.1 section 4.7 says (checked against paho's matcher)."""

from __future__ import annotations

import itertools

import paho.mqtt.client as paho
from twisted.trial.unittest import SynchronousTestCase

from wgkex.mqtt import TopicFilter


class TopicFilterTests(SynchronousTestCase):
    def test_matches_like_the_mqtt_spec(self) -> None:
        """Wildcards match as MQTT 3.1.1 section 4.7 says, checked against paho's own matcher."""
        levels = ["wireguard", "ffmuc_welt", "all", "", "$SYS", "+", "#"]
        filters = ["#", "+", "wireguard/+/+", "wireguard/#", "wireguard/+/all", "+/+/all", "wireguard/ffmuc_welt/all",
                   "+/#", "wireguard/+", "/+", "$SYS/#", "wireguard//all", "+/ffmuc_welt/#"]
        topics = ["/".join(p) for n in (1, 2, 3, 4) for p in itertools.product(levels[:5], repeat=n)]
        for topic_filter in filters:
            compiled = TopicFilter(topic_filter)
            for topic in topics:
                self.assertEqual(compiled.matches(topic), paho.topic_matches_sub(topic_filter, topic),
                                 f"{topic_filter!r} against {topic!r}")

    def test_examples(self) -> None:
        """The examples every MQTT reader knows: a/# matches a; + skips $ topics; + matches an empty level."""
        self.assertTrue(TopicFilter("sport/#").matches("sport"))
        self.assertFalse(TopicFilter("+/status").matches("$SYS/status"))
        self.assertTrue(TopicFilter("a/+/c").matches("a//c"))
        self.assertFalse(TopicFilter("wireguard/+/+").matches("wireguard/ffmuc_welt"))
        self.assertFalse(TopicFilter("wireguard/+/+").matches("wireguard/ffmuc_welt/all/more"))
