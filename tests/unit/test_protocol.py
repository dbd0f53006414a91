"""decode(): every rejection reason, table-driven; the payload never leaks into the error."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from collector.fleet.carddata import may_hold_card  # the hot path's prefilter
from collector.fleet.protocol import (
    CARD_BRANDS,
    REJECT_REASONS,
    DecodeError,
    Heartbeat,
    Status,
    TxnReceipt,
    UpstreamBatch,
    _heartbeat_holds_no_card,  # the heartbeat's typed guard
    decode,
    find_card_number,
    has_card_number,
    is_card_number,
    json_schemas,
    luhn_ok,
    valid_id,
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
        ("pos/v1/T1/heartbeat", hb(ts=-1), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(ts=2**53 + 2), "out_of_range"),
        ("pos/v1/T1/heartbeat", b'{"tid": "T1", "ts": 1e999}', "out_of_range"),  # inf is not a time
        ("pos/v1/T1/heartbeat", b'{"tid": "T1", "ts": Infinity}', "bad_json"),
        ("pos/v1/T1/txn", json.dumps({"txn_id": "x", "ts": 1764510000000, "amount_minor": 1, "currency": "EUR",
                                      "status": "approved"}).encode(), "out_of_range"),  # ms, shown as a date
        ("pos/v1/T1/txn", json.dumps({"txn_id": "x", "ts": 1764510000, "amount_minor": 1, "currency": "EUR\n",
                                      "status": "approved"}).encode(), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(interval_s=0), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(queue_depth=6), "out_of_range"),  # more queued than ever completed
        ("pos/v1/T1/heartbeat", hb(model="x" * 65), "out_of_range"),
        ("pos/v1/T1/heartbeat", hb(tid="T2"), "tid_mismatch"),
        ("pos/v1/T1/heartbeat", hb(mid="M 1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M,1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M=1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M\n1"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="Mé"), "bad_id"),
        ("pos/v1/T1/heartbeat", hb(mid="M1\n"), "bad_id"),  # Python's `$` alone would accept this
        ("pos/v1/T1/heartbeat", hb(tid="T1\n"), "bad_id"),
        ("pos/v1/T1\n/heartbeat", hb(tid="T1\n"), "bad_id"),
        ("acquirer/v1/A1\n/transactions", b'{"ts": 1764510000, "txns": []}', "bad_id"),
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
        ("acquirer/v1/A1/transactions", json.dumps({"ts": 1764510000, "note": CARD, "txns": []}).encode(),
         "card_data"),  # card data in the envelope rejects the whole body
        ("acquirer/v1/A1/transactions", json.dumps({"ts": CARD, "txns": []}).encode(), "card_data"),
        ("acquirer/v1/A1/transactions", b'{"ts": 1764510000, "txns": [1, 2', "bad_json"),
        # Broken JSON whose quotes are off by one: its text is still searched.
        ("acquirer/v1/A1/transactions", b'{"ts": 1764510000, "a": "x, "b": "4111 1111 1111 1111"', "card_data"),
        ("pos/v1/T1/heartbeat", b'{"tid": "T1", "a": "x, "b": "4111 1111 1111 1111"', "card_data"),
        ("acquirer/v1/A1/transactions", b'{"ts": 1764510000, "txns": {}}', "bad_type"),
        ("acquirer/v1/A1/transactions", b'{"ts": 1764510000000, "txns": []}', "out_of_range"),
        ("acquirer/v1/A1/transactions", b'{"ts": 1764510000, "txns": [' + b"1," * 10_000 + b'1]}', "out_of_range"),
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
        (b"not json 4111 1111 1111 1111", True),  # broken JSON is searched as text
    ],
)
def test_card_number_detector(text: bytes, found: bool) -> None:
    assert find_card_number(text) is found


def test_luhn() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")


# ---- the card-data guard: what it must find, and the ordinary numbers it must let through ------------------

FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


def luhn_complete(body: str) -> str:
    """body plus the check digit that makes it pass Luhn."""
    return next(body + c for c in "0123456789" if luhn_ok(body + c))


def groups(number: str, sep: str, size: int = 4) -> str:
    return sep.join(number[i : i + size] for i in range(0, len(number), size))


@pytest.mark.parametrize(
    ("where", "doc"),
    [
        ("plain", {"note": CARD}),
        ("json \\u escapes", None),  # built below from raw bytes
        *[(f"separator {sep!r}", {"note": groups(CARD, sep)}) for sep in
          (" ", "-", ".", "_", ":", "\t", "/", "\n", " - ", "\u00a0", "\u200b", "*", "|")],
        ("two-digit groups", {"note": groups(CARD, " ", 2)}),
        ("full-width digits", {"note": CARD.translate(FULL_WIDTH)}),
        ("Arabic-Indic digits", {"note": CARD.translate(ARABIC_INDIC)}),
        ("Devanagari digits, spaced", {"note": groups(CARD.translate(DEVANAGARI), " ")}),
        ("mixed scripts", {"note": CARD[:8] + CARD[8:].translate(FULL_WIDTH)}),
        ("embedded in text", {"note": f"card={CARD};exp=12/29"}),
        ("after a date", {"note": f"2025-12-01 {groups(CARD, ' ')}"}),
        ("glued to letters", {"note": f"PAN{CARD}X"}),
        ("unknown nested field", {"extra": {"deeper": {"x": CARD}}}),
        ("nested array", {"extra": [1, [2, {"y": [groups(CARD, ".")]}]]}),
        ("object key", {"extra": {CARD: 1}}),
        ("integer in an unknown field", {"extra": int(CARD)}),
        ("negative integer", {"extra": -int(CARD)}),
        ("integer in an array", {"extra": [0, int(CARD)]}),
        ("amex 15", {"note": "3782 822463 10005"}),
        ("mastercard 2-series", {"note": "2223000048400011"}),
        ("discover", {"note": "6011111111111117"}),
        ("jcb", {"note": "3530111333300000"}),
        ("diners 14", {"note": "30569309025904"}),
        ("unionpay 19", {"note": luhn_complete("620000000000000000")}),
        ("visa 13", {"note": "4222222222222"}),
        ("visa 19", {"note": luhn_complete("411111111111111111")}),
    ],
)
def test_card_numbers_found_in_any_form(where: str, doc: dict[str, Any] | None) -> None:
    payload = hb(note="\\u0034" + CARD[1:]).replace(b"\\\\u", b"\\u") if doc is None else hb(**doc)
    with pytest.raises(DecodeError) as info:
        decode("pos/v1/T1/heartbeat", payload)
    assert info.value.reason == "card_data", where
    assert info.value.tid == "T1"


MS_TIMESTAMP = luhn_complete("176451000012")  # 13 digits, a millisecond timestamp, passes Luhn
SNOWFLAKE = luhn_complete("176451000012345678")  # 19 digits, a snowflake-style id, passes Luhn


@pytest.mark.parametrize(
    ("where", "over"),
    [
        ("long float (battery from millivolts)", {"power": {"source": "battery", "battery_pct": 8.285714285714285}}),
        ("long float rssi", {"net": {"type": "wifi", "rssi_dbm": -61.428571428571431}}),
        ("ts with microseconds", {"ts": 1764510000.123456}),
        ("float that looks like a PAN", {"extra": 4111111111111111.0}),
        ("float with a PAN in its digits", {"extra": 0.4111111111111111}),
        ("ms timestamp integer", {"extra": int(MS_TIMESTAMP)}),
        ("ms timestamp string", {"extra": MS_TIMESTAMP}),
        ("snowflake integer", {"extra": int(SNOWFLAKE)}),
        ("snowflake string", {"extra": SNOWFLAKE}),
        ("Luhn-valid 16 digits, no brand starts with 9", {"extra": luhn_complete("9" * 15)}),
        ("Luhn-valid 15 digits starting 4 (Visa is 13/16/19)", {"extra": luhn_complete("4" + "1" * 13)}),
        ("20 unbroken digits", {"extra": "4111111111111111" + "1234"}),
        ("groups split by 4 separators", {"extra": groups(CARD, "    ")}),
        ("counters and small numbers", {"extra": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]}),
        ("Luhn-failing PAN", {"extra": "4111111111111112"}),
        ("ip addresses", {"extra": "10.20.30.40 192.168.100.200"}),
    ],
)
def test_ordinary_numbers_are_not_card_data(where: str, over: dict[str, Any]) -> None:
    msg = decode("pos/v1/T1/heartbeat", hb(**over))
    assert isinstance(msg, Heartbeat), where


def test_plausible_ms_timestamp_and_snowflake_pass_luhn_but_have_no_brand() -> None:
    assert luhn_ok(MS_TIMESTAMP) and luhn_ok(SNOWFLAKE)  # the Luhn check alone would flag both
    assert not is_card_number(MS_TIMESTAMP) and not is_card_number(SNOWFLAKE)


def test_every_brand_row_is_reachable() -> None:
    """The lowest and highest prefix of each row, at each length 13–19, against the table read row by row."""
    for brand, lo, hi, lengths in CARD_BRANDS:
        for prefix in (lo, hi):
            for n in range(13, 20):
                number = luhn_complete(prefix + "0" * (n - len(prefix) - 1))
                expected = any(n in ls and a <= number[: len(a)] <= b for _x, a, b, ls in CARD_BRANDS)
                assert expected or n not in lengths, (brand, prefix, n)
                assert is_card_number(number) is expected, (brand, prefix, n)
                assert not is_card_number(number[:-1] + str((int(number[-1]) + 1) % 10))  # Luhn still applies


# ---- acquirer feeds: one bad transaction drops only itself -------------------------------------------------


def feed(*txn_ids: Any, ts: Any = 1764510000, **extra: Any) -> bytes:
    return json.dumps({"ts": ts, "txns": [{"tid": "T1", "txn_id": t, "ts": 1764510000} for t in txn_ids],
                       **extra}).encode()


def test_feed_of_numeric_txn_ids_with_one_pan_keeps_all_others() -> None:
    ids = [str(1764510000000 + i) for i in range(100)] + [str(1234567890123456789 + i) for i in range(100)]
    assert sum(luhn_ok(i) for i in ids) > 10  # a Luhn-only guard would have dropped the whole batch
    batch = decode("acquirer/v1/A1/transactions", feed(*ids[:50], CARD, *ids[50:]))
    assert isinstance(batch, UpstreamBatch)
    assert [t.txn_id for t in batch.txns] == ids
    assert batch.dropped == ("card_data",) and batch.acquirer == "A1"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"tid": "T1", "txn_id": CARD, "ts": 1764510000}, "card_data"),
        ({"tid": "T1", "txn_id": groups(CARD, "."), "ts": 1764510000}, "card_data"),
        ({"tid": "T1", "txn_id": "x", "ts": 1764510000, "pan": CARD.translate(FULL_WIDTH)}, "card_data"),
        ({"tid": "T1", "txn_id": "x", "ts": 1764510000, "pan": int(CARD)}, "card_data"),
        ({"tid": "T 1", "txn_id": "x", "ts": 1764510000}, "bad_id"),
        ({"tid": "T1\n", "txn_id": "x", "ts": 1764510000}, "bad_id"),
        ({"tid": "T1", "txn_id": 7, "ts": 1764510000}, "bad_type"),
        ({"tid": "T1", "txn_id": "x", "ts": 1764510000000}, "out_of_range"),
        ({"tid": "T1", "txn_id": "", "ts": 1764510000}, "out_of_range"),
        ({"tid": "T1", "ts": 1764510000}, "missing_field"),
        ("T1", "not_object"),
        (None, "not_object"),
    ],
)
def test_feed_drops_only_the_bad_transaction_with_its_reason(bad: Any, reason: str) -> None:
    good = [{"tid": "T1", "txn_id": f"ok-{i}", "ts": 1764510000} for i in range(3)]
    body = json.dumps({"ts": 1764510000, "txns": [good[0], bad, good[1], bad, good[2]]}).encode()
    batch = decode("acquirer/v1/A1/transactions", body)
    assert isinstance(batch, UpstreamBatch)
    assert [t.txn_id for t in batch.txns] == ["ok-0", "ok-1", "ok-2"]
    assert batch.dropped == (reason, reason) and reason in REJECT_REASONS


def test_clean_feed_drops_nothing() -> None:
    batch = decode("acquirer/v1/A1/transactions", feed("a", "b", "1764510000123"))
    assert isinstance(batch, UpstreamBatch) and len(batch.txns) == 3 and batch.dropped == ()


def test_upstream_schema_is_what_senders_send() -> None:
    schema = json.dumps(json_schemas()["upstream"])
    assert '"txns"' in schema and '"dropped"' not in schema


# ---- who sent it, for messages that were rejected -----------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "payload", "tid", "acquirer"),
    [
        ("pos/v1/T1/heartbeat", hb(seq=-1), "T1", None),
        ("pos/v1/T1/heartbeat", b"{", "T1", None),
        ("pos/v1/T1/status", json.dumps({"state": "x", "reason": CARD}).encode(), "T1", None),
        ("pos/v1/T1/txn", b"[]", "T1", None),
        ("pos/v1/T1\n/heartbeat", hb(), None, None),  # not a valid id: never named
        (f"pos/v1/T{CARD}/heartbeat", hb(), None, None),  # card data in the topic: never named
        ("pos/v1/T1/reboot", hb(), None, None),
        ("acquirer/v1/A1/transactions", b"{", None, "A1"),
        ("acquirer/v1/A1/transactions", feed(ts=1), None, "A1"),
        (f"acquirer/v1/{CARD}/transactions", feed(), None, None),
    ],
)
def test_rejection_names_the_sender_only_when_its_id_is_safe(
    topic: str, payload: bytes, tid: str | None, acquirer: str | None
) -> None:
    with pytest.raises(DecodeError) as info:
        decode(topic, payload)
    assert (info.value.tid, info.value.acquirer) == (tid, acquirer)


# ---- ids are whole matches -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ok"),
    [("T1", True), ("a-b_C9", True), ("x" * 64, True), ("x" * 65, False), ("", False), ("T1\n", False),
     ("\nT1", False), ("T1\r", False), ("T 1", False), ("Tü", False), ("T1\x00", False)],
)
def test_valid_id_is_a_full_match_and_agrees_with_the_decoder(value: str, ok: bool) -> None:
    assert valid_id(value) is ok
    payload = json.dumps({**BASE, "mid": value}).encode()
    if ok:
        assert isinstance(decode("pos/v1/T1/heartbeat", payload), Heartbeat)
    else:
        with pytest.raises(DecodeError):
            decode("pos/v1/T1/heartbeat", payload)


def test_id_pattern_in_the_schema_rejects_a_trailing_newline_in_ecma_terms() -> None:
    pattern = json_schemas()["heartbeat"]["$defs"]["Heartbeat"]["properties"]["tid"]["pattern"]
    assert "(?!\\n)$" in pattern  # Python's re and ECMA-262 both read `$` after a newline lookahead as the end


# ---- terminal clocks: broken clocks decode; state reports them as clock_skew ----------------------------------


@pytest.mark.parametrize(
    "over",
    [
        {"ts": 0},  # RTC reset to 1970
        {"ts": 12},
        {"ts": 1764510000000},  # milliseconds: decades ahead as seconds
        {"ts": 4_102_444_800 * 10},  # far future
        {"ts": 2**53},
        {"ts": 0, "oldest_queued_ts": 0, "queue_depth": 1},
        {"oldest_queued_ts": 2**53, "queue_depth": 1},
    ],
)
def test_broken_terminal_clocks_decode(over: dict[str, Any]) -> None:
    msg = decode("pos/v1/T1/heartbeat", hb(**over))
    assert isinstance(msg, Heartbeat) and msg.ts == over.get("ts", BASE["ts"])


def test_status_with_a_reset_clock_decodes() -> None:
    st = decode("pos/v1/T1/status", b'{"state": "online", "ts": 0}')
    assert isinstance(st, Status) and st.ts == 0


# ---- cost: ordinary payloads skip the search; hostile ones are searched in linear time ------------------------


@pytest.mark.parametrize(
    ("over", "fast"),
    [
        ({}, True),
        ({"power": {"source": "battery", "battery_pct": 8.285714285714285}}, True),
        ({"ts": 1764510000.123456, "oldest_queued_ts": 1764509990.654321, "queue_depth": 1}, True),
        ({"extra": [1.25, -0.333333333333333, 1e-7]}, True),
        ({"extra": 1764510000123}, False),  # a 13-digit integer is searched (and is no card number)
        ({"extra": "1764510000123"}, False),
        ({"model": "Møve/5000"}, False),  # non-ASCII: only the decoded string tells
    ],
)
def test_the_raw_prefilter_keeps_ordinary_heartbeats_on_the_fast_path(over: dict[str, Any], fast: bool) -> None:
    payload = hb(**over)
    assert (not may_hold_card(payload)) is fast
    assert isinstance(decode("pos/v1/T1/heartbeat", payload), Heartbeat)


@pytest.mark.parametrize(
    ("over", "typed"),
    [
        ({}, True),  # oldest_queued_ts null, the usual heartbeat
        ({"oldest_queued_ts": 1764509990.5, "queue_depth": 1, "net": {"type": "wifi", "rssi_dbm": None}}, True),
        ({"os_version": None, "uptime_s": None}, True),
        ({"extra": None}, False),  # a key the message does not have: the guard reads the payload
        ({"model": "PAX 12:30"}, False),  # a colon in a string
        ({"txn_count": 1764510000123, "uploaded_count": 1764510000123}, False),  # 13 digits
    ],
)
def test_the_typed_guard_answers_for_ordinary_heartbeats(over: dict[str, Any], typed: bool) -> None:
    """The heartbeat's card-data check is read off the typed message when the payload holds nothing else (the
    property test in test_protocol_properties.py holds it to the full search)."""
    payload = hb(**over).replace(b": ", b":").replace(b", ", b",")
    msg = msgspec.json.decode(payload, type=Heartbeat)
    assert _heartbeat_holds_no_card(msg, "T1", payload) is typed
    assert isinstance(decode("pos/v1/T1/heartbeat", payload), Heartbeat)


def test_a_card_number_after_thousands_of_digit_chunks_is_found() -> None:
    noise = "5 " * 1800  # thousands of candidate spans, none of them a card number
    assert not has_card_number(noise)
    assert has_card_number(noise + groups(CARD, " ", 1))
    assert has_card_number(groups(CARD, "-", 2) + " " + noise)
