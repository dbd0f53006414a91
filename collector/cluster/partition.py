"""Which partition a terminal's messages land in, and the MQTT topic behind a partitioned NATS subject.

The NATS server maps `pos.v1.<tid>.<kind>` to `posp.<p>.<tid>.<kind>` with `{{partition(N,1)}}`, which is
FNV-1a (32 bit) of the terminal id's bytes modulo N. The collector computes the same function to know which
registered terminals it owns before it hears them; tests/integration/test_nats_collectors.py checks it against a
running server. Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Final

from collector.config import parse_shard

__all__ = ["FNV_OFFSET", "FNV_PRIME", "fnv1a_32", "parse_shard", "partition_of", "shard_partitions", "topic_of"]

FNV_OFFSET: Final = 0x811C9DC5
FNV_PRIME: Final = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """The 32-bit FNV-1a hash of `data` (what nats-server's partition() mapping uses)."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & 0xFFFFFFFF
    return h


def partition_of(tid: str, partitions: int) -> int:
    """The partition (0..partitions-1) the server puts terminal `tid`'s messages in."""
    return fnv1a_32(tid.encode()) % partitions


def topic_of(subject: str, topic_prefix: str) -> tuple[int, str] | None:
    """`posp.<p>.<tid>.<kind>` -> (p, `<topic_prefix>/<tid>/<kind>`); None for a subject of another shape.

    The MQTT gateway turns a '.' inside a topic level into '//' (a NATS token cannot hold a dot): reversed here,
    so an id with a dot reaches protocol.decode as the terminal sent it and is rejected there like over MQTT.
    """
    parts = subject.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    tid, kind = parts[2].replace("//", "."), parts[3].replace("//", ".")
    return int(parts[1]), f"{topic_prefix}/{tid}/{kind}"


def shard_partitions(shard: tuple[int, int], partitions: int) -> frozenset[int]:
    """The partitions of static shard i of K: every K-th, starting at i (balanced within one partition)."""
    i, k = shard
    return frozenset(range(i, partitions, k))
