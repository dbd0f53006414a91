"""decode(): every rejection reason, table-driven; the payload never leaks into the error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from collector.protocol import (
    REJECT_REASONS,
    DecodeError,
    Heartbeat,
    Status,
    TxnReceipt,
    UpstreamBatch,
    decode,
    find_card_number,
    luhn_ok,
)

BASE: dict[str, Any] = {
    "tid": "T1", "ts": 1764510000, "seq": 1, "interval_s": 30, "txn_count": 5, "uploaded_count": 5,
    "queue_depth": 0, "oldest_queued_ts": None,
}
CARD = "4111111111111111"  # a well-known Luhn-valid test PAN


def hb(**over: Any) -> bytes:
    return json.dumps({**BASE, **over}).encode()


def test_valid_heartbeat_with_optional_fields_and_unknown_ones() -> None:
    msg = decode("pos/v1/T1/heartbeat", hb(mid="M1", net={"type": "wifi", "rssi_dbm": -60}, hw={"printer": "ok"},
                                          future_field={"x": 1}))
    assert isinstance(msg, Heartbeat)
    assert msg.mid == "M1" and msg.net is not None and msg.net.rssi_dbm == -60


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("pos/v1/T1/heartbeat", b"x" * 5000, "too_large"),
        ("pos/v1/T1/heartbeat", b"\xff\xfe{}", "not_utf8"),
        ("pos/v1/T1/heartbeat", b"{", "bad_json"),
        ("pos/v1/T1/heartbeat", b'{"ts": NaN}', "bad_json"),
        ("pos/v1/T1/heartbeat", b'{"a":' * 40 + b"1" + b"}" * 40, "too_deep"),
        ("pos/v1/T1/heartbeat", b"[1, 2]", "not_object"),
        ("pos/v1/T1/heartbeat", json.dumps({k: v for k, v in BASE.items() if k != "seq"}).encode(), "missing_field"),
        ("pos/v1/T1/heartbeat", hb(seq="7"), "bad_type"),
        ("pos/v1/T1/heartbeat", hb(hw={"printer": "smoking"}), "bad_type"),
        ("pos/v1/T1/heartbeat", hb(net=[1]), "bad_type"),
        ("pos/v1/T1/heartbeat", hb(seq=-1), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(txn_count=10**30), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(seq=1.5), "bad_type"),
        ("pos/v1/T1/heartbeat", hb(ts=1764510000000), "out_of_range"),  # milliseconds, not seconds
        ("pos/v1/T1/heartbeat", hb(ts=12), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(interval_s=0), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(queue_depth=6), "out_of_range"),  # more queued than ever completed
        ("pos/v1/T1/heartbeat", hb(model="x" * 65), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(tid="T2"), "tid_mismatch"),
        ("pos/v1/T1/heartbeat", hb(mid="M 1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M,1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M=1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M\n1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="Mé"), "bad_id"),
        ("pos/v1/T 1/heartbeat", hb(), "bad_id"),
        ("pos/v1/T,1/heartbeat", hb(), "bad_id"),
        ("pos/v1/Tü/heartbeat", hb(), "bad_id"),
        ("pos/v1/" + "T" * 65 + "/heartbeat", hb(), "bad_id"),
        ("pos/v1/T1/heartbeat/extra", hb(), "bad_topic"),
        ("pos/v1/T1/reboot", hb(), "bad_topic"),
        ("other/T1/heartbeat", hb(), "bad_topic"),
        ("pos/v1/T1/heartbeat", hb(note=CARD), "card_data"),
        ("pos/v1/T1/heartbeat", hb(note="4111 1111 1111 1111"), "card_data"),
        ("pos/v1/T1/heartbeat", hb(note="4111-1111-1111-1111"), "card_data"),
        ("pos/v1/T1/heartbeat", hb(extra=int(CARD)), "card_data"),
        ("pos/v1/T1/status", b'{"state": "sleeping"}', "bad_type"),
        ("pos/v1/T1/status", json.dumps({"state": "offline", "reason": CARD}).encode(), "card_data"),
        ("pos/v1/T1/txn", json.dumps({"txn_id": "x", "ts": 1764510000, "amount_minor": 1, "currency": "EUR",
                                      "status": "approved", "pan": CARD}).encode(), "card_data"),
        ("pos/v1/T1/txn", json.dumps({"txn_id": "x", "ts": 1764510000, "amount_minor": -1, "currency": "EUR",
                                      "status": "approved"}).encode(), "out_of_range"),
        ("acquirer/v1/A1/transactions", json.dumps({"ts": 1764510000, "txns": [{"tid": "T1", "txn_id": CARD,
                                                                               "ts": 1764510000}]}).encode(),
         "card_data"),
        ("acquirer/v1/A 1/transactions", b'{"ts": 1764510000, "txns": []}', "bad_id"),
        ("acquirer/v1/A1/transactions", b'{"ts": 1764510000}', "missing_field"),
        ("acquirer/v1/A1/other", b'{"ts": 1764510000, "txns": []}', "bad_topic"),
    ],
)
def test_rejections(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(topic, payload)
    assert info.value.reason == reason
    assert info.value.reason in REJECT_REASONS
    assert CARD not in str(info.value) and "4111" not in str(info.value)


def test_huge_integer_literal_is_out_of_range_not_a_crash() -> None:
    payload = hb(seq=0).replace(b'"seq": 0', b'"seq": ' + b"9" * 4000)
    with pytest.raises(DecodeError) as info:
        decode("pos/v1/T1/heartbeat", payload)
    assert info.value.reason in ("out_of_range", "too_large")


def test_status_upstream_and_txn_take_ids_from_the_topic() -> None:
    st = decode("pos/v1/T9/status", b'{"state":"offline","reason":"connection_lost"}')
    assert isinstance(st, Status) and st.tid == "T9" and st.ts is None
    up = decode(
        "acquirer/v1/acq-a/transactions", b'{"ts":1764510000,"txns":[{"tid":"T9","txn_id":"a","ts":1764510000}]}'
    )
    assert isinstance(up, UpstreamBatch) and up.acquirer == "acq-a" and up.txns[0].txn_id == "a"
    tx = decode(
        "pos/v1/T9/txn", b'{"txn_id":"a","ts":1764510000,"amount_minor":250,"currency":"EUR","status":"approved"}'
    )
    assert isinstance(tx, TxnReceipt) and tx.tid == "T9"


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (b'{"x": "4111111111111111"}', True),
        (b'{"x": "4111111111111112"}', False),  # Luhn fails
        (b'{"ts": 1764510000, "seq": 123456}', False),
        (b'{"x": "378282246310005"}', True),  # 15-digit Amex test number
        (b'{"x": "41111111111111111111"}', False),  # 20 digits: not a PAN length
    ],
)
def test_card_number_detector(text: bytes, found: bool) -> None:
    assert find_card_number(text) is found


def test_luhn() -> None:
    assert luhn_ok(b"79927398713") and not luhn_ok(b"79927398710")
