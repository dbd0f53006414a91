"""decode() under hypothesis: nothing but DecodeError escapes, every real card number is found in any form,
ordinary ids are never taken for one, and a feed loses exactly its bad transactions.

`python -m tests.unit.test_protocol_properties` prints the guard's measured false-positive rate for random
numeric ids, and `... cost` the µs per decode (the figures in docs/protocol.md).
"""

from __future__ import annotations

import json
import random
import string
import sys
import timeit
from functools import partial
from typing import Any

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from collector.fleet.carddata import json_has_card  # the hot path's prefilter, checked against the full search
from collector.fleet.protocol import (
    CARD_BRANDS,
    DecodeError,
    Heartbeat,
    UpstreamBatch,
    UpstreamTxn,
    decode,
    find_card_number,
    has_card_number,
    is_card_number,
    luhn_ok,
    valid_id,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE: dict[str, Any] = {
    "tid": "T1", "ts": 1764510000, "seq": 1, "interval_s": 30, "txn_count": 5, "uploaded_count": 5,
    "queue_depth": 0, "oldest_queued_ts": None,
}
# Decimal digit scripts a terminal's firmware or a copy-paste could produce.
DIGIT_SCRIPTS = ("0123456789", "０１２３４５６７８９", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯",
                 "๐๑๒๓๔๕๖๗๘๙", "𝟎𝟏𝟐𝟑𝟒𝟓𝟔𝟕𝟖𝟗")
SEPARATORS = " -._:/\t\n*|+,;~\u00a0\u2009\u200b\u2013"
PLAIN_SEPARATORS = " -._:/*|+,;~[]{}"


def complete(body: str) -> str:
    """body plus its Luhn check digit."""
    return next(body + c for c in "0123456789" if luhn_ok(body + c))


@st.composite
def pans(draw: st.DrawFn) -> str:
    """A Luhn-valid number with the prefix and length of a listed brand."""
    _brand, lo, hi, lengths = draw(st.sampled_from(CARD_BRANDS))
    length = draw(st.sampled_from(lengths))
    prefix = str(draw(st.integers(int(lo), int(hi))))
    rest = draw(st.text("0123456789", min_size=length - len(prefix) - 1, max_size=length - len(prefix) - 1))
    return complete(prefix + rest)


@st.composite
def written(draw: st.DrawFn, number: str, plain: bool = False) -> str:
    """number as a person or a program might write it: any grouping, short separators, any digit script.

    plain: ASCII digits and separators JSON writes as they are (no escapes), the raw prefilter's own ground.
    """
    script = "0123456789" if plain else draw(st.sampled_from(DIGIT_SCRIPTS))
    digits = number.translate(str.maketrans("0123456789", script))
    out, i = [], 0
    while i < len(digits):
        size = draw(st.integers(1, len(digits) - i))
        out.append(digits[i : i + size])
        i += size
    seps = [draw(st.text(PLAIN_SEPARATORS if plain else SEPARATORS, min_size=1, max_size=3)) for _ in out[1:]]
    return "".join(chunk + sep for chunk, sep in zip(out, [*seps, ""], strict=True))


# Text around the number: no digit or separator touching it, so the number's own chunks stay whole.
SURROUND = st.text(string.ascii_letters + "é ", max_size=12).map(lambda s: s.strip())


@st.composite
def payload_with_card(draw: st.DrawFn) -> bytes:
    """A valid heartbeat with a written card number somewhere: a known string field, an unknown one, nested."""
    number = draw(pans())
    text = draw(SURROUND) + " " + draw(written(number)) + " " + draw(SURROUND)
    doc = dict(BASE)
    where = draw(st.sampled_from(["model", "app_version", "note", "nested", "array", "key"]))
    if where == "nested":
        doc["extra"] = {"a": {"b": text}}
    elif where == "array":
        doc["extra"] = [1, "x", [text]]
    elif where == "key":
        doc["extra"] = {text: 1}
    else:
        doc[where] = text
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()  # ensure_ascii: \uXXXX escapes


@SETTINGS
@given(payload_with_card())
def test_every_written_card_number_is_found(payload: bytes) -> None:
    try:
        decode("pos/v1/T1/heartbeat", payload)
    except DecodeError as err:
        assert err.reason == "card_data"
    else:
        raise AssertionError(f"card number not found in {payload!r}")


@SETTINGS
@given(pans())
def test_every_card_number_as_an_integer_is_found(number: str) -> None:
    try:
        decode("pos/v1/T1/heartbeat", json.dumps({**BASE, "extra": [int(number)]}).encode())
    except DecodeError as err:
        assert err.reason == "card_data"
    else:
        raise AssertionError(number)


# Ordinary ids that start with 1: millisecond timestamps (13 digits) and snowflake-style ids (19 digits).
ORDINARY_IDS = st.one_of(
    st.integers(10**12, 2 * 10**12 - 1), st.integers(10**18, 2 * 10**18 - 1)
).map(str)


@SETTINGS
@given(st.lists(ORDINARY_IDS, min_size=1, max_size=50), st.floats(0, 100))
def test_timestamps_and_snowflakes_are_never_card_data(ids: list[str], battery: float) -> None:
    body = json.dumps({"ts": 1764510000, "txns": [{"tid": "T1", "txn_id": i, "ts": 1764510000} for i in ids]})
    batch = decode("acquirer/v1/A1/transactions", body.encode())
    assert isinstance(batch, UpstreamBatch) and len(batch.txns) == len(ids) and batch.dropped == ()
    hb = {**BASE, "extra": [int(i) for i in ids], "ids": " ".join(ids), "power": {"battery_pct": battery}}
    assert isinstance(decode("pos/v1/T1/heartbeat", json.dumps(hb).encode()), Heartbeat)


BAD_TXNS: list[tuple[str, Any]] = [
    ("card_data", {"tid": "T1", "txn_id": "4111111111111111", "ts": 1764510000}),
    ("card_data", {"tid": "T1", "txn_id": "x", "ts": 1764510000, "pan": "4111 1111 1111 1111"}),
    ("bad_id", {"tid": "T1\n", "txn_id": "x", "ts": 1764510000}),
    ("bad_type", {"tid": "T1", "txn_id": 5, "ts": 1764510000}),
    ("out_of_range", {"tid": "T1", "txn_id": "x", "ts": 1764510000000}),
    ("missing_field", {"tid": "T1", "ts": 1764510000}),
    ("not_object", [1, 2]),
]


@SETTINGS
@given(st.lists(ORDINARY_IDS, max_size=40), st.lists(st.sampled_from(BAD_TXNS), max_size=10), st.randoms())
def test_a_batch_with_k_bad_txns_among_n_keeps_exactly_n_minus_k(
    good_ids: list[str], bad: list[tuple[str, Any]], rnd: random.Random
) -> None:
    entries: list[tuple[str | None, Any]] = [(None, {"tid": "T1", "txn_id": i, "ts": 1764510000}) for i in good_ids]
    entries += bad
    rnd.shuffle(entries)
    body = json.dumps({"ts": 1764510000, "txns": [e for _r, e in entries]}).encode()
    batch = decode("acquirer/v1/A1/transactions", body)
    assert isinstance(batch, UpstreamBatch)
    assert [t.txn_id for t in batch.txns] == [e["txn_id"] for r, e in entries if r is None]
    assert batch.dropped == tuple(r for r, _e in entries if r is not None)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
TOPICS = st.one_of(
    st.text(max_size=40),
    st.builds(lambda tid, kind: f"pos/v1/{tid}/{kind}", st.text(max_size=20),
              st.sampled_from(["heartbeat", "status", "txn", "x"])),
    st.builds(lambda acq: f"acquirer/v1/{acq}/transactions", st.text(max_size=20)),
)


def mutated_heartbeat(doc: dict[str, Any]) -> bytes:
    return json.dumps({**BASE, **doc}).encode()


@settings(max_examples=500, deadline=None)
@given(TOPICS, st.one_of(st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
                         st.dictionaries(st.sampled_from([*BASE, "ts", "txns", "state", "net", "hw"]), JSON_VALUES)
                         .map(mutated_heartbeat)))
@example("acquirer/v1/A/transactions", b'{"ts": 1764510000, "txns": [{"tid": "T1", "txn_id": "\\u00e9", "ts": 1}]}')
@example("pos/v1/T1/heartbeat", b'{"a": "\\ud800"}')  # a lone surrogate escape
def test_decode_raises_nothing_but_decode_error(topic: str, payload: bytes) -> None:
    try:
        decode(topic, payload)
    except DecodeError as err:
        assert err.tid is None or valid_id(err.tid)
        assert err.acquirer is None or valid_id(err.acquirer)


LEAVES = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.integers(),
    st.integers(10**12, 10**19), pans().map(int), pans().map(lambda n: -int(n)), pans().map(lambda n: int(n) / 10),
    st.text(max_size=20), st.from_regex(r"[0-9 .:_\-/,\t]{10,40}", fullmatch=True),
    pans().flatmap(written), pans().flatmap(lambda n: written(n, plain=True).map(lambda w: f"x{w}y")),
    pans().flatmap(lambda n: written(n, plain=True)), pans(),
)
DOCS = st.recursive(LEAVES, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.one_of(st.text(max_size=8), pans()), children, max_size=4), max_leaves=12)


@SETTINGS
@given(DOCS, st.booleans(), st.booleans())
@example("4222222222222", True, True)  # 13 digits, the shortest run
@example(["4111:::1111---1111...1111", 1.5], True, True)  # three-character separators
@example({"a": [4222222222222]}, True, True)
def test_the_raw_prefilter_never_hides_what_the_full_search_finds(doc: Any, ascii_only: bool, compact: bool) -> None:
    payload = json.dumps(doc, ensure_ascii=ascii_only, separators=(",", ":") if compact else None).encode()
    assert json_has_card(payload) is find_card_number(payload)


def reference_is_card(digits: str) -> bool:
    """The brand table read row by row, and Luhn: the obvious, slow definition."""
    return luhn_ok(digits) and any(
        len(digits) in lengths and lo <= digits[: len(lo)] <= hi for _b, lo, hi, lengths in CARD_BRANDS
    )


def reference_has_card(chunks: list[str]) -> bool:
    """Every contiguous span of whole chunks with 13–19 digits, joined and checked one by one."""
    return any(
        reference_is_card("".join(chunks[i:j]))
        for i in range(len(chunks)) for j in range(i + 1, len(chunks) + 1)
        if 13 <= sum(map(len, chunks[i:j])) <= 19
    )


CHUNKS = st.lists(
    st.one_of(st.text("0123456789", min_size=1, max_size=6), pans(), st.sampled_from(["4", "37", "6011"])),
    min_size=1, max_size=12,
)


@SETTINGS
@given(CHUNKS, st.sampled_from([" ", "-", ". ", "_:/"]))
def test_the_span_search_matches_the_obvious_definition(chunks: list[str], sep: str) -> None:
    assert has_card_number(sep.join(chunks)) is reference_has_card(chunks)


@SETTINGS
@given(st.text("0123456789", min_size=13, max_size=19))
def test_is_card_number_matches_the_table(digits: str) -> None:
    assert is_card_number(digits) is reference_is_card(digits)


@given(st.text(max_size=70))
@example("T1\n")
def test_valid_id_agrees_with_the_schema_pattern(value: str) -> None:
    try:
        msgspec.convert({"tid": value, "txn_id": "x", "ts": 1764510000}, UpstreamTxn)
        decoded = True
    except msgspec.ValidationError:
        decoded = False
    assert decoded is valid_id(value)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_has_card_number_never_raises(text: str) -> None:
    has_card_number(text)


# ---- the measured residual false-positive rate (docs/protocol.md) ---------------------------------------------


def false_positive_rate(length: int, samples: int, seed: int, first: str | None = None) -> float:
    """Share of random numeric ids of `length` digits (first digit `first`, or any 1–9) taken for card data."""
    rng = random.Random(seed)
    lo = 10 ** (length - 1) if first is None else int(first) * 10 ** (length - 1)
    hi = 10**length - 1 if first is None else (int(first) + 1) * 10 ** (length - 1) - 1
    return sum(is_card_number(str(rng.randint(lo, hi))) for _ in range(samples)) / samples


def test_false_positive_rate_is_bounded_by_the_brand_table() -> None:
    # Ids starting with 1 (timestamps, snowflakes) are only ever plausible as 15-digit UATP numbers.
    for length in (13, 14, 16, 17, 18, 19):
        assert false_positive_rate(length, 2000, seed=length, first="1") == 0.0
    # Uniform ids: Luhn passes 1 in 10; the brand table keeps well under half of those.
    assert 0.0 < false_positive_rate(16, 20_000, seed=1) < 0.06


def decode_cost_us() -> dict[str, float]:
    """Best-of-5 µs per decode of a typical heartbeat, one with long floats, and hostile worst cases."""
    typical = {**BASE, "ts": 1764510000.5, "mid": "M00010", "model": "A920", "app_version": "3.4.1",
               "uptime_s": 3541, "net": {"type": "wifi", "rssi_dbm": -61}, "power": {"source": "mains",
               "battery_pct": 100}, "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}}
    cases = {
        "typical heartbeat": ("pos/v1/T1/heartbeat", typical, 20_000),
        "heartbeat, battery_pct 8.285714285714285": (
            "pos/v1/T1/heartbeat", {**typical, "power": {"source": "battery", "battery_pct": 8.285714285714285}},
            20_000),
        "heartbeat, ts with microseconds": ("pos/v1/T1/heartbeat", {**typical, "ts": 1764510000.123456}, 20_000),
        "4 KiB heartbeat of one-digit chunks (worst case)": (
            "pos/v1/T1/heartbeat", {**typical, "note": "5 " * 1800}, 20),
        "1000-txn feed, 13-digit numeric txn ids": ("acquirer/v1/A1/transactions", {"ts": 1764510000, "txns": [
            {"tid": "T1", "txn_id": str(1764510000000 + 7 * i), "ts": 1764510000} for i in range(1000)]}, 20),
    }
    out = {}
    for name, (topic, doc, number) in cases.items():
        payload = json.dumps(doc).encode()
        timer = timeit.Timer(partial(decode, topic, payload))
        out[name] = min(timer.repeat(number=number, repeat=5)) / number * 1e6
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["cost"]:
        for name, us in decode_cost_us().items():
            print(f"{name}: {us:,.1f} µs per decode")
        raise SystemExit(0)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    print(f"false-positive rate over {n:,} random numeric ids per length (Luhn alone: ~10%)")
    print("| digits | uniform first digit 1–9 | first digit 1 (timestamps, snowflakes) |")
    print("|---|---|---|")
    for length in range(13, 20):
        uniform = false_positive_rate(length, n, seed=length)
        ones = false_positive_rate(length, n, seed=100 + length, first="1")
        print(f"| {length} | {uniform:.2%} | {ones:.2%} |")


# ---- the typed guard on the heartbeat's hot path ------------------------------------------------------------
# A heartbeat written member by member, so keys can repeat: every field present, null or absent, values that are
# card numbers (as text or as integers) or near misses, unknown keys (a card number as the key too), duplicates
# that overwrite a card number, a colon in a string, spaces around the colon.
def mostly(ordinary: st.SearchStrategy[Any], *traps: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """An ordinary value three times in four, else one of the traps."""
    return st.integers(0, 3).flatmap(lambda i: st.one_of(*traps) if i == 0 and traps else ordinary)


HB_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "ts": mostly(st.floats(1e9, 2e9), st.integers(10**12, 10**16), pans().map(int)),
    "seq": mostly(st.integers(0, 100), pans().map(int)),
    "txn_count": mostly(st.integers(10, 1000), st.integers(10**12, 10**13)), "uploaded_count": st.integers(0, 10),
    "queue_depth": st.just(0), "interval_s": st.sampled_from([30, 30.0, 60]),
    "oldest_queued_ts": mostly(st.one_of(st.none(), st.floats(0, 2e9)), pans().map(int)),
    "mid": mostly(st.sampled_from([None, "M1", "M00042"]), pans()),
    "model": mostly(st.sampled_from([None, "A920", "PAX A920 Pro"]), st.just("A920 12:30"),
                    pans().flatmap(lambda n: written(n, plain=True)), pans()),
    "app_version": mostly(st.sampled_from([None, "4.2.1"]), pans()),
    "os_version": mostly(st.sampled_from([None, "11"]), pans().map(lambda n: f"build {n}")),
    "uptime_s": mostly(st.one_of(st.none(), st.floats(0, 1e6)), pans().map(int)),
    "net": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["wifi", None]), "rssi_dbm": st.sampled_from([-70, None])})),
    "hw": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"printer": st.sampled_from(["ok", None])})),
}
UNKNOWN_MEMBERS = st.tuples(
    st.one_of(st.sampled_from(["note", "type", "x"]), pans()),
    st.one_of(st.none(), st.just(1), pans(), pans().map(int), st.just({"a": None}), st.just([None])),
)


@st.composite
def heartbeat_members(draw: st.DrawFn) -> bytes:
    """A heartbeat of topic T1 as JSON text, member by member (repeats allowed); mostly one the typed guard can
    answer for, with a trap somewhere in about half of them."""
    members: list[tuple[str, Any]] = [("tid", draw(mostly(st.just("T1"), st.just("4111111111111111"))))]
    for key, values in HB_VALUES.items():
        required = key in ("ts", "seq", "txn_count", "uploaded_count", "queue_depth", "interval_s",
                           "oldest_queued_ts")
        if required or draw(st.booleans()):
            members.append((key, draw(values)))
    if draw(st.integers(0, 3)) == 0:
        members.append(draw(UNKNOWN_MEMBERS))
    if draw(st.integers(0, 3)) == 0:  # an earlier member repeated, the one decoded last keeps its place
        key, _value = draw(st.sampled_from(members))
        members.insert(draw(st.integers(0, len(members))), (key, draw(HB_VALUES.get(key, UNKNOWN_MEMBERS.map(
            lambda m: m[1])))))
    colon = draw(mostly(st.just(":"), st.sampled_from([": ", " :"])))
    return ("{" + ",".join(json.dumps(k) + colon + json.dumps(v) for k, v in members) + "}").encode()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heartbeat_members())
@example(b'{"tid":"T1","ts":1,"seq":1,"interval_s":30,"txn_count":1,"uploaded_count":1,"queue_depth":0,'
         b'"oldest_queued_ts":null,"model":"4111111111111111","model":"A920"}')  # an overwritten card number
@example(b'{"tid":"T1","ts":1,"seq":1,"interval_s":30,"txn_count":1,"uploaded_count":1,"queue_depth":0,'
         b'"oldest_queued_ts":null,"4111111111111111":null}')  # a card number as a key, its value null
@example(b'{"tid":"T1","ts":1,"seq":1,"interval_s":30,"txn_count":1,"uploaded_count":1,"queue_depth":0,'
         b'"oldest_queued_ts":null,"uptime_s":4111111111111111}')  # a JSON integer in a float field
def test_the_typed_guard_says_what_the_full_search_says(payload: bytes) -> None:
    """decode() reads the card-data guard off the typed heartbeat when it can prove the payload holds nothing
    else; whatever the payload, it rejects with card_data exactly when the full search finds a card number."""
    try:
        decode("pos/v1/T1/heartbeat", payload)
        reason = None
    except DecodeError as err:
        reason = err.reason
    assert (reason == "card_data") is find_card_number(payload), (reason, payload)
