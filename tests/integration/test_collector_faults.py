"""Every fault the simulator can inject, each on its own terminals, through a real Mosquitto and a real
collector process: the API and /metrics show exactly those conditions on exactly those terminals, nothing on
the healthy ones, and clearing a fault clears its condition."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from collector.sim.simulator import FAULTS, Simulator, TerminalSpec, make_fleet
from tests.harness.core import (
    Process,
    free_port,
    http_get,
    http_json,
    start_collector,
    terminal_views,
    wait_until,
    write_collector_config,
)

pytestmark = pytest.mark.integration

INTERVAL = 0.5


def conditions_by_terminal(port: int) -> dict[str, set[str]]:
    """Every terminal's active conditions, from the API."""
    return {tid: {c["condition"] for c in t["conditions"]} for tid, t in terminal_views(port).items()}


def problem_series(port: int) -> dict[str, set[str]]:
    """terminal_id -> conditions, from posfleet_terminal_problem in /metrics."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out: dict[str, set[str]] = {}
    for line in body.decode().splitlines():
        if line.startswith("posfleet_terminal_problem{"):
            labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(",")
                          if "=" in part)
            out.setdefault(labels["terminal_id"].strip('"'), set()).add(labels["condition"].strip('"'))
    return out


@pytest.fixture
def fleet_specs() -> tuple[list[TerminalSpec], dict[str, str], list[str]]:
    """Two faulty terminals per fault, plus healthy ones, plus an acquirer that goes into maintenance."""
    faults = list(FAULTS)
    specs = make_fleet(2 * len(faults) + 8, ("acq-a", "acq-b"))
    specs += make_fleet(3, ("acq-m",), prefix="MT")
    assignment = {}
    for i, fault in enumerate(faults):
        assignment[specs[2 * i].tid] = fault
        assignment[specs[2 * i + 1].tid] = fault
    healthy = [s.tid for s in specs[2 * len(faults) :]]
    return specs, assignment, healthy


async def test_every_fault_named_on_its_terminals_only(
    tmp_path: Path, mosquitto: Process, fleet_specs: tuple[list[TerminalSpec], dict[str, str], list[str]]
) -> None:
    specs, assignment, healthy = fleet_specs
    http_port = free_port()
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
    for tid, fault in assignment.items():
        if fault == "unregistered":
            sim.set_fault(tid, fault)
    sim.write_registry(tmp_path / "terminals.csv")
    config = write_collector_config(tmp_path, mosquitto.port, http_port, thresholds={"flapping_window_s": 15})
    collector = start_collector(tmp_path, config, http_port)
    try:
        async with sim:
            # Let every terminal be seen healthy first, then break them.
            await asyncio.to_thread(
                wait_until,
                lambda: all(t["last_heartbeat_received"] for t in terminal_views(http_port).values()),
                20,
                "every terminal heard",
            )
            assert all(not c for c in conditions_by_terminal(http_port).values()), "a healthy fleet shows problems"
            for tid, fault in assignment.items():
                sim.set_fault(tid, fault)
            sim.set_fault("acq-m", "host_maintenance")
            expected = {tid: ({FAULTS[f]} if FAULTS[f] else set()) for tid, f in assignment.items()}
            expected.update({tid: set() for tid in healthy})

            def matches() -> bool:
                return conditions_by_terminal(http_port) == expected

            try:
                await asyncio.to_thread(wait_until, matches, 40, "every fault named", 0.25)
            except TimeoutError:
                got = conditions_by_terminal(http_port)
                diff = {t: (got.get(t), e) for t, e in expected.items() if got.get(t) != e}
                raise AssertionError(f"got != expected for {diff}") from None
            series = problem_series(http_port)
            assert series == {t: c for t, c in expected.items() if c}
            _, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
            text = body.decode()
            assert 'posfleet_acquirer_feed_stale{acquirer="acq-m"} 1.0' in text
            assert 'posfleet_acquirer_feed_stale{acquirer="acq-a"} 0.0' in text
            shutdown_tid = next(t for t, f in assignment.items() if f == "shutdown")
            view = http_json(f"http://127.0.0.1:{http_port}/api/v1/terminals/{shutdown_tid}")
            assert view["status"] == "shutdown" and view["conditions"] == []
            lost = next(t for t, f in assignment.items() if f == "network_loss")
            view = http_json(f"http://127.0.0.1:{http_port}/api/v1/terminals/{lost}")
            assert view["conditions"][0]["detail"] == "last_will"
            assert "last will" in view["conditions"][0]["probable_cause"]
            silent = next(t for t, f in assignment.items() if f == "power_loss")
            view = http_json(f"http://127.0.0.1:{http_port}/api/v1/terminals/{silent}")
            assert view["conditions"][0]["detail"] == "silent"

            # Clear every fault: every condition clears, and nothing new appears anywhere.
            for tid, fault in assignment.items():
                sim.clear_fault(tid, fault)
            sim.clear_fault("acq-m", "host_maintenance")
            sim.write_registry(tmp_path / "terminals.csv")
            try:
                await asyncio.to_thread(
                    wait_until, lambda: all(not c for c in conditions_by_terminal(http_port).values()),
                    40, "every condition cleared", 0.25,
                )
            except TimeoutError:
                left = {t: c for t, c in conditions_by_terminal(http_port).items() if c}
                raise AssertionError(f"conditions left after clearing: {left}") from None
            assert problem_series(http_port) == {}
    finally:
        collector.stop()
    assert "Traceback" not in collector.log_text()
