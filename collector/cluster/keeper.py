"""Partition leases in NATS KV, partition state in the NATS object store, and the takeover that uses both.

Every round (a third of the lease TTL) the keeper
1. renews its member key `m.<instance>` and each of its leases `p.<N>` (update with the last revision: only the
   holder can renew; a failed renewal means someone else holds it now, and the partition is dropped at once,
   without writing its state, which belongs to the new owner);
2. reads every lease and member and asks `ownership.plan` what to take and release;
3. takes a partition: create its lease (fails if anybody holds it), load its state object (the snapshot encoding
   of its terminals + the last applied stream sequence), adopt the terminals into the Fleet (a full offline
   period from now, no false offline storm), then (re)create its consumer from that sequence + 1;
4. releases one: stop reading, write its state, drop its terminals, delete the lease.
A collector that dies stops renewing: its leases expire with the bucket's TTL and the others take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore
from prometheus_client import CollectorRegistry, Counter, Gauge

from collector.cluster.ownership import plan
from collector.cluster.partition import parse_shard, partition_of, shard_partitions
from collector.config import NatsConfig
from collector.fleet.snapshot import SnapshotError, decode_terminals, encode_terminals
from collector.fleet.state import Fleet, Terminal

__all__ = ["ClusterMetrics", "Keeper", "PartitionReader", "decode_state", "encode_state"]

log = logging.getLogger(__name__)

_SEQ = struct.Struct("<Q")


def encode_state(applied_seq: int, terminals: list[Terminal]) -> bytes:
    """A partition's state object: the last applied stream sequence, then the snapshot encoding of its terminals."""
    return _SEQ.pack(applied_seq) + encode_terminals(terminals)


def decode_state(data: bytes) -> tuple[int, list[Terminal]]:
    """(last applied stream sequence, terminals) of a state object; SnapshotError when it is damaged."""
    if len(data) < _SEQ.size:
        raise SnapshotError(f"partition state too short ({len(data)} bytes)")
    return _SEQ.unpack_from(data)[0], decode_terminals(data[_SEQ.size:])


class PartitionReader(Protocol):
    """What the keeper needs from the ingest (collector.ingest.nats.NatsIngest has it)."""

    applied: dict[int, int]
    pending: dict[int, int]

    async def start_partition(self, p: int, after_seq: int | None, *, keep_position: bool = False) -> None:
        """Start reading partition p after stream sequence `after_seq`."""
        ...

    async def stop_partition(self, p: int) -> None:
        """Stop reading partition p."""
        ...

    def forget(self, p: int) -> None:
        """Drop partition p's progress."""
        ...


class ClusterMetrics:
    """The keeper's self-metrics, on the collector's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.owned = Gauge("posfleet_cluster_partitions_owned", "Partitions this collector owns", registry=registry)
        self.lag = Gauge("posfleet_cluster_consumer_pending", "Messages of an owned partition not yet fetched",
                         ["partition"], registry=registry)
        self.renew_failures = Counter("posfleet_cluster_lease_renew_failures", "Lease renewals that failed",
                                      registry=registry)
        self.takeovers = Counter("posfleet_cluster_takeovers", "Partitions taken (from a dead owner, or free)",
                                 ["state"], registry=registry)
        self.lost = Counter("posfleet_cluster_leases_lost", "Partitions dropped because their lease was lost",
                            registry=registry)
        for state in ("snapshot", "none", "corrupt"):
            self.takeovers.labels(state)


class Keeper:
    """Holds this collector's partitions: leases, state objects, adoption and release."""

    def __init__(self, js: JetStreamContext, cfg: NatsConfig, instance: str, fleet: Fleet, reader: PartitionReader,
                 owned: set[int], metrics: ClusterMetrics, monotonic: Callable[[], float] = time.monotonic,
                 clock: Callable[[], float] = time.time) -> None:
        self.js, self.cfg, self.instance, self.fleet, self.reader = js, cfg, instance, fleet, reader
        self.owned = owned  # shared with the Fleet's `materialise` (the app's set)
        self.metrics = metrics
        self.monotonic, self.clock = monotonic, clock
        self.preferred = shard_partitions(parse_shard(cfg.shard), cfg.partitions) if cfg.shard else frozenset()
        self.revisions: dict[int, int] = {}  # my leases -> their last revision
        self.renewed: dict[int, float] = {}  # my leases -> monotonic time of the last successful renewal
        self.kv: KeyValue | None = None
        self.obs: ObjectStore | None = None
        self.round_s = cfg.lease_ttl_s / 3
        self.connected = False

    def belongs(self, p: int) -> Callable[[str], bool]:
        """The predicate of partition p's terminal ids."""
        n = self.cfg.partitions
        return lambda tid: partition_of(tid, n) == p

    async def setup(self) -> None:
        """Open (creating when missing) the lease bucket and the state object store."""
        try:
            self.kv = await self.js.key_value(self.cfg.lease_bucket)
        except nats.js.errors.BucketNotFoundError:
            self.kv = await self.js.create_key_value(KeyValueConfig(
                bucket=self.cfg.lease_bucket, ttl=self.cfg.lease_ttl_s, history=1, replicas=self.cfg.replicas,
                storage=StorageType.FILE))
        try:
            self.obs = await self.js.object_store(self.cfg.state_bucket)
        except nats.js.errors.BucketNotFoundError:
            self.obs = await self.js.create_object_store(self.cfg.state_bucket, replicas=self.cfg.replicas,
                                                         storage=StorageType.FILE)

    # ---- the round -------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Rounds for ever (supervised by the app); errors of one round are logged and the next one tries again."""
        if self.kv is None:
            await self.setup()
        while True:
            try:
                await self.round()
                self.connected = True
            except (nats.errors.Error, OSError, TimeoutError) as err:
                self.connected = False
                log.warning("partition round failed: %s", err or type(err).__name__)
                await self._drop_expired()
            self.metrics.owned.set(len(self.owned))
            for p in self.owned:
                self.metrics.lag.labels(str(p)).set(self.reader.pending.get(p, 0))
            await asyncio.sleep(self.round_s)

    async def round(self) -> None:
        """One round: renew, read, plan, act."""
        assert self.kv is not None
        kv = self.kv
        await kv.put(f"m.{self.instance}", json.dumps({"shard": self.cfg.shard}).encode())
        for p in sorted(self.owned):
            try:
                self.revisions[p] = await kv.update(f"p.{p}", self.instance.encode(), last=self.revisions[p])
                self.renewed[p] = self.monotonic()
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                self.metrics.renew_failures.inc()
                self.metrics.lost.inc()
                log.error("lease of partition %d lost (expired and taken, or deleted): dropping it", p)
                await self._drop(p)
        leases, members = await self._read()
        decision = plan(self.instance, self.cfg.partitions, leases, members)
        for p in decision.release:
            await self.release(p)
        for p in decision.take:
            await self.take(p)

    async def _read(self) -> tuple[dict[int, str], dict[str, frozenset[int]]]:
        assert self.kv is not None
        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        leases: dict[int, str] = {}
        members: dict[str, frozenset[int]] = {}
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired or deleted meanwhile
            value = (entry.value or b"").decode(errors="replace")
            if key.startswith("p.") and key[2:].isdigit():
                leases[int(key[2:])] = value
            elif key.startswith("m."):
                try:
                    shard = json.loads(value).get("shard")
                    prefs = shard_partitions(parse_shard(shard), self.cfg.partitions) if shard else frozenset()
                except (ValueError, AttributeError):
                    prefs = frozenset()
                members[key[2:]] = prefs
        return leases, members

    async def _drop_expired(self) -> None:
        """While NATS cannot be reached, a lease not renewed within its TTL may be another's now: stop using it."""
        now = self.monotonic()
        for p in [p for p, at in self.renewed.items() if now - at > self.cfg.lease_ttl_s]:
            log.error("lease of partition %d not renewed for %.1f s: dropping it", p, now - self.renewed[p])
            self.metrics.lost.inc()
            await self._drop(p)

    async def _drop(self, p: int) -> None:
        await self.reader.stop_partition(p)
        self.fleet.release(self.belongs(p))
        self.owned.discard(p)
        self.reader.forget(p)
        self.revisions.pop(p, None)
        self.renewed.pop(p, None)
        with contextlib.suppress(KeyError):
            self.metrics.lag.remove(str(p))

    # ---- take and release ------------------------------------------------------------------------------------
    async def take(self, p: int) -> bool:
        """Acquire partition p's lease, adopt its state and start reading it; False when someone was first."""
        assert self.kv is not None and self.obs is not None
        try:
            rev = await self.kv.create(f"p.{p}", self.instance.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        self.revisions[p], self.renewed[p] = rev, self.monotonic()
        try:
            after, terminals, state = await self._load(p)
            self.owned.add(p)
            adopted = self.fleet.adopt(terminals, self.belongs(p), self.clock())
            await self.reader.start_partition(p, after)
        except BaseException:
            # Half taken (NATS went away meanwhile): give it back now rather than hold it unread until it expires.
            await self._drop(p)
            with contextlib.suppress(Exception):
                await self.kv.delete(f"p.{p}", last=rev)
            raise
        self.metrics.takeovers.labels(state).inc()
        log.info("took partition %d: %d terminals (%s), reading from stream sequence %s", p, adopted, state,
                 after + 1 if after is not None else "the last message per subject")
        return True

    async def _load(self, p: int) -> tuple[int | None, list[Terminal], str]:
        """Partition p's state object: (last applied sequence, terminals, how it went)."""
        assert self.obs is not None
        try:
            obj = await self.obs.get(f"p{p}")
        except nats.js.errors.ObjectNotFoundError:
            return None, [], "none"
        try:
            after, terminals = decode_state(obj.data or b"")
        except SnapshotError as err:
            log.error("partition %d: %s; its terminals start empty (a full offline period each)", p, err)
            return None, [], "corrupt"
        return after, terminals, "snapshot"

    async def save(self, p: int) -> bool:
        """Write partition p's state object (its terminals and the last applied sequence)."""
        assert self.obs is not None
        applied = self.reader.applied.get(p)
        if applied is None:
            return False  # nothing applied yet and nothing restored: no state worth a write
        renewed = self.renewed.get(p)
        if renewed is None or self.monotonic() - renewed > self.cfg.lease_ttl_s:
            return False  # the lease may have passed to another collector: its state is theirs to write
        belongs = self.belongs(p)
        # Encoded synchronously: no message is applied between reading `applied` and encoding the terminals.
        data = encode_state(applied, [t for tid, t in self.fleet.terminals.items() if belongs(tid)])
        await self.obs.put(f"p{p}", data)
        return True

    async def save_all(self) -> int:
        """Write the state of every owned partition; returns how many were written."""
        n = 0
        for p in sorted(self.owned):
            try:
                n += await self.save(p)
            except (nats.errors.Error, OSError, TimeoutError) as err:
                log.error("cannot write the state of partition %d: %s", p, err or type(err).__name__)
        return n

    async def release(self, p: int) -> None:
        """Hand partition p over cleanly: stop reading, write its state, drop its terminals, delete the lease."""
        assert self.kv is not None
        await self.reader.stop_partition(p)
        try:
            await self.save(p)
        except (nats.errors.Error, OSError, TimeoutError) as err:
            log.error("cannot write the state of partition %d on release: %s", p, err or type(err).__name__)
        rev = self.revisions.get(p)
        await self._drop(p)
        if rev is not None:
            try:
                await self.kv.delete(f"p.{p}", last=rev)
            except nats.errors.Error as err:
                log.warning("lease of partition %d not deleted (%s): it expires on its own", p, err)
        log.info("released partition %d", p)

    async def close(self) -> None:
        """Clean shutdown: release every partition (state written) and leave the members."""
        for p in sorted(self.owned):
            try:
                await self.release(p)
            except (nats.errors.Error, OSError, TimeoutError) as err:
                log.error("releasing partition %d failed: %s", p, err or type(err).__name__)
        if self.kv is not None:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self.kv.delete(f"m.{self.instance}")
