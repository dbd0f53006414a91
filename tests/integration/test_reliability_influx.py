"""Reliability matrix, history (docs/reliability.md row 4): an InfluxDB that answers slowly, or never.

Monitoring must not wait for history: every heartbeat is applied at the broker's pace while writes crawl or
hang, and what the database did not take is spooled and replayed once a real server (VictoriaMetrics) is back.
What test_influx_history.py already covers (a database that is down, kill -9 with a full spool, an unwritable
spool) is not repeated here.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import tests.integration.test_influx_history as history
from collector.sim.simulator import Simulator, make_fleet
from tests.faults import ConditionWatch, LineSink, lost_and_extra, metric_sample
from tests.harness.core import Process, free_port, start_collector, wait_until, write_collector_config
from tests.harness.tsdb import VictoriaMetrics

pytestmark = pytest.mark.integration

INTERVAL = 0.5
N = 60  # 120 heartbeats/s


def accepted(port: int) -> float:
    return metric_sample(port, "posfleet_messages_total", kind="heartbeat", result="accepted")


async def run_load(sim: Simulator, port: int, seconds: float) -> tuple[float, float]:
    """Let the fleet publish for `seconds`; returns (peak ingest queue depth, peak broker-to-applied lag in s)."""
    peak_depth = peak_lag = 0.0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(0.5)
        depth = await asyncio.to_thread(metric_sample, port, "posfleet_ingest_queue_depth")
        last = await asyncio.to_thread(metric_sample, port, "posfleet_mqtt_last_message_seconds")
        peak_depth, peak_lag = max(peak_depth, depth), max(peak_lag, time.time() - last)
    return peak_depth, peak_lag


async def all_applied(sim: Simulator, port: int) -> None:
    """Every heartbeat the fleet sent was applied (heartbeats carry new seqs: accepted counts each once)."""
    await asyncio.to_thread(wait_until, lambda: accepted(port) >= sim.heartbeats_sent, 30,
                            "every heartbeat applied", 0.25)
    assert accepted(port) == sim.heartbeats_sent


async def test_slow_influx_does_not_slow_ingest(tmp_path: Path, mosquitto: Process) -> None:
    """Every write takes 1.5 s (well under request_timeout_s): ingest keeps its pace, history arrives complete."""
    sink = LineSink(delay_s=1.5)
    specs = make_fleet(N)
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
    sim.write_registry(tmp_path / "terminals.csv")
    port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, port, mqtt={
        "url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": "slow-influx"},
        **history.influx_overrides(tmp_path, sink.url, request_timeout_s=5.0))
    collector = start_collector(tmp_path, config, port)
    try:
        async with sim:
            with ConditionWatch(port, [s.tid for s in specs]) as watch:
                await asyncio.to_thread(wait_until, lambda: len(sink.heartbeat_seqs()) == N, 30, "history flowing")
                depth, lag = await run_load(sim, port, 6)
        await all_applied(sim, port)
        await asyncio.to_thread(wait_until, lambda: not lost_and_extra(sim.sent_seqs, sink.heartbeat_seqs())[0],
                                30, "every heartbeat written", 0.25)
        lost, extra = lost_and_extra(sim.sent_seqs, sink.heartbeat_seqs())
        assert not lost and not extra, (lost, extra)
        assert metric_sample(port, "posfleet_influx_up") == 1
        assert metric_sample(port, "posfleet_influx_points_total", result="spooled") == 0
        assert not watch.seen, watch.seen
        print(f"\nslow InfluxDB (1.5 s per write): {sim.heartbeats_sent} heartbeats at {N / INTERVAL:.0f}/s all "
              f"applied and written; peak ingest queue {depth:.0f}, peak lag of the last message {lag:.2f} s, "
              f"{sink.answered} writes")
        assert collector.stop() == 0
        assert "Traceback" not in collector.log_text()
    finally:
        collector.stop()
        sink.close()


async def test_hung_influx_spools_then_replays_to_a_real_server(tmp_path: Path, mosquitto: Process) -> None:
    """The server accepts connections and reads requests but never answers: writes time out, history is spooled,
    ingest keeps its pace; VictoriaMetrics then takes the port and receives every heartbeat exactly once."""
    sink = LineSink(hang=True)
    specs = make_fleet(N)
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, INTERVAL, receipts=False)
    sim.write_registry(tmp_path / "terminals.csv")
    port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, port, mqtt={
        "url": f"mqtt://127.0.0.1:{mosquitto.port}", "client_id": "hung-influx"},
        **history.influx_overrides(tmp_path, sink.url, request_timeout_s=1.0))
    collector = start_collector(tmp_path, config, port)
    vm = VictoriaMetrics(tmp_path / "vm-data", port=sink.port)
    try:
        async with sim:
            with ConditionWatch(port, [s.tid for s in specs]) as watch:
                await asyncio.to_thread(wait_until, lambda: metric_sample(port, "posfleet_influx_up") == 0, 30,
                                        "the hung server noticed")
                depth, lag = await run_load(sim, port, 6)
                await asyncio.to_thread(wait_until, lambda: metric_sample(
                    port, "posfleet_influx_spool_points") > 0, 30, "history spooled")
        await all_applied(sim, port)
        spooled = metric_sample(port, "posfleet_influx_points_total", result="spooled")
        timeouts = metric_sample(port, "posfleet_influx_responses_total", code="timeout")
        assert sink.requests > 0 and sink.answered == 0 and timeouts > 0
        assert not watch.seen, watch.seen
        sink.close()
        vm.start()
        await asyncio.to_thread(wait_until, lambda: metric_sample(port, "posfleet_influx_spool_points") == 0
                                and metric_sample(port, "posfleet_influx_up") == 1, 60, "the spool replayed", 0.25)
        await history.assert_stored_exactly_once(sim, vm)
        assert metric_sample(port, "posfleet_influx_points_total", result="dropped") == 0
        print(f"\nhung InfluxDB (never answers, timeout 1 s): {sim.heartbeats_sent} heartbeats at "
              f"{N / INTERVAL:.0f}/s all applied; peak ingest queue {depth:.0f}, peak lag {lag:.2f} s; {timeouts:.0f} "
              f"timed-out writes, {spooled:.0f} points spooled, all replayed to VictoriaMetrics exactly once")
        assert collector.stop() == 0
        assert "Traceback" not in collector.log_text()
    finally:
        collector.stop()
        sink.close()
        vm.stop()
