"""Terminal history end to end: simulator -> real Mosquitto -> collector process -> InfluxDB line protocol ->
a real VictoriaMetrics. Every heartbeat sent is stored exactly once, through a database outage, a collector
kill -9 with a full spool, and an unwritable spool; monitoring never notices any of it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.sim.simulator import Simulator, TerminalSpec, make_fleet
from tests.harness.core import Process, free_port, http_json, start_collector, wait_until_async, write_collector_config
from tests.harness.tsdb import VictoriaMetrics

pytestmark = pytest.mark.integration

INTERVAL = 0.5  # heartbeats per terminal per second x fleet size = load; small and fast for tests
OUTAGE_S = 32.0  # the issue asks for at least 30 s of database outage


# -- helpers ---------------------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the collector's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(port: int, name: str, **labels: str) -> float:
    """One sample; fails when the series is missing (every series must exist from the start)."""
    samples = scrape(port)
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} missing from /metrics"
    return samples[key]


def sent_counts(sim: Simulator) -> dict[str, Counter[int]]:
    """terminal -> how many heartbeats with each seq were sent."""
    return {tid: Counter(seq for seq, _ in seqs) for tid, seqs in sim.sent_seqs.items()}


def stored_counts(vm: VictoriaMetrics) -> dict[str, Counter[int]]:
    """terminal -> how many heartbeat points with each seq VictoriaMetrics holds (raw, not deduplicated)."""
    out: dict[str, Counter[int]] = {}
    for series in vm.export('{__name__="heartbeat_seq"}'):
        tid = series["metric"]["terminal_id"]
        out.setdefault(tid, Counter()).update(int(v) for v in series["values"])
    return out


def total(counts: dict[str, Counter[int]]) -> int:
    return sum(c.total() for c in counts.values())


def diff(sent: dict[str, Counter[int]], stored: dict[str, Counter[int]]) -> str:
    lost = {t: sorted((c - stored.get(t, Counter())).elements()) for t, c in sent.items()}
    dup = {t: sorted((c - sent.get(t, Counter())).elements()) for t, c in stored.items()}
    return f"lost={ {t: v for t, v in lost.items() if v} } extra={ {t: v for t, v in dup.items() if v} }"


async def assert_stored_exactly_once(sim: Simulator, vm: VictoriaMetrics, timeout: float = 60) -> None:
    """Every heartbeat the simulator sent is in the database exactly once (waits for it to become visible)."""
    sent = sent_counts(sim)
    expected = total(sent)
    assert expected > 0
    try:
        await wait_until_async(lambda: total(stored_counts(vm)) >= expected, timeout, "every heartbeat stored")
    except AssertionError:
        raise AssertionError(diff(sent, stored_counts(vm))) from None
    stored = stored_counts(vm)
    assert stored == sent, diff(sent, stored)


def conditions(port: int) -> dict[str, list[str]]:
    """terminal -> active conditions, from the API."""
    page = http_json(f"http://127.0.0.1:{port}/api/v1/terminals?all=1&limit=1000")
    return {t["terminal_id"]: [c["condition"] for c in t["conditions"]] for t in page["terminals"]}


def all_healthy(port: int, specs: list[TerminalSpec]) -> bool:
    seen = conditions(port)
    return set(seen) == {s.tid for s in specs} and not any(seen.values())


def accepted(port: int) -> float:
    return metric(port, "posfleet_messages_total", kind="heartbeat", result="accepted")


def influx_overrides(tmp_path: Path, url: str, **influx: Any) -> dict[str, Any]:
    return {
        "influx": {"enabled": True, "url": url, "bucket": "posfleet", "flush_interval_s": 0.2,
                   "backoff_initial_s": 0.2, "backoff_max_s": 2.0, "shutdown_deadline_s": 10.0, **influx},
        "state": {"snapshot_path": str(tmp_path / "state.snapshot"), "snapshot_interval_s": 1,
                  "eval_interval_s": 0.2, "spool_dir": str(tmp_path / "spool")},
    }


class Stack:
    """Simulator + collector process wired to one VictoriaMetrics, for one test."""

    def __init__(self, tmp_path: Path, mosquitto: Process, vm_url: str, n: int = 40, **influx: Any) -> None:
        self.tmp_path = tmp_path
        self.specs = make_fleet(n, ("acq-a", "acq-b"))
        self.sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", self.specs, INTERVAL, receipts=False)
        self.sim.write_registry(tmp_path / "terminals.csv")
        self.http_port = free_port()
        self.config = write_collector_config(tmp_path, mosquitto.port, self.http_port,
                                             **influx_overrides(tmp_path, vm_url, **influx))
        self.collector: Process | None = None

    def start_collector(self) -> Process:
        self.collector = start_collector(self.tmp_path, self.config, self.http_port)
        return self.collector

    def stop_collector(self) -> None:
        if self.collector is not None:
            self.collector.stop()

    async def wait_all_accepted(self, timeout: float = 30) -> None:
        """The collector took every heartbeat the simulator sent (nothing left in the broker)."""
        sent = total(sent_counts(self.sim))
        await wait_until_async(lambda: accepted(self.http_port) >= sent,
            timeout, f"the collector to accept all {sent} heartbeats")


@pytest.fixture
def stacks() -> Iterator[list[Stack]]:
    made: list[Stack] = []
    yield made
    for s in made:
        s.stop_collector()


# -- tests -----------------------------------------------------------------------------------------------


async def test_every_heartbeat_stored_exactly_once(
    tmp_path: Path, mosquitto: Process, victoria_metrics: VictoriaMetrics, stacks: list[Stack]
) -> None:
    stack = Stack(tmp_path, mosquitto, victoria_metrics.url, n=60)
    stacks.append(stack)
    port = stack.start_collector().port
    async with stack.sim:
        await wait_until_async(
            lambda: all(len(v) >= 20 for v in stack.sim.sent_seqs.values()) and len(stack.sim.sent_seqs) == 60,
            60, "20 heartbeats per terminal")
    await stack.wait_all_accepted()
    await assert_stored_exactly_once(stack.sim, victoria_metrics)
    assert metric(port, "posfleet_influx_points_total", result="dropped") == 0
    assert metric(port, "posfleet_influx_up") == 1
    assert stack.collector is not None and stack.collector.stop() == 0
    assert "Traceback" not in stack.collector.log_text()


async def test_outage_loses_nothing_duplicates_nothing_and_alerts_nothing(
    tmp_path: Path, mosquitto: Process, victoria_metrics: VictoriaMetrics, stacks: list[Stack]
) -> None:
    stack = Stack(tmp_path, mosquitto, victoria_metrics.url, n=40)
    stacks.append(stack)
    port = stack.start_collector().port
    vm = victoria_metrics
    async with stack.sim:
        await wait_until_async(lambda: all_healthy(port, stack.specs), 30, "a healthy fleet, heard in full")
        await wait_until_async(lambda: metric(port, "posfleet_influx_points_total", result="written") > 200,
            30, "history flowing")

        vm.stop()
        outage_started = time.monotonic()
        await wait_until_async(lambda: metric(port, "posfleet_influx_up") == 0, 20, "the writer to notice")
        spool_peak = 0.0
        while time.monotonic() - outage_started < OUTAGE_S:
            # monitoring must not notice the database: every terminal healthy, all the time
            healthy = await asyncio.to_thread(all_healthy, port, stack.specs)
            assert healthy, f"a terminal alert changed during the outage: {conditions(port)}"
            spool_peak = max(spool_peak, metric(port, "posfleet_influx_spool_bytes"))
            await asyncio.sleep(1.0)
        assert spool_peak > 0, "nothing was spooled during the outage"
        spooled = metric(port, "posfleet_influx_points_total", result="spooled")
        assert spooled > 0
        assert metric(port, "posfleet_influx_responses_total", code="connection_error") > 0

        vm.start()
        await wait_until_async(lambda: metric(port, "posfleet_influx_up") == 1
                   and metric(port, "posfleet_influx_spool_points") == 0, 120, "the spool drained")
        assert await asyncio.to_thread(all_healthy, port, stack.specs)
        await wait_until_async(lambda: metric(
            port, "posfleet_influx_points_total", result="written") > 0, 10, "more heartbeats after the recovery")
    await stack.wait_all_accepted()
    await assert_stored_exactly_once(stack.sim, vm)

    # spooling goes on until the first retry succeeds, so compare the final counts
    assert metric(port, "posfleet_influx_points_total", result="replayed") == metric(
        port, "posfleet_influx_points_total", result="spooled") >= spooled
    assert metric(port, "posfleet_influx_points_total", result="dropped") == 0
    assert metric(port, "posfleet_influx_spool_bytes") == 0
    assert all_healthy(port, stack.specs)
    summary = {k[0] + str(dict(k[1])): v for k, v in scrape(port).items()
               if k[0].startswith("posfleet_influx_") and "bucket" not in k[0] and "created" not in k[0] and v}
    print(f"outage of {OUTAGE_S:.0f} s, {total(sent_counts(stack.sim))} heartbeats sent; self-metrics: {summary}")
    assert stack.collector is not None and stack.collector.stop() == 0
    log = stack.collector.log_text()
    assert "influx server unavailable" in log and "influx spool drained" in log
    assert "Traceback" not in log


async def test_kill_9_with_full_spool_replays_on_restart(
    tmp_path: Path, mosquitto: Process, victoria_metrics: VictoriaMetrics, stacks: list[Stack]
) -> None:
    stack = Stack(tmp_path, mosquitto, victoria_metrics.url, n=30)
    stacks.append(stack)
    port = stack.start_collector().port
    vm = victoria_metrics
    async with stack.sim:
        await wait_until_async(lambda: metric(port, "posfleet_influx_points_total", result="written") > 100,
            30, "history flowing")
        vm.stop()
        await wait_until_async(lambda: metric(port, "posfleet_influx_spool_points") > 200,
            60, "a few seconds of heartbeats in the spool")
    await stack.wait_all_accepted()
    # everything the collector accepted is in the spool, and its state snapshot is newer than the last message
    # (so MQTT redelivery after the kill cannot be mistaken for new heartbeats)
    await wait_until_async(lambda: metric(port, "posfleet_influx_buffer_points") == 0
               and metric(port, "posfleet_snapshot_age_seconds") < time.time() - metric(
                   port, "posfleet_mqtt_last_message_seconds") - 0.1, 20, "memory spooled and snapshot current")
    spooled = metric(port, "posfleet_influx_spool_points")
    written = metric(port, "posfleet_influx_points_total", result="written")
    assert spooled > 0
    assert stack.collector is not None
    os.kill(stack.collector.proc.pid, signal.SIGKILL)
    stack.collector.proc.wait(10)

    vm.start()
    stack.start_collector()
    await wait_until_async(lambda: metric(port, "posfleet_influx_points_total", result="replayed")
               >= spooled and metric(port, "posfleet_influx_spool_points") == 0, 60, "the old spool replayed")
    await assert_stored_exactly_once(stack.sim, vm)
    assert written + spooled >= total(sent_counts(stack.sim))
    assert metric(port, "posfleet_influx_points_total", result="dropped") == 0
    assert "replaying them first" in stack.collector.log_text()


async def test_unwritable_spool_is_loud_and_monitoring_continues(
    tmp_path: Path, mosquitto: Process, stacks: list[Stack]
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["chattr", "+i", str(spool)], check=True)  # read-only, even for root
    try:
        # no database at all (nothing listens on that port), a small memory bound, a spool that cannot be written
        stack = Stack(tmp_path, mosquitto, f"http://127.0.0.1:{free_port()}", n=20, max_buffer_bytes=50_000)
        stacks.append(stack)
        port = stack.start_collector().port
        async with stack.sim:
            await wait_until_async(lambda: all_healthy(port, stack.specs), 30, "a healthy fleet, heard in full")
            await wait_until_async(lambda: metric(port, "posfleet_influx_spool_writable") == 0,
                20, "spool marked unwritable")
            await wait_until_async(lambda: metric(
                port, "posfleet_influx_dropped_total", reason="spool_unwritable") > 0, 60, "losses counted")
            # monitoring still works: a fault is detected on its terminal, and only there
            faulty = stack.specs[0].tid
            stack.sim.set_fault(faulty, "paper_out")
            await wait_until_async(lambda: conditions(port).get(faulty) == ["hardware_fault"], 30, "the fault detected")
            others = {t: c for t, c in conditions(port).items() if t != faulty}
            assert not any(others.values()), others
            assert metric(port, "posfleet_influx_buffer_points") * 300 < 50_000 + 5000 * 300
        assert stack.collector is not None
        log = stack.collector.log_text()
        assert "ERROR" in log and "cannot" in log and "monitoring continues" in log
        assert stack.collector.stop() == 0
    finally:
        subprocess.run(["chattr", "-i", str(spool)], check=False)


async def test_kill_9_mid_stream_loses_at_most_the_unflushed_interval(
    tmp_path: Path, mosquitto: Process, victoria_metrics: VictoriaMetrics, stacks: list[Stack]
) -> None:
    """kill -9 while heartbeats keep coming and the database is down: the spool survives, and what is lost is
    only what sat in memory, i.e. heartbeats received within `flush_interval_s` of the kill."""
    flush_interval = 0.2  # influx_overrides
    stack = Stack(tmp_path, mosquitto, victoria_metrics.url, n=30)
    stacks.append(stack)
    port = stack.start_collector().port
    vm = victoria_metrics
    async with stack.sim:
        await wait_until_async(lambda: metric(port, "posfleet_influx_points_total", result="written") > 100,
            30, "history flowing")
        vm.stop()
        await wait_until_async(lambda: metric(port, "posfleet_influx_spool_points") > 200,
            60, "heartbeats in the spool")
        assert stack.collector is not None
        os.kill(stack.collector.proc.pid, signal.SIGKILL)
        killed_at = time.time()
        stack.collector.proc.wait(10)
        vm.start()
        stack.start_collector()
        await wait_until_async(lambda: metric(port, "posfleet_influx_spool_points") == 0
                               and metric(port, "posfleet_influx_points_total", result="replayed") > 200,
                               60, "the old spool replayed")
        await wait_until_async(lambda: metric(port, "posfleet_influx_points_total", result="written") > 100,
            30, "heartbeats written after the restart")
    await wait_until_async(lambda: time.time() - metric(port, "posfleet_mqtt_last_message_seconds") > 2
                           and metric(port, "posfleet_influx_buffer_points") == 0, 30, "the broker's backlog consumed")
    assert stack.collector is not None and stack.collector.stop() == 0  # SIGTERM: flush

    sent = sent_counts(stack.sim)
    must_have = {tid: Counter(seq for seq, ts in seqs if ts < killed_at - flush_interval - 1.0)
                 for tid, seqs in stack.sim.sent_seqs.items()}

    def complete() -> bool:
        stored = stored_counts(vm)
        return all(not (c - stored.get(t, Counter())) for t, c in must_have.items())

    try:
        await wait_until_async(complete, 60, "everything older than the kill window stored")
    except AssertionError:
        raise AssertionError(diff(must_have, stored_counts(vm))) from None
    stored = stored_counts(vm)
    extra = {t: sorted((c - sent.get(t, Counter())).elements()) for t, c in stored.items()}
    assert not any(extra.values()), f"duplicated or unknown heartbeats: {extra}"
    lost = total(sent) - total(stored)
    print(f"kill -9 mid-stream: {total(sent)} heartbeats sent, {lost} lost (received within "
          f"{flush_interval} s + 1 s of the kill)")
