"""Reliability matrix, disk full (docs/reliability.md row 5): the history spool and the state snapshot on a small
tmpfs filled to the last byte. The collector keeps ingesting, counts the failures, loses nothing it holds in
memory, and recovers by itself when space returns. Mounting needs root; elsewhere the tests skip, saying so.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

import tests.integration.test_influx_history as history
from collector.sim.simulator import Simulator, make_fleet
from tests.faults import ConditionWatch, fill_disk, metric_sample, tmpfs
from tests.harness.core import Process, free_port, start_collector, terminal_views, wait_until, write_collector_config
from tests.harness.tsdb import VictoriaMetrics

pytestmark = pytest.mark.integration

INTERVAL = 0.5
N = 40  # 80 heartbeats/s


def accepted(port: int) -> float:
    return metric_sample(port, "posfleet_messages_total", kind="heartbeat", result="accepted")


async def until(what: str, check: object, timeout: float) -> None:
    await asyncio.to_thread(wait_until, check, timeout, what, 0.25)  # type: ignore[arg-type]


async def test_spool_disk_full_keeps_history_in_memory_and_recovers(tmp_path: Path, mosquitto: Process) -> None:
    """The database is down and the spool's disk fills: ingest goes on, history waits in memory (bounded), the
    spool is retried once there is room, and every heartbeat reaches the database exactly once."""
    with tmpfs(tmp_path / "small", "1m") as small:
        vm = VictoriaMetrics(tmp_path / "vm-data")  # not started yet: connection refused
        specs = make_fleet(N)
        sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
        sim.write_registry(tmp_path / "terminals.csv")
        port = free_port()
        overrides = history.influx_overrides(tmp_path, vm.url)
        overrides["state"]["spool_dir"] = str(small / "spool")
        config = write_collector_config(tmp_path, mosquitto.port, port, mqtt={
            "url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": "spool-full"}, **overrides)
        collector = start_collector(tmp_path, config, port)
        try:
            async with sim:
                with ConditionWatch(port, [s.tid for s in specs]) as watch:
                    await until("history spooled", lambda: metric_sample(port, "posfleet_influx_spool_points") > 0,
                                30)
                    filler = await asyncio.to_thread(fill_disk, small)
                    await until("the full spool noticed", lambda: metric_sample(
                        port, "posfleet_influx_spool_writable") == 0, 30)
                    full_at = time.monotonic()
                    await asyncio.sleep(3)  # heartbeats keep coming while the disk is full
                    sent_while_full = sim.heartbeats_sent
                    await until("ingest keeping up with a full disk", lambda: accepted(port) >= sent_while_full, 20)
                    buffered = metric_sample(port, "posfleet_influx_buffer_points")
                    filler.unlink()
                    await until("the spool usable again", lambda: metric_sample(
                        port, "posfleet_influx_spool_writable") == 1, 45)
                    recovered_after = time.monotonic() - full_at
                    vm.start()
                    await until("the spool drained", lambda: metric_sample(port, "posfleet_influx_spool_points") == 0
                                and metric_sample(port, "posfleet_influx_up") == 1, 60)
            await until("every heartbeat applied", lambda: accepted(port) >= sim.heartbeats_sent, 30)
            await history.assert_stored_exactly_once(sim, vm)
            assert metric_sample(port, "posfleet_influx_points_total", result="dropped") == 0
            assert not watch.seen, watch.seen
            print(f"\nspool disk full: {sim.heartbeats_sent} heartbeats at {N / INTERVAL:.0f}/s all applied; "
                  f"{buffered:.0f} points held in memory while full; spool usable again {recovered_after:.0f} s after "
                  f"it filled (retried every 30 s); all stored exactly once, 0 dropped")
            assert collector.stop() == 0
            log = collector.log_text()
            assert "cannot" in log and "Traceback" not in log
        finally:
            collector.stop()
            vm.stop()


async def test_snapshot_disk_full_keeps_state_and_recovers(tmp_path: Path, mosquitto: Process) -> None:
    """The snapshot's disk fills: failures are counted, ingest and detection go on, the state in memory is intact,
    and once there is room a snapshot is written that a restart (kill -9) comes back from."""
    with tmpfs(tmp_path / "small", "1m") as small:
        specs = make_fleet(N)
        sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
        sim.write_registry(tmp_path / "terminals.csv")
        port = free_port()
        config = write_collector_config(tmp_path, mosquitto.port, port, mqtt={
            "url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": "snapshot-full"}, state={
            "snapshot_path": str(small / "state.snapshot"), "snapshot_interval_s": 0.5})
        collector = start_collector(tmp_path, config, port)
        try:
            async with sim:
                with ConditionWatch(port, [s.tid for s in specs[1:]]) as watch:
                    await until("a snapshot", lambda: metric_sample(port, "posfleet_snapshot_age_seconds") < 2, 30)
                    filler = await asyncio.to_thread(fill_disk, small)
                    failures = metric_sample(port, "posfleet_snapshot_failures_total")
                    await until("snapshot failures counted", lambda: metric_sample(
                        port, "posfleet_snapshot_failures_total") >= failures + 3, 30)
                    sent = sim.heartbeats_sent
                    await until("ingest going on", lambda: accepted(port) >= sent, 20)
                    # the state in memory is current: every terminal's last seq is the one it sent
                    await until("state current while the disk is full", lambda: all(
                        v["seq"] >= sim.sent_seqs[t][-1][0] - 2 for t, v in terminal_views(port).items()), 20)
                    # a fault is still detected
                    sim.set_fault(specs[0].tid, "paper_out")
                    await until("a fault detected", lambda: terminal_views(port)[specs[0].tid]["conditions"], 20)
                    failed = metric_sample(port, "posfleet_snapshot_failures_total") - failures
                    seqs_before = {t: v["seq"] for t, v in terminal_views(port).items()}  # all in the next snapshot
                    filler.unlink()
                    freed_at = time.time()
                    await until("a snapshot once there is room", lambda: time.time() - metric_sample(
                        port, "posfleet_snapshot_age_seconds") > freed_at, 20)
                    os.kill(collector.proc.pid, signal.SIGKILL)
                    collector.proc.wait(10)
                    collector = start_collector(tmp_path, config, port)
                    first = terminal_views(port)
            assert all(first[t]["seq"] >= seqs_before[t] for t in seqs_before), "state older than the disk"
            assert [c["condition"] for c in first[specs[0].tid]["conditions"]] == ["hardware_fault"]
            assert not watch.seen, watch.seen
            print(f"\nsnapshot disk full: {failed:.0f} snapshot writes failed and were counted, ingest and detection "
                  f"went on; after space returned a snapshot was written and a kill -9 restart came back from it")
            assert collector.stop() == 0
            assert "Traceback" not in collector.log_text()
        finally:
            collector.stop()
