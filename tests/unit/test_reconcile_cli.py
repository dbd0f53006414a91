"""`posfleet reconcile` offline mode and the CLI's error paths (no collector needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from collector.cli import main

NOW = float(int(time.time()))  # offline mode ages transactions against the real clock
WINDOW = ["--from", str(NOW - 86_400), "--to", str(NOW)]


def write_inputs(tmp_path: Path) -> tuple[Path, Path]:
    receipts = tmp_path / "receipts.jsonl"
    receipts.write_text("".join(
        json.dumps({"terminal_id": tid, "merchant_id": mid, "acquirer": "acq-a", "txn_id": f"{tid}-{n}",
                    "ts": NOW - 5000 + n, "received_at": NOW - 5000 + n, "amount_minor": 100 + n,
                    "currency": "EUR", "status": "approved"}) + "\n"
        for tid, mid in (("T1", "M1"), ("T2", "M2")) for n in range(1, 5)))
    settlement = tmp_path / "settlement.csv"
    settlement.write_text("terminal_id,txn_id,ts,pan_masked\n"
                          + "".join(f"T1,T1-{n},{NOW - 5000 + n},411111******1111\n" for n in (1, 2, 4))
                          + "".join(f"T2,T2-{n},{NOW - 5000 + n},\n" for n in (1, 2, 3, 4))
                          + f"T2,T2-77,{NOW - 4000},\n")
    return receipts, settlement


def test_offline_lists_differences_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts, settlement = write_inputs(tmp_path)
    code = main(["reconcile", "--receipts", str(receipts), "--settlement", str(settlement), *WINDOW, "--grace",
                 "900", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [x["txn_id"] for x in out["missing_at_acquirer"]] == ["T1-3"]
    assert [x["txn_id"] for x in out["unknown_to_terminal"]] == ["T2-77"]
    assert out["merchants"]["M1"]["missing_amount_minor"] == {"EUR": 103}
    assert out["merchants"]["M2"]["unknown_to_terminal"] == 1


def test_offline_scope_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts, settlement = write_inputs(tmp_path)
    code = main(["reconcile", "--receipts", str(receipts), "--settlement", str(settlement), *WINDOW, "--grace",
                 "900", "--merchant", "M2"])
    captured = capsys.readouterr()
    assert code == 1
    assert "T2-77" in captured.out and "T1-3" not in captured.out
    assert "Completed on the terminal, not recorded by the acquirer: 0" in captured.out
    assert "\r" not in captured.err  # no progress bar: not a tty, no --progress
    assert "411111" not in captured.out + captured.err  # extra settlement columns are never read out


def test_offline_reconciled_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts, settlement = write_inputs(tmp_path)
    code = main(["reconcile", "--receipts", str(receipts), "--settlement", str(settlement), *WINDOW, "--grace",
                 "900", "--terminal", "T2", "--to", str(NOW - 4500)])
    assert code == 0, capsys.readouterr().out


def test_offline_needs_both_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts, _ = write_inputs(tmp_path)
    assert main(["reconcile", "--receipts", str(receipts)]) == 2
    assert "needs both --settlement and --receipts" in capsys.readouterr().err


def test_bad_settlement_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receipts, _ = write_inputs(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("terminal,txn\nT1,T1-1\n")
    assert main(["reconcile", "--receipts", str(receipts), "--settlement", str(bad), "--grace", "1"]) == 2
    assert "missing column(s) terminal_id, txn_id" in capsys.readouterr().err
    assert main(["reconcile", "--receipts", str(receipts), "--settlement", str(tmp_path / "nope.csv"),
                 "--grace", "1"]) == 2


def test_unreadable_token_file_and_unreachable_collector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", "T1", "--url", "http://127.0.0.1:9", "--token-file", str(tmp_path / "none")]) == 2
    assert "cannot read token file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["reconcile", "--url", "http://127.0.0.1:9", "--token-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("tok-0123456789abcdef")
    assert main(["diagnose", "T1", "--url", "http://127.0.0.1:9", "--token-file", str(token), "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the collector" in err and "tok-0123456789abcdef" not in err


def test_no_token_option_on_the_command_line() -> None:
    for cmd in (["diagnose", "T1"], ["reconcile"]):
        with pytest.raises(SystemExit):
            main([*cmd, "--token", "secret-on-the-command-line"])
