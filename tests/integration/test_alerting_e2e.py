"""End to end with real processes: simulator -> Mosquitto -> collector -> Prometheus (fast rules) -> Alertmanager
(the shipped config, fast timers) -> webhook sink.

Every terminal fault runs on its own terminal; healthy and cleanly shut down terminals run beside them. The test
shows every expected alert active in Alertmanager with exactly its labels and nothing else there, a 60% outage of
one site as one mass-offline alert with its per-terminal offline alerts inhibited (never notified), maintenance
silences muting exactly their scope, every alert resolving when the faults clear, and it measures the time from
injecting a fault to the alert being active in Alertmanager.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from collector.sim.simulator import FAULTS, Simulator, TerminalSpec
from exporters.alerting import rules
from tests.harness.alerting import WebhookSink, am_alerts, start_prometheus, write_prometheus_config
from tests.harness.core import (
    ROOT,
    Process,
    free_port,
    http_get,
    http_json,
    start_collector,
    wait_until,
    write_collector_config,
)

pytestmark = pytest.mark.integration

INTERVAL = 0.5  # simulated heartbeat interval (s)

# fault -> (alert, severity)
ALERT_OF_FAULT: dict[str, tuple[str, str]] = {
    "network_loss": ("PosTerminalOffline", "critical"),
    "power_loss": ("PosTerminalOffline", "critical"),
    "paper_out": ("PosTerminalHardwareFault", "warning"),
    "printer_fault": ("PosTerminalHardwareFault", "critical"),
    "display_fault": ("PosTerminalHardwareFault", "critical"),
    "card_reader_fault": ("PosTerminalHardwareFault", "critical"),
    "outdated_app": ("PosTerminalOutdatedSoftware", "warning"),
    "stuck_uploads": ("PosTerminalUploadBacklog", "critical"),
    "host_drops": ("PosTerminalUpstreamMissing", "critical"),
    "unregistered": ("PosTerminalUnregistered", "warning"),
    "wrong_merchant": ("PosTerminalMerchantMismatch", "critical"),
    "clock_skew": ("PosTerminalClockSkew", "warning"),
    "weak_signal": ("PosTerminalWeakSignal", "warning"),
    "reboot_loop": ("PosTerminalFlapping", "warning"),
}


def spec(tid: str, mid: str, acquirer: str, site: str) -> TerminalSpec:
    """A registered terminal."""
    return TerminalSpec(tid, mid, acquirer, "A920", site, "r1")


def build_fleet() -> tuple[list[TerminalSpec], dict[str, str]]:
    """Terminals and the fault each faulty one gets."""
    assert set(ALERT_OF_FAULT) == set(FAULTS) - {"shutdown"}, "a simulator fault without an expected alert"
    specs: list[TerminalSpec] = []
    faults: dict[str, str] = {}
    for i, fault in enumerate(ALERT_OF_FAULT):
        tid = f"F{i:02d}"
        specs.append(spec(tid, f"MF{i:02d}", "acq-b", f"acq-b-site{i % 3}"))
        faults[tid] = fault
    specs += [spec(f"H{i}", f"MH{i}", "acq-b", f"acq-b-site{i % 3}") for i in range(6)]  # healthy
    for i in range(2):  # shut down cleanly: not a problem
        specs.append(spec(f"S{i}", f"MS{i}", "acq-b", f"acq-b-site{i}"))
        faults[f"S{i}"] = "shutdown"
    # acq-a: site0 has 5 terminals, 3 lose power (60%); site1 keeps acq-a as a whole under the threshold.
    specs += [spec(f"A{i}", f"MA{i}", "acq-a", f"acq-a-site{i // 5}") for i in range(10)]
    faults.update({"A0": "power_loss", "A1": "power_loss", "A2": "power_loss"})
    # acq-m: announced host maintenance (feed pauses) while one of its terminals has a real hardware fault.
    specs += [spec("M0", "MM0", "acq-m", "acq-m-site0"), spec("M1", "MM1", "acq-m", "acq-m-site0")]
    faults["M0"] = "card_reader_fault"
    return specs, faults


def key(labels: dict[str, str]) -> str:
    """alertname:terminal or alertname:acquirer/site."""
    where = labels.get("terminal_id") or f"{labels.get('acquirer', '')}/{labels.get('site', '')}"
    return f"{labels['alertname']}:{where}"


def state(alert: dict[str, Any]) -> str:
    """active, silenced or inhibited."""
    st = alert["status"]
    return "silenced" if st["silencedBy"] else "inhibited" if st["inhibitedBy"] else str(st["state"])


def snapshot(am_port: int) -> dict[str, tuple[str, dict[str, str]]]:
    """key -> (state, labels) of every alert in Alertmanager."""
    return {key(a["labels"]): (state(a), a["labels"]) for a in am_alerts(am_port)}


def maintenance(am_port: int, *args: str) -> str:
    """`posfleet maintenance ...` as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "collector.cli", "maintenance", *args, "--author", "e2e",
         "--alertmanager", f"http://127.0.0.1:{am_port}"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("\t")[0]


def rule_evaluations(prom_port: int) -> float:
    """Latest evaluation time of the per-terminal rule group (Unix seconds)."""
    groups = http_json(f"http://127.0.0.1:{prom_port}/api/v1/rules")["data"]["groups"]
    group = next(g for g in groups if g["name"] == "posfleet-terminals")
    # RFC 3339 with nanoseconds: keep microseconds for fromisoformat.
    m = re.fullmatch(r"([^.Z]+)(\.\d{1,6})?\d*Z", str(group["lastEvaluation"]))
    assert m is not None, group["lastEvaluation"]
    return datetime.fromisoformat(f"{m.group(1)}{m.group(2) or ''}+00:00").timestamp()


async def test_faults_to_alertmanager(
    tmp_path: Path, mosquitto: Process, alertmanager: Process, webhook_sink: WebhookSink
) -> None:
    specs, faults = build_fleet()
    by_tid = {s.tid: s for s in specs}
    am_port = alertmanager.port
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
    sim.set_fault("F09", "unregistered")  # left out of the registry from the start
    assert faults["F09"] == "unregistered"
    registry = tmp_path / "terminals.csv"
    sim.write_registry(registry)
    http_port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port, thresholds={"flapping_window_s": 15})
    collector = start_collector(tmp_path, config, http_port)
    prometheus = start_prometheus(
        tmp_path / "prom", write_prometheus_config(tmp_path / "prom", http_port, am_port, "fast")
    )
    try:
        # Maintenance windows, announced before anything breaks.
        maintenance(am_port, "start", "--acquirer", "acq-m", "--kind", "host", "--reason", "host upgrade",
                    "--duration", "1h")
        paper_out = next(t for t, f in faults.items() if f == "paper_out")
        maintenance(am_port, "start", "--merchant", by_tid[paper_out].mid, "--reason", "refit", "--duration", "1h")
        skewed = [t for t, f in faults.items() if f in ("clock_skew", "weak_signal")]
        maintenance(am_port, "start", *[x for t in skewed for x in ("--terminal", t)], "--reason", "repair",
                    "--duration", "1h")

        async with sim:
            await asyncio.to_thread(
                wait_until,
                lambda: all(t["last_heartbeat_received"] for t in
                            http_json(f"http://127.0.0.1:{http_port}/api/v1/terminals?all=1&limit=1000")["terminals"]),
                30, "every terminal heard",
            )
            await asyncio.to_thread(
                wait_until, lambda: "PosWatchdog:/" in snapshot(am_port), 30, "Prometheus -> Alertmanager"
            )

            t0 = time.time()
            for tid, fault in faults.items():
                if fault != "unregistered":
                    sim.set_fault(tid, fault)
            sim.set_fault("acq-m", "host_maintenance")

            expected: dict[str, tuple[str, dict[str, str]]] = {}
            for tid, fault in faults.items():
                if fault == "shutdown":
                    continue
                name, severity = ALERT_OF_FAULT[fault]
                s = by_tid[tid]
                labels = {"alertname": name, "severity": severity, "terminal_id": tid, "merchant_id": s.mid,
                          "acquirer": s.acquirer, "site": s.site, "model": s.model}
                if fault == "unregistered":
                    labels |= {"acquirer": "unknown", "site": "unknown"}
                st = "active"
                if tid in ("A0", "A1", "A2"):
                    st = "inhibited"
                elif tid == paper_out or tid in skewed:
                    st = "silenced"
                expected[key(labels)] = (st, labels)
            for labels, st in (
                ({"alertname": "PosFleetMassOffline", "severity": "critical", "scope": "site", "acquirer": "acq-a",
                  "site": "acq-a-site0"}, "active"),
                ({"alertname": "PosUpstreamFeedStale", "severity": "critical", "acquirer": "acq-m"}, "silenced"),
                ({"alertname": "PosWatchdog", "severity": "none"}, "active"),
            ):
                expected[key(labels)] = (st, labels)

            first_seen: dict[str, float] = {}

            def reached() -> bool:
                now = time.time()
                got = snapshot(am_port)
                for k in got:
                    first_seen.setdefault(k, now)
                return got == expected

            try:
                await asyncio.to_thread(wait_until, reached, 90, "every expected alert in Alertmanager", 0.1)
            except TimeoutError:
                got = snapshot(am_port)
                diff = {k: (got.get(k, ("-",))[0], v[0]) for k, v in expected.items() if got.get(k) != v}
                extra = {k: v for k, v in got.items() if k not in expected}
                raise AssertionError(f"(got, expected) differ for {diff}; unexpected: {extra}") from None

            # Stable: five more evaluations later, still exactly the expected alerts.
            settled = time.time()
            await asyncio.to_thread(
                wait_until, lambda: rule_evaluations(prometheus.port) > settled + 5, 20, "five more evaluations"
            )
            assert snapshot(am_port) == expected

            # Notifications: the inhibited and the silenced never went out; the rest did, to their receivers.
            await asyncio.to_thread(
                wait_until,
                lambda: {(r, a["alertname"], a.get("terminal_id", "")) for r, _, a in webhook_sink.alerts()}
                >= {("acq-b-page", "PosTerminalOffline", "F00"), ("acq-a-page", "PosFleetMassOffline", ""),
                    ("fleet-ops-page", "PosTerminalHardwareFault", "M0"),
                    ("fleet-ops-tickets", "PosTerminalUnregistered", "F09")},
                20, "notifications",
            )
            notified = {(a["alertname"], a.get("terminal_id", a.get("acquirer", ""))) for _, _, a in
                        webhook_sink.alerts()}
            for k, (st, labels) in expected.items():
                ident = (labels["alertname"], labels.get("terminal_id", labels.get("acquirer", "")))
                if st != "active":
                    assert ident not in notified, f"{k} is {st} but was notified"

            latencies = {
                k: round(first_seen[k] - t0, 1)
                for k, (st, labels) in expected.items()
                # the unregistered terminal was unregistered from the start: no injection time
                if ("terminal_id" in labels and labels["alertname"] != "PosTerminalUnregistered")
                or labels["alertname"] == "PosFleetMassOffline"
            }
            budget = rules.latency_budget(rules.load_alert_config(), "fast")
            for k, seconds in latencies.items():
                # collector detection (at most ~8 s with the test thresholds) + scrape + eval + for + slack
                assert seconds <= budget[k.split(":")[0]] + 12, (k, seconds)
            report = {"fault_to_alertmanager_s": latencies,
                      "median_s": statistics.median(latencies.values()), "max_s": max(latencies.values())}
            print("\nfast profile, fault -> active in Alertmanager:", json.dumps(report, indent=1))

            # Clear every fault: everything resolves but the watchdog, and nothing new appears.
            t1 = time.time()
            for tid, fault in faults.items():
                sim.clear_fault(tid, fault)
            sim.clear_fault("acq-m", "host_maintenance")
            sim.write_registry(registry)
            try:
                await asyncio.to_thread(
                    wait_until, lambda: set(snapshot(am_port)) == {"PosWatchdog:/"}, 90, "every alert resolved", 0.2
                )
            except TimeoutError:
                raise AssertionError(f"left after clearing: {snapshot(am_port)}") from None
            print(f"fast profile, all faults cleared -> resolved in Alertmanager: {time.time() - t1:.1f}s")
            await asyncio.to_thread(
                wait_until,
                lambda: ("acq-b-page", "resolved", "F00") in {(r, s, a.get("terminal_id", ""))
                                                              for r, s, a in webhook_sink.alerts()},
                20, "resolved notification",
            )
    finally:
        prometheus.stop()
        collector.stop()
    assert "Traceback" not in collector.log_text()
    _, body = http_get(f"http://127.0.0.1:{am_port}/api/v2/status")
    assert json.loads(body)["cluster"]["status"] in ("disabled", "ready")
