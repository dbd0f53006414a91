"""The NATS source's pure parts: a stored message back to the collector's terms, and lost-delivery detection.

Messages are built the way nats-py hands them over (the JetStream ack reply subject carries stream and consumer
sequence, stored timestamp and pending count); the source itself runs against real servers in
tests/integration/test_nats_collectors.py."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from collector.config import NatsConfig
from collector.ingest.nats import FEED, connect_options, inbound, next_cseq

T_NS = 1_764_510_000_123_456_789


def stored(subject: str, sseq: int, cseq: int, data: bytes = b"{}", pending: int = 0, ts_ns: int = T_NS) -> Msg:
    reply = f"$JS.ACK.POSP.posfleet-p3.1.{sseq}.{cseq}.{ts_ns}.{pending}"
    return Msg(_client=None, subject=subject, reply=reply, data=data)  # type: ignore[arg-type]


def test_partition_message_back_to_its_topic_with_the_stored_time() -> None:
    item = inbound(stored("posp.3.T1.heartbeat", 41, 7, b"x"), "pos/v1", 3)
    assert (item.topic, item.payload, item.partition, item.seq, item.retain) == ("pos/v1/T1/heartbeat", b"x", 3, 41,
                                                                                  False)
    assert item.rx == pytest.approx(T_NS / 1e9)  # the stream's time, not ours: a replay is not fresher


def test_feed_message_keeps_its_own_prefix() -> None:
    item = inbound(stored("acquirer.v1.acq-a.transactions", 5, 5), "pos/v1", FEED)
    assert item.topic == "acquirer/v1/acq-a/transactions" and item.partition == FEED


def test_unexpected_subject_reaches_the_decoder_as_is() -> None:
    assert inbound(stored("posp.3.T1", 1, 1), "pos/v1", 3).topic == "posp.3.T1"  # decode rejects it, counted


@pytest.mark.parametrize(
    ("last", "cseqs", "expected"),
    [
        (None, [1, 2, 3], 3),  # the first fetch of a consumer
        (3, [4, 5], 5),
        (3, [], 3),
        (3, [5, 6], None),  # 4 was delivered into a response that never arrived
        (3, [4, 6], None),
        (3, [3], None),  # a redelivery out of turn: read again from what was applied
    ],
)
def test_next_cseq_finds_lost_deliveries(last: int | None, cseqs: list[int], expected: int | None) -> None:
    msgs = [stored("posp.3.T1.heartbeat", 100 + c, c) for c in cseqs]
    assert next_cseq(last, msgs) == expected


def test_connect_options_credentials_and_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSFLEET_NATS_PASSWORD", "from-env")
    opts = connect_options(NatsConfig(servers=["nats://a:4222", "nats://b:4222"], user="u"), "posfleet-c0")
    assert opts["servers"] == ["nats://a:4222", "nats://b:4222"] and opts["user"] == "u"
    assert opts["password"] == "from-env" and opts["max_reconnect_attempts"] == -1 and "tls" not in opts
    assert "tls" in connect_options(NatsConfig(servers=["tls://a:4222"]), "x")
