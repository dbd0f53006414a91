"""Partitioned collectors on a real three-node NATS JetStream cluster (tests/harness/nats.py): real `posfleet run`
processes, the simulator's terminals over MQTT to the cluster's gateway, every answer through the collectors' API.

- The partition function is the server's (checked by publishing and reading back the mapped subject).
- Static shards: each terminal shows exactly its fault's condition through the collector that owns it, healthy
  ones nothing, and no collector materialises a terminal of another's partition.
"""

from __future__ import annotations

import asyncio
import random
import string
from pathlib import Path
from typing import Any

import pytest

from collector.cluster.partition import partition_of, shard_partitions
from collector.sim.simulator import FAULTS, Simulator, make_fleet
from tests.harness.core import Process, free_port, http_get, start_collector, terminal_views, wait_until
from tests.harness.core import write_collector_config as _write_config
from tests.harness.nats import FEED_STREAM, PARTITION_STREAM, NatsCluster

pytestmark = pytest.mark.integration

INTERVAL = 0.5


def nats_collector(workdir: Path, cluster: NatsCluster, registry: Path, instance: str, **nats: Any) -> Process:
    """A `posfleet run` reading the cluster with `ingest.source: nats` (fast thresholds as the other tests)."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    config = _write_config(
        workdir, cluster.mqtt_ports[0], http_port,
        ingest={"source": "nats"},
        nats={"servers": cluster.urls, "stream": PARTITION_STREAM, "feed_stream": FEED_STREAM,
              "partitions": cluster.partitions, "instance": instance, "replicas": 3, **nats},
        registry={"path": str(registry), "reload_interval_s": 0.5},
        thresholds={"flapping_window_s": 15, "offline_factor": 3, "default_interval_s": 1, "backlog_queue_depth": 5,
                    "backlog_oldest_age_s": 4, "upstream_grace_s": 4, "feed_stale_s": 4, "clock_skew_s": 300},
    )
    return start_collector(workdir, config, http_port)


def conditions(port: int) -> dict[str, set[str]]:
    """Every terminal this collector holds, with its active conditions."""
    return {tid: {c["condition"] for c in t["conditions"]} for tid, t in terminal_views(port).items()}


async def test_partition_function_is_the_servers(nats_cluster: NatsCluster) -> None:
    rng = random.Random(12)
    ids = ["".join(rng.choices(string.ascii_letters + string.digits + "-_", k=rng.randint(1, 24))) for _ in range(60)]
    nc = await nats_cluster.connect()
    try:
        js = nc.jetstream(timeout=30)
        for tid in ids:
            ack = await js.publish(f"pos.v1.{tid}.heartbeat", b"{}")
            assert ack.stream == PARTITION_STREAM
            stored = await js.get_msg(PARTITION_STREAM, ack.seq)
            assert stored.subject == f"posp.{partition_of(tid, nats_cluster.partitions)}.{tid}.heartbeat", tid
    finally:
        await nc.close()


async def test_static_shards_every_fault_on_its_owner_only(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    faults = list(FAULTS)
    specs = make_fleet(2 * len(faults) + 10, ("acq-a", "acq-b"))
    specs += make_fleet(3, ("acq-m",), prefix="MT")
    assignment = {specs[2 * i + k].tid: f for i, f in enumerate(faults) for k in (0, 1)}
    healthy = [s.tid for s in specs[2 * len(faults):]]
    sim = Simulator(f"mqtt://127.0.0.1:{nats_cluster.mqtt_ports[0]}", specs, INTERVAL, receipts=False)
    for tid, fault in assignment.items():
        if fault == "unregistered":
            sim.set_fault(tid, fault)
    registry = tmp_path / "terminals.csv"
    sim.write_registry(registry)
    n = nats_cluster.partitions
    shards = {port_i: shard_partitions((port_i, 2), n) for port_i in (0, 1)}
    collectors = [nats_collector(tmp_path / f"c{i}", nats_cluster, registry, f"c{i}", ownership="static",
                                 shard=f"{i}/2") for i in (0, 1)]
    owner = {s.tid: collectors[next(i for i, ps in shards.items() if partition_of(s.tid, n) in ps)] for s in specs}
    try:
        async with sim:
            def all_heard() -> bool:
                views = [terminal_views(c.port) for c in collectors]
                return all(views[collectors.index(owner[s.tid])].get(s.tid, {}).get("last_heartbeat_received")
                           for s in specs)

            await asyncio.to_thread(wait_until, all_heard, 40, "every terminal heard by its owner")
            for i, c in enumerate(collectors):
                held = set(conditions(c.port))
                assert all(partition_of(t, n) in shards[i] for t in held), f"c{i} holds another shard's terminal"
                assert all(not v for v in conditions(c.port).values()), f"c{i}: a healthy fleet shows problems"
            for tid, fault in assignment.items():
                sim.set_fault(tid, fault)
            sim.set_fault("acq-m", "host_maintenance")
            expected = {tid: ({FAULTS[f]} if FAULTS[f] else set()) for tid, f in assignment.items()}
            expected.update({tid: set() for tid in healthy})

            def seen() -> dict[str, set[str] | None]:
                views = [conditions(c.port) for c in collectors]
                return {tid: views[collectors.index(owner[tid])].get(tid) for tid in expected}

            try:
                await asyncio.to_thread(wait_until, lambda: seen() == expected, 60, "every fault named", 0.25)
            except TimeoutError:
                got = seen()
                diff = {t: (got.get(t), e) for t, e in expected.items() if got.get(t) != e}
                raise AssertionError(f"got != expected for {diff}") from None
            for i, c in enumerate(collectors):
                held = conditions(c.port)
                assert all(partition_of(t, n) in shards[i] for t in held), f"c{i} holds another shard's terminal"
                _, body = http_get(f"http://127.0.0.1:{c.port}/metrics")
                text = body.decode()
                # The acquirer feed is read by every collector.
                assert 'posfleet_acquirer_feed_stale{acquirer="acq-m"} 1.0' in text, f"c{i}"
                assert 'posfleet_acquirer_feed_stale{acquirer="acq-a"} 0.0' in text, f"c{i}"
    finally:
        for c in collectors:
            c.stop()
    for c in collectors:
        assert "Traceback" not in c.log_text()
