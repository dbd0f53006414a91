"""The alert rule generator: config validation, profiles, the committed file, and what every alert carries."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from collector.cli import main
from exporters.alerting import rules

ROOT = Path(__file__).resolve().parents[2]
RULE_TESTS = sorted((ROOT / "alert_rules" / "tests").glob("*.test.yml"))
RAW: dict[str, Any] = yaml.safe_load(rules.DEFAULT_CONFIG_PATH.read_text(encoding="utf-8"))
PER_TERMINAL = {a.name for a in rules.TERMINAL_ALERTS}


def rendered(profile: str = "default") -> list[dict[str, Any]]:
    """Every rule of a profile."""
    doc = yaml.safe_load(rules.render_rules(rules.load_alert_config(), profile))
    return [r for g in doc["groups"] for r in g["rules"]]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0s", 0), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("2h", 7200), ("1m30s", 90), ("1h2m3s", 3723)],
)
def test_durations_round_trip(text: str, seconds: int) -> None:
    assert rules.parse_duration(text) == seconds
    assert rules.format_duration(seconds) == text


@pytest.mark.parametrize("text", ["", "5", "5x", "1.5m", "m", "30s5m", "-1m"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        rules.parse_duration(text)


@pytest.mark.parametrize(("seconds", "scaled"), [(0, 0), (1, 1), (30, 1), (45, 2), (120, 4), (300, 10)])
def test_fast_profile_divides_durations_never_below_one_second(seconds: int, scaled: int) -> None:
    assert rules.load_alert_config().profile("fast").scale(seconds) == scaled


def test_committed_rules_match_the_generator(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check"]) == 0, capsys.readouterr()


def test_check_fails_with_a_diff_when_the_committed_file_drifts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drifted = tmp_path / "posfleet.rules.yml"
    drifted.write_text(rules.DEFAULT_RULES_PATH.read_text().replace("for: 2m", "for: 3m", 1))
    assert main(["rules", "check", "--rules", str(drifted)]) == 1
    out, err = capsys.readouterr()
    assert "-    for: 3m" in out and "+    for: 2m" in out
    assert "posfleet rules render" in err


def test_render_fast_profile_to_a_directory(tmp_path: Path) -> None:
    assert main(["rules", "render", "--profile", "fast", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "posfleet-fast.rules.yml").read_text()
    assert "interval: 1s" in text and "for: 4s" in text and "[10s:1s]" in text


def test_unknown_profile_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "render", "--profile", "slow", "--out", "-"]) == 2
    assert "no profile 'slow'; have default, fast" in capsys.readouterr().err


def broken(**changes: Any) -> dict[str, Any]:
    """The shipped config with some top-level sections changed."""
    raw = copy.deepcopy(RAW)
    for key, value in changes.items():
        raw[key] = value
    return raw


def test_every_problem_is_reported_at_once() -> None:
    raw = broken(bogus=1, hold="5 minutes")
    raw["selectors"]["collector"] = "posfleet"
    del raw["for"]["PosTerminalOffline"]
    raw["thresholds"]["ingest_queue_fill"] = 2
    with pytest.raises(rules.AlertConfigError) as err:
        rules.parse_alert_config(raw)
    text = str(err.value)
    for needle in (
        "config.bogus: unknown key",
        "hold: '5 minutes' is not a duration",
        "selectors.collector: must be label matchers",
        "for.PosTerminalOffline: missing",
        "thresholds.ingest_queue_fill: must be a number in [0.01, 1]",
    ):
        assert needle in text


def test_an_alert_name_outside_the_catalog_is_an_error() -> None:
    raw = broken()
    raw["for"]["PosTerminalOfline"] = "1m"
    with pytest.raises(rules.AlertConfigError, match=r"for\.PosTerminalOfline: unknown key"):
        rules.parse_alert_config(raw)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("for", "PosFleetMassOffline", "2m", "PosFleetMassOffline must be shorter than for.PosTerminalOffline"),
        ("for", "PosCollectorDown", "5m", "PosCollectorDown plus one evaluation must be shorter than hold"),
        (None, "hold", "30s", "hold must cover at least two scrape intervals"),
        (None, "rate_window", "1m", "rate_window must cover at least four scrape intervals"),
    ],
)
def test_timing_relations_the_alert_model_depends_on(
    section: str | None, key: str, value: str, message: str
) -> None:
    raw = broken()
    (raw[section] if section else raw)[key] = value
    with pytest.raises(rules.AlertConfigError, match=re.escape(message)):
        rules.parse_alert_config(raw)


def test_every_default_in_the_config_has_a_comment() -> None:
    lines = rules.DEFAULT_CONFIG_PATH.read_text().splitlines()
    section = ""
    checked = 0
    for i, line in enumerate(lines):
        top = re.match(r"^(\w+):(.*)$", line)
        if top:
            section = top.group(1)
        scalar_top = top is not None and top.group(2).strip() != ""
        entry = re.match(r"^  \w+: \S", line) and section in {"selectors", "thresholds", "for"}
        if scalar_top or entry:
            assert lines[i - 1].lstrip().startswith("#"), f"no comment saying why: {line.strip()}"
            checked += 1
    assert checked >= len(rules.ALERT_NAMES) + 10


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_catalog_is_complete_and_every_alert_carries_labels_and_annotations(profile: str) -> None:
    rendered_rules = rendered(profile)
    assert {r["alert"] for r in rendered_rules} == set(rules.ALERT_NAMES)
    for name in (
        "PosTerminalOffline", "PosTerminalUploadBacklog", "PosTerminalUpstreamMissing", "PosTerminalUnregistered",
        "PosTerminalMerchantMismatch", "PosTerminalOutdatedSoftware", "PosTerminalHardwareFault",
        "PosTerminalWeakSignal", "PosTerminalClockSkew", "PosTerminalFlapping", "PosUpstreamFeedStale",
        "PosFleetMassOffline", "PosCollectorDown", "PosCollectorMqttDisconnected", "PosCollectorRejectingMessages",
        "PosWatchdog",
    ):
        assert name in rules.ALERT_NAMES
    for r in rendered_rules:
        expected_severities = {"none"} if r["alert"] == "PosWatchdog" else {"warning", "critical"}
        assert r["labels"]["severity"] in expected_severities, r["alert"]
        assert set(r["annotations"]) == {"summary", "description", "probable_cause", "runbook_url"}
        assert r["annotations"]["runbook_url"].endswith(f"/docs/runbooks/{r['alert']}.md")
        assert "{{" not in r["annotations"]["summary"], "summaries are static"
        if r["alert"] in PER_TERMINAL:
            by = re.search(r"max by \(([^)]*)\)", r["expr"])
            assert by is not None
            assert {"terminal_id", "merchant_id", "acquirer", "site"} <= {s.strip() for s in by.group(1).split(",")}


def test_hardware_fault_severity_follows_the_fault() -> None:
    hw = [r for r in rendered() if r["alert"] == "PosTerminalHardwareFault"]
    assert {r["labels"]["severity"]: ('severity="critical"' in r["expr"]) for r in hw} == {
        "critical": True, "warning": False,
    }


def test_every_alert_has_a_runbook_with_the_four_sections() -> None:
    for name in rules.ALERT_NAMES:
        text = (ROOT / "docs" / "runbooks" / f"{name}.md").read_text()
        assert text.startswith(f"# {name}\n"), name
        for section in ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation"):
            assert section in text, (name, section)


def test_promtool_tests_cover_every_alert_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../posfleet.rules.yml"]
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else quiet).add(check["alertname"])
                for alert in check["exp_alerts"]:
                    assert set(alert["exp_annotations"]) == {"summary", "description", "probable_cause",
                                                             "runbook_url"}
    assert firing == set(rules.ALERT_NAMES)
    assert quiet == set(rules.ALERT_NAMES) - {"PosWatchdog"}  # always firing, by design


def test_deploy_prometheus_matches_the_default_profile() -> None:
    cfg = rules.load_alert_config()
    prof = cfg.profile("default")
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert rules.parse_duration(doc["global"]["scrape_interval"]) == prof.scrape_interval
    assert rules.parse_duration(doc["global"]["evaluation_interval"]) == prof.evaluation_interval
    job = re.fullmatch(r'job="([^"]+)"', cfg.collector_selector)
    assert job is not None
    assert job.group(1) in {j["job_name"] for j in doc["scrape_configs"]}
    assert any(f.endswith("/posfleet.rules.yml") for f in doc["rule_files"])


def test_latency_budget_from_the_config_numbers() -> None:
    cfg = rules.load_alert_config()
    default = rules.latency_budget(cfg, "default")
    # scrape 30s + evaluation 30s (+ subquery step 30s for per-terminal alerts) + for
    assert default["PosTerminalOffline"] == 30 + 30 + 30 + 120
    assert default["PosFleetMassOffline"] == 30 + 30 + 60
    assert default["PosWatchdog"] == 60
    fast = rules.latency_budget(cfg, "fast")
    assert fast["PosTerminalOffline"] == 1 + 1 + 1 + 4
    assert fast["PosFleetMassOffline"] < fast["PosTerminalOffline"]
