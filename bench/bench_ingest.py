"""Ingest benchmark through a real Mosquitto: heartbeats/s end to end, RSS per terminal, /metrics render time,
with `mosquitto_sub` draining the same backlog as the floor.

Method: the broker holds a backlog of N heartbeats (QoS 1) for a persistent session while the consumer is away;
then the consumer (the collector, or mosquitto_sub) connects and the time to drain the backlog is measured.
This isolates the consumer from the publishers' CPU on a 2-core machine.

    .venv/bin/python bench/bench_ingest.py --terminals 100000 --rounds 3
    .venv/bin/python bench/bench_ingest.py --max-inflight 20 --no-floor   # Mosquitto's default window
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from collector.sim.simulator import make_fleet  # noqa: E402
from tests.harness.core import (  # noqa: E402
    Process,
    free_port,
    http_get,
    port_open,
    require_binary,
    start_collector,
    wait_until,
    write_collector_config,
)

T0 = time.time()


def start_mosquitto(workdir: Path, max_inflight: int) -> Process:
    """A real Mosquitto with persistence and the given in-flight window per client (0: unlimited)."""
    binary = require_binary("mosquitto", "/usr/sbin/mosquitto")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {workdir}/\n"
        f"autosave_interval 60\nmax_inflight_messages {max_inflight}\nmax_queued_messages 0\n"
        "log_dest stderr\n"
    )
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log.open("ab"), stderr=subprocess.STDOUT)
    broker = Process(proc, port, workdir, log)
    wait_until(lambda: port_open(port), 10, "mosquitto to listen")
    return broker


def publish_worker(port: int, tids: list[str], rounds: int, fault_every: int) -> None:
    """Publish `rounds` heartbeats per terminal at QoS 1 and wait for every PUBACK."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=paho.MQTTv311)
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    last = None
    window: list[paho.MQTTMessageInfo] = []
    for r in range(rounds):
        for i, tid in enumerate(tids):
            faulty = fault_every and i % fault_every == 0
            body = {
                "tid": tid,
                "ts": round(T0 + r * 30, 3),
                "seq": r,
                "interval_s": 30,
                "txn_count": r,
                "uploaded_count": r,
                "queue_depth": 0,
                "oldest_queued_ts": None,
                "mid": f"M{int(tid[1:]) // 4:05d}",
                "model": "A920",
                "app_version": "3.4.1",
                "net": {"type": "wifi", "rssi_dbm": -60},
                "hw": {"printer": "paper_out" if faulty else "ok", "display": "ok", "card_reader": "ok"},
            }
            last = client.publish(f"pos/v1/{tid}/heartbeat", json.dumps(body, separators=(",", ":")), qos=1)
            window.append(last)
            if len(window) >= 20_000:  # paho's message ids wrap at 65535: keep fewer than that in flight
                window[10_000].wait_for_publish(120)
                window = window[10_001:]
    if last is not None:
        last.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def preload(port: int, tids: list[str], rounds: int, fault_every: int, procs: int = 2) -> float:
    """Fill the broker's queue for the (absent) consumer; returns seconds taken."""
    start = time.monotonic()
    chunks = [tids[i::procs] for i in range(procs)]
    ps = [multiprocessing.Process(target=publish_worker, args=(port, c, rounds, fault_every)) for c in chunks]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return time.monotonic() - start


def rss_kib(pid: int) -> int:
    """Resident set size of a process."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+)", text)
    return int(m.group(1)) if m else 0


def metric(port: int, name: str) -> float:
    """Sum of a metric's samples."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def bench_floor(workdir: Path, n_terms: int, rounds: int, max_inflight: int) -> float:
    """mosquitto_sub draining the same backlog: messages/s."""
    broker = start_mosquitto(workdir / "floor-broker", max_inflight)
    try:
        # A persistent QoS 1 session (fixed id, -c): register it, leave so the broker queues for it, come back.
        sub = ["mosquitto_sub", "-p", str(broker.port), "-i", "bench-floor-sub", "-c", "-q", "1",
               "-t", "pos/v1/+/heartbeat"]
        subprocess.run([*sub, "-W", "1"], capture_output=True)
        tids = [s.tid for s in make_fleet(n_terms)]
        preload(broker.port, tids, rounds, 0)
        total = n_terms * rounds
        start = time.monotonic()
        subprocess.run([*sub, "-C", str(total)], stdout=subprocess.DEVNULL, check=True)
        return total / (time.monotonic() - start)
    finally:
        broker.stop()


def bench_collector(
    workdir: Path, n_terms: int, rounds: int, fault_every: int, max_inflight: int
) -> dict[str, float]:
    """The collector draining the backlog, plus memory and /metrics timings."""
    broker = start_mosquitto(workdir / "broker", max_inflight)
    specs = make_fleet(n_terms)
    with open(workdir / "terminals.csv", "w") as fh:
        fh.write("terminal_id,merchant_id,acquirer,model,site,region\n")
        for s in specs:
            fh.write(f"{s.tid},{s.mid},{s.acquirer},{s.model},{s.site},{s.region}\n")
    http_port = free_port()
    config = write_collector_config(
        workdir,
        broker.port,
        http_port,
        state={"snapshot_path": str(workdir / "state.snapshot"), "snapshot_interval_s": 3600, "eval_interval_s": 5},
        mqtt={"url": f"mqtt://127.0.0.1:{broker.port}", "client_id": "posfleet-bench", "queue_size": 10000},
        thresholds={"default_interval_s": 30},
    )
    out: dict[str, float] = {}
    try:
        collector = start_collector(workdir, config, http_port)
        pid = collector.proc.pid
        rss_registry = rss_kib(pid)
        collector.stop()  # the persistent session stays; the broker now queues for it
        tids = [s.tid for s in specs]
        out["preload_s"] = preload(broker.port, tids, rounds, fault_every)
        total = n_terms * rounds
        collector = start_collector(workdir, config, http_port)
        start = time.monotonic()
        out["rss_kib_restarted"] = rss_kib(collector.proc.pid)
        wait_until(lambda: metric(http_port, "posfleet_messages_total") >= total, 600, "backlog drained", 0.2)
        elapsed = time.monotonic() - start
        out["heartbeats"] = total
        out["drain_s"] = elapsed
        out["heartbeats_per_s"] = total / elapsed
        out["rss_kib_after_load"] = rss_kib(collector.proc.pid)
        out["rss_kib_registry_only"] = rss_registry
        out["accepted"] = metric(http_port, 'posfleet_messages_total{kind="heartbeat",result="accepted"}')
        times = []
        for _ in range(20):
            t = time.monotonic()
            status, body = http_get(f"http://127.0.0.1:{http_port}/metrics", timeout=30)
            times.append(time.monotonic() - t)
            assert status == 200
        out["metrics_ms_median"] = statistics.median(times) * 1000
        out["metrics_ms_max"] = max(times) * 1000
        out["metrics_bytes"] = len(body)
        out["problem_series"] = metric(http_port, "posfleet_fleet_condition_terminals")
        collector.stop()
    finally:
        broker.stop()
    return out


def rss_empty(workdir: Path) -> int:
    """RSS of a collector with no terminals, to subtract."""
    broker = start_mosquitto(workdir / "broker-empty", 1000)
    try:
        (workdir / "empty").mkdir(exist_ok=True)
        (workdir / "empty" / "terminals.csv").write_text("terminal_id,merchant_id,acquirer,model,site,region\n")
        port = free_port()
        cfg = write_collector_config(workdir / "empty", broker.port, port)
        c = start_collector(workdir / "empty", cfg, port)
        rss = rss_kib(c.proc.pid)
        c.stop()
        return rss
    finally:
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--terminals", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3, help="heartbeats per terminal in the backlog")
    ap.add_argument("--fault-every", type=int, default=25, help="every Nth terminal reports paper_out (problems)")
    ap.add_argument("--max-inflight", type=int, default=1000,
                    help="the broker's max_inflight_messages (Mosquitto's default 20, EMQX's 32; 0 unlimited)")
    ap.add_argument("--no-floor", action="store_true", help="skip the mosquitto_sub floor")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="posfleet-bench-") as tmp:
        workdir = Path(tmp)
        floor = 0.0 if args.no_floor else bench_floor(workdir, args.terminals, args.rounds, args.max_inflight)
        base = rss_empty(workdir)
        res = bench_collector(workdir, args.terminals, args.rounds, args.fault_every, args.max_inflight)
    per_terminal = (res["rss_kib_after_load"] - base) * 1024 / args.terminals
    print(f"terminals                 {args.terminals}")
    print(f"heartbeats in backlog     {int(res['heartbeats'])}")
    print(f"broker in-flight window   {args.max_inflight or 'unlimited'}")
    print(f"load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rate = res["heartbeats_per_s"]
    if floor:
        print(f"mosquitto_sub floor       {floor:,.0f} msg/s")
        print(f"collector end to end      {rate:,.0f} heartbeats/s  ({rate / floor:.2f} x floor)")
    else:
        print(f"collector end to end      {rate:,.0f} heartbeats/s")
    print(f"RSS empty / loaded        {base / 1024:.1f} MiB / {res['rss_kib_after_load'] / 1024:.1f} MiB")
    print(f"RSS per terminal          {per_terminal:,.0f} bytes")
    registry_only = (res["rss_kib_registry_only"] - base) * 1024 / args.terminals
    print(f"  of which before any heartbeat (registry loaded) {registry_only:,.0f} bytes")
    restarted = (res["rss_kib_restarted"] - base) * 1024 / args.terminals
    print(f"  after a restart from the snapshot, before the backlog  {restarted:,.0f} bytes")
    print(
        f"/metrics median / max     {res['metrics_ms_median']:.1f} ms / {res['metrics_ms_max']:.1f} ms "
        f"({res['metrics_bytes'] / 1024:.0f} KiB, {int(res['problem_series'])} terminals in a condition)"
    )


if __name__ == "__main__":
    main()
