"""The shipped alerting files against the real tools: promtool (rule checks and unit tests), amtool (config and
routing of every alert), and a real Alertmanager (inhibition and maintenance silences with synthetic alerts)."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporters.alerting import alertmanager as am
from exporters.alerting import rules
from tests.harness.alerting import (
    DEPLOY_ALERTMANAGER,
    DEPLOY_PROMETHEUS,
    am_alerts,
    amtool,
    promtool,
    write_alertmanager_config,
    write_prometheus_config,
)
from tests.harness.core import ROOT, Process, free_port, wait_until

pytestmark = pytest.mark.integration


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a tool, capturing its output."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


# ---- promtool -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "fast"])
def test_promtool_check_rules(profile: str, tmp_path: Path) -> None:
    path = rules.DEFAULT_RULES_PATH
    if profile != "default":
        path = tmp_path / rules.rule_file_name(profile)
        path.write_text(rules.render_rules(rules.load_alert_config(), profile))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    count = sum(len(g["rules"]) for g in rules.build_groups(rules.load_alert_config(), profile))
    assert f"SUCCESS: {count} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    files = sorted(str(p) for p in (ROOT / "alert_rules" / "tests").glob("*.test.yml"))
    assert len(files) == 3
    result = run(promtool(), "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_promtool_unit_tests_catch_a_rule_that_resets_on_a_missed_scrape(tmp_path: Path) -> None:
    """The gap tests are not vacuous: a naive per-terminal expression fails them."""
    text = rules.DEFAULT_RULES_PATH.read_text()
    held = re.compile(
        r"last_over_time\(timestamp\((posfleet_terminal_problem\{[^}]*\})\)\[5m:30s\]\)\n"
        r"\s*== on \(job, instance\) group_left \(\)\n"
        r"\s*last_over_time\(timestamp\(posfleet_up\{[^}]*\}\)\[5m:30s\]\)"
    )
    naive = held.sub(r"\1", text)
    assert naive != text
    (tmp_path / "posfleet.rules.yml").write_text(naive)
    tests = tmp_path / "tests"
    tests.mkdir()
    target = tests / "terminals.test.yml"
    target.write_text((ROOT / "alert_rules" / "tests" / "terminals.test.yml").read_text())
    assert run(promtool(), "check", "rules", str(tmp_path / "posfleet.rules.yml")).returncode == 0
    result = run(promtool(), "test", "rules", str(target))
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


def test_promtool_check_prometheus_config(tmp_path: Path) -> None:
    syntax = run(promtool(), "check", "config", "--syntax-only", str(DEPLOY_PROMETHEUS))
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    full = run(promtool(), "check", "config", str(write_prometheus_config(tmp_path, 9108, 9093, "default")))
    assert full.returncode == 0, full.stdout + full.stderr
    doc = yaml.safe_load(rules.render_rules(rules.load_alert_config()))
    assert f"SUCCESS: {sum(len(g['rules']) for g in doc['groups'])} rules found" in full.stdout


def test_posfleet_rules_check_cli() -> None:
    result = run(sys.executable, "-m", "collector.cli", "rules", "check")
    assert result.returncode == 0, result.stdout + result.stderr


# ---- amtool ---------------------------------------------------------------------------------------------------


def test_amtool_check_config(tmp_path: Path) -> None:
    for path in (DEPLOY_ALERTMANAGER, write_alertmanager_config(tmp_path, "http://127.0.0.1:1")):
        result = run(amtool(), "check-config", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "5 inhibit rules" in result.stdout


# (labels, receiver): one row per alert and severity it can have, plus per-acquirer variants.
ROUTES: list[tuple[dict[str, str], str]] = [
    ({"alertname": "PosWatchdog", "severity": "none"}, "deadmans-switch"),
    ({"alertname": "PosCollectorCardDataRejected", "severity": "critical"}, "security-page"),
    ({"alertname": "PosCollectorDown", "severity": "critical"}, "platform-page"),
    ({"alertname": "PosCollectorMqttDisconnected", "severity": "critical"}, "platform-page"),
    ({"alertname": "PosCollectorIngestStalled", "severity": "critical"}, "platform-page"),
    ({"alertname": "PosCollectorRejectingMessages", "severity": "warning", "reason": "bad_json"}, "platform-tickets"),
    ({"alertname": "PosCollectorIngestQueueSaturated", "severity": "warning"}, "platform-tickets"),
    ({"alertname": "PosCollectorSnapshotFailing", "severity": "warning"}, "platform-tickets"),
    ({"alertname": "PosCollectorProblemSeriesCapped", "severity": "warning"}, "platform-tickets"),
    ({"alertname": "PosCollectorRegistryReloadFailing", "severity": "warning"}, "platform-tickets"),
    ({"alertname": "PosCollectorSnapshotCorrupt", "severity": "warning"}, "platform-tickets"),
    ({"alertname": "PosCollectorTaskRestarting", "severity": "warning", "task": "tick"}, "platform-tickets"),
    ({"alertname": "PosTerminalOffline", "severity": "critical", "acquirer": "acq-a"}, "acq-a-page"),
    ({"alertname": "PosTerminalUploadBacklog", "severity": "critical", "acquirer": "acq-a"}, "acq-a-page"),
    ({"alertname": "PosTerminalUpstreamMissing", "severity": "critical", "acquirer": "acq-b"}, "acq-b-page"),
    ({"alertname": "PosTerminalMerchantMismatch", "severity": "critical", "acquirer": "acq-b"}, "acq-b-page"),
    ({"alertname": "PosTerminalHardwareFault", "severity": "critical", "acquirer": "acq-b"}, "acq-b-page"),
    ({"alertname": "PosTerminalHardwareFault", "severity": "warning", "acquirer": "acq-b"}, "acq-b-tickets"),
    ({"alertname": "PosTerminalOutdatedSoftware", "severity": "warning", "acquirer": "acq-a"}, "acq-a-tickets"),
    ({"alertname": "PosTerminalWeakSignal", "severity": "warning", "acquirer": "acq-a"}, "acq-a-tickets"),
    ({"alertname": "PosTerminalClockSkew", "severity": "warning", "acquirer": "acq-b"}, "acq-b-tickets"),
    ({"alertname": "PosTerminalFlapping", "severity": "warning", "acquirer": "acq-b"}, "acq-b-tickets"),
    ({"alertname": "PosTerminalMessagesRejected", "severity": "warning", "acquirer": "acq-a"}, "acq-a-tickets"),
    ({"alertname": "PosTerminalActivityDrop", "severity": "warning", "acquirer": "acq-a"}, "acq-a-tickets"),
    ({"alertname": "PosAcquirerVolumeDrop", "severity": "warning", "acquirer": "acq-b"}, "acq-b-tickets"),
    ({"alertname": "PosTerminalUnregistered", "severity": "warning", "acquirer": "unknown"}, "fleet-ops-tickets"),
    ({"alertname": "PosFleetMassOffline", "severity": "critical", "acquirer": "acq-a", "scope": "site"}, "acq-a-page"),
    ({"alertname": "PosUpstreamFeedStale", "severity": "critical", "acquirer": "acq-a"}, "acq-a-page"),
    ({"alertname": "PosUpstreamFeedStale", "severity": "critical", "acquirer": "acq-z"}, "fleet-ops-page"),
    ({"alertname": "PosTerminalOffline", "severity": "critical", "acquirer": "acq-z"}, "fleet-ops-page"),
    ({"alertname": "PosTerminalWeakSignal", "severity": "warning", "acquirer": "acq-z"}, "fleet-ops-tickets"),
]


@pytest.mark.parametrize(("labels", "receiver"), ROUTES, ids=lambda x: x if isinstance(x, str) else x["alertname"])
def test_amtool_routes_each_alert_to_its_receiver(labels: dict[str, str], receiver: str) -> None:
    pairs = [f"{k}={v}" for k, v in labels.items()]
    result = run(amtool(), "config", "routes", "test", f"--config.file={DEPLOY_ALERTMANAGER}",
                 f"--verify.receivers={receiver}", *pairs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_route_table_covers_every_alert_and_severity() -> None:
    doc = yaml.safe_load(rules.render_rules(rules.load_alert_config()))
    pairs = {(r["alert"], r["labels"]["severity"]) for g in doc["groups"] for r in g["rules"]}
    assert pairs <= {(labels["alertname"], labels["severity"]) for labels, _ in ROUTES}


# ---- a real Alertmanager: inhibition and silences ------------------------------------------------------------


def synthetic(name: str, **labels: str) -> dict[str, Any]:
    """A firing alert as Prometheus would post it."""
    now = datetime.now(UTC)
    return {
        "labels": {"alertname": name, **labels},
        "annotations": {"summary": name},
        "startsAt": now.isoformat(),
        "endsAt": (now + timedelta(minutes=10)).isoformat(),
    }


def term(name: str, tid: str, acquirer: str, site: str, severity: str = "critical", mid: str = "M1") -> dict[str, Any]:
    """A per-terminal alert."""
    return synthetic(name, severity=severity, terminal_id=tid, merchant_id=mid, acquirer=acquirer, site=site,
                     model="A920")


def states(port: int) -> dict[str, str]:
    """key -> 'active' | 'inhibited' | 'silenced' for every alert in Alertmanager."""
    out = {}
    for a in am_alerts(port):
        labels = a["labels"]
        where = labels.get("terminal_id") or f"{labels.get('acquirer', '')}/{labels.get('site', '')}"
        key = f"{labels['alertname']}:{where}"
        st = a["status"]
        out[key] = "silenced" if st["silencedBy"] else "inhibited" if st["inhibitedBy"] else st["state"]
    return out


def wait_states(port: int, expected: dict[str, str]) -> None:
    """Poll until Alertmanager shows exactly these states."""
    try:
        wait_until(lambda: states(port) == expected, 15, "alert states", 0.1)
    except TimeoutError:
        raise AssertionError(f"got {states(port)}, expected {expected}") from None


def test_inhibition_rules(alertmanager: Process) -> None:
    client = am.AlertmanagerClient(f"http://127.0.0.1:{alertmanager.port}")
    client.post_alerts([
        synthetic("PosFleetMassOffline", severity="critical", scope="site", acquirer="acq-a", site="s1"),
        synthetic("PosFleetMassOffline", severity="critical", scope="acquirer", acquirer="acq-b"),
        # A site-scoped alert without a site label must not mute terminals that have none either.
        synthetic("PosFleetMassOffline", severity="critical", scope="site", acquirer="acq-c"),
        synthetic("PosUpstreamFeedStale", severity="critical", acquirer="acq-m"),
        term("PosTerminalOffline", "A-S1", "acq-a", "s1"),
        term("PosTerminalOffline", "A-S2", "acq-a", "s2"),
        term("PosTerminalHardwareFault", "A-S1-HW", "acq-a", "s1"),
        term("PosTerminalOffline", "B-S1", "acq-b", "s1"),
        term("PosTerminalOffline", "B-S9", "acq-b", "s9"),
        term("PosTerminalWeakSignal", "B-S9-W", "acq-b", "s9", "warning"),
        synthetic("PosTerminalOffline", severity="critical", terminal_id="C-NOSITE", acquirer="acq-c"),
        term("PosTerminalUpstreamMissing", "M-1", "acq-m", "m1"),
        term("PosTerminalUpstreamMissing", "A-UP", "acq-a", "s2"),
        term("PosTerminalOffline", "X-OFF", "acq-x", "x1"),
        term("PosTerminalWeakSignal", "X-OFF", "acq-x", "x1", "warning"),
    ])
    wait_states(alertmanager.port, {
        "PosFleetMassOffline:acq-a/s1": "active",
        "PosFleetMassOffline:acq-b/": "active",
        "PosFleetMassOffline:acq-c/": "active",
        "PosUpstreamFeedStale:acq-m/": "active",
        "PosTerminalOffline:A-S1": "inhibited",  # same acquirer and site as the site-scoped mass offline
        "PosTerminalOffline:A-S2": "active",  # other site
        "PosTerminalHardwareFault:A-S1-HW": "active",  # not an offline alert
        "PosTerminalOffline:B-S1": "inhibited",  # acquirer-scoped mass offline: every site
        "PosTerminalOffline:B-S9": "inhibited",
        "PosTerminalWeakSignal:B-S9-W": "active",
        "PosTerminalOffline:C-NOSITE": "active",  # `equal` on a label missing on both sides must not mute
        "PosTerminalUpstreamMissing:M-1": "inhibited",  # stale feed of the same acquirer
        "PosTerminalUpstreamMissing:A-UP": "active",
        "PosTerminalOffline:X-OFF": "active",
        "PosTerminalWeakSignal:X-OFF": "inhibited",  # an offline terminal's signal reading is stale
    })

    # The collector going down mutes every terminal and fleet alert, and nothing of its own.
    client.post_alerts([synthetic("PosCollectorDown", severity="critical", job="posfleet", instance="c:9108")])
    wait_until(lambda: len(am_alerts(alertmanager.port)) == 16, 15, "collector alert received", 0.1)
    for a in am_alerts(alertmanager.port):
        muted = bool(a["status"]["inhibitedBy"])
        assert muted == (a["labels"]["alertname"] != "PosCollectorDown"), a["labels"]


def maintenance(am_port: int, *args: str) -> str:
    """Run `posfleet maintenance ...` as a user would; returns stdout."""
    result = run(sys.executable, "-m", "collector.cli", "maintenance", *args,
                 "--alertmanager", f"http://127.0.0.1:{am_port}")
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_maintenance_silences_mute_what_they_should_and_nothing_else(alertmanager: Process) -> None:
    port = alertmanager.port
    client = am.AlertmanagerClient(f"http://127.0.0.1:{port}")
    client.post_alerts([
        synthetic("PosUpstreamFeedStale", severity="critical", acquirer="acq-m"),
        term("PosTerminalUpstreamMissing", "M-UP", "acq-m", "m1"),
        term("PosTerminalHardwareFault", "M-HW", "acq-m", "m1"),
        term("PosTerminalOffline", "M-OFF", "acq-m", "m1"),
        term("PosTerminalUpstreamMissing", "A-UP", "acq-a", "a1"),
        term("PosTerminalHardwareFault", "A-HW", "acq-a", "a1", mid="M7"),
        term("PosTerminalOffline", "A-OFF", "acq-a", "a1", mid="M7"),
        term("PosTerminalWeakSignal", "A-W1", "acq-a", "a2", "warning", mid="M8"),
        term("PosTerminalWeakSignal", "A-W2", "acq-a", "a2", "warning", mid="M8"),
    ])
    base = {
        "PosUpstreamFeedStale:acq-m/": "active",
        "PosTerminalUpstreamMissing:M-UP": "inhibited",
        "PosTerminalHardwareFault:M-HW": "active",
        "PosTerminalOffline:M-OFF": "active",
        "PosTerminalUpstreamMissing:A-UP": "active",
        "PosTerminalHardwareFault:A-HW": "active",
        "PosTerminalOffline:A-OFF": "active",
        "PosTerminalWeakSignal:A-W1": "active",
        "PosTerminalWeakSignal:A-W2": "active",
    }
    wait_states(port, base)

    host = maintenance(port, "start", "--acquirer", "acq-m", "--kind", "host", "--reason", "host upgrade CHG-1",
                       "--author", "ana", "--duration", "2h").split("\t")[0]
    merchant = maintenance(port, "start", "--merchant", "M7", "--reason", "shop refit", "--author", "ana",
                           "--until", (datetime.now(UTC) + timedelta(hours=3)).isoformat()).split("\t")[0]
    terminals = maintenance(port, "start", "--terminal", "A-W1", "--terminal", "NOT-THERE", "--reason", "repair",
                            "--author", "ana", "--duration", "30m").split("\t")[0]
    muted = base | {
        # host maintenance of acq-m: its feed and upstream-missing only, not its hardware or offline terminals
        "PosUpstreamFeedStale:acq-m/": "silenced",
        "PosTerminalUpstreamMissing:M-UP": "silenced",
        # merchant M7: everything of its terminals
        "PosTerminalHardwareFault:A-HW": "silenced",
        "PosTerminalOffline:A-OFF": "silenced",
        # the terminal set
        "PosTerminalWeakSignal:A-W1": "silenced",
    }
    wait_states(port, muted)

    listing = maintenance(port, "list")
    for sid, needle in ((host, "host upgrade CHG-1"), (merchant, "shop refit"), (terminals, "repair")):
        assert sid in listing and needle in listing
    assert 'terminal_id=~"A-W1|NOT-THERE"' in listing

    maintenance(port, "end", merchant)
    wait_states(port, muted | {"PosTerminalHardwareFault:A-HW": "active", "PosTerminalOffline:A-OFF": "active"})
    assert merchant not in maintenance(port, "list")


def test_maintenance_against_a_dead_alertmanager_fails_clearly() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run(sys.executable, "-m", "collector.cli", "maintenance", "start", "--acquirer", "acq-a", "--reason",
                 "x", "--author", "a", "--duration", "1h", "--alertmanager", url)
    assert result.returncode == 1
    assert f"cannot reach Alertmanager at {url}" in result.stderr
    assert "Traceback" not in result.stderr
