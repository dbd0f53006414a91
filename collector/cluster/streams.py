"""The two streams the collectors read, defined once: the fixture, deploy/nats/ and a collector that finds one
missing build them from here.

Both are *sourced* from the MQTT gateway's own stream `$MQTT_msgs` with a subject transform
(`$MQTT.msgs.posp.>` -> `posp.>`), not capturing `posp.>` directly: the gateway PUBACKs a terminal's QoS 1
message once it is stored in `$MQTT_msgs`, while the plain-subject copy a capturing stream would store is a
core-NATS publish that is dropped, silently, while that stream elects a new leader after a node loss (measured
by H12b: 7-1,127 acknowledged heartbeats missing per node stop). A source is a consumer of `$MQTT_msgs`
(interest retention: a message stays until the source has it), so what was PUBACKed reaches our stream at least
once. Limits retention on ours: what a collector can replay after an outage or a takeover.
"""

from __future__ import annotations

from typing import Final

from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamSource, SubjectTransform

from collector.config import NatsConfig

__all__ = ["FEED_SUBJECT", "MQTT_MESSAGES_PREFIX", "MQTT_MESSAGES_STREAM", "stream_configs"]

MQTT_MESSAGES_STREAM: Final = "$MQTT_msgs"
MQTT_MESSAGES_PREFIX: Final = "$MQTT.msgs."
FEED_SUBJECT: Final = "acquirer.v1.>"


def stream_configs(cfg: NatsConfig) -> list[StreamConfig]:
    """The partitioned stream and the acquirer feed stream, as `nats.replicas`, `stream_max_age_s` and
    `stream_max_bytes` say."""
    out = []
    for name, subject in ((cfg.stream, f"{cfg.subject_prefix}.>"), (cfg.feed_stream, FEED_SUBJECT)):
        source = StreamSource(name=MQTT_MESSAGES_STREAM, subject_transforms=[
            SubjectTransform(src=MQTT_MESSAGES_PREFIX + subject, dest=subject)])
        out.append(StreamConfig(
            name=name, sources=[source], retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            num_replicas=cfg.replicas, max_age=cfg.stream_max_age_s,
            max_bytes=cfg.stream_max_bytes if cfg.stream_max_bytes > 0 else -1,
        ))
    return out
