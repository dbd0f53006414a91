"""`posfleet reconcile` refuses non-numbers, nan and infinities before they reach a report or a request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collector.cli import main
from collector.support.reconcile import SettlementError, read_receipts


@pytest.mark.parametrize("args", [
    ["--grace", "nan"], ["--grace", "inf"], ["--grace", "-1"], ["--grace", "soon"],
    ["--timeout", "nan"], ["--timeout", "-inf"], ["--limit", "0"], ["--limit", "1e3"],
])
def test_bad_numbers_are_usage_errors(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["reconcile", "--receipts", "r", "--settlement", "s", *args])
    assert exit_.value.code == 2
    assert args[0] in capsys.readouterr().err


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_receipts_with_non_finite_times_are_refused(value: str) -> None:
    line = '{"terminal_id": "T1", "txn_id": "x", "ts": TS, "amount_minor": 1, "currency": "EUR", "status": "ok"}'
    line = line.replace("TS", value)
    with pytest.raises(SettlementError, match="receipts line 1"):
        list(read_receipts([line]))


def test_grace_zero_is_a_valid_grace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts, settlement = tmp_path / "r.jsonl", tmp_path / "s.csv"
    receipts.write_text(json.dumps({"terminal_id": "T1", "txn_id": "a", "ts": 1_800_000_000,
                                    "amount_minor": 1, "currency": "EUR", "status": "approved"}) + "\n")
    settlement.write_text("terminal_id,txn_id\nT1,a\n")
    code = main(["reconcile", "--receipts", str(receipts), "--settlement", str(settlement), "--grace", "0",
                 "--from", "1799990000", "--to", "1800010000", "--json"])
    assert code == 0, capsys.readouterr()
