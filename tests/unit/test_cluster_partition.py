"""The partition function and the subject -> topic mapping (the server's own mapping is checked against a real
cluster in tests/integration/test_nats_collectors.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collector.cluster.partition import fnv1a_32, parse_shard, partition_of, shard_partitions, topic_of
from collector.fleet.protocol import DecodeError, decode


@pytest.mark.parametrize(
    ("data", "expected"),
    # The published FNV-1a 32-bit test vectors (Fowler/Noll/Vo reference code).
    [(b"", 0x811C9DC5), (b"a", 0xE40C292C), (b"foobar", 0xBF9CF968)],
)
def test_fnv1a_32_reference_vectors(data: bytes, expected: int) -> None:
    assert fnv1a_32(data) == expected


@given(st.text(min_size=1, max_size=64), st.integers(1, 4096))
def test_partition_in_range(tid: str, n: int) -> None:
    assert 0 <= partition_of(tid, n) < n


def test_partitions_spread() -> None:
    counts = [0] * 64
    for i in range(64_000):
        counts[partition_of(f"T{i:07d}", 64)] += 1
    assert min(counts) > 800 and max(counts) < 1200  # ~1000 each: no partition starves or overflows


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("posp.6.T1.heartbeat", (6, "pos/v1/T1/heartbeat")),
        ("posp.0.T-9_x.status", (0, "pos/v1/T-9_x/status")),
        ("posp.3.a//b.heartbeat", (3, "pos/v1/a.b/heartbeat")),  # the gateway's '.' inside a level
        ("posp.x.T1.heartbeat", None),
        ("posp.1.T1", None),
        ("posp.1.T1.heartbeat.extra", None),
    ],
)
def test_topic_of(subject: str, expected: tuple[int, str] | None) -> None:
    assert topic_of(subject, "pos/v1") == expected


def test_rebuilt_topic_decodes_and_a_dotted_id_is_rejected_as_over_mqtt() -> None:
    payload = (b'{"tid":"T1","ts":1764510000,"seq":1,"interval_s":30,"txn_count":0,"uploaded_count":0,'
               b'"queue_depth":0,"oldest_queued_ts":null}')
    mapped = topic_of("posp.6.T1.heartbeat", "pos/v1")
    assert mapped is not None
    assert decode(mapped[1], payload, "pos/v1", "acquirer/v1").tid == "T1"
    dotted = topic_of("posp.6.a//b.heartbeat", "pos/v1")
    assert dotted is not None
    with pytest.raises(DecodeError) as err:
        decode(dotted[1], payload, "pos/v1", "acquirer/v1")
    assert err.value.tid is None  # not a valid id: rejected, never a terminal of its own


@pytest.mark.parametrize(("text", "expected"), [("0/2", (0, 2)), ("3/4", (3, 4)), (" 1 / 3 ", (1, 3))])
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/2", "0/0", ""])
def test_parse_shard_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"i/K|need"):
        parse_shard(text)


@given(st.integers(1, 64), st.integers(1, 512))
def test_shards_cover_every_partition_once(k: int, n: int) -> None:
    shards = [shard_partitions((i, k), n) for i in range(k)]
    assert sorted(p for s in shards for p in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
