"""Scale-out ingest benchmark on a real three-node NATS JetStream cluster (tests/harness/nats.py): the cluster's
MQTT ingest with ../shared/bench/fleetgen.py, a stand-in ingester (a bare nats-py pull consumer) and 1 or 2
partitioned `posfleet run` collectors draining the same backlog. Figures go to docs/scale.md.

Method (drain, like bench/bench_ingest.py, so that the publisher does not compete with the consumers for the two
cores): the collectors start, see one heartbeat per terminal (warm-up), stop (their partitions' state goes to
the cluster); fleetgen publishes `--count` QoS 1 heartbeats to one node's MQTT port (`--procs` connections) and
the time until the stream POSP holds them all is taken; then the stand-in reads them, then the collectors start
again and the time until they have applied them all is taken.

    .venv/bin/python bench/nats_ingest.py --terminals 100000 --count 300000 --collectors 1,2
    .venv/bin/python bench/nats_ingest.py --memory-terminals 1000000 --memory-shards 4 --skip-ingest
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy  # noqa: E402

from tests.harness.core import (  # noqa: E402
    Process,
    free_port,
    http_get,
    start_collector,
    wait_until,
    write_collector_config,
)
from tests.harness.nats import PARTITION_STREAM, NatsCluster, run_coro  # noqa: E402

FLEETGEN = ROOT.parent / "shared" / "bench" / "fleetgen.py"


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def rss_mib(pid: int) -> float:
    """Resident set size, MiB."""
    m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else 0.0


def metric(port: int, name: str, contains: str = "") -> float:
    """Sum of the samples of `name` (lines containing `contains`) on a collector's /metrics."""
    _, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if (line.startswith(name + "{") or line.startswith(name + " ")) and contains in line)


def heartbeats_done(port: int) -> float:
    """Heartbeats the collector has handled, whatever the result (accepted, duplicate...)."""
    return metric(port, "posfleet_messages_total", 'kind="heartbeat"')


def idle(collectors: list[Process], partitions: int) -> bool:
    """Every partition owned by one of them, nothing pending in their consumers."""
    return (sum(metric(p.port, "posfleet_cluster_partitions_owned") for p in collectors) == partitions
            and sum(metric(p.port, "posfleet_cluster_consumer_pending") for p in collectors) == 0)


def fleetgen(port: int, terminals: int, count: int, procs: int, seq_start: int) -> dict[str, Any]:
    """../shared/bench/fleetgen.py, QoS 1 burst, against one MQTT port."""
    out = subprocess.run(
        [sys.executable, str(FLEETGEN), "--port", str(port), "-n", str(terminals), "-c", str(count), "-q", "1",
         "-P", str(procs), "--seq-start", str(seq_start), "--json"],
        capture_output=True, text=True, timeout=600, check=True)
    doc: dict[str, Any] = json.loads(out.stdout[out.stdout.index("{"):])
    return doc


def stored(cluster: NatsCluster) -> int:
    """Messages in POSP."""
    return int(cluster.stream_info().state.messages)


async def standin_drain(cluster: NatsCluster, count: int, batch: int) -> float:
    """A bare pull consumer over all of POSP from its first message, AckPolicy.ALL: msg/s for `count`."""
    nc = await cluster.connect()
    try:
        js = nc.jetstream(timeout=30)
        sub = await js.pull_subscribe("posp.>", stream=PARTITION_STREAM, config=ConsumerConfig(
            ack_policy=AckPolicy.ALL, deliver_policy=DeliverPolicy.ALL, max_ack_pending=batch * 20))
        got, start = 0, time.monotonic()
        while got < count:
            msgs = await sub.fetch(batch, timeout=5)
            got += len(msgs)
            await msgs[-1].ack()
        return got / (time.monotonic() - start)
    finally:
        await nc.close()


def collectors_config(workdir: Path, cluster: NatsCluster, registry: Path, i: int, k: int) -> tuple[Path, int]:
    http_port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = write_collector_config(
        workdir, cluster.mqtt_ports[0], http_port,
        ingest={"source": "nats"},
        nats={"servers": cluster.urls, "partitions": cluster.partitions, "instance": f"c{i}", "replicas": 3,
              "ownership": "lease", "shard": f"{i}/{k}", "fetch_batch": 500},
        registry={"path": str(registry), "reload_interval_s": 3600},
        state={"snapshot_path": None, "snapshot_interval_s": 3600, "eval_interval_s": 5},
        thresholds={"default_interval_s": 30},
    )
    return cfg, http_port


def run_collectors(workdir: Path, cluster: NatsCluster, registry: Path, k: int, terminals: int,
                   count: int, procs: int, seq_start: int) -> dict[str, Any]:
    """K collectors: warm-up, stop, preload `count`, restart, drain. Returns the figures."""
    configs = [collectors_config(workdir / f"k{k}-c{i}", cluster, registry, i, k) for i in range(k)]
    procs_: list[Process] = [start_collector(cfg.parent, cfg, port) for cfg, port in configs]
    try:
        wait_until(lambda: idle(procs_, cluster.partitions), 120, "partitions shared out", 0.5)
        done = sum(heartbeats_done(p.port) for p in procs_)
        fleetgen(cluster.mqtt_ports[0], terminals, terminals, procs, seq_start)  # warm-up: every terminal once
        wait_until(lambda: sum(heartbeats_done(p.port) for p in procs_) >= done + terminals
                   and idle(procs_, cluster.partitions), 300, "warm-up applied", 0.5)
        for p in procs_:
            p.stop()
        before = stored(cluster)
        pub = fleetgen(cluster.mqtt_ports[0], terminals, count, procs, seq_start + 1)
        wait_until(lambda: stored(cluster) >= before + count, 300, "the backlog in POSP", 0.2)
        procs_ = [start_collector(cfg.parent, cfg, port) for cfg, port in configs]
        start = time.monotonic()
        cpu0 = [cpu_s(p.proc.pid) for p in procs_]
        # The restarted collectors replay from their state objects' sequence + 1: exactly the backlog. The rate
        # is taken between 5 % and 95 % of it, leaving out the start-up (leases, state objects).
        samples: list[tuple[float, float]] = []

        def drained() -> bool:
            samples.append((time.monotonic(), sum(heartbeats_done(p.port) for p in procs_)))
            return samples[-1][1] >= count

        wait_until(drained, 600, "backlog drained", 0.1)
        elapsed = time.monotonic() - start
        cpu = sum(cpu_s(p.proc.pid) - c for p, c in zip(procs_, cpu0, strict=True))
        t5 = next(t for t, n in samples if n >= 0.05 * count)
        t95 = next(t for t, n in samples if n >= 0.95 * count)
        return {"collectors": k, "heartbeats": count, "drain_s": round(elapsed, 2),
                "first_applied_after_s": round(t5 - start, 2), "msg_per_s": round(0.9 * count / (t95 - t5)),
                "cpu_us_per_msg": round(cpu / count * 1e6, 1),
                "rss_mib": [round(rss_mib(p.proc.pid)) for p in procs_], "publish": pub}
    finally:
        for p in procs_:
            p.stop()


def memory(workdir: Path, cluster: NatsCluster, terminals: int, shards: int) -> dict[str, Any]:
    """`shards` collectors over a registry of `terminals`: RSS of each once the partitions are shared out (each
    materialises only its own terminals), before any heartbeat."""
    registry = workdir / "terminals-memory.csv"
    with registry.open("w") as fh:
        fh.write("terminal_id,merchant_id,acquirer,model,site,region\n")
        for i in range(terminals):
            fh.write(f"T{i:07d},M{i // 20:06d},acq-{i % 4},A920,site{i // 50},r{i % 8}\n")
    configs = [collectors_config(workdir / f"mem-c{i}", cluster, registry, i, shards) for i in range(shards)]
    procs_: list[Process] = []
    try:
        start = time.monotonic()
        procs_ = [start_collector(cfg.parent, cfg, port) for cfg, port in configs]
        wait_until(lambda: idle(procs_, cluster.partitions), 600, "partitions shared out", 1.0)
        held = [metric(p.port, "posfleet_fleet_terminals") for p in procs_]
        return {"terminals": terminals, "shards": shards, "ready_s": round(time.monotonic() - start, 1),
                "rss_mib": [round(rss_mib(p.proc.pid)) for p in procs_], "terminals_held": held}
    finally:
        for p in procs_:
            p.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--terminals", type=int, default=100_000)
    ap.add_argument("--count", type=int, default=300_000, help="heartbeats in each measured backlog")
    ap.add_argument("--procs", type=int, default=2, help="fleetgen connections")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--collectors", default="1,2", help="comma list of collector counts; empty: none")
    ap.add_argument("--memory-terminals", type=int, default=0, help="also: RSS with this many registered")
    ap.add_argument("--memory-shards", type=int, default=4)
    ap.add_argument("--skip-ingest", action="store_true", help="only the memory figure")
    ap.add_argument("--out", default=None, help="JSON result path")
    a = ap.parse_args()

    results: dict[str, Any] = {"terminals": a.terminals, "count": a.count, "procs": a.procs,
                               "partitions": a.partitions}
    with tempfile.TemporaryDirectory(prefix="bench-nats-") as tmp, \
            NatsCluster(Path(tmp) / "nats", partitions=a.partitions) as cluster:
        if a.memory_terminals:
            results["memory"] = memory(Path(tmp), cluster, a.memory_terminals, a.memory_shards)
            print("memory:", json.dumps(results["memory"]), flush=True)
        if a.skip_ingest:
            print(json.dumps(results, indent=1))
            return 0
        pids = [n.proc.proc.pid for n in cluster.nodes if n.proc is not None]
        # 1. the cluster's MQTT ingest: PUBACKed, and stored in POSP (sourced from $MQTT_msgs)
        cpu0 = [cpu_s(p) for p in pids]
        pub = fleetgen(cluster.mqtt_ports[0], a.terminals, a.count, a.procs, 0)
        wait_until(lambda: stored(cluster) >= a.count, 300, "every heartbeat in POSP", 0.1)
        in_stream_s = time.time() - pub["t_first"]
        nats_cpu = sum(cpu_s(p) - c for p, c in zip(pids, cpu0, strict=True))
        info = cluster.stream_info()
        results["cluster"] = {
            "mqtt_accepted_msg_per_s": pub["rate_accepted"], "accept_s": pub["accept_s"],
            "stored_msg_per_s": round(a.count / in_stream_s), "stored_s": round(in_stream_s, 2),
            "nats_cpu_us_per_msg_3_nodes": round(nats_cpu / a.count * 1e6, 1),
            "stream_bytes_per_msg": round(info.state.bytes / max(1, info.state.messages), 1),
            "nats_rss_mib": [round(rss_mib(p)) for p in pids],
        }
        print("cluster:", json.dumps(results["cluster"]), flush=True)
        # 2. the stand-in ingester
        results["standin_msg_per_s"] = round(run_coro(standin_drain(cluster, a.count, 500)))
        print("stand-in nats-py pull consumer:", results["standin_msg_per_s"], "msg/s", flush=True)
        # 3. collectors
        registry = Path(tmp) / "terminals.csv"
        registry.write_text("terminal_id,merchant_id,acquirer,model,site,region\n" + "".join(
            f"T{i:07d},M{i // 20:05d},acq-{i % 4},A920,site{i // 50},r{i % 8}\n" for i in range(a.terminals)))
        results["collectors"] = []
        seq = 10_000_000
        for k in [int(x) for x in a.collectors.split(",") if x]:
            r = run_collectors(Path(tmp), cluster, registry, k, a.terminals, a.count, a.procs, seq)
            seq += 10_000_000
            results["collectors"].append(r)
            print(f"{k} collector(s):", json.dumps({x: y for x, y in r.items() if x != "publish"}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
