"""Fleet-level decisions across partitioned collectors (collector/cluster/fleetwide.py) and the merging of lists
across collectors (collector/cluster/forward.py): pure functions, no I/O."""

from __future__ import annotations

from collections import Counter

import pytest

from collector.cluster.fleetwide import FleetJudge, Report, registry_totals, sparse_report
from collector.cluster.forward import (
    MemberAnswer,
    merge_facets,
    merge_reconcile,
    merge_sites,
    merge_terminals,
    uncovered,
)
from collector.config import Thresholds
from collector.fleet.detect import MassOffline, mass_offline_step
from collector.fleet.registry import Registry, RegistryEntry

TH = Thresholds()  # share 0.5, clear share 0.4, min 3 terminals, raise after 2 rounds, clear after 2
SITE = ("acq-a", "s1")
KNOWN = {SITE: 10, ("acq-a", "s2"): 10}
ACQ_KNOWN = {"acq-a": 20}


def report(site_offline: int, shutdown: int = 0, acq_offline: int | None = None) -> Report:
    off = site_offline if acq_offline is None else acq_offline
    return Report({SITE: (site_offline, shutdown)} if site_offline or shutdown else {}, {"acq-a": (off, shutdown)})


def rounds(judge: FleetJudge, n: int, **reports: Report) -> list[list[tuple[str, str, str, bool]]]:
    out = []
    for i in range(n):
        for instance, rep in reports.items():
            judge.receive(instance, rep)
        out.append(judge.judge(float(i), KNOWN, ACQ_KNOWN))
    return out


def test_a_site_spread_over_two_collectors_is_one_mass_outage() -> None:
    """3 + 3 of 10 offline: neither collector's part alone (3 of its 5) would be judged fleet-wide; the sum is."""
    judge = FleetJudge(TH)
    changes = rounds(judge, 3, c0=report(3), c1=report(3))
    assert changes[0] == []  # raise_after = 2 rounds
    assert ("site", "acq-a", "s1", True) in changes[1]
    assert [a[:3] for a in judge.active()] == [("site", "acq-a", "s1")]  # the acquirer: 6 of 20, not mass
    assert judge.watched() == [SITE]


def test_one_collectors_part_alone_is_not_a_mass_outage() -> None:
    judge = FleetJudge(TH)
    rounds(judge, 4, c0=report(4), c1=report(0))
    assert judge.active() == []


def test_shut_down_terminals_are_not_expected_online() -> None:
    """4 offline of 10, 3 of them shut down elsewhere: 4 of 7 expected is a majority."""
    judge = FleetJudge(TH)
    rounds(judge, 2, c0=report(4), c1=report(0, shutdown=3))
    assert [a[:3] for a in judge.active()] == [("site", "acq-a", "s1")]


def test_equals_the_single_collector_hysteresis() -> None:
    """The same sequence of sums gives the same decisions as mass_offline_step (the condition defined once)."""
    seq = [0, 6, 6, 6, 3, 2, 2, 5, 5, 1, 1, 1]
    judge = FleetJudge(TH)
    state = MassOffline(False, 0)
    for i, offline in enumerate(seq):
        judge.receive("c0", report(offline // 2, acq_offline=0))
        judge.receive("c1", report(offline - offline // 2, acq_offline=0))
        judge.judge(float(i), KNOWN, ACQ_KNOWN)
        state = mass_offline_step(state, offline, 10, TH)
        assert bool(judge.active()) == state.active, (i, offline)


def test_a_gone_collectors_report_expires() -> None:
    """A dead collector's offline terminals are counted by whoever takes them over, not twice for ever."""
    judge = FleetJudge(TH, max_age=3)
    rounds(judge, 2, c0=report(3), c1=report(3))
    assert judge.active()
    rounds(judge, 6, c0=report(3))  # c1 silent: after 3 rounds only c0's 3 of 10 remain -> cleared
    assert judge.active() == []
    assert set(judge.reports) == {"c0"}


def test_the_acquirer_scope_sums_too() -> None:
    judge = FleetJudge(TH)
    rounds(judge, 2, c0=report(5, acq_offline=6), c1=report(5, acq_offline=6))
    assert {a[:3] for a in judge.active()} == {("site", "acq-a", "s1"), ("acquirer", "acq-a", "")}


def test_sparse_report_only_sites_with_offline_or_watched() -> None:
    counts = Counter({("a", "s1", "offline"): 2, ("a", "s1", "_shutdown"): 1, ("a", "s1", "_known"): 9,
                      ("a", "s2", "hardware_fault"): 1, ("a", "s2", "_known"): 5, ("a", "s3", "_shutdown"): 4,
                      ("unknown", "", "offline"): 7})
    acq = Counter({("a", "offline"): 2, ("a", "_shutdown"): 5, ("a", "_known"): 18, ("b", "_known"): 3})
    rep = sparse_report(counts, acq, [("a", "s1"), ("a", "s2"), ("unknown", "")], watch=[("a", "s3")])
    assert rep.sites == {("a", "s1"): (2, 1), ("a", "s3"): (0, 4)}
    assert rep.acquirers == {"a": (2, 5)}
    assert rep.dropped == 0
    assert Report.decode(rep.encode("c0")) == ("c0", rep)


def test_sparse_report_is_bounded_and_counts_what_it_left_out() -> None:
    counts = Counter({("a", f"s{i}", "offline"): 1 for i in range(10)})
    rep = sparse_report(counts, Counter(), [("a", f"s{i}") for i in range(10)], [], max_sites=4)
    assert len(rep.sites) == 4 and rep.dropped == 6


@pytest.mark.parametrize("body", [b"", b"{}", b'{"instance": "c0", "sites": [[1]], "acquirers": []}', b"[1]"])
def test_malformed_report_is_refused(body: bytes) -> None:
    with pytest.raises((ValueError, KeyError, TypeError)):
        Report.decode(body)


def test_registry_totals() -> None:
    entries = {f"T{i}": RegistryEntry.of(f"T{i}", "M", "a" if i < 5 else "b", "X", f"s{i % 2}", "r") for i in range(8)}
    sites, acqs = registry_totals(Registry(entries))
    assert sites == Counter({("a", "s0"): 3, ("a", "s1"): 2, ("b", "s0"): 1, ("b", "s1"): 2})
    assert acqs == Counter({"a": 5, "b": 3})


# ---- lists merged across collectors -------------------------------------------------------------------------
def test_merge_terminals_pages_the_whole_fleet() -> None:
    a = {"total": 3, "terminals": [{"terminal_id": t} for t in ("A", "C", "E")]}
    b = {"total": 4, "terminals": [{"terminal_id": t} for t in ("B", "D", "F", "G")]}
    page = merge_terminals([a, b], offset=2, limit=3)
    assert page["total"] == 7
    assert [t["terminal_id"] for t in page["terminals"]] == ["C", "D", "E"]


def test_merge_sites_sums_a_site_spread_over_collectors() -> None:
    s = {"acquirer": "a", "site": "s1", "terminals": 4, "online": 3, "shutdown": 0,
         "conditions": {"offline": 1}, "mass_offline_since": None}
    t = {**s, "terminals": 6, "online": 2, "shutdown": 1, "conditions": {"offline": 3, "weak_signal": 1},
         "mass_offline_since": 12.0}
    u = {**s, "site": "s0"}
    page = merge_sites([{"sites": [s, u]}, {"sites": [t]}], 0, 10)
    assert page["total"] == 2
    assert page["sites"][1] == {"acquirer": "a", "site": "s1", "terminals": 10, "online": 5, "shutdown": 1,
                                "conditions": {"offline": 4, "weak_signal": 1}, "mass_offline_since": 12.0}
    assert s["conditions"] == {"offline": 1}  # the members' bodies are not changed
    # The fleet leader's judgement replaces the members' own (each judged only its part of a site).
    judged = merge_sites([{"sites": [s, u]}, {"sites": [t]}], 0, 10, mass={("a", "s0"): 7.0})
    assert [x["mass_offline_since"] for x in judged["sites"]] == [7.0, None]


def test_uncovered_partitions() -> None:
    answers = [MemberAnswer("c0", 200, {}, [0, 2]), MemberAnswer("c1", 200, {}, [1])]
    assert uncovered(answers, 5) == [3, 4]
    assert uncovered([], 2) == [0, 1]


def _summary(completed: int, missing: int, amounts: dict[str, int]) -> dict[str, object]:
    return {"completed": completed, "recorded": completed - missing, "matched": completed - missing, "pending": 0,
            "missing_at_acquirer": missing, "unknown_to_terminal": 0, "missing_amount_minor": amounts}


def test_merge_reconcile_sums_a_merchant_spread_over_collectors() -> None:
    base = {"window": {"from": "x"}, "now": "n", "grace_s": 60.0, "scope": {"acquirer": "a"}, "pending": [],
            "unknown_to_terminal": [], "recorded_rows": 3}
    a = {**base, "missing_at_acquirer": [{"txn_id": "1"}, {"txn_id": "2"}], "truncated": False, "terminals": 2,
         "totals": _summary(5, 2, {"EUR": 300}), "merchants": {"M1": _summary(5, 2, {"EUR": 300})}}
    b = {**base, "missing_at_acquirer": [{"txn_id": "3"}], "truncated": False, "terminals": 1,
         "totals": _summary(2, 1, {"EUR": 50, "USD": 7}),
         "merchants": {"M1": _summary(1, 1, {"USD": 7}), "M2": _summary(1, 0, {})}}
    out = merge_reconcile([a, b], limit=2)
    assert out["terminals"] == 3 and out["recorded_rows"] == 6
    assert out["totals"] == _summary(7, 3, {"EUR": 350, "USD": 7})
    assert out["merchants"]["M1"] == _summary(6, 3, {"EUR": 300, "USD": 7})
    assert out["missing_at_acquirer"] == [{"txn_id": "1"}, {"txn_id": "2"}] and out["truncated"]
    assert out["scope"] == {"acquirer": "a"}


def test_merge_facets() -> None:
    a = {"acquirers": ["a"], "sites": {"a": ["s1"]}, "conditions": ["offline"],
         "problem_terminals_by_condition": {"offline": 2}}
    b = {"acquirers": ["a", "b"], "sites": {"a": ["s0", "s1"], "b": ["t"]}, "conditions": ["offline"],
         "problem_terminals_by_condition": {"offline": 1}}
    assert merge_facets([a, b]) == {"acquirers": ["a", "b"], "sites": {"a": ["s0", "s1"], "b": ["t"]},
                                    "conditions": ["offline"], "problem_terminals_by_condition": {"offline": 3}}
