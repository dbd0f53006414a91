"""The bounded ledger: receipts and records share one entry, bounds by count, age and fleet total, evictions
counted; transition history bounded; condition intervals for the timeline."""

from __future__ import annotations

from collector.fleet.state import Transition
from collector.support.ledger import Ledger, LedgerLimits, condition_intervals

T0 = 1_800_000_000.0


def receipt(ledger: Ledger, tid: str, n: int, rx: float, status: str = "approved") -> None:
    ledger.add_receipt(tid, f"{tid}-{n}", rx - 0.5, 100 + n, "EUR", status, rx)


def test_receipt_and_record_share_an_entry() -> None:
    ledger = Ledger()
    receipt(ledger, "T1", 1, T0)
    ledger.add_recorded("T1", "T1-1", T0 - 0.5, T0 + 3)
    ledger.add_recorded("T1", "T1-1", T0 - 0.5, T0 + 9)  # a feed replay keeps the first record time
    [(txn_id, e)] = ledger.entries("T1", T0 + 10)
    assert txn_id == "T1-1" and e.received_at == T0 and e.recorded_at == T0 + 3 and e.amount_minor == 101
    assert ledger.total_txns == 1


def test_a_repeated_receipt_updates_status_not_receive_time() -> None:
    ledger = Ledger()
    receipt(ledger, "T1", 1, T0)
    receipt(ledger, "T1", 1, T0 + 5, status="reversed")
    [(_id, e)] = ledger.entries("T1", T0 + 6)
    assert e.status == "reversed" and e.received_at == T0


def test_count_bound_evicts_oldest_and_counts() -> None:
    ledger = Ledger(LedgerLimits(max_txns_per_terminal=3))
    for n in range(5):
        receipt(ledger, "T1", n, T0 + n)
    assert [i for i, _e in ledger.entries("T1", T0 + 5)] == ["T1-2", "T1-3", "T1-4"]
    assert ledger.evictions[("txn", "count")] == 2 and ledger.total_txns == 3


def test_count_bound_of_one_keeps_the_newest() -> None:
    ledger = Ledger(LedgerLimits(max_txns_per_terminal=1))
    receipt(ledger, "T1", 1, T0)
    receipt(ledger, "T1", 2, T0 + 1)
    assert [i for i, _e in ledger.entries("T1", T0 + 2)] == ["T1-2"] and ledger.total_txns == 1


def test_age_bound_on_read_write_and_sweep() -> None:
    ledger = Ledger(LedgerLimits(max_age_s=100, sweep_per_call=100))
    receipt(ledger, "T1", 1, T0)
    receipt(ledger, "T2", 1, T0)
    receipt(ledger, "T1", 2, T0 + 150)  # expires T1-1 on write; the sweep also reaches idle T2
    assert [i for i, _e in ledger.entries("T1", T0 + 150)] == ["T1-2"]
    assert "T2" not in ledger.txns
    assert ledger.evictions[("txn", "age")] == 2 and ledger.total_txns == 1


def test_record_and_receipt_evicted_together() -> None:
    """Eviction never leaves a receipt whose record was dropped: it would look missing."""
    ledger = Ledger(LedgerLimits(max_txns_per_terminal=2))
    for n in range(4):
        receipt(ledger, "T1", n, T0 + n)
        ledger.add_recorded("T1", f"T1-{n}", T0 + n, T0 + n + 0.5)
    assert all(e.recorded_at is not None and e.received_at is not None for _i, e in ledger.entries("T1", T0 + 5))


def test_fleet_total_bound() -> None:
    ledger = Ledger(LedgerLimits(max_total_txns=4, max_txns_per_terminal=10))
    for n in range(4):
        receipt(ledger, "T1", n, T0 + n)
    receipt(ledger, "T2", 1, T0 + 5)  # T2 has nothing of its own to give up: its receipt is not kept
    assert "T2" not in ledger.txns and ledger.evictions[("txn", "total")] == 1
    receipt(ledger, "T1", 9, T0 + 6)  # T1 gives up its own oldest
    assert ledger.total_txns == 4 and ledger.evictions[("txn", "total")] == 2
    assert [i for i, _e in ledger.entries("T1", T0 + 7)] == ["T1-1", "T1-2", "T1-3", "T1-9"]


def test_records_for_unknown_terminals_are_not_kept() -> None:
    ledger = Ledger(known=lambda tid: tid == "T1")
    ledger.add_recorded("T9", "T9-1", T0, T0)
    ledger.add_recorded("T1", "T1-1", T0, T0)
    assert list(ledger.txns) == ["T1"]


def test_every_eviction_label_exists_from_the_start() -> None:
    assert dict(Ledger().evictions) == {(k, r): 0 for k in ("txn", "transition") for r in ("count", "age", "total")}


def tr(cond: str, raised: bool, at: float, tid: str = "T1", severity: str = "critical") -> Transition:
    return Transition(tid, cond, raised, at, severity, "d")


def test_transition_history_bounded_by_count_and_age() -> None:
    ledger = Ledger(LedgerLimits(max_transitions_per_terminal=3, max_age_s=1000))
    ledger.add_transitions([tr("offline", i % 2 == 0, T0 + i) for i in range(5)])
    assert [x.at for x in ledger.transitions("T1", T0 + 5)] == [T0 + 2, T0 + 3, T0 + 4]
    assert ledger.evictions[("transition", "count")] == 2
    assert ledger.transitions("T1", T0 + 2000) == [] and ledger.evictions[("transition", "age")] == 3


def test_intervals_pairs_active_and_clipping() -> None:
    start, end = T0, T0 + 1000
    hist = [
        tr("weak_signal", False, T0 + 50, severity="warning"),  # raised before the kept history began
        tr("offline", True, T0 + 100), tr("offline", False, T0 + 200),
        tr("offline", True, T0 + 700),
        tr("clock_skew", True, T0 - 500, severity="warning"), tr("clock_skew", False, T0 - 400),  # before window
    ]
    got = condition_intervals(hist, {"offline": (T0 + 700, "critical", "silent")}, start, end)
    assert [(iv["condition"], iv["from"], iv["to"]) for iv in got] == [
        ("weak_signal", T0, T0 + 50),
        ("offline", T0 + 100, T0 + 200),
        ("offline", T0 + 700, None),
    ]


def test_interval_active_since_before_window_starts_at_window() -> None:
    got = condition_intervals([], {"outdated_software": (T0 - 5000, "warning", "")}, T0, T0 + 10)
    assert got == [{"condition": "outdated_software", "severity": "warning", "detail": "", "from": T0, "to": None}]


def test_a_feed_marks_and_evicts_only_its_own_acquirers_receipts() -> None:
    """Before: records naming another acquirer's terminal marked its receipts recorded (hiding a missing
    transaction) and, past the per-terminal bound, evicted its real receipts."""
    from collector.config import Config
    from collector.fleet.protocol import UpstreamBatch, UpstreamTxn
    from collector.fleet.registry import Registry, RegistryEntry
    from collector.fleet.state import Fleet

    fleet = Fleet(Config(), T0, Registry({"A1": RegistryEntry.of("A1", "M1", "acq-a", "A920", "s", "r"),
                                          "B1": RegistryEntry.of("B1", "M2", "acq-b", "A920", "s", "r")}))
    owns = fleet.owns

    ledger = Ledger(LedgerLimits(max_txns_per_terminal=3))
    for n in range(3):
        receipt(ledger, "A1", n, T0 + n)
    hostile = UpstreamBatch(T0, [UpstreamTxn("A1", f"A1-{n}", T0) for n in range(2)]
                            + [UpstreamTxn("A1", f"evict-{n}", T0) for n in range(5)]
                            + [UpstreamTxn("B1", "B1-1", T0)], "acq-b")
    assert ledger.add_batch(hostile, T0 + 10, owns) == 7 and ledger.foreign == 7
    entries = ledger.entries("A1", T0 + 11)
    assert [i for i, _e in entries] == ["A1-0", "A1-1", "A1-2"], "nothing evicted"
    assert all(e.recorded_at is None for _i, e in entries), "nothing marked recorded by another acquirer"
    assert [i for i, _e in ledger.entries("B1", T0 + 11)] == ["B1-1"]
    own = UpstreamBatch(T0, [UpstreamTxn("A1", "A1-1", T0)], "acq-a")
    assert ledger.add_batch(own, T0 + 12, owns) == 0
    assert dict(ledger.entries("A1", T0 + 13))["A1-1"].recorded_at == T0 + 12
    assert ledger.evictions[("txn", "count")] == 0
