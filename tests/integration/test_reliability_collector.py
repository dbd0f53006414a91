"""Reliability matrix, the collector killed under load (docs/reliability.md row 2), counted by seq.

test_restarts.py shows the state comes back without false offline and the backlog is applied;
test_influx_history.py shows history loses at most the unflushed interval while the database is down. This
test counts heartbeats: every one published while the collector was dead reaches the new process through the
persistent session (0 lost), and the only ones missing from history are those the old process had applied in
its last flush interval.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from collector.sim.simulator import Simulator, make_fleet
from tests.faults import ConditionWatch, LineSink, lost_and_extra
from tests.harness.core import Process, free_port, start_collector, wait_until_async
from tests.integration.test_reliability_broker import caught_up, collector_config

pytestmark = pytest.mark.integration

FLUSH_S = 0.2  # influx.flush_interval_s in collector_config


async def test_collector_kill_9_under_load_loses_no_heartbeat(tmp_path: Path, mosquitto: Process) -> None:
    sink = LineSink()
    specs = make_fleet(160)  # 80 heartbeats/s; offline after 6 s, longer than the restart
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 2.0, receipts=False, dedicated=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    config = collector_config(tmp_path, mosquitto.port, http_port, sink, "kill-9-count", 2.0)
    collector = start_collector(tmp_path, config, http_port)
    try:
        async with sim:
            with ConditionWatch(http_port, [s.tid for s in specs]) as watch:
                await wait_until_async(
                    lambda: all(len(sink.heartbeat_seqs().get(s.tid, ())) >= 2 for s in specs),
                    30,
                    "every terminal heard twice",
                    0.25,
                )
                collector.stop(signal.SIGKILL)
                killed_at = time.time()
                await asyncio.sleep(3)  # heartbeats queue in the broker for the collector's session
                collector = await asyncio.to_thread(start_collector, tmp_path, config, http_port)
                up_at = time.time()
                await wait_until_async(
                    lambda: all(sum(1 for _, ts in sim.sent_seqs[s.tid] if ts > up_at) >= 2 for s in specs),
                    30,
                    "two more heartbeats from every terminal",
                    0.25,
                )
        try:
            await wait_until_async(
                lambda: caught_up(sim, sink),
                30,
                "the last heartbeat of every terminal applied",
                0.25,
            )
        finally:
            assert collector.stop() == 0
        lost, extra = lost_and_extra(sim.sent_seqs, sink.heartbeat_seqs())
        sent_ts = {(tid, seq): ts for tid, seqs in sim.sent_seqs.items() for seq, ts in seqs}
        lost_keys = {(t, s) for t, seqs in lost.items() for s in seqs}
        while_down = sum(1 for ts in sent_ts.values() if killed_at <= ts <= up_at)
        print(f"\ncollector kill -9 under load: {sim.heartbeats_sent} heartbeats sent by {len(specs)} terminals at "
              f"{len(specs) / 2.0:.0f}/s, {while_down} of them while it was down ({up_at - killed_at:.1f} s); "
              f"0 of those lost; missing from history {len(lost_keys)} (applied within {FLUSH_S} s of the kill, "
              f"not flushed), applied twice {sum(len(v) for v in extra.values())}")
        assert while_down > 100
        after_kill = {k for k in lost_keys if sent_ts[k] >= killed_at}
        assert not after_kill, f"published while the collector was down and never applied: {sorted(after_kill)}"
        # applied by the killed process in its last flush interval (+ 1.5 s of delivery and scheduling slack)
        early = {k for k in lost_keys if sent_ts[k] < killed_at - FLUSH_S - 1.5}
        assert not early, f"lost long before the kill: {sorted(early)}"
        assert not extra, f"applied twice: {extra}"
        assert not watch.seen, f"a terminal raised something because of the restart: {watch.seen}"
        assert "Traceback" not in collector.log_text()
    finally:
        collector.stop()
        sink.close()
