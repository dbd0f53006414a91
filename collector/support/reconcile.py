"""Transaction reconciliation: what the terminals completed against what the acquirer recorded.

`reconcile(completed, recorded, window, now, grace_s)` is a pure function. It holds the completed side in
memory (receipts, bounded by the collector's ledger or by the export it came from) and streams the recorded
side, so a settlement file of any size reconciles in bounded memory: only unmatched rows are kept, and only up
to `max_items` of them are listed (the counts stay exact).

Rules:
- Matching is by (terminal_id, txn_id), whatever the times: a transaction recorded under a skewed clock still
  matches. Only what is *listed* is limited to the window.
- A completed transaction is "missing at the acquirer" only once `grace_s` passed since it was completed; until
  then it is "pending" (acquirers record in batches; recorded shortly after is not missing).
- Only approved and reversed transactions are expected in the acquirer's records (declined ones were refused
  by the host and pending ones are not finished).
- A recorded transaction is "unknown to the terminal" only for terminals that publish receipts, only after the
  grace period, and only if it is not older than the terminal's oldest receipt we hold (older ones may have
  been evicted, or predate the receipts).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any, Final

__all__ = [
    "EXPECTED_STATUSES",
    "Completed",
    "Progress",
    "Recorded",
    "Report",
    "SettlementError",
    "Window",
    "day_window",
    "parse_time",
    "read_receipts",
    "read_settlement",
    "reconcile",
]

EXPECTED_STATUSES: Final = frozenset({"approved", "reversed"})
SETTLEMENT_REQUIRED: Final = ("terminal_id", "txn_id")
SETTLEMENT_OPTIONAL: Final = ("ts", "merchant_id", "acquirer", "amount_minor", "currency")


@dataclass(frozen=True, slots=True)
class Completed:
    """A transaction the terminal completed (its receipt)."""

    terminal_id: str
    txn_id: str
    ts: float  # terminal clock
    received_at: float | None  # collector receive time; the reference for ages when known
    amount_minor: int
    currency: str
    status: str
    merchant_id: str = ""
    acquirer: str = ""

    @property
    def at(self) -> float:
        """When it happened, as far as we can vouch: receive time, else the terminal's clock."""
        return self.received_at if self.received_at is not None else self.ts


@dataclass(frozen=True, slots=True)
class Recorded:
    """A transaction the acquirer recorded (feed or settlement file)."""

    terminal_id: str
    txn_id: str
    ts: float | None  # the transaction time the acquirer gives
    recorded_at: float | None = None  # when the feed reported it; None for a settlement file
    merchant_id: str = ""
    acquirer: str = ""
    amount_minor: int | None = None
    currency: str | None = None

    @property
    def at(self) -> float | None:
        """The transaction's time, else when it was recorded."""
        return self.ts if self.ts is not None else self.recorded_at


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end) in Unix seconds."""

    start: float
    end: float

    def __contains__(self, t: object) -> bool:
        return isinstance(t, float | int) and self.start <= t < self.end


@dataclass
class MerchantSummary:
    """Counts for one merchant."""

    completed: int = 0
    recorded: int = 0
    matched: int = 0
    pending: int = 0
    missing_at_acquirer: int = 0
    unknown_to_terminal: int = 0
    missing_amount_minor: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """The outcome; `to_dict()` is the API's and the CLI's JSON."""

    window: Window
    now: float
    grace_s: float
    missing_at_acquirer: list[dict[str, Any]] = field(default_factory=list)
    unknown_to_terminal: list[dict[str, Any]] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    merchants: dict[str, MerchantSummary] = field(default_factory=dict)
    totals: MerchantSummary = field(default_factory=MerchantSummary)
    truncated: bool = False
    recorded_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        def summary(s: MerchantSummary) -> dict[str, Any]:
            return {
                "completed": s.completed, "recorded": s.recorded, "matched": s.matched, "pending": s.pending,
                "missing_at_acquirer": s.missing_at_acquirer, "unknown_to_terminal": s.unknown_to_terminal,
                "missing_amount_minor": dict(sorted(s.missing_amount_minor.items())),
            }

        return {
            "window": {"from": iso(self.window.start), "to": iso(self.window.end),
                       "from_unix": self.window.start, "to_unix": self.window.end},
            "now": iso(self.now),
            "grace_s": self.grace_s,
            "missing_at_acquirer": self.missing_at_acquirer,
            "unknown_to_terminal": self.unknown_to_terminal,
            "pending": self.pending,
            "truncated": self.truncated,
            "recorded_rows": self.recorded_rows,
            "totals": summary(self.totals),
            "merchants": {m: summary(s) for m, s in sorted(self.merchants.items())},
        }


def iso(t: float | None) -> str | None:
    """Unix seconds -> ISO 8601 UTC (seconds), None stays None."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Times the reports can name: 1970 up to the last whole day datetime can represent (a window ends one day
# later). Anything outside is a typo or a probe, and would otherwise fail deep inside datetime as a 500.
TIME_MIN: Final = 0.0
TIME_MAX: Final = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


def _in_range(value: float, text: str) -> float:
    if not (math.isfinite(value) and TIME_MIN <= value <= TIME_MAX):
        raise ValueError(f"not a time between 1970-01-01 and 9999-12-31: {text!r}")
    return value


def parse_time(text: str) -> float:
    """Unix seconds, or ISO 8601 (a naive time is UTC), between 1970 and 9999-12-31; ValueError otherwise."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return _in_range(value, text)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return _in_range(dt.timestamp(), text)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 is past what datetime holds in UTC
        raise ValueError(f"not a time between 1970-01-01 and 9999-12-31: {text!r}") from None


def day_window(day: str) -> Window:
    """A UTC calendar day 'YYYY-MM-DD' (1970-01-01 to 9999-12-30) as a window; ValueError otherwise."""
    start = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    begin = _in_range(start.timestamp(), day)
    if begin >= TIME_MAX:  # the window's end, a day later, would not be a representable time
        raise ValueError(f"not a day between 1970-01-01 and 9999-12-30: {day!r}")
    return Window(begin, (start + timedelta(days=1)).timestamp())


def reconcile(
    completed: Iterable[Completed],
    recorded: Iterable[Recorded],
    window: Window,
    now: float,
    grace_s: float,
    max_items: int = 1000,
) -> Report:
    """Compare completed against recorded transactions (see the module docstring for the rules)."""
    report = Report(window, now, grace_s)
    totals = report.totals
    mine: dict[tuple[str, str], Completed] = {}
    coverage: dict[str, float] = {}  # terminal -> its oldest receipt we hold
    merchant_of: dict[str, str] = {}
    for c in completed:
        mine[(c.terminal_id, c.txn_id)] = c
        merchant_of.setdefault(c.terminal_id, c.merchant_id)
        if c.at < coverage.get(c.terminal_id, math.inf):
            coverage[c.terminal_id] = c.at
    matched: set[tuple[str, str]] = set()

    def summary_for(merchant: str) -> MerchantSummary:
        s = report.merchants.get(merchant)
        if s is None:
            s = report.merchants[merchant] = MerchantSummary()
        return s

    def listed(target: list[dict[str, Any]], item: dict[str, Any]) -> None:
        if len(target) < max_items:
            target.append(item)
        else:
            report.truncated = True

    for r in recorded:
        report.recorded_rows += 1
        key = (r.terminal_id, r.txn_id)
        at = r.at
        in_window = at is not None and at in window
        mine_c = mine.get(key)
        if mine_c is not None:
            if key in matched:
                continue  # the same record twice (feed replay, or a file listing it twice)
            matched.add(key)
            if mine_c.at in window:
                s = summary_for(mine_c.merchant_id or r.merchant_id)
                s.recorded += 1
                totals.recorded += 1
            continue
        if not in_window:
            continue
        merchant = r.merchant_id or merchant_of.get(r.terminal_id, "")
        s = summary_for(merchant)
        s.recorded += 1
        totals.recorded += 1
        cover = coverage.get(r.terminal_id)
        assert at is not None
        reference = r.recorded_at if r.recorded_at is not None else at
        if cover is None or at < cover or now - reference <= grace_s:
            continue  # the terminal publishes no receipts, or we cannot vouch for this time: not a finding
        s.unknown_to_terminal += 1
        totals.unknown_to_terminal += 1
        listed(report.unknown_to_terminal, {
            "terminal_id": r.terminal_id, "merchant_id": merchant, "acquirer": r.acquirer, "txn_id": r.txn_id,
            "ts": iso(r.ts), "recorded_at": iso(r.recorded_at), "age_s": round(now - at, 1),
            "amount_minor": r.amount_minor, "currency": r.currency,
        })

    for key, c in sorted(mine.items(), key=lambda kv: (kv[1].at, kv[0])):
        if c.at not in window:
            continue
        s = summary_for(c.merchant_id)
        s.completed += 1
        totals.completed += 1
        if key in matched:
            s.matched += 1
            totals.matched += 1
            continue
        if c.status not in EXPECTED_STATUSES:
            continue
        age = now - c.at
        item = {
            "terminal_id": c.terminal_id, "merchant_id": c.merchant_id, "acquirer": c.acquirer, "txn_id": c.txn_id,
            "ts": iso(c.ts), "received_at": iso(c.received_at), "age_s": round(age, 1),
            "amount_minor": c.amount_minor, "currency": c.currency, "status": c.status,
        }
        if age <= grace_s:
            s.pending += 1
            totals.pending += 1
            listed(report.pending, item)
            continue
        s.missing_at_acquirer += 1
        totals.missing_at_acquirer += 1
        s.missing_amount_minor[c.currency] = s.missing_amount_minor.get(c.currency, 0) + c.amount_minor
        totals.missing_amount_minor[c.currency] = totals.missing_amount_minor.get(c.currency, 0) + c.amount_minor
        listed(report.missing_at_acquirer, item)
    return report


# ---- files -------------------------------------------------------------------------------------------------
class SettlementError(ValueError):
    """The settlement file cannot be read; the message names the line."""


class Progress:
    """A progress bar on a stream (stderr), redrawn at most every `every_s` seconds."""

    def __init__(self, total: int, stream: IO[str] | None = None, every_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.stream, self.every_s, self.clock = total, stream or sys.stderr, every_s, clock
        self._last = -math.inf
        self.drawn = 0

    def update(self, done: int, rows: int, final: bool = False) -> None:
        """Redraw when due (always when final)."""
        now = self.clock()
        if not final and now - self._last < self.every_s:
            return
        self._last = now
        frac = min(done / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width)
        self.stream.write(
            f"\r[{bar:<{width}}] {frac * 100:5.1f}% {done / 1e6:8.1f}/{self.total / 1e6:.1f} MB {rows:>12,} rows"
            + ("\n" if final else "")
        )
        self.stream.flush()
        self.drawn += 1


class _CountingReader(io.RawIOBase):
    """Counts the bytes read through it, for the progress bar."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.count = raw, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        return n


def read_settlement(
    path: str, progress: Progress | None = None, acquirer: str = ""
) -> Iterator[Recorded]:
    """Stream a settlement CSV (header: terminal_id, txn_id, and optionally ts, merchant_id, acquirer,
    amount_minor, currency); memory stays bounded whatever the file size."""
    with open(path, "rb") as raw:
        counter = _CountingReader(raw)
        text = io.TextIOWrapper(io.BufferedReader(counter, 1 << 20), encoding="utf-8-sig", newline="")
        reader = csv.reader(text)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in SETTLEMENT_REQUIRED if c not in header]
        if missing:
            raise SettlementError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(header)})")
        col = {name: header.index(name) for name in (*SETTLEMENT_REQUIRED, *SETTLEMENT_OPTIONAL) if name in header}
        rows = 0
        for lineno, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            rows += 1
            try:
                values = {name: row[i].strip() for name, i in col.items()}
                ts = parse_time(values["ts"]) if values.get("ts") else None
                amount = int(values["amount_minor"]) if values.get("amount_minor") else None
            except (IndexError, ValueError) as err:
                # The row itself is not echoed: settlement files may carry data that must not reach logs.
                raise SettlementError(f"{path}: line {lineno}: {type(err).__name__}") from None
            yield Recorded(values["terminal_id"], values["txn_id"], ts, None, values.get("merchant_id", ""),
                           values.get("acquirer", acquirer), amount, values.get("currency") or None)
            if progress is not None and rows % 1024 == 0:
                progress.update(counter.count, rows)
        if progress is not None:
            progress.update(counter.count, rows, final=True)


def _finite(value: object) -> float:
    """A float that is a real number: json.loads takes NaN and Infinity, which would reach the report."""
    out = float(value)  # type: ignore[arg-type]  # TypeError/ValueError are the caller's "bad line"
    if not math.isfinite(out):
        raise ValueError("not a finite number")
    return out


def read_receipts(lines: Iterable[str | bytes]) -> Iterator[Completed]:
    """Receipts exported by `GET /api/v1/receipts` (JSON lines)."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            yield Completed(
                str(d["terminal_id"]), str(d["txn_id"]), _finite(d["ts"]),
                None if d.get("received_at") is None else _finite(d["received_at"]),
                int(d["amount_minor"]), str(d["currency"]), str(d["status"]),
                str(d.get("merchant_id") or ""), str(d.get("acquirer") or ""),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise SettlementError(f"receipts line {n}: {type(err).__name__}") from None
