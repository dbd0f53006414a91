"""Bounded in-memory ledger: per-terminal transaction receipts, the ids the acquirer recorded, and the history
of condition transitions.

Everything is bounded per terminal by count and by age, and the receipt side also by a fleet-wide total, so a
chatty or hostile terminal cannot grow the collector's memory. Evictions are counted by kind and reason
(`posfleet_ledger_evictions_total`). A receipt and the acquirer's record of the same transaction live in one
entry, so they are always evicted together: eviction can never turn a matched transaction into a "missing" one.
Nothing here reads the clock; times are receive times passed in. An acquirer's feed is applied only to its own
terminals (`add_batch`): another acquirer's records can neither mark a receipt recorded nor evict one.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from collector.fleet.protocol import UpstreamBatch
from collector.fleet.state import Transition

__all__ = ["EVICTION_KINDS", "EVICTION_REASONS", "Entry", "Ledger", "LedgerLimits", "condition_intervals"]

EVICTION_KINDS: Final = ("txn", "transition")
EVICTION_REASONS: Final = ("count", "age", "total")


@dataclass(frozen=True, slots=True)
class LedgerLimits:
    """Bounds of the ledger (see docs/support.md for the memory they imply)."""

    # A busy shop does a few hundred payments a day; 500 keeps a full day for nearly every terminal.
    max_txns_per_terminal: int = 500
    # A day plus a margin, so "yesterday" reconciles in the morning and the 24 h timeline is complete.
    max_age_s: float = 26 * 3600.0
    # ~150 B per entry: 1,000,000 entries is ~150 MB, the budget for a 100,000-terminal fleet.
    max_total_txns: int = 1_000_000
    # Condition changes per terminal kept for the timeline; a flapping terminal produces a few per hour.
    max_transitions_per_terminal: int = 200
    # Terminals checked for expired entries per write (round robin): idle terminals age out without a full pass.
    sweep_per_call: int = 8


class Entry:
    """One transaction: what the terminal said (receipt) and/or what the acquirer recorded."""

    __slots__ = ("amount_minor", "currency", "first_seen", "received_at", "recorded_at", "recorded_ts", "status",
                 "ts")

    def __init__(self, first_seen: float) -> None:
        self.first_seen = first_seen
        self.ts: float | None = None  # terminal clock, from the receipt
        self.received_at: float | None = None  # receipt receive time
        self.amount_minor: int | None = None
        self.currency: str | None = None
        self.status: str | None = None
        self.recorded_at: float | None = None  # when the acquirer's feed reported it (receive time)
        self.recorded_ts: float | None = None  # the transaction time the feed gave


class Ledger:
    """Receipts, recorded ids and transition history, per terminal, bounded."""

    def __init__(self, limits: LedgerLimits = LedgerLimits(), known: Callable[[str], bool] = lambda _t: True):
        self.limits = limits
        self.known = known  # records for ids outside the fleet are not kept
        self.txns: dict[str, dict[str, Entry]] = {}
        self.history: dict[str, deque[Transition]] = {}
        self.total_txns = 0
        self.foreign = 0  # feed records skipped because the terminal is not the feed's acquirer's
        self.evictions: Counter[tuple[str, str]] = Counter()
        for kind in EVICTION_KINDS:
            for reason in EVICTION_REASONS:
                self.evictions[(kind, reason)] += 0
        self._sweep: Iterator[str] = iter(())

    # ---- writes --------------------------------------------------------------------------------------
    def _entry(self, tid: str, txn_id: str, now: float) -> Entry | None:
        book = self.txns.get(tid)
        if book is None:
            book = {}  # indexed only once it holds an entry: a refused write leaves nothing behind
        entry = book.get(txn_id)
        if entry is not None:
            return entry
        self._expire(tid, book, now)
        if len(book) >= self.limits.max_txns_per_terminal:
            self._pop_oldest(tid, book, "count")
        if self.total_txns >= self.limits.max_total_txns:
            self.sweep(now, budget=self.limits.sweep_per_call * 16)
            if self.total_txns >= self.limits.max_total_txns:
                if not book:
                    # The fleet-wide budget is spent on other terminals' recent entries: drop this one.
                    self.evictions[("txn", "total")] += 1
                    return None
                self._pop_oldest(tid, book, "total")
        entry = book[txn_id] = Entry(now)
        self.txns[tid] = book  # evictions above may have dropped the emptied book from the index
        self.total_txns += 1
        return entry

    def _pop_oldest(self, tid: str, book: dict[str, Entry], reason: str) -> None:
        del book[next(iter(book))]
        self.total_txns -= 1
        self.evictions[("txn", reason)] += 1
        if not book:
            self.txns.pop(tid, None)

    def _expire(self, tid: str, book: dict[str, Entry], now: float) -> None:
        limit = now - self.limits.max_age_s
        while book:
            first = next(iter(book))
            if book[first].first_seen >= limit:
                break
            self._pop_oldest(tid, book, "age")
            if tid not in self.txns:
                return

    def add_receipt(self, tid: str, txn_id: str, ts: float, amount_minor: int, currency: str, status: str,
                    rx: float) -> None:
        """A receipt the terminal published; a repeat of the same txn_id updates it (status may change)."""
        entry = self._entry(tid, txn_id, rx)
        if entry is None:
            return
        if entry.received_at is None:
            entry.received_at = rx
        entry.ts, entry.amount_minor, entry.currency, entry.status = ts, amount_minor, currency, status
        self.sweep(rx)

    def add_recorded(self, tid: str, txn_id: str, ts: float, rx: float) -> None:
        """A transaction the acquirer's feed reported recorded."""
        if tid not in self.txns and not self.known(tid):
            return
        entry = self._entry(tid, txn_id, rx)
        if entry is None:
            return
        if entry.recorded_at is None:
            entry.recorded_at = rx
        entry.recorded_ts = ts
        self.sweep(rx)

    def add_batch(self, batch: UpstreamBatch, rx: float, owns: Callable[[str, str], bool]) -> int:
        """An acquirer's feed batch: records of terminals `owns(acquirer, tid)` accepts; returns how many it skipped.

        A record naming another acquirer's terminal is not this acquirer's to vouch for: kept, it would mark a
        receipt recorded that its own acquirer never saw, or evict real receipts through the per-terminal bound.
        """
        skipped = 0
        for txn in batch.txns:
            if owns(batch.acquirer, txn.tid):
                self.add_recorded(txn.tid, txn.txn_id, txn.ts, rx)
            else:
                skipped += 1
        self.foreign += skipped
        return skipped

    def add_transitions(self, transitions: list[Transition]) -> None:
        """Condition changes, for the timeline."""
        cap = self.limits.max_transitions_per_terminal
        for tr in transitions:
            hist = self.history.get(tr.tid)
            if hist is None:
                hist = self.history[tr.tid] = deque(maxlen=cap)
            if len(hist) == cap:
                self.evictions[("transition", "count")] += 1
            hist.append(tr)
            self._expire_history(tr.tid, hist, tr.at)

    def _expire_history(self, tid: str, hist: deque[Transition], now: float) -> None:
        limit = now - self.limits.max_age_s
        while hist and hist[0].at < limit:
            hist.popleft()
            self.evictions[("transition", "age")] += 1
        if not hist:
            del self.history[tid]

    def sweep(self, now: float, budget: int | None = None) -> None:
        """Expire old entries of a few terminals (round robin), so idle terminals age out too."""
        budget = self.limits.sweep_per_call if budget is None else budget
        for _ in range(budget):
            tid = next(self._sweep, None)
            if tid is None:
                # A fresh pass over a copy of the keys: entries may be deleted while the pass runs.
                self._sweep = iter(list(self.txns) + list(self.history))
                tid = next(self._sweep, None)
                if tid is None:
                    return
            book = self.txns.get(tid)
            if book is not None:
                self._expire(tid, book, now)
            hist = self.history.get(tid)
            if hist is not None:
                self._expire_history(tid, hist, now)

    # ---- reads ---------------------------------------------------------------------------------------
    def entries(self, tid: str, now: float) -> list[tuple[str, Entry]]:
        """The terminal's live entries (after expiring old ones), oldest first."""
        book = self.txns.get(tid)
        if book is None:
            return []
        self._expire(tid, book, now)
        return list(book.items())

    def transitions(self, tid: str, now: float) -> list[Transition]:
        """The terminal's kept condition changes, oldest first."""
        hist = self.history.get(tid)
        if hist is None:
            return []
        self._expire_history(tid, hist, now)
        return list(hist)

    def stats(self) -> dict[str, int]:
        """Sizes, for the metrics."""
        return {
            "txn": self.total_txns,
            "transition": sum(len(h) for h in self.history.values()),
            "terminals": len(self.txns),
        }


def condition_intervals(
    transitions: list[Transition], active: dict[str, tuple[float, str, str]], start: float, end: float
) -> list[dict[str, object]]:
    """Intervals [from, to) per condition within [start, end]; `to` is None while still active."""
    out: list[tuple[float, str, dict[str, object]]] = []
    open_: dict[str, tuple[float, str, str]] = {}
    for tr in sorted(transitions, key=lambda x: x.at):
        if tr.raised:
            open_.setdefault(tr.condition, (tr.at, tr.severity, tr.detail))
        else:
            began = open_.pop(tr.condition, None)
            # A clear without its raise in the history: it was raised before the kept history began.
            since, severity, detail = began if began is not None else (start, tr.severity, tr.detail)
            if tr.at >= start:
                out.append((max(since, start), tr.condition, {
                    "condition": tr.condition, "severity": severity, "detail": detail,
                    "from": max(since, start), "to": min(tr.at, end)}))
    for cond, (since, severity, detail) in active.items():
        began = open_.pop(cond, None)
        first = min(since, began[0]) if began is not None else since
        out.append((max(first, start), cond, {
            "condition": cond, "severity": severity, "detail": detail, "from": max(first, start), "to": None}))
    # Raised in the history but neither cleared nor active now (history and state disagree after a restart):
    # show what is known, ending at the last point we can vouch for.
    for cond, (since, severity, detail) in open_.items():
        if since <= end:
            out.append((max(since, start), cond, {
                "condition": cond, "severity": severity, "detail": detail, "from": max(since, start), "to": end}))
    out.sort(key=lambda iv: (iv[0], iv[1]))
    return [iv[2] for iv in out]
