"""The condition catalogue is complete: every condition detection raises has every part the rest of posfleet
reads (severity, checklist step, rank, causes, alert, runbook, merchant message, evidence, next steps)."""

from pathlib import Path

import pytest

from collector.fleet import detect
from collector.fleet.conditions import CATALOGUE, FINDINGS, RANK, STEPS, critical_conditions
from collector.support import diagnose
from exporters.alerting import rules
from exporters.grafana import dashboards

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_764_510_000.0
CODES = [*CATALOGUE, *FINDINGS]


def test_every_detected_condition_has_a_catalogue_entry_and_nothing_else_does() -> None:
    assert set(detect.CONDITIONS) == set(CATALOGUE)
    assert len(detect.CONDITIONS) == len(set(detect.CONDITIONS))
    assert {c for c in CATALOGUE if CATALOGUE[c].kind == "heartbeat"} == set(detect.HEARTBEAT_CONDITIONS)
    assert {c for c in CATALOGUE if CATALOGUE[c].kind == "time"} == set(detect.TIME_CONDITIONS)
    assert not set(CATALOGUE) & set(FINDINGS)


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_a_condition_entry_has_every_part(name: str) -> None:
    c = CATALOGUE[name]
    assert c.severity in ("critical", "warning")
    assert c.step in dict(STEPS)
    assert c.causes and all(c.causes.values())
    for detail in c.causes:
        assert detect.probable_cause(name, detail) == c.causes[detail]
    en, zh = c.merchant
    assert "{tid}" in en and "{tid}" in zh
    assert c.alerts, "every condition pages or warns someone"
    for alert in c.alerts:
        assert alert.summary and alert.what and alert.cause
        assert (ROOT / "docs" / "runbooks" / f"{alert.name}.md").is_file(), f"{alert.name} has no runbook"
    assert {a.severity for a in c.alerts} >= {c.severity}


@pytest.mark.parametrize("code", CODES)
def test_every_condition_and_finding_is_ranked_placed_and_explained(code: str) -> None:
    assert code == "shutdown" or code in RANK  # a clean shutdown is informational, never the primary cause
    assert diagnose.STEP_OF[code] in dict(STEPS)
    if code not in ("shutdown", "paper_out"):  # paper_out refines hardware_fault's evidence and steps
        facts = diagnose.Facts("T1", conditions={code: (NOW, "critical", "")} if code in CATALOGUE else {})
        assert diagnose._evidence(code, facts, NOW), f"{code}: no evidence"
        assert diagnose._next_steps(code, facts, "2026-12-01"), f"{code}: no next steps"
    if code != "shutdown":
        assert code in diagnose._MESSAGES, f"{code}: no merchant message"


def test_rank_names_only_known_codes() -> None:
    assert set(RANK) <= set(CODES)
    assert len(RANK) == len(set(RANK))


def test_generators_read_the_catalogue() -> None:
    assert [(a.name, a.condition) for a in rules.TERMINAL_ALERTS] == [
        (a.name, c.name) for c in CATALOGUE.values() for a in c.alerts
    ]
    assert dashboards.CONDITIONS_CRITICAL.split("|") == list(critical_conditions())
    assert {c for c, s in detect.SEVERITY.items() if s == "critical"} == set(critical_conditions())
