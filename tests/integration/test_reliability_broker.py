"""Reliability matrix, the broker link (docs/reliability.md rows 1 and 3): a broker restart or crash mid-stream,
and a half-open (black-holed) connection between the collector and the broker.

Heartbeats lost are counted by sequence number as the collector saw them: its history writer points at a
`LineSink`, which records the `seq` of every heartbeat the collector applied, per terminal.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import tests.integration.test_influx_history as history
from collector.sim.simulator import Simulator, make_fleet
from tests.faults import (
    BlackholeProxy,
    ConditionWatch,
    LineSink,
    deploy_persistence,
    lost_and_extra,
    metric_sample,
    restart_mosquitto,
    start_deploy_mosquitto,
)
from tests.harness.core import (
    Process,
    free_port,
    http_get,
    start_collector,
    terminal_views,
    wait_until_async,
    write_collector_config,
)

pytestmark = pytest.mark.integration


def collector_config(tmp_path: Path, mqtt_port: int, http_port: int, sink: LineSink, client_id: str,
                     interval: float, **mqtt: Any) -> Path:
    """A test collector whose history goes to `sink` (flushed every 0.2 s) and that reconnects within 2 s."""
    return write_collector_config(
        tmp_path, mqtt_port, http_port,
        # a terminal not heard yet is given the fleet's interval (not the tests' 1 s) before it counts as offline
        thresholds={"default_interval_s": interval},
        mqtt={"url": f"mqtt://127.0.0.1:{mqtt_port}", "client_id": client_id, "reconnect_min_s": 1,
              "reconnect_max_s": 2, **mqtt},
        **history.influx_overrides(tmp_path, sink.url),
    )


def connected(port: int) -> float:
    return metric_sample(port, "posfleet_mqtt_connected")


def caught_up(sim: Simulator, sink: LineSink) -> bool:
    """The sink holds the last heartbeat every terminal sent."""
    seen = sink.heartbeat_seqs()
    return all(seqs and seqs[-1][0] in seen.get(tid, {}) for tid, seqs in sim.sent_seqs.items())


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_broker_restart_mid_stream(tmp_path: Path, how: signal.Signals) -> None:
    """Mosquitto restarted (SIGTERM saves its database, SIGKILL loses what was not autosaved) under load: heartbeats
    lost are counted by seq; any loss stays inside the outage, the collector catches up, nothing is raised."""
    assert deploy_persistence()["autosave_interval"] == "60", "docs/reliability.md quotes the deploy setting"
    broker = start_deploy_mosquitto()
    assert "Error saving" not in broker.log_text()
    sink = LineSink()
    # 160 terminals every 2 s (80 heartbeats/s) over 4 gateway connections: the offline threshold (6 s) is longer
    # than the outage, as in production (90 s vs seconds), so a terminal alert here would be a false one.
    specs = make_fleet(160)
    sim = Simulator(f"mqtt://127.0.0.1:{broker.port}", specs, 2.0, receipts=False, dedicated=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    config = collector_config(tmp_path, broker.port, http_port, sink, f"broker-{how.name}", 2.0)
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
                down_at = time.time()
                broker = await asyncio.to_thread(restart_mosquitto, broker, how)
                await wait_until_async(lambda: connected(http_port) == 1, 30, "the collector reconnected", 0.1)
                up_at = time.time()
                await wait_until_async(
                    lambda: all(sum(1 for _, ts in sim.sent_seqs[s.tid] if ts > up_at) >= 2 for s in specs),
                    30,
                    "two more heartbeats from every terminal",
                    0.25,
                )
        sent = sum(len(v) for v in sim.sent_seqs.values())
        try:
            await wait_until_async(
                lambda: caught_up(sim, sink),
                30,
                "the last heartbeat of every terminal applied",
                0.25,
            )
            results = {r: metric_sample(http_port, "posfleet_messages_total", kind="heartbeat", result=r)
                       for r in ("accepted", "duplicate", "stale", "rejected")}
        finally:
            assert collector.stop() == 0  # SIGTERM: the writer flushes
        lost, extra = lost_and_extra(sim.sent_seqs, sink.heartbeat_seqs())
        n_lost = sum(len(v) for v in lost.values())
        print(f"\nbroker {how.name} mid-stream: {sent} heartbeats sent by {len(specs)} terminals at "
              f"{len(specs) / 2.0:.0f}/s, outage {up_at - down_at:.1f} s, lost {n_lost} "
              f"({n_lost / sent:.2%}), duplicated {sum(len(v) for v in extra.values())}; collector: {results}")
        assert not extra, f"a heartbeat applied twice: {extra}"
        assert not watch.seen, f"a terminal raised something because of the broker: {watch.seen}"
        assert watch.polls > 5
        # The collector applied everything the broker delivered (accepted = sent - lost, nothing stale).
        assert results["accepted"] == sent - n_lost and results["stale"] == 0
        if how == signal.SIGTERM:  # Mosquitto saved the collector's session and its queue
            assert not lost, f"lost on a clean broker restart: {lost}"
        # A crash loses what was not autosaved, confined to the restart: before it everything was delivered and
        # acked; after it the collector's session is subscribed again.
        sent_ts = {(tid, seq): ts for tid, seqs in sim.sent_seqs.items() for seq, ts in seqs}
        outside = {(t, s) for t, seqs in lost.items() for s in seqs
                   if not down_at - 2.0 <= sent_ts[(t, s)] <= up_at + 2.0}
        assert not outside, f"lost outside the outage window: {sorted(outside)[:20]}"
        assert "Traceback" not in collector.log_text()
        assert how == signal.SIGKILL or "Error saving" not in broker.log_text(), "Mosquitto could not persist"
    finally:
        collector.stop()
        broker.stop()
        sink.close()
        shutil.rmtree(broker.workdir, ignore_errors=True)


KEEPALIVE_S = 5  # the smallest mqtt.keepalive_s the config accepts


async def test_half_open_link_detected_within_one_and_a_half_keepalives(tmp_path: Path, mosquitto: Process) -> None:
    """The link goes silent right after a keepalive exchange (the worst moment): noticed within 1.5 keepalives."""
    (tmp_path / "terminals.csv").write_text("terminal_id,merchant_id,acquirer,model,site,region\n")
    http_port = free_port()
    with BlackholeProxy(mosquitto.port) as proxy:
        config = write_collector_config(tmp_path, proxy.port, http_port, mqtt={
            "url": f"mqtt://127.0.0.1:{proxy.port}", "client_id": "half-open-worst", "keepalive_s": KEEPALIVE_S})
        collector = start_collector(tmp_path, config, http_port)
        try:
            proxy.blackhole_after_pingresp()
            await wait_until_async(
                lambda: proxy.holed_at is not None,
                3 * KEEPALIVE_S,
                "the link black-holed after a PINGRESP", 0.1,
            )
            await wait_until_async(lambda: connected(http_port) == 0, 4 * KEEPALIVE_S, "the dead link noticed", 0.1)
            assert proxy.holed_at is not None
            detected_after = time.monotonic() - proxy.holed_at
            print(f"\nhalf-open link right after a keepalive exchange: noticed after {detected_after:.1f} s "
                  f"(keepalive {KEEPALIVE_S} s)")
            assert http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 503
        finally:
            collector.stop()
    assert detected_after <= 1.5 * KEEPALIVE_S


async def test_half_open_link_detected_and_nothing_lost(tmp_path: Path, mosquitto: Process) -> None:
    """Black-holed under load: noticed (not ready, mqtt_connected 0) within 1.5 keepalives by the collector's own
    silence check (paho alone takes up to two), reconnected when the link is back, 0 heartbeats lost."""
    sink = LineSink()
    proxy = BlackholeProxy(mosquitto.port)
    # 240 terminals every 8 s (30/s): an offline threshold of 24 s, longer than the keepalive's detection and the
    # reconnect together, as in production (keepalive 30 s, threshold 90 s).
    specs = make_fleet(240)
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 8.0, receipts=False, dedicated=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    config = collector_config(tmp_path, proxy.port, http_port, sink, "half-open", 8.0,
                              keepalive_s=KEEPALIVE_S)
    collector = start_collector(tmp_path, config, http_port)
    try:
        async with sim:
            with ConditionWatch(http_port, [s.tid for s in specs]) as watch:
                await wait_until_async(
                    lambda: len(sink.heartbeat_seqs()) == len(specs),
                    30,
                    "every terminal heard",
                    0.25,
                )
                proxy.blackhole()
                assert proxy.holed_at is not None
                await wait_until_async(lambda: connected(http_port) == 0, 4 * KEEPALIVE_S, "the dead link noticed", 0.1)
                detected_after = time.monotonic() - proxy.holed_at
                status, body = http_get(f"http://127.0.0.1:{http_port}/readyz")
                assert status == 503, body
                during = sum(len(v) for v in sim.sent_seqs.values())
                proxy.restore()
                await wait_until_async(lambda: connected(http_port) == 1, 30, "reconnected", 0.1)
                status, _ = http_get(f"http://127.0.0.1:{http_port}/readyz")
                assert status == 200
                await wait_until_async(lambda: sum(
                    len(v) for v in sim.sent_seqs.values()) > during + 60, 30, "heartbeats flowing again", 0.25)
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
        n_lost = sum(len(v) for v in lost.values())
        sent = sum(len(v) for v in sim.sent_seqs.values())
        print(f"\nhalf-open link, keepalive {KEEPALIVE_S} s: noticed after {detected_after:.1f} s; {sent} heartbeats "
              f"sent at {len(specs) / 8.0:.0f}/s, lost {n_lost}, duplicated {sum(len(v) for v in extra.values())}")
        assert not extra, extra
        assert not lost, lost
        assert not watch.seen, f"a terminal raised something because of the collector's link: {watch.seen}"
        views = terminal_views(http_port) if collector.proc.poll() is None else {}
        assert not any(v["conditions"] for v in views.values())
        assert "Traceback" not in collector.log_text()
        # paho's worst case plus its 1 s housekeeping tick
        assert detected_after <= 2 * KEEPALIVE_S + 2, f"half-open link noticed after {detected_after:.1f} s"
    finally:
        collector.stop()
        proxy.close()
        sink.close()


async def test_broker_outage_longer_than_the_offline_threshold_raises_no_terminal(tmp_path: Path) -> None:
    """While the collector cannot hear the broker it cannot know a terminal is silent: nothing may be raised."""
    broker = start_deploy_mosquitto()
    sink = LineSink()
    specs = make_fleet(20)
    sim = Simulator(f"mqtt://127.0.0.1:{broker.port}", specs, 0.5, receipts=False, dedicated=False)
    sim.write_registry(tmp_path / "terminals.csv")
    http_port = free_port()
    collector = start_collector(tmp_path, collector_config(tmp_path, broker.port, http_port, sink, "outage", 0.5),
                                http_port)
    try:
        async with sim:
            with ConditionWatch(http_port, [s.tid for s in specs], step=0.2) as watch:
                await wait_until_async(
                    lambda: len(sink.heartbeat_seqs()) == len(specs),
                    30,
                    "every terminal heard",
                    0.25,
                )
                broker.stop()
                await wait_until_async(lambda: connected(http_port) == 0, 10, "the collector noticed", 0.1)
                await asyncio.sleep(3 * 0.5 * 3)  # three offline thresholds without a broker
                broker = await asyncio.to_thread(restart_mosquitto, broker, signal.SIGTERM)
                await wait_until_async(lambda: connected(http_port) == 1, 30, "the collector reconnected", 0.1)
                await wait_until_async(lambda: caught_up(sim, sink), 30, "heartbeats again", 0.25)
        assert not watch.seen, f"raised while the collector could not hear the broker: {watch.seen}"
    finally:
        collector.stop()
        broker.stop()
        sink.close()
        shutil.rmtree(broker.workdir, ignore_errors=True)
