"""Every panel of every dashboard, proven against real data.

A simulated fleet with every kind of fault publishes to a real Mosquitto; a real collector process ingests it,
exposes /metrics (scraped every second by a real Prometheus) and writes its history through the InfluxDB 2
write API into a real InfluxDB 1.x. The test then reads the committed dashboards/*.json, finds every panel
(nothing is listed by hand), substitutes the variables as Grafana would and runs each query:

* PromQL against Prometheus: non-empty, and every series carries the labels the panel shows (legend
  `{{label}}`s on every series, table columns on at least one: Prometheus drops empty-valued labels).
* InfluxQL against InfluxDB: at least one series, each value column with at least one non-null value, and the
  tags the query groups by.

On top of "not empty", the panels that answer a fault question must show the injected faults, and the tables
of problem terminals must never list a healthy terminal.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collector.sim.simulator import Simulator, TerminalSpec, make_fleet
from exporters.grafana.dashboards import DASHBOARDS_DIR, iter_panels
from tests.harness.core import Process, free_port, start_collector, wait_until, write_collector_config
from tests.harness.dash import Influx, Prometheus, V2WriteBridge, start_influxd, start_prometheus

pytestmark = pytest.mark.integration

INTERVAL = 0.5
JOB = "posfleet"
# Faults on their own terminals; the drill-down terminal queues uploads (backlog) so its history moves.
FAULTS = {
    "T00000": "stuck_uploads",
    "T00001": "host_drops",
    "T00002": "paper_out",
    "T00003": "card_reader_fault",
    "T00004": "power_loss",
    "T00005": "network_loss",
    "T00006": "outdated_app",
    "T00007": "weak_signal",
    "T00008": "unregistered",
    "T00009": "wrong_merchant",
    "T00010": "clock_skew",
    "T00011": "reboot_loop",
    "T00012": "shutdown",
}
DRILLDOWN_TERMINAL = "T00000"
MAINTENANCE_ACQUIRER = "acq-m"
# A site whose three terminals all lose power: a mass outage (of the site, and of its acquirer acq-o).
MASS_OUTAGE = {f"MO{i:05d}": "power_loss" for i in range(3)}


def fleet() -> tuple[list[TerminalSpec], list[str]]:
    specs = (
        make_fleet(24, ("acq-a", "acq-b"))
        + make_fleet(3, (MAINTENANCE_ACQUIRER,), prefix="MT")
        + make_fleet(3, ("acq-o",), sites_per_acquirer=1, prefix="MO")
    )
    healthy = [s.tid for s in specs if s.tid not in FAULTS and s.tid not in MASS_OUTAGE]
    return specs, healthy


# ------------------------------------------------------------------------------------------ query running


def load_dashboards() -> dict[str, dict[str, Any]]:
    boards = {}
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        boards[board["uid"]] = board
    assert len(boards) == 4, f"expected four dashboards in {DASHBOARDS_DIR}"
    return boards


def substitute(query: str, values: dict[str, str]) -> str:
    """Replace `$name` and `${name}` as Grafana does (longest names first, so $__range is not $__r...)."""
    for name in sorted(values, key=len, reverse=True):
        query = query.replace(f"${{{name}}}", values[name]).replace(f"${name}", values[name])
    leftover = re.findall(r"\$\{?\w+", query)
    assert not leftover, f"unsubstituted variables {leftover} in {query}"
    return query


def prom_values() -> dict[str, str]:
    # "All" of a multi-value variable is its allValue, `.*`; the intervals are what Grafana computes for a
    # short range with a 1 s scrape interval (rate windows of at least four scrapes).
    return {
        "acquirer": ".*",
        "site": ".*",
        "job": JOB,
        "terminal_id": DRILLDOWN_TERMINAL,
        "__rate_interval": "20s",
        "__interval": "1s",
        "__range": "60s",
    }


def influx_values() -> dict[str, str]:
    return {
        "acquirer": ".*",
        "terminal_id": DRILLDOWN_TERMINAL,
        "timeFilter": "time > now() - 10m",
        "__interval": "2s",
    }


def legend_labels(target: dict[str, Any]) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))


def table_columns(panel: dict[str, Any]) -> set[str]:
    for t in panel.get("transformations", []):
        if t["id"] == "filterFieldsByName":
            return set(t["options"]["include"]["names"]) - {"Value", "Time"}
    return set()


def run_prom(prom: Prometheus, panel: dict[str, Any], target: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """(result series, problem or "") for one Prometheus target."""
    expr = substitute(target["expr"], prom_values())
    if target.get("instant"):
        result: list[dict[str, Any]] = prom.api("query", query=expr)["result"]
    else:
        now = time.time()
        result = prom.api("query_range", query=expr, start=str(now - 60), end=str(now), step="1")["result"]
    if not result:
        return result, "no series"
    for label in legend_labels(target):
        missing = [s["metric"] for s in result if label not in s["metric"]]
        if missing:
            return result, f"label {label!r} (legend) missing on {missing[:2]}"
    for label in table_columns(panel):
        if not any(label in s["metric"] for s in result):
            return result, f"column {label!r} on no series"
    return result, ""


def run_influx(influx: Influx, target: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """(series, problem or "") for one InfluxQL target."""
    query = substitute(target["query"], influx_values())
    series = influx.query(query)
    if not series:
        return series, "no series"
    for s in series:
        columns = s["columns"]
        for i, column in enumerate(columns):
            if column != "time" and all(row[i] is None for row in s["values"]):
                return series, f"column {column!r} is all null in {s.get('tags')}"
    # Tags of the outermost GROUP BY (after a subquery's closing parenthesis), time() and fill() aside.
    outer = query.rsplit("GROUP BY", 1)[1] if "GROUP BY" in query else ""
    tags = set(re.findall(r'"(\w+)"', re.sub(r"fill\(\w+\)", "", outer)))
    for s in series:
        if not tags <= set(s.get("tags", {})):
            return series, f"grouped by {tags} but series tags are {s.get('tags')}"
    return series, ""


# --------------------------------------------------------------------------------------- fault assertions

ProblemCheck = Callable[[list[dict[str, Any]]], str]


def last_value(series: dict[str, Any]) -> float:
    value = series["value"] if "value" in series else series["values"][-1]
    return float(value[1])


def sum_positive(min_total: float = 1) -> ProblemCheck:
    def check(result: list[dict[str, Any]]) -> str:
        total = sum(last_value(s) for s in result)
        return "" if total >= min_total else f"shows {total}, the injected faults make it at least {min_total}"

    return check


def by_label(label: str, expected: set[str], *, positive: bool = True) -> ProblemCheck:
    """Every `expected` value of `label` appears (with a value > 0 when `positive`)."""

    def check(result: list[dict[str, Any]]) -> str:
        seen = {s["metric"].get(label) for s in result if not positive or last_value(s) > 0}
        missing = expected - seen
        return f"{label} {sorted(missing)} not shown" if missing else ""

    return check


def terminals(expected: set[str], healthy: list[str]) -> ProblemCheck:
    """A problem table lists exactly the faulty terminals expected, and never a healthy one."""

    def check(result: list[dict[str, Any]]) -> str:
        shown = {s["metric"]["terminal_id"] for s in result}
        wrongly = shown & set(healthy)
        if wrongly:
            return f"healthy terminals listed: {sorted(wrongly)}"
        return "" if shown == expected else f"shows {sorted(shown)}, expected {sorted(expected)}"

    return check


def fault_checks(healthy: list[str]) -> dict[tuple[str, str], ProblemCheck]:
    """(dashboard uid, panel title) -> what the injected faults must make that panel show."""
    conditions = {
        "offline",
        "upload_backlog",
        "upstream_missing",
        "hardware_fault",
        "outdated_software",
        "weak_signal",
        "unregistered",
        "merchant_mismatch",
        "clock_skew",
        "flapping",
    }
    fleet_uid, up_uid, term_uid, col_uid = (
        "posfleet-fleet-overview",
        "posfleet-upstream",
        "posfleet-terminal",
        "posfleet-collector",
    )
    critical = {
        t
        for t, f in FAULTS.items()
        if f in ("stuck_uploads", "host_drops", "card_reader_fault", "power_loss", "network_loss", "wrong_merchant")
    } | set(MASS_OUTAGE)
    return {
        (fleet_uid, "Offline"): sum_positive(2),
        (fleet_uid, "Upload backlog"): sum_positive(1),
        (fleet_uid, "Upstream missing"): sum_positive(1),
        (fleet_uid, "Stale acquirer feeds"): sum_positive(1),
        (fleet_uid, "Terminals by condition"): by_label("condition", conditions),
        (fleet_uid, "Conditions per acquirer"): by_label("acquirer", {"acq-a", "acq-b", "unknown"}),
        (fleet_uid, "Software versions"): by_label("app_version", {"3.4.1", "2.0.7"}),
        (fleet_uid, "Hardware faults"): terminals({"T00002", "T00003"}, healthy),
        (fleet_uid, "Critical problems"): terminals(critical, healthy),
        (fleet_uid, "Mass outages"): by_label("site", {"acq-o-site0"}),
        (up_uid, "Feed stale"): by_label("acquirer", {MAINTENANCE_ACQUIRER}),
        (up_uid, "Terminals missing upstream"): terminals({"T00001"}, healthy),
        (up_uid, "Terminals with missing transactions"): sum_positive(1),
        (up_uid, "Transactions recorded"): by_label("acquirer", {"acq-a", "acq-b"}),
        (term_uid, "Active conditions"): by_label("condition", {"upload_backlog"}),
        (col_uid, "MQTT connected"): sum_positive(1),
        (col_uid, "History writer up"): sum_positive(1),
        (col_uid, "Messages by kind and result"): by_label("kind", {"heartbeat", "status", "upstream", "txn"}),
    }


# ------------------------------------------------------------------------------------------------- test


def drilldown_history_exists(influx: Influx) -> bool:
    """The drill-down terminal's transactions have been recorded upstream (and written to history)."""
    where = f"\"terminal_id\" = '{DRILLDOWN_TERMINAL}'"
    return bool(influx.query(f'SELECT count("txn_id") FROM "upstream_txn" WHERE {where}'))


async def test_every_dashboard_query_returns_the_fleet_it_describes(tmp_path: Path, mosquitto: Process) -> None:
    boards = load_dashboards()
    specs, healthy = fleet()
    checks = fault_checks(healthy)
    titles = {(uid, p["title"]) for uid, b in boards.items() for p in iter_panels(b)}
    assert set(checks) <= titles, f"fault checks name panels that no longer exist: {set(checks) - titles}"

    with start_influxd(tmp_path / "influxd") as influx, V2WriteBridge(influx) as bridge:
        sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL)
        sim.set_fault("T00008", "unregistered")
        sim.write_registry(tmp_path / "terminals.csv")
        http_port = free_port()
        config = write_collector_config(
            tmp_path,
            mosquitto.port,
            http_port,
            thresholds={"flapping_window_s": 15},
            influx={
                "enabled": True,
                "url": bridge.url,
                "org": "posfleet",
                "bucket": "posfleet",
                "flush_interval_s": 0.2,
            },
        )
        collector = start_collector(tmp_path, config, http_port)
        try:
            with start_prometheus(tmp_path / "prometheus", {JOB: f"127.0.0.1:{http_port}"}) as prom:
                async with sim:
                    # A healthy start first: the drill-down terminal uploads (and its acquirer records) some
                    # transactions before its uploads get stuck, as in a real incident.
                    await asyncio.to_thread(
                        wait_until, lambda: drilldown_history_exists(influx), 30, "history of a healthy fleet"
                    )
                    for tid, fault in (FAULTS | MASS_OUTAGE).items():
                        sim.set_fault(tid, fault)
                    sim.set_fault(MAINTENANCE_ACQUIRER, "host_maintenance")
                    problems = await asyncio.to_thread(poll_until_proven, boards, prom, influx, checks)
                    variable_problems = check_variables(boards, prom, influx)
        finally:
            collector.stop()
        assert not bridge.errors, f"InfluxDB refused the collector's writes: {bridge.errors[:3]}"
    assert not problems, (
        "panels not proven:\n" + "\n".join(problems) + f"\n\ncollector log:\n{collector.log_text()[-2000:]}"
    )
    assert not variable_problems, "\n".join(variable_problems)


def all_problems(
    boards: dict[str, dict[str, Any]], prom: Prometheus, influx: Influx, checks: dict[tuple[str, str], ProblemCheck]
) -> list[str]:
    problems = []
    for uid, board in boards.items():
        for panel in iter_panels(board):
            where = f"{uid} / {panel['title']}"
            results: list[dict[str, Any]] = []
            for target in panel["targets"]:
                kind = target["datasource"]["type"]
                if kind == "prometheus":
                    result, problem = run_prom(prom, panel, target)
                elif kind == "influxdb":
                    result, problem = run_influx(influx, target)
                else:
                    problem, result = f"unknown datasource type {kind}", []
                if problem:
                    problems.append(f"{where} [{target['refId']}]: {problem}")
                results += result
            check = checks.get((uid, panel["title"]))
            if check and not any(p.startswith(where) for p in problems):
                problem = check(results)
                if problem:
                    problems.append(f"{where}: {problem}")
    return problems


def poll_until_proven(
    boards: dict[str, dict[str, Any]],
    prom: Prometheus,
    influx: Influx,
    checks: dict[tuple[str, str], ProblemCheck],
    timeout: float = 90.0,
) -> list[str]:
    """Re-run every query until all are proven or the deadline passes; the problems left at the end."""
    deadline = time.monotonic() + timeout
    while True:
        problems = all_problems(boards, prom, influx, checks)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(1.0)


def check_variables(boards: dict[str, dict[str, Any]], prom: Prometheus, influx: Influx) -> list[str]:
    """Every query variable lists the values a user must be able to pick."""
    expected = {
        "acquirer": {"acq-a", "acq-b", MAINTENANCE_ACQUIRER, "unknown"},
        "site": {"acq-a-site0", "acq-b-site0"},
        "job": {JOB},
        "terminal_id": {DRILLDOWN_TERMINAL, "T00001", "MT00000"},
    }
    problems = []
    for uid, board in boards.items():
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            if var["datasource"]["type"] == "prometheus":
                match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
                assert match, var["query"]
                selector = substitute(match.group(1), prom_values())
                values = set(prom.api(f"label/{match.group(2)}/values", **{"match[]": selector}))
            else:
                series = influx.query(substitute(var["query"], influx_values()))
                values = {row[1] for s in series for row in s["values"]}
            missing = expected[var["name"]] - values
            if missing:
                problems.append(f"{uid} variable {var['name']}: {sorted(missing)} not offered (got {sorted(values)})")
    return problems
