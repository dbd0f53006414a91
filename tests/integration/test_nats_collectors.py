"""Partitioned collectors on a real three-node NATS JetStream cluster (tests/harness/nats.py): real `posfleet run`
processes, the simulator's terminals over MQTT to the cluster's gateway, every answer through the collectors' API.

- The partition function is the server's (checked by publishing and reading back the mapped subject).
- Static shards: each terminal shows exactly its fault's condition through the collector that owns it, healthy
  ones nothing, and no collector materialises a terminal of another's partition.
- Leases: two collectors share the partitions; kill -9 of one under load, the other serves its partitions again
  (lease expiry, state object, replay from the last applied sequence + 1); the killed one restarts and gets its
  preferred partitions handed back: no heartbeat lost by seq, no condition on a healthy terminal.
"""

from __future__ import annotations

import asyncio
import random
import signal
import string
import time
from pathlib import Path
from typing import Any

import pytest

import tests.integration.test_influx_history as history
from collector.cluster.partition import partition_of, shard_partitions
from collector.sim.simulator import FAULTS, Simulator, make_fleet
from tests.faults import ConditionWatch, LineSink, lost_and_extra, metric_sample
from tests.harness.core import Process, free_port, http_get, start_collector, terminal_views, wait_until
from tests.harness.core import write_collector_config as _write_config
from tests.harness.nats import FEED_STREAM, PARTITION_STREAM, NatsCluster

pytestmark = pytest.mark.integration

INTERVAL = 0.5


def nats_collector(workdir: Path, cluster: NatsCluster, registry: Path, instance: str,
                   extra: dict[str, Any] | None = None, **nats: Any) -> Process:
    """A `posfleet run` reading the cluster with `ingest.source: nats` (fast thresholds as the other tests)."""
    workdir.mkdir(parents=True, exist_ok=True)
    http_port = free_port()
    config = _write_config(
        workdir, cluster.mqtt_ports[0], http_port,
        ingest={"source": "nats"},
        nats={"servers": cluster.urls, "stream": PARTITION_STREAM, "feed_stream": FEED_STREAM,
              "partitions": cluster.partitions, "instance": instance, "replicas": 3, **nats},
        registry={"path": str(registry), "reload_interval_s": 0.5},
        # Offline after 6 intervals (3 s at the simulator's 0.5 s), not 3: through a three-node cluster on two
        # shared cores a heartbeat can take over 1.5 s (a false `offline` once, with a benchmark running alongside).
        thresholds={"flapping_window_s": 15, "offline_factor": 6, "default_interval_s": 1, "backlog_queue_depth": 5,
                    "backlog_oldest_age_s": 4, "upstream_grace_s": 4, "feed_stale_s": 4, "clock_skew_s": 300},
        **(extra or {}),
    )
    return start_collector(workdir, config, http_port)


def conditions(port: int) -> dict[str, set[str]]:
    """Every terminal this collector holds, with its active conditions."""
    return {tid: {c["condition"] for c in t["conditions"]} for tid, t in terminal_views(port).items()}


async def test_partition_function_is_the_servers(nats_cluster: NatsCluster) -> None:
    """The server's mapping, seen by a core subscriber on the mapped subjects, equals partition_of."""
    rng = random.Random(12)
    ids = ["".join(rng.choices(string.ascii_letters + string.digits + "-_", k=rng.randint(1, 24))) for _ in range(60)]
    nc = await nats_cluster.connect()
    try:
        sub = await nc.subscribe("posp.>")
        for tid in ids:
            await nc.publish(f"pos.v1.{tid}.heartbeat", b"{}")
        for tid in ids:
            msg = await sub.next_msg(timeout=10)
            assert msg.subject == f"posp.{partition_of(tid, nats_cluster.partitions)}.{tid}.heartbeat", tid
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
                # The acquirer feed is read by every collector; its staleness is exported once, by the fleet leader
                # (the owner of partition 0: c0), collector/cluster/fleetwide.py.
                if i == 0:
                    assert 'posfleet_acquirer_feed_stale{acquirer="acq-m"} 1.0' in text, f"c{i}"
                    assert 'posfleet_acquirer_feed_stale{acquirer="acq-a"} 0.0' in text, f"c{i}"
                else:
                    assert "posfleet_acquirer_feed_stale{" not in text, f"c{i}"
                # ... and applied by each to its own terminals; the others' records are `elsewhere`.
                assert metric_sample(c.port, "posfleet_feed_records_total", result="matched") > 0, f"c{i}"
                assert metric_sample(c.port, "posfleet_feed_records_total", result="elsewhere") > 0, f"c{i}"
    finally:
        for c in collectors:
            c.stop()
    for c in collectors:
        assert "Traceback" not in c.log_text()


def owners(collectors: list[Process]) -> dict[str, int]:
    """terminal -> index of the collector whose API holds it (a collector that does not answer holds nothing)."""
    out: dict[str, int] = {}
    for i, c in enumerate(collectors):
        try:
            views = terminal_views(c.port)
        except (OSError, AssertionError):
            continue
        for tid in views:
            out[tid] = i
    return out


async def test_kill_9_of_a_collector_taken_over_then_handed_back_nothing_lost(
    tmp_path: Path, nats_cluster: NatsCluster
) -> None:
    sink = LineSink()
    interval = 1.0
    specs = make_fleet(80)  # 80 heartbeats/s over 16 partitions
    sim = Simulator(f"mqtt://127.0.0.1:{nats_cluster.mqtt_ports[0]}", specs, interval, receipts=False,
                    dedicated=False)
    registry = tmp_path / "terminals.csv"
    sim.write_registry(registry)
    n = nats_cluster.partitions
    collectors: list[Process] = []
    extras = []
    for i in (0, 1):
        extra = history.influx_overrides(tmp_path / f"c{i}", sink.url)
        extra["state"]["snapshot_path"] = None
        extras.append(extra)
        collectors.append(nats_collector(tmp_path / f"c{i}", nats_cluster, registry, f"c{i}", extra,
                                         ownership="lease", shard=f"{i}/2", lease_ttl_s=6))
    extra1 = extras[1]
    tids = [s.tid for s in specs]
    try:
        async with sim:
            # Shared out: each its preferred half, every terminal heard by exactly its owner.
            def settled() -> bool:
                held = owners(collectors)
                return (all(metric_sample(c.port, "posfleet_cluster_partitions_owned") == n / 2 for c in collectors)
                        and all(held.get(t) == (0 if partition_of(t, n) % 2 == 0 else 1) for t in tids)
                        and all(len(sink.heartbeat_seqs().get(t, ())) >= 2 for t in tids))

            await asyncio.to_thread(wait_until, settled, 60, "partitions shared out, every terminal heard", 0.5)
            with ConditionWatch(collectors[0].port, tids) as watch:
                collectors[1].stop(signal.SIGKILL)
                killed_at = time.time()

                def taken_over() -> bool:
                    return metric_sample(collectors[0].port, "posfleet_cluster_partitions_owned") == n

                # The bound: partitions served again within 15 s (lease TTL 6 s + a round + the replay).
                await asyncio.to_thread(wait_until, taken_over, 15, "c0 owns every partition", 0.2)
                served_after = time.time() - killed_at
                await asyncio.to_thread(
                    wait_until,
                    lambda: all(sum(1 for _, ts in sim.sent_seqs[t] if ts > killed_at + served_after) >= 2
                                for t in tids), 30, "two more heartbeats from every terminal", 0.25)
            await asyncio.to_thread(wait_until, lambda: set(owners(collectors[:1])) == set(tids), 10,
                                    "c0 holds every terminal")
            # c1 comes back: c0 hands its preferred partitions back (state written, lease deleted), c1 replays
            # them from there; still nothing lost, nothing raised.
            with ConditionWatch(collectors[0].port, tids) as watch0, ConditionWatch(collectors[1].port, tids) as watch1:
                collectors[1] = await asyncio.to_thread(
                    lambda: nats_collector(tmp_path / "c1", nats_cluster, registry, "c1", extra1, ownership="lease",
                                           shard="1/2", lease_ttl_s=6))
                await asyncio.to_thread(wait_until, settled, 60, "partitions shared out again", 0.5)
                back_at = time.time()
                await asyncio.to_thread(
                    wait_until, lambda: all(sum(1 for _, ts in sim.sent_seqs[t] if ts > back_at) >= 2 for t in tids),
                    30, "two more heartbeats from every terminal after the hand-back", 0.25)
            handed_back = metric_sample(collectors[1].port, "posfleet_cluster_takeovers_total", state="snapshot")
        sent_at_end = {t: sim.sent_seqs[t][-1][0] for t in tids}
        await asyncio.to_thread(
            wait_until, lambda: all(sent_at_end[t] in sink.heartbeat_seqs().get(t, {}) for t in tids), 30,
            "the last heartbeat of every terminal applied", 0.25)
        lost, extra = lost_and_extra({t: sim.sent_seqs[t] for t in tids}, sink.heartbeat_seqs())
        replayed = sum(len(v) for v in extra.values())
        print(f"\nkill -9 of one of two collectors: partitions served again by the other after {served_after:.1f} s; "
              f"{sim.heartbeats_sent} heartbeats sent, lost {sum(len(v) for v in lost.values())}, "
              f"written twice (replayed after the takeover and the hand-back) {replayed}")
        assert not lost, f"heartbeats never applied: {lost}"
        assert not watch.seen, f"a healthy terminal raised something during the takeover: {watch.seen}"
        assert not watch0.seen and not watch1.seen, f"raised during the hand-back: {watch0.seen} {watch1.seen}"
        assert handed_back == n / 2, "the handed-back partitions did not come with their state"
        takeovers = metric_sample(collectors[0].port, "posfleet_cluster_takeovers_total", state="snapshot")
        assert takeovers >= n / 2, "the dead collector's partitions were not restored from their state objects"
    finally:
        for c in collectors:
            c.stop()
        sink.close()
    assert "Traceback" not in collectors[0].log_text()
