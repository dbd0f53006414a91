"""Reconciliation as a pure function, and the streaming settlement and receipt readers."""

from __future__ import annotations

import io
import json
import tracemalloc
from pathlib import Path

import pytest

from collector.support.reconcile import (
    Completed,
    Progress,
    Recorded,
    SettlementError,
    Window,
    day_window,
    parse_time,
    read_receipts,
    read_settlement,
    reconcile,
)

NOW = 1_800_000_000.0
GRACE = 900.0
DAY = Window(NOW - 86_400, NOW + 1)


def done(tid: str, n: int, at: float, status: str = "approved", merchant: str = "M1", amount: int = 100) -> Completed:
    return Completed(tid, f"{tid}-{n}", at, at, amount, "EUR", status, merchant, "acq-a")


def rec(tid: str, n: int, at: float, merchant: str = "") -> Recorded:
    return Recorded(tid, f"{tid}-{n}", at, at + 5, merchant, "acq-a")


def ids(items: list[dict[str, object]]) -> list[object]:
    return [x["txn_id"] for x in items]


def test_lists_exactly_the_unrecorded_and_the_unknown() -> None:
    completed = [done("T1", n, NOW - 5000 + n) for n in range(1, 6)]
    recorded = [rec("T1", n, NOW - 5000 + n) for n in (1, 3, 5)] + [rec("T1", 99, NOW - 3000)]
    r = reconcile(completed, recorded, DAY, NOW, GRACE)
    assert ids(r.missing_at_acquirer) == ["T1-2", "T1-4"]
    assert ids(r.unknown_to_terminal) == ["T1-99"]
    assert r.missing_at_acquirer[0]["age_s"] == 4998.0
    t = r.totals
    assert (t.completed, t.recorded, t.matched, t.missing_at_acquirer, t.unknown_to_terminal, t.pending) == (
        5, 4, 3, 2, 1, 0)
    assert t.missing_amount_minor == {"EUR": 200}


def test_within_grace_is_pending_not_missing() -> None:
    r = reconcile([done("T1", 1, NOW - 100), done("T1", 2, NOW - 1000)], [], DAY, NOW, GRACE)
    assert ids(r.pending) == ["T1-1"] and ids(r.missing_at_acquirer) == ["T1-2"]


def test_recorded_within_grace_without_receipt_is_not_flagged() -> None:
    r = reconcile([done("T1", 1, NOW - 5000)], [rec("T1", 1, NOW - 5000), rec("T1", 2, NOW - 100)], DAY, NOW, GRACE)
    assert r.unknown_to_terminal == [] and r.totals.recorded == 2


@pytest.mark.parametrize(("status", "missing"), [("approved", 1), ("reversed", 1), ("declined", 0), ("pending", 0)])
def test_only_approved_and_reversed_are_expected(status: str, missing: int) -> None:
    r = reconcile([done("T1", 1, NOW - 5000, status)], [], DAY, NOW, GRACE)
    assert r.totals.missing_at_acquirer == missing


def test_matches_by_id_whatever_the_clock() -> None:
    """A terminal an hour ahead: the acquirer's time is outside the window, the receipt's is inside."""
    r = reconcile([done("T1", 1, NOW - 5000)], [Recorded("T1", "T1-1", NOW + 3600, None)], DAY, NOW, GRACE)
    assert r.missing_at_acquirer == [] and r.unknown_to_terminal == [] and r.totals.matched == 1


def test_window_limits_what_is_listed() -> None:
    completed = [done("T1", 1, NOW - 90_000), done("T1", 2, NOW - 5000)]
    r = reconcile(completed, [], DAY, NOW, GRACE)
    assert ids(r.missing_at_acquirer) == ["T1-2"] and r.totals.completed == 1


def test_terminals_without_receipts_are_not_flagged_for_records() -> None:
    r = reconcile([done("T1", 1, NOW - 5000)], [rec("T1", 1, NOW - 5000), rec("T2", 1, NOW - 5000)], DAY, NOW, GRACE)
    assert r.unknown_to_terminal == [] and r.totals.recorded == 2


def test_records_older_than_the_oldest_receipt_are_not_flagged() -> None:
    r = reconcile([done("T1", 5, NOW - 5000)], [rec("T1", 5, NOW - 5000), rec("T1", 1, NOW - 9000)], DAY, NOW, GRACE)
    assert r.unknown_to_terminal == []


def test_duplicate_records_count_once() -> None:
    r = reconcile([done("T1", 1, NOW - 5000)], [rec("T1", 1, NOW - 5000)] * 3, DAY, NOW, GRACE)
    assert r.totals.recorded == 1 and r.totals.matched == 1


def test_summary_per_merchant() -> None:
    completed = [done("T1", 1, NOW - 5000, merchant="M1", amount=250), done("T2", 1, NOW - 5000, merchant="M2"),
                 done("T2", 2, NOW - 4000, merchant="M2")]
    r = reconcile(completed, [rec("T2", 1, NOW - 5000)], DAY, NOW, GRACE)
    body = r.to_dict()
    assert body["merchants"]["M1"]["missing_at_acquirer"] == 1
    assert body["merchants"]["M1"]["missing_amount_minor"] == {"EUR": 250}
    assert body["merchants"]["M2"] == {"completed": 2, "recorded": 1, "matched": 1, "pending": 0,
                                       "missing_at_acquirer": 1, "unknown_to_terminal": 0,
                                       "missing_amount_minor": {"EUR": 100}}
    json.dumps(body)


def test_listing_is_capped_counts_stay_exact() -> None:
    completed = [done("T1", n, NOW - 5000 + n) for n in range(50)]
    r = reconcile(completed, [], DAY, NOW, GRACE, max_items=10)
    assert len(r.missing_at_acquirer) == 10 and r.totals.missing_at_acquirer == 50 and r.truncated


def test_time_parsing() -> None:
    assert parse_time("1800000000") == NOW
    assert parse_time("2027-01-15T08:00:00Z") == NOW
    assert parse_time("2027-01-15T08:00:00") == NOW  # naive is UTC
    assert parse_time("2027-01-15T09:00:00+01:00") == NOW
    w = day_window("2027-01-15")
    assert (w.start, w.end) == (NOW - 8 * 3600, NOW + 16 * 3600)
    for bad in ("nan", "yesterday", ""):
        with pytest.raises(ValueError):
            parse_time(bad)


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_settlement_reader_columns_and_times(tmp_path: Path) -> None:
    p = write(tmp_path / "s.csv", "\ufeffTxn_ID,terminal_id,ts,amount_minor,currency\n"
              "T1-1,T1,2027-01-15T08:00:00Z,125,EUR\nT1-2,T1,1800000001,,\n\n")
    rows = list(read_settlement(p, acquirer="acq-a"))
    assert [(r.terminal_id, r.txn_id, r.ts, r.amount_minor, r.currency, r.acquirer) for r in rows] == [
        ("T1", "T1-1", NOW, 125, "EUR", "acq-a"), ("T1", "T1-2", NOW + 1, None, None, "acq-a")]


def test_settlement_missing_column(tmp_path: Path) -> None:
    p = write(tmp_path / "s.csv", "terminal,txn_id\nT1,T1-1\n")
    with pytest.raises(SettlementError, match="missing column"):
        list(read_settlement(p))


def test_settlement_bad_row_is_not_echoed(tmp_path: Path) -> None:
    p = write(tmp_path / "s.csv", "terminal_id,txn_id,ts\nT1,T1-1,4111111111111111x\n")
    with pytest.raises(SettlementError) as err:
        list(read_settlement(p))
    assert "line 2" in str(err.value) and "4111" not in str(err.value)


def test_progress_bar(tmp_path: Path) -> None:
    lines = "".join(f"T1,T1-{n},{NOW}\n" for n in range(5000))
    p = write(tmp_path / "s.csv", "terminal_id,txn_id,ts\n" + lines)
    out = io.StringIO()
    ticks = iter(range(10_000))
    progress = Progress(Path(p).stat().st_size, out, every_s=0.5, clock=lambda: float(next(ticks)))
    assert sum(1 for _ in read_settlement(p, progress)) == 5000
    text = out.getvalue()
    assert text.endswith("100.0%      0.1/0.1 MB        5,000 rows\n") and text.count("\r") == progress.drawn >= 2


def test_large_settlement_streams_in_bounded_memory(tmp_path: Path) -> None:
    """120,000 rows (~4.5 MB): peak memory stays far below the file size (only unmatched rows are kept)."""
    path = tmp_path / "big.csv"
    with path.open("w") as fh:
        fh.write("terminal_id,txn_id,ts,amount_minor,currency\n")
        for n in range(120_000):
            fh.write(f"T{n % 1000:05d},T{n % 1000:05d}-{n},{NOW - 5000},1234,EUR\n")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        r = reconcile([done("T00001", 1, NOW - 5000)], read_settlement(str(path)), DAY, NOW, GRACE)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.recorded_rows == 120_000 and r.totals.recorded == 120_000
    assert peak < size / 4, f"peak {peak} bytes for a {size}-byte file"


def test_receipts_round_trip() -> None:
    lines = [json.dumps({"terminal_id": "T1", "merchant_id": "M1", "acquirer": "a", "txn_id": "T1-1", "ts": NOW,
                         "received_at": NOW + 1, "amount_minor": 5, "currency": "EUR", "status": "approved"}), ""]
    assert list(read_receipts(lines)) == [Completed("T1", "T1-1", NOW, NOW + 1, 5, "EUR", "approved", "M1", "a")]
    with pytest.raises(SettlementError, match="line 1"):
        list(read_receipts(['{"terminal_id": "T1"}']))
