"""Diagnosis as a pure function: every simulator fault is named as the primary cause with its evidence, a healthy
terminal gets "nothing wrong found", and combined faults rank the cause that explains missing transactions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from collector.config import Config, Thresholds
from collector.fleet.protocol import Hardware, Heartbeat, Net
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import FeedState, Fleet, Transition
from collector.sim.simulator import ACQUIRER_FAULTS, FAULTS
from collector.support.diagnose import RANK, STEPS, Facts, LedgerFacts, diagnose, facts_from

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
SINCE = NOW - 600


def healthy(**changes: Any) -> Facts:
    """A terminal that works: heard a second ago, its acquirer's feed alive, a transaction recorded."""
    base = Facts(
        terminal_id="T1", merchant_id="M1", acquirer="acq-a", site="s1", model="A920",
        registry_merchant_id="M1", heartbeat_mid="M1", status="online", status_at=NOW - 3600,
        last_heartbeat_at=NOW - 1, terminal_clock=NOW - 1, interval_s=30, uptime_s=86_000, app_version="3.4.1",
        min_app_version="3.0.0", net_type="wifi", rssi_dbm=-58, power_source="mains", battery_pct=100,
        printer="ok", display="ok", card_reader="ok", txn_count=40, uploaded_count=40, queue_depth=0,
        last_recorded_at=NOW - 30, recorded_txns=40, feed_last_at=NOW - 5, feed_stale=False,
        ledger=LedgerFacts(receipts=40, recorded=40, last_recorded_at=NOW - 30),
    )
    return dataclasses.replace(base, **changes)


def cond(name: str, severity: str = "critical", detail: str = "", since: float = SINCE) -> dict[str, Any]:
    return {name: (since, severity, detail)}


# fault -> (facts, primary code, detail, evidence that must be present)
CASES: dict[str, tuple[Facts, str, str, dict[str, Any]]] = {
    "network_loss": (
        healthy(status="offline", status_at=NOW - 590, last_heartbeat_at=NOW - 620,
                conditions=cond("offline", detail="last_will")),
        "offline", "last_will",
        {"status": "offline", "last_will_at": "2027-01-15T07:50:10Z", "last_heartbeat_age_s": 620.0},
    ),
    "power_loss": (
        healthy(last_heartbeat_at=NOW - 700, conditions=cond("offline", detail="silent")),
        "offline", "silent", {"status": "online", "last_heartbeat_age_s": 700.0, "power_source": "mains"},
    ),
    "paper_out": (
        healthy(printer="paper_out", conditions=cond("hardware_fault", "warning", "printer_paper_out")),
        "hardware_fault", "printer_paper_out", {"printer": "paper_out"},
    ),
    "printer_fault": (
        healthy(printer="fault", conditions=cond("hardware_fault", detail="printer_fault")),
        "hardware_fault", "printer_fault", {"printer": "fault", "display": "ok"},
    ),
    "display_fault": (
        healthy(display="fault", conditions=cond("hardware_fault", detail="display_fault")),
        "hardware_fault", "display_fault", {"display": "fault"},
    ),
    "card_reader_fault": (
        healthy(card_reader="fault", conditions=cond("hardware_fault", detail="card_reader_fault")),
        "hardware_fault", "card_reader_fault", {"card_reader": "fault"},
    ),
    "outdated_app": (
        healthy(app_version="2.0.7", conditions=cond("outdated_software", "warning")),
        "outdated_software", "", {"app_version": "2.0.7", "minimum_app_version": "3.0.0"},
    ),
    "stuck_uploads": (
        healthy(queue_depth=25, uploaded_count=15, oldest_queued_ts=NOW - 750, terminal_clock=NOW - 1,
                conditions=cond("upload_backlog", detail="queue_depth")),
        "upload_backlog", "queue_depth", {"queue_depth": 25, "queue_depth_threshold": 20, "oldest_queued_age_s": 749.0},
    ),
    "host_drops": (
        healthy(last_recorded_at=NOW - 2000, conditions=cond("upstream_missing"),
                ledger=LedgerFacts(receipts=30, unrecorded=12, oldest_unrecorded_at=NOW - 1500,
                                   unrecorded_sample=("T1-29", "T1-30"))),
        "upstream_missing", "",
        {"last_recorded_at": "2027-01-15T07:26:40Z", "unrecorded_transactions": 12, "grace_s": 900.0,
         "unrecorded_txn_ids": ["T1-29", "T1-30"]},
    ),
    "unregistered": (
        healthy(registry_merchant_id=None, acquirer="unknown", conditions=cond("unregistered", "warning")),
        "unregistered", "", {"terminal_id": "T1", "registry_loaded": True},
    ),
    "wrong_merchant": (
        healthy(heartbeat_mid="M-WRONG", conditions=cond("merchant_mismatch")),
        "merchant_mismatch", "", {"heartbeat_merchant_id": "M-WRONG", "registered_merchant_id": "M1"},
    ),
    "clock_skew": (
        healthy(terminal_clock=NOW + 3599, conditions=cond("clock_skew", "warning", "ahead")),
        "clock_skew", "ahead", {"skew_s": 3600.0, "threshold_s": 300.0},
    ),
    "weak_signal": (
        healthy(net_type="cellular", rssi_dbm=-108, conditions=cond("weak_signal", "warning", "cellular")),
        "weak_signal", "cellular", {"rssi_dbm": -108, "threshold_dbm": -95.0},
    ),
    "reboot_loop": (
        healthy(restarts=(NOW - 300, NOW - 200, NOW - 100), uptime_s=50, conditions=cond("flapping", "warning")),
        "flapping", "",
        {"restarts_or_reconnects": ["2027-01-15T07:55:00Z", "2027-01-15T07:56:40Z", "2027-01-15T07:58:20Z"],
         "threshold": 3},
    ),
    "host_maintenance": (
        healthy(feed_last_at=NOW - 400, feed_stale=True, ledger=LedgerFacts(receipts=40, pending=3, unrecorded=2)),
        "acquirer_maintenance", "feed_stale",
        {"acquirer": "acq-a", "feed_silent_s": 400.0, "transactions_waiting_for_records": 5},
    ),
}


def test_every_simulator_fault_has_a_case() -> None:
    assert set(CASES) | {"shutdown"} == set(FAULTS) | set(ACQUIRER_FAULTS)


@pytest.mark.parametrize("fault", sorted(CASES))
def test_fault_is_the_primary_cause_with_its_evidence(fault: str) -> None:
    facts, code, detail, evidence = CASES[fault]
    d = diagnose(facts, NOW)
    assert not d.healthy
    assert d.primary is not None
    assert (d.primary.code, d.primary.detail) == (code, detail)
    for key, value in evidence.items():
        assert d.primary.evidence[key] == value, key
    assert d.primary.cause
    assert [f for f in d.others if f.severity != "info"] == []  # a single fault: nothing else reported
    assert d.next_steps and d.merchant_message["en"] and d.merchant_message["zh-CN"]
    assert "T1" in d.merchant_message["en"] and "T1" in d.merchant_message["zh-CN"]
    assert "Nothing wrong" not in d.summary
    # The step that owns the finding says so; the others say ok.
    statuses = {s["step"]: s["status"] for s in d.steps}
    assert statuses[d.primary.step] in ("problem", "warning")
    assert all(v == "ok" for k, v in statuses.items() if k != d.primary.step), statuses
    body = d.to_dict()
    assert body["primary_cause"]["code"] == code and body["healthy"] is False


def test_healthy_terminal_says_nothing_wrong_and_until_when() -> None:
    d = diagnose(healthy(), NOW)
    assert d.healthy and d.primary is None and d.others == ()
    assert d.summary == "Nothing wrong found; transactions reaching the acquirer up to 2027-01-15 07:59 UTC."
    assert d.to_dict()["transactions_reaching_acquirer_until"] == "2027-01-15T07:59:30Z"
    assert [s["status"] for s in d.steps] == ["ok"] * len(STEPS)
    assert [s["step"] for s in d.steps] == [s for s, _t in STEPS]
    assert "working normally" in d.merchant_message["en"] and "工作正常" in d.merchant_message["zh-CN"]
    net = d.steps[0]["evidence"]
    assert net["last_heartbeat_at"] == "2027-01-15T07:59:59Z" and net["rssi_dbm"] == -58


def test_healthy_with_nothing_recorded_yet() -> None:
    d = diagnose(healthy(last_recorded_at=None, ledger=None), NOW)
    assert d.healthy and "no transaction from this terminal has been recorded" in d.summary


def test_clean_shutdown_is_not_a_problem() -> None:
    d = diagnose(healthy(status="shutdown", status_at=NOW - 120, last_heartbeat_at=NOW - 125), NOW)
    assert d.healthy and d.primary is None
    assert d.summary.startswith("Nothing wrong found: the terminal was switched off cleanly at 2027-01-15 07:58 UTC")
    assert [f.code for f in d.others] == ["shutdown"]


def test_ledger_gap_without_condition_is_named() -> None:
    facts = healthy(ledger=LedgerFacts(receipts=20, recorded=18, unrecorded=2, oldest_unrecorded_at=NOW - 2000,
                                       unrecorded_sample=("T1-3", "T1-7"), last_recorded_at=NOW - 30))
    d = diagnose(facts, NOW)
    assert d.primary is not None and d.primary.code == "unrecorded_transactions"
    assert d.primary.evidence["unrecorded_txn_ids"] == ["T1-3", "T1-7"]
    assert "posfleet reconcile --terminal T1 --day 2027-01-15" in d.next_steps[0]


def test_pending_within_grace_is_not_a_problem() -> None:
    assert diagnose(healthy(ledger=LedgerFacts(receipts=5, pending=3)), NOW).healthy


def test_upstream_missing_not_judged_while_feed_stale() -> None:
    d = diagnose(healthy(feed_stale=True, feed_last_at=NOW - 400, conditions=cond("upstream_missing")), NOW)
    assert d.primary is not None and d.primary.code == "acquirer_maintenance"
    assert [f.code for f in d.others] == []


def test_feed_never_heard_cannot_vouch() -> None:
    d = diagnose(healthy(feed_last_at=None, feed_stale=True), NOW)
    assert d.primary is not None and d.primary.code == "acquirer_feed_unknown" and not d.healthy


COMBINED = [
    ({"offline": ("critical", "silent"), "outdated_software": ("warning", "")}, "offline"),
    ({"outdated_software": ("warning", ""), "offline": ("critical", "last_will")}, "offline"),
    ({"weak_signal": ("warning", "cellular"), "upload_backlog": ("critical", "queue_age")}, "upload_backlog"),
    ({"hardware_fault": ("warning", "printer_paper_out"), "outdated_software": ("warning", "")}, "outdated_software"),
    ({"clock_skew": ("warning", "ahead"), "merchant_mismatch": ("critical", "")}, "merchant_mismatch"),
    ({"flapping": ("warning", ""), "offline": ("critical", "silent"), "weak_signal": ("warning", "")}, "offline"),
    ({"hardware_fault": ("critical", "card_reader_fault"), "weak_signal": ("warning", "")}, "hardware_fault"),
    ({"upstream_missing": ("critical", ""), "outdated_software": ("warning", "")}, "upstream_missing"),
]


@pytest.mark.parametrize(("conds", "primary"), COMBINED)
def test_combined_faults_rank_what_explains_missing_transactions(
    conds: dict[str, tuple[str, str]], primary: str
) -> None:
    d = diagnose(healthy(conditions={c: (SINCE, s, det) for c, (s, det) in conds.items()}), NOW)
    assert d.primary is not None and d.primary.code == primary
    assert {f.code for f in d.others} == set(conds) - {primary}
    # The primary cause's steps come first; each other finding adds its first step after them.
    assert len(d.next_steps) >= 2


def test_offline_and_maintenance_names_the_terminal_first() -> None:
    d = diagnose(healthy(feed_stale=True, feed_last_at=NOW - 400, conditions=cond("offline", detail="silent")), NOW)
    assert d.primary is not None and d.primary.code == "offline"
    assert [f.code for f in d.others] == ["acquirer_maintenance"]


def test_rank_lists_every_code() -> None:
    assert set(RANK) >= {"offline", "upload_backlog", "upstream_missing", "merchant_mismatch", "unregistered",
                         "outdated_software", "clock_skew", "hardware_fault", "weak_signal", "flapping"}


def test_facts_from_real_state() -> None:
    """The pure builder over a Fleet that saw an outdated, weak-signal terminal."""
    cfg = Config(software_policy={"*": "3.0.0"})
    reg = Registry({"T1": RegistryEntry.of("T1", "M1", "acq-a", "A920", "s1", "r1")})
    fleet = Fleet(cfg, started_at=NOW - 100, registry=reg)
    out: list[Transition] = []
    for i in range(4):
        hb = Heartbeat(tid="T1", ts=NOW - 40 + 10 * i, seq=i, interval_s=10, txn_count=i, uploaded_count=i,
                       queue_depth=0, oldest_queued_ts=None, mid="M1", model="A920", app_version="2.0.7",
                       net=Net("cellular", -110), hw=Hardware("ok", "ok", "ok"))
        fleet.on_heartbeat(hb, NOW - 40 + 10 * i, out)
    feed = fleet.feeds["acq-a"] = FeedState("acq-a")
    feed.last_rx = NOW - 2
    t = fleet.terminals["T1"]
    facts = facts_from(t, reg.get("T1"), True, feed, Thresholds(), cfg.software_policy, NOW)
    assert facts.min_app_version == "3.0.0" and facts.rssi_dbm == -110 and not facts.feed_stale
    d = diagnose(facts, NOW)
    assert d.primary is not None and d.primary.code == "outdated_software"
    assert [f.code for f in d.others] == ["weak_signal"]


def test_rejected_messages_are_named_with_their_reasons_and_a_pci_step() -> None:
    facts = healthy(last_heartbeat_at=NOW - 900, rejected={"card_data": 30, "bad_json": 1},
                    last_rejected_at=NOW - 20, conditions=cond("messages_rejected", "warning", "card_data"))
    d = diagnose(facts, NOW)
    assert d.primary is not None and (d.primary.code, d.primary.step) == ("messages_rejected", "software")
    assert d.primary.severity == "warning" and d.primary.detail == "card_data"
    assert d.primary.evidence["rejected_by_reason"] == {"bad_json": 1, "card_data": 30}
    assert d.primary.evidence["last_rejected_at"] == "2027-01-15T07:59:40Z"
    assert "31 rejected" in d.next_steps[0] and "PCI" in d.next_steps[1]
    assert "T1" in d.merchant_message["en"] and "T1" in d.merchant_message["zh-CN"]
    assert "alive" in d.primary.cause


@pytest.mark.parametrize(
    ("conds", "primary"),
    [
        ({"messages_rejected": ("warning", "bad_type"), "outdated_software": ("warning", "")}, "messages_rejected"),
        ({"messages_rejected": ("warning", "bad_type"), "upstream_missing": ("critical", "")}, "upstream_missing"),
    ],
)
def test_rejected_messages_rank_below_acquirer_evidence_above_terminal_reports(
    conds: dict[str, tuple[str, str]], primary: str
) -> None:
    d = diagnose(healthy(conditions={c: (SINCE, s, det) for c, (s, det) in conds.items()}), NOW)
    assert d.primary is not None and d.primary.code == primary


@pytest.mark.parametrize("clock", [0.0, 1e15, 1e300])
def test_any_finite_terminal_clock_gives_a_diagnosis(clock: float) -> None:
    """Before: a terminal clock past year 9999 raised ValueError in the diagnosis (a 500 for support)."""
    d = diagnose(healthy(terminal_clock=clock, oldest_queued_ts=clock, queue_depth=25,
                         conditions={**cond("clock_skew", "warning", "behind" if clock == 0 else "ahead"),
                                     **cond("upload_backlog", detail="queue_depth")}), NOW)
    assert d.primary is not None and d.primary.code == "upload_backlog"
    skew = next(f for f in d.others if f.code == "clock_skew")
    assert skew.evidence["skew_s"] == round(clock - (NOW - 1), 1)
    assert skew.evidence["terminal_clock"] == ("1970-01-01T00:00:00Z" if clock == 0 else None)
    assert d.to_dict()["primary_cause"]["code"] == "upload_backlog"


def test_facts_from_copy_rejects_and_a_clock_reset_to_the_epoch() -> None:
    cfg = Config(software_policy={"*": "3.0.0"})
    reg = Registry({"T1": RegistryEntry.of("T1", "M1", "acq-a", "A920", "s1", "r1")})
    fleet = Fleet(cfg, started_at=NOW - 100, registry=reg)
    hb = Heartbeat(tid="T1", ts=0.0, seq=0, interval_s=10, txn_count=0, uploaded_count=0, queue_depth=0,
                   oldest_queued_ts=None, mid="M1", app_version="3.1.0")
    fleet.on_heartbeat(hb, NOW - 50, [])
    fleet.on_rejected("T1", "card_data", NOW - 5, [])
    facts = facts_from(fleet.terminals["T1"], reg.get("T1"), True, None, Thresholds(), cfg.software_policy, NOW)
    assert facts.terminal_clock == 0.0 and facts.rejected == {"card_data": 1} and facts.last_rejected_at == NOW - 5
