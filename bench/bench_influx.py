"""InfluxDB writer benchmark against a real line-protocol server (VictoriaMetrics on loopback).

Three phases, each with the writer on the same event loop as the load (as in the collector):
  1. paced   — heartbeat lines offered at the target ingest rate (default 25,000/s): does the writer keep up?
               (no drops, memory stays bounded, everything written shortly after the load stops)
  2. max     — lines offered as fast as the writer drains them: the sustained ceiling in points/s
  3. outage  — the server is stopped for --outage-s while the paced load continues (everything spooled), then
               restarted: how fast the spool is replayed while the load goes on

Lines are real heartbeat lines built by exporters.history.lines from decoded protocol messages (~370 bytes, 18 fields).
The cost of building them is measured separately (it is the collector's, per heartbeat).

    .venv/bin/python bench/bench_influx.py --rate 25000 --seconds 20 --outage-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from collector.fleet.protocol import decode  # noqa: E402
from exporters.history.influx import InfluxConfig, InfluxWriter  # noqa: E402
from exporters.history.lines import heartbeat_line, tag_set  # noqa: E402
from tests.harness.core import free_port, wait_until  # noqa: E402
from tests.harness.tsdb import VictoriaMetrics  # noqa: E402

TERMINALS = 20_000

NULL_SINK = """
import sys
from aiohttp import web
async def write(request):
    await request.read()
    return web.Response(status=204)
app = web.Application(client_max_size=256 * 1024 * 1024)
app.router.add_post("/api/v2/write", write)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def make_lines(n: int, start_ns: int, step_ns: int) -> list[str]:
    """n distinct heartbeat lines over TERMINALS terminals, timestamps from start_ns."""
    lines = []
    for i in range(n):
        tid = f"T{i % TERMINALS:06d}"
        body = json.dumps({
            "tid": tid, "ts": start_ns / 1e9, "seq": i // TERMINALS, "interval_s": 30, "txn_count": 120,
            "uploaded_count": 118, "queue_depth": 2, "oldest_queued_ts": start_ns / 1e9 - 60, "mid": f"M{i % 5000:05d}",
            "model": "A920", "app_version": "3.4.1", "os_version": "11", "uptime_s": 86400,
            "net": {"type": "wifi", "rssi_dbm": -71}, "power": {"source": "mains", "battery_pct": 88},
            "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"},
        }).encode()
        hb = decode(f"pos/v1/{tid}/heartbeat", body)
        tags = tag_set(tid, f"M{i % 5000:05d}", ("acq-a", "acq-b")[i % 2], "A920")
        lines.append(heartbeat_line(hb, (start_ns + i * step_ns) / 1e9, tags))  # type: ignore[arg-type]
    return lines


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def paced(w: InfluxWriter, lines: list[str], rate: float, seconds: float, reg: CollectorRegistry,
                on_tick: object = None) -> dict[str, float]:
    """Offer `rate` lines/s for `seconds` in 10 ms ticks; returns what was offered and the buffer peak."""
    tick = 0.01
    per_tick = rate * tick
    start = time.perf_counter()
    offered = 0
    peak = 0.0
    i = 0
    n = len(lines)
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * rate) - offered
        for _ in range(min(due, int(per_tick * 10))):
            w.write(lines[i])
            i = (i + 1) % n
        offered += max(0, min(due, int(per_tick * 10)))
        peak = max(peak, sample(reg, "posfleet_influx_buffer_points"))
        await asyncio.sleep(tick)
    return {"offered": offered, "seconds": time.perf_counter() - start, "buffer_peak": peak}


async def max_rate(w: InfluxWriter, reg: CollectorRegistry, lines: list[str], seconds: float, batch: int) -> float:
    """Offer lines as fast as the writer drains them (~4 batches queued, never dropping); points/s written."""
    base = sample(reg, "posfleet_influx_points_total", result="written")
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        if sample(reg, "posfleet_influx_buffer_points") < 4 * batch:
            for _ in range(1000):
                w.write(lines[i])
                i = (i + 1) % len(lines)
        await asyncio.sleep(0)
    await w.flush(60)
    return (sample(reg, "posfleet_influx_points_total", result="written") - base) / (time.perf_counter() - t0)


async def null_sink(lines: list[str], seconds: float, tmp: str) -> float:
    """The writer's own ceiling: a server (another process) that discards every body and answers 204."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", NULL_SINK, str(port)])
    try:
        wait_until(lambda: _listening(port), 20, "the null sink")
        reg = CollectorRegistry()
        cfg = InfluxConfig(enabled=True, url=f"http://127.0.0.1:{port}")
        async with InfluxWriter(cfg, reg, Path(tmp) / "spool-null") as w:
            return await max_rate(w, reg, lines, seconds, cfg.batch_size)
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def main(args: argparse.Namespace) -> None:
    print(f"building {args.lines} heartbeat lines ...", flush=True)
    now_ns = time.time_ns() - int(3600e9)  # an hour ago: inside any retention, never in the future
    lines = make_lines(args.lines, now_ns, 1000)
    avg_len = sum(map(len, lines)) / len(lines)
    hb_body = json.dumps({"tid": "T1", "ts": 1.8e9, "seq": 1, "interval_s": 30, "txn_count": 1, "uploaded_count": 1,
                          "queue_depth": 0, "oldest_queued_ts": None, "mid": "M1", "app_version": "3.4.1",
                          "net": {"type": "wifi", "rssi_dbm": -71}, "power": {"source": "mains", "battery_pct": 88},
                          "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}}).encode()
    hb = decode("pos/v1/T1/heartbeat", hb_body)
    tags = tag_set("T1", "M1", "acq-a", "A920")
    build_us = min(timeit.repeat(lambda: heartbeat_line(hb, 1.8e9, tags), number=20000, repeat=3)) / 20000 * 1e6  # type: ignore[arg-type]
    print(f"line: {avg_len:.0f} bytes, built in {build_us:.2f} µs (collector side, per heartbeat)")

    with tempfile.TemporaryDirectory(prefix="bench-influx-") as tmp:
        rate = await null_sink(lines, args.seconds, tmp)
        print(f"writer ceiling (null sink in another process): {rate:,.0f} points/s")
        vm = VictoriaMetrics(Path(tmp) / "vm")
        vm.start()
        try:
            reg = CollectorRegistry()
            cfg = InfluxConfig(enabled=True, url=vm.url, backoff_max_s=2.0)
            async with InfluxWriter(cfg, reg, Path(tmp) / "spool") as w:
                # 1. paced
                c0, t0 = cpu_s(), time.perf_counter()
                p = await paced(w, lines, args.rate, args.seconds, reg)
                ok = await w.flush(60)
                tail = time.perf_counter() - t0 - p["seconds"]
                written = sample(reg, "posfleet_influx_points_total", result="written") + sample(
                    reg, "posfleet_influx_points_total", result="replayed")
                spooled = sample(reg, "posfleet_influx_points_total", result="spooled")
                dropped = sample(reg, "posfleet_influx_points_total", result="dropped")
                reqs = sample(reg, "posfleet_influx_write_seconds_count")
                mean_req = sample(reg, "posfleet_influx_write_seconds_sum") / max(reqs, 1)
                print(f"paced:  offered {p['offered'] / p['seconds']:,.0f} lines/s for {p['seconds']:.0f} s; "
                      f"written {written:,.0f} ({written / (p['seconds'] + tail):,.0f}/s; {spooled:,.0f} via the "
                      f"spool), dropped {dropped:.0f}, flushed "
                      f"{tail:.2f} s after the load, buffer peak {p['buffer_peak']:,.0f} points, "
                      f"{mean_req * 1000:.0f} ms/request ({reqs:.0f}), writer+load CPU "
                      f"{(cpu_s() - c0) / (time.perf_counter() - t0) * 100:.0f}% of one core; all written: {ok}")

                # 2. max
                rate = await max_rate(w, reg, lines, args.seconds, cfg.batch_size)
                print(f"max:    {rate:,.0f} points/s sustained into VictoriaMetrics "
                      f"({rate * avg_len / 1e6:.1f} MB/s of line protocol)")

                # 3. outage while the paced load goes on
                if args.outage_s > 0:
                    spooled_before = sample(reg, "posfleet_influx_points_total", result="spooled")
                    vm.stop()
                    load = asyncio.create_task(paced(w, lines, args.rate, args.outage_s + args.recovery_s, reg))
                    await asyncio.sleep(args.outage_s)
                    spooled = sample(reg, "posfleet_influx_points_total", result="spooled") - spooled_before
                    spool_points = sample(reg, "posfleet_influx_spool_points")
                    spool_bytes = sample(reg, "posfleet_influx_spool_bytes")
                    vm.start()
                    t0 = time.perf_counter()
                    base_replayed = sample(reg, "posfleet_influx_points_total", result="replayed")
                    while sample(reg, "posfleet_influx_spool_points") > 0 or sample(reg, "posfleet_influx_up") == 0:
                        await asyncio.sleep(0.1)
                        if time.perf_counter() - t0 > 600:
                            break
                    drain = time.perf_counter() - t0
                    replayed = sample(reg, "posfleet_influx_points_total", result="replayed") - base_replayed
                    await load
                    await w.flush(60)
                    per_point = spool_bytes / spool_points if spool_points else 0.0
                    print(f"outage: {args.outage_s:.0f} s at {args.rate:,.0f}/s spooled {spooled:,.0f} points in "
                          f"{spool_bytes / 1e6:.1f} MB ({per_point:.0f} B/point on disk); after recovery the "
                          f"spool ({replayed:,.0f} points incl. what arrived meanwhile) drained in {drain:.1f} s "
                          f"({replayed / max(drain, 1e-9):,.0f} points/s replayed while the load went on)")
                total_dropped = sample(reg, "posfleet_influx_points_total", result="dropped")
                print(f"dropped overall: {total_dropped:.0f}")
        finally:
            vm.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=25_000, help="offered heartbeats/s in the paced phases")
    ap.add_argument("--seconds", type=float, default=20, help="duration of the paced and max phases")
    ap.add_argument("--outage-s", type=float, default=10, help="server outage in phase 3 (0 = skip)")
    ap.add_argument("--recovery-s", type=float, default=60, help="load kept on after the server is back")
    ap.add_argument("--lines", type=int, default=200_000, help="distinct lines cycled through")
    args = ap.parse_args()
    print(f"cpu cores: {os.cpu_count()}")
    asyncio.run(main(args))
