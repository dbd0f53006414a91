"""activity_drop end to end: a real Mosquitto, the collector started from a snapshot holding learned baselines (a
restart), heartbeats published over MQTT. A busy terminal that keeps heartbeating but stops selling gets
activity_drop in the API and /metrics; a quiet shop and a terminal without a baseline do not; a sale clears it;
the collector's own final snapshot brings every baseline back byte for byte.

Heartbeats are received at wall-clock time (the ingest stamps them); the collector's clock is injected and moved
forward (wall and monotonic together, so it is not a clock jump): no sleeping while the silence grows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.app import Collector
from collector.config import load_config
from collector.fleet.registry import load_registry
from collector.fleet.snapshot import save_snapshot
from collector.fleet.state import Fleet
from tests.faults import publish_all
from tests.harness.activity import Feeder
from tests.harness.core import Process, free_port, http_get, start_mosquitto, wait_until_async, write_collector_config

pytestmark = pytest.mark.integration
DAY = 86_400.0
BUSY_PER_H, QUIET_PER_H = 600.0, 0.5  # around the clock, so the test does not depend on the hour it runs at


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Process]:
    p = start_mosquitto(tmp_path / "mqtt")
    try:
        yield p
    finally:
        p.stop()


def payload(tid: str, seq: int, count: int) -> bytes:
    return json.dumps({
        "tid": tid, "ts": time.time(), "seq": seq, "interval_s": 300, "txn_count": count, "uploaded_count": count,
        "queue_depth": 0, "oldest_queued_ts": None, "mid": f"M-{tid}", "app_version": "3.1.0",
        "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}, "net": {"type": "wifi", "rssi_dbm": -60},
    }).encode()


def view(port: int, tid: str) -> dict[str, Any]:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/terminals/{tid}")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


async def test_a_terminal_that_stops_selling_gets_activity_drop_and_quiet_or_new_ones_do_not(
    tmp_path: Path, broker: Process
) -> None:
    (tmp_path / "terminals.csv").write_text(
        "terminal_id,merchant_id,acquirer,model,site,region,tz\n"
        "BUSY,M-BUSY,acq,A920,s1,north,UTC\nQUIET,M-QUIET,acq,A920,s1,north,UTC\nNEW,M-NEW,acq,A920,s2,north,\n"
    )
    http_port = free_port()
    cfg = load_config(write_collector_config(tmp_path, broker.port, http_port, activity={"recheck_s": 60}))
    # What an earlier run of the collector learned: eight days of BUSY and QUIET, one of NEW, ending now.
    now = time.time()
    earlier = Feeder(Fleet(cfg, started_at=now - 8 * DAY, registry=load_registry(tmp_path / "terminals.csv")))
    earlier.learn("BUSY", now - 8 * DAY, now - 30, lambda _t: BUSY_PER_H)
    earlier.learn("QUIET", now - 8 * DAY, now - 30, lambda _t: QUIET_PER_H)
    earlier.learn("NEW", now - DAY, now - 30, lambda _t: BUSY_PER_H)
    assert cfg.state.snapshot_path
    save_snapshot(earlier.fleet, cfg.state.snapshot_path)

    offset = 0.0
    collector = Collector.load(cfg, clock=lambda: time.time() + offset, monotonic=lambda: time.monotonic() + offset)
    seq, count = dict(earlier.seq), dict(earlier.count)

    async def beat(sales: dict[str, int]) -> None:
        messages = []
        for tid in ("BUSY", "QUIET", "NEW"):
            seq[tid] += 1
            count[tid] += sales.get(tid, 0)
            messages.append((f"pos/v1/{tid}/heartbeat", payload(tid, seq[tid], count[tid])))
        await asyncio.to_thread(publish_all, broker.port, messages)
        fleet = collector.fleet
        await wait_until_async(lambda: all(fleet.terminals[t].seq == seq[t] for t in seq), 20, "heartbeats applied")

    def drop(tid: str) -> list[dict[str, Any]]:
        return [c for c in view(http_port, tid)["conditions"] if c["condition"] == "activity_drop"]

    async with collector:
        await wait_until_async(collector.hearing, 20, "the collector to subscribe")
        await beat({"BUSY": 10, "NEW": 10})  # BUSY sells: not silent
        busy, quiet, new = [await asyncio.to_thread(view, http_port, t) for t in ("BUSY", "QUIET", "NEW")]
        assert busy["activity"]["state"] == "evaluated" and busy["activity"]["learned_days"] >= 7
        assert busy["activity"]["expected_per_hour_now"] == pytest.approx(BUSY_PER_H, rel=0.05)
        assert quiet["activity"]["state"] == "evaluated"
        assert new["activity"]["state"] == "no_baseline" and "no baseline yet" in new["activity"]["note"]
        assert not await asyncio.to_thread(drop, "BUSY")

        # Four minutes later by the collector's clock: BUSY (~10 sales a minute) has sold nothing since.
        offset = 240.0
        await beat({})
        found = await wait_until_async(lambda: drop("BUSY"), 20, "activity_drop on BUSY")
        assert found[0]["severity"] == "warning"
        assert found[0]["detail"].endswith("local, none seen") and found[0]["detail"].startswith("expected ")
        assert not await asyncio.to_thread(drop, "QUIET"), "a quiet shop's silence is not improbable"
        assert not await asyncio.to_thread(drop, "NEW"), "no baseline yet: not evaluated"
        status, metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{http_port}/metrics")
        text = metrics.decode()
        assert status == 200 and 'posfleet_activity_baselines{state="evaluated"} 2.0' in text
        assert 'posfleet_activity_baselines{state="learning"} 1.0' in text
        assert 'condition="activity_drop"' in text and 'terminal_id="BUSY"' in text

        await beat({"BUSY": 1})  # a sale clears it at once
        await wait_until_async(lambda: not drop("BUSY"), 20, "activity_drop on BUSY to clear")
        assert collector.fleet.terminals["BUSY"].conds is None
        activity = collector.fleet.activity
        records = {tid: activity.store.record(activity.slot_of(tid)) for tid in seq}

    # Stopped (the final snapshot) and started again: every baseline is back byte for byte.
    again = Collector.load(load_config(write_collector_config(tmp_path, broker.port, http_port)))
    assert again.restored.source.value == "current"
    assert {tid: again.fleet.activity.store.record(again.fleet.activity.slot_of(tid)) for tid in seq} == records
    assert again.fleet.activity.counts() == {"evaluated": 2, "learning": 1}
