"""Restarts: a broker restart mid-stream loses no state; a collector restart (kill or SIGTERM) comes back from
its snapshot without a storm of false offline, and the messages published while it was away are applied."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from collector.sim.simulator import Simulator, make_fleet
from tests.harness.core import (
    Process,
    free_port,
    http_get,
    http_json,
    start_collector,
    start_mosquitto,
    wait_until,
    write_collector_config,
)

pytestmark = pytest.mark.integration
INTERVAL = 0.5


def views(port: int) -> dict[str, dict[str, Any]]:
    page = http_json(f"http://127.0.0.1:{port}/api/v1/terminals?all=1&limit=1000")
    return {t["terminal_id"]: t for t in page["terminals"]}


def metric_value(port: int, series: str) -> float:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")


async def test_broker_restart_mid_stream_loses_no_state(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "broker")
    specs = make_fleet(6)
    sim = Simulator(f"mqtt://127.0.0.1:{broker.port}", specs, INTERVAL, receipts=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    config = write_collector_config(tmp_path, broker.port, http_port, mqtt={"url": f"mqtt://127.0.0.1:{broker.port}",
                                    "client_id": "restart-test", "reconnect_min_s": 1, "reconnect_max_s": 2})
    collector = start_collector(tmp_path, config, http_port)
    try:
        async with sim:
            sim.set_fault(specs[0].tid, "paper_out")
            await asyncio.to_thread(wait_until, lambda: views(http_port)[specs[0].tid]["conditions"], 20,
                                    "paper_out named")
            before = views(http_port)
            broker.stop()
            await asyncio.to_thread(wait_until, lambda: metric_value(http_port, "posfleet_mqtt_connected") == 0, 10,
                                    "collector notices the broker is gone")
            # The broker comes back on the same port with its persisted sessions.
            broker = start_mosquitto(tmp_path / "broker", port=broker.port)
            await asyncio.to_thread(wait_until, lambda: metric_value(http_port, "posfleet_mqtt_connected") == 1, 30,
                                    "collector reconnected and resubscribed")
            after = views(http_port)
            for tid, view in before.items():
                assert after[tid]["txn_count"] >= view["txn_count"], "state moved backwards"
                assert after[tid]["seq"] is not None
            assert [c["condition"] for c in after[specs[0].tid]["conditions"]] == ["hardware_fault"]
            # Terminals reconnect (the simulator's paho clients retry) and heartbeats flow again.
            await asyncio.to_thread(
                wait_until,
                lambda: all(v["txn_count"] > before[t]["txn_count"] + 2 for t, v in views(http_port).items()),
                40, "heartbeats flowing again after the broker restart", 0.25,
            )
            assert all(not v["conditions"] for t, v in views(http_port).items() if t != specs[0].tid)
    finally:
        collector.stop()
        broker.stop()


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
async def test_collector_restart_restores_state_without_false_offline(
    tmp_path: Path, mosquitto: Process, how: signal.Signals
) -> None:
    specs = make_fleet(8)
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port, mqtt={
        "url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": f"restart-{how.name}"})
    collector = start_collector(tmp_path, config, http_port)
    down, faulty = specs[0].tid, specs[1].tid
    async with sim:
        sim.set_fault(down, "power_loss")
        sim.set_fault(faulty, "printer_fault")
        await asyncio.to_thread(
            wait_until,
            lambda: {t for t, v in views(http_port).items() if v["conditions"]} == {down, faulty},
            20, "faults named before the restart",
        )
        # Wait for a periodic snapshot taken after they were named (snapshot_interval_s is 2 in tests).
        named_at = time.time()
        await asyncio.to_thread(
            wait_until,
            lambda: time.time() - metric_value(http_port, "posfleet_snapshot_age_seconds") > named_at + 0.1,
            10, "a snapshot holding the conditions",
        )
        collector.stop(how)
        await asyncio.sleep(3 * INTERVAL * 3)  # away for longer than the offline threshold: heartbeats queue up
        collector = start_collector(tmp_path, config, http_port)
        try:
            first = views(http_port)
            assert {c["condition"] for c in first[down]["conditions"]} == {"offline"}, "offline survives restart"
            assert {c["condition"] for c in first[faulty]["conditions"]} == {"hardware_fault"}
            healthy = [s.tid for s in specs[2:]]
            assert all(not first[t]["conditions"] for t in healthy), "false offline right after restart"
            # Heartbeats published while the collector was away are delivered by the persistent session.
            await asyncio.to_thread(wait_until, lambda: all(
                views(http_port)[t]["seq"] >= max(s for s, _ in sim.sent_seqs[t]) - 1 for t in healthy),
                20, "backlog applied")
            for _ in range(6):  # stays quiet over several evaluation rounds
                assert all(not v["conditions"] for t, v in views(http_port).items() if t in healthy)
                await asyncio.sleep(INTERVAL)
        finally:
            collector.stop()
    assert "Traceback" not in collector.log_text()


@pytest.mark.parametrize("damage", ["truncated", "empty", "bit_flip"])
async def test_a_corrupt_snapshot_no_longer_stops_the_collector_from_starting(
    tmp_path: Path, mosquitto: Process, damage: str
) -> None:
    """It used to exit 2 on every start (under Restart=on-failure: no monitoring until a person moved the file).
    Now the file is set aside, the previous generation is used, and /metrics and the log say so."""
    specs = make_fleet(4)
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port, mqtt={
        "url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": f"corrupt-{damage}"})
    snapshot = tmp_path / "state.snapshot"
    collector = start_collector(tmp_path, config, http_port)
    async with sim:
        sim.set_fault(specs[0].tid, "printer_fault")
        await asyncio.to_thread(wait_until, lambda: views(http_port)[specs[0].tid]["conditions"], 20, "fault named")
        # Two periodic snapshots after the fault was named: the previous generation holds it too.
        await asyncio.to_thread(wait_until, snapshot.exists, 10, "a first snapshot")
        first = snapshot.stat().st_mtime_ns
        await asyncio.to_thread(wait_until, lambda: snapshot.stat().st_mtime_ns != first, 10, "one more snapshot")
    assert collector.stop() == 0
    data = snapshot.read_bytes()
    snapshot.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                          "bit_flip": data[:-40] + bytes([data[-40] ^ 1]) + data[-39:]}[damage])
    collector = start_collector(tmp_path, config, http_port)  # ready: it started
    try:
        assert metric_value(http_port, 'posfleet_snapshot_restore{source="previous"}') == 1
        assert metric_value(http_port, 'posfleet_snapshot_restore{source="current"}') == 0
        assert metric_value(http_port, "posfleet_snapshot_corrupt_files") == 1
        first = views(http_port)
        assert [c["condition"] for c in first[specs[0].tid]["conditions"]] == ["hardware_fault"], "state restored"
        assert all(not first[s.tid]["conditions"] for s in specs[1:]), "no false offline after the restore"
        [aside] = list(tmp_path.glob("state.snapshot.corrupt-*"))
        log = collector.log_text()
        assert f"state snapshot {snapshot} is corrupt" in log and str(aside) in log
        assert "restoring state from the previous snapshot generation" in log
    finally:
        collector.stop()
