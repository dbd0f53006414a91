"""Partition leases in NATS KV, partition state in the NATS object store, and the takeover that uses both.

Every third of the lease TTL, in a task of its own (slow takes must never hold renewals past the TTL), the keeper
1. renews each of its leases `p.<N>` at once (update with the last revision: only the holder can renew), then its
   member key `m.<instance>`. A lease not renewed within its TTL (KV unreachable) is dropped: another collector
   may hold it by now. A renewal refused because the lease expired is taken again if it is still free and its
   consumer is still ours; otherwise someone else holds it, and the partition is dropped at once, without
   writing its state, which belongs to the new owner. State objects are written only within a TTL of a renewal;
and every round it
2. reads every lease and member and asks `ownership.plan` what to take and release;
3. takes a partition: create its lease (fails if anybody holds it), load its state object (the snapshot encoding
   of its terminals + the last applied stream sequence), adopt the terminals into the Fleet (a full offline
   period from now, no false offline storm), then (re)create its consumer from that sequence + 1;
4. releases: stop reading, write their state, drop their terminals, delete the leases.
Every request is bounded (a third of the TTL); takes and releases are batched (one recount of the fleet).
A collector that dies stops renewing: its leases expire with the bucket's TTL and the others take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import nats.errors
import nats.js.errors
from nats.aio.client import Client
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

    pending: dict[int, int]
    stolen: set[int]  # partitions whose consumer another collector recreated

    async def start_partition(self, p: int, after_seq: int | None, *, keep_position: bool = False) -> None:
        """Start reading partition p after stream sequence `after_seq`."""
        ...

    async def stop_partition(self, p: int) -> None:
        """Stop reading partition p."""
        ...

    def forget(self, p: int) -> None:
        """Drop partition p's progress."""
        ...

    def position(self, p: int) -> int | None:
        """The stream sequence up to which partition p is applied."""
        ...

    async def consumer_unchanged(self, p: int) -> bool:
        """Whether partition p's consumer is the one this collector started reading."""
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

    def __init__(self, nc: Client, cfg: NatsConfig, instance: str, fleet: Fleet, reader: PartitionReader,
                 owned: set[int], metrics: ClusterMetrics, monotonic: Callable[[], float] = time.monotonic,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.instance, self.fleet, self.reader = cfg, instance, fleet, reader
        # KV and object store requests wait at most a round: a request lost with a dying node must not hold the
        # round (and the renewals) for the whole API timeout.
        self.js: JetStreamContext = nc.jetstream(timeout=max(1.0, cfg.lease_ttl_s / 3))
        self.owned = owned  # shared with the Fleet's `materialise` (the app's set)
        self.metrics = metrics
        self.monotonic, self.clock = monotonic, clock
        self.preferred = shard_partitions(parse_shard(cfg.shard), cfg.partitions) if cfg.shard else frozenset()
        self.revisions: dict[int, int] = {}  # my leases -> their last revision
        self.lost_leases: set[int] = set()  # renewals refused: somebody else holds them now (dropped next round)
        self.renewed: dict[int, float] = {}  # my leases -> monotonic time of the last successful renewal
        self.kv: KeyValue | None = None
        self.obs: ObjectStore | None = None
        self.round_s = cfg.lease_ttl_s / 3
        self._part: dict[str, int] = {}
        self.connected = False

    def partition(self, tid: str) -> int:
        """The partition of a terminal id, cached: a snapshot round groups every held terminal by partition."""
        p = self._part.get(tid)
        if p is None:
            p = self._part[tid] = partition_of(tid, self.cfg.partitions)
        return p

    def members_of(self, ps: Iterable[int]) -> Callable[[str], bool]:
        """The predicate of the terminal ids of partitions `ps`."""
        wanted, part = frozenset(ps), self.partition
        return lambda tid: part(tid) in wanted

    def _group(self, ps: Iterable[int]) -> dict[int, list[Terminal]]:
        """The held terminals of partitions `ps`, by partition, in one pass over the fleet."""
        groups: dict[int, list[Terminal]] = {p: [] for p in ps}
        part = self.partition
        for tid, t in self.fleet.terminals.items():
            group = groups.get(part(tid))
            if group is not None:
                group.append(t)
        return groups

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
        """Renewals in a task of their own (slow takes or releases must never hold them past the TTL), and rounds
        of read, plan, act for ever (supervised by the app); errors of one round are logged, the next tries again."""
        if self.kv is None:
            await self.setup()
        renewer = asyncio.create_task(self._renew_loop(), name="lease-renewals")
        try:
            while True:
                if renewer.done():
                    renewer.result()  # a bug in the renewals ends the task (the supervisor restarts it, loudly)
                try:
                    # Bounded: a round stuck on a request lost with a dying node must not stop it for good.
                    await asyncio.wait_for(self.round(), 3 * self.cfg.lease_ttl_s)
                except (nats.errors.Error, OSError, TimeoutError) as err:
                    log.warning("partition round failed: %s", err or type(err).__name__)
                await self._drop_expired()
                self.metrics.owned.set(len(self.owned))
                for p in self.owned:
                    self.metrics.lag.labels(str(p)).set(self.reader.pending.get(p, 0))
                await asyncio.sleep(self.round_s)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer

    async def _renew_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.renew(), 2 * self.round_s)
                self.connected = True
            except (nats.errors.Error, OSError, TimeoutError) as err:
                self.connected = False
                log.warning("lease renewal failed: %s", err or type(err).__name__)
            await asyncio.sleep(self.round_s)

    async def renew(self) -> None:
        """Renew every held lease at once, then the member key. A lease refused (expired) is reclaimed when still
        free and its consumer still ours, else marked lost; the next round drops it."""
        assert self.kv is not None
        kv = self.kv
        mine = sorted(self.revisions)
        results = await asyncio.gather(
            *(kv.update(f"p.{p}", self.instance.encode(), last=self.revisions[p]) for p in mine),
            return_exceptions=True)
        for p, result in zip(mine, results, strict=True):
            if p not in self.revisions:
                continue  # released meanwhile
            if isinstance(result, int):
                self.revisions[p], self.renewed[p] = result, self.monotonic()
                continue
            self.metrics.renew_failures.inc()
            if isinstance(result, (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError)):
                if not await self._reclaim(p):
                    self.lost_leases.add(p)
            elif isinstance(result, Exception):
                log.warning("lease of partition %d not renewed: %s", p, result or type(result).__name__)
            else:
                raise result
        await kv.put(f"m.{self.instance}", json.dumps({"shard": self.cfg.shard}).encode())

    async def round(self) -> None:
        """One round: drop what is no longer ours, read every lease and member, plan, act."""
        stolen = sorted(self.owned & self.reader.stolen)
        if stolen:  # another collector recreated their consumers: it owns them now
            self.metrics.lost.inc(len(stolen))
            log.error("partitions %s were taken over by another collector: dropping them", stolen)
            await self._drop(stolen)
        lost = sorted(self.lost_leases & self.owned)
        self.lost_leases.clear()
        if lost:
            self.metrics.lost.inc(len(lost))
            log.error("leases of partitions %s lost (expired and taken, or deleted): dropping them", lost)
            await self._drop(lost)
        leases, members = await self._read()
        members[self.instance] = self.preferred  # alive and with these preferences, whether KV shows it yet or not
        decision = plan(self.instance, self.cfg.partitions, leases, members)
        if decision.release:
            await self.release(decision.release)
        if decision.take:
            await self.take(decision.take)

    async def _read(self) -> tuple[dict[int, str], dict[str, frozenset[int]]]:
        """Every lease and member: the bucket's subjects in one request, then their values concurrently (each
        request bounded by the keeper's timeout; kv.keys() builds a consumer per call and can wait much longer)."""
        assert self.kv is not None
        kv, prefix = self.kv, f"$KV.{self.cfg.lease_bucket}."
        info = await self.js.stream_info(f"KV_{self.cfg.lease_bucket}", subjects_filter=f"{prefix}>")
        keys = [subject[len(prefix):] for subject in (info.state.subjects or {})]
        entries = await asyncio.gather(*(kv.get(key) for key in keys), return_exceptions=True)
        leases: dict[int, str] = {}
        members: dict[str, frozenset[int]] = {}
        for key, entry in zip(keys, entries, strict=True):
            if isinstance(entry, nats.js.errors.NotFoundError):
                continue  # deleted (released) or expired meanwhile
            if isinstance(entry, BaseException):
                raise entry
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
        """A lease not renewed within its TTL may be another collector's by now: stop using it (its next owner
        replays it from its state object, so nothing is lost, only read twice)."""
        now = self.monotonic()
        expired = sorted(p for p, at in self.renewed.items() if now - at > self.cfg.lease_ttl_s)
        if expired:
            self.metrics.lost.inc(len(expired))
            log.error("leases of partitions %s not renewed for a TTL (%.0f s): dropping them", expired,
                      self.cfg.lease_ttl_s)
            await self._drop(expired)

    async def _reclaim(self, p: int) -> bool:
        """Partition p's lease expired without being renewed (KV was unreachable longer than the TTL): take it
        again if nobody else did and nobody recreated its consumer meanwhile; our state is then still the newest."""
        assert self.kv is not None
        try:
            rev = await self.kv.create(f"p.{p}", self.instance.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            return False  # somebody holds it now
        if not await self.reader.consumer_unchanged(p):
            # Taken and released by another collector meanwhile: its state object is newer than ours. Let go; the
            # next round takes it properly (state object, replay).
            with contextlib.suppress(Exception):
                await self.kv.delete(f"p.{p}", last=rev)
            return False
        self.revisions[p], self.renewed[p] = rev, self.monotonic()
        log.warning("lease of partition %d expired while NATS KV could not be reached; nobody took it: kept", p)
        return True

    async def _drop(self, ps: Sequence[int]) -> None:
        """Stop reading partitions `ps` and forget their terminals (one recount of the fleet for all of them)."""
        for p in ps:
            await self.reader.stop_partition(p)
        for t in self.fleet.release(self.members_of(ps)):
            self._part.pop(t.tid, None)
        for p in ps:
            self.owned.discard(p)
            self.reader.forget(p)
            self.revisions.pop(p, None)
            self.renewed.pop(p, None)
            with contextlib.suppress(KeyError):
                self.metrics.lag.remove(str(p))

    # ---- take and release ------------------------------------------------------------------------------------
    async def take(self, ps: Sequence[int]) -> list[int]:
        """Acquire the leases of partitions `ps` (those nobody was first to), adopt their state (one recount for
        all of them) and start reading them; returns the partitions taken."""
        assert self.kv is not None
        kv = self.kv
        created = await asyncio.gather(*(kv.create(f"p.{p}", self.instance.encode()) for p in ps),
                                       return_exceptions=True)
        got: list[int] = []
        for p, result in zip(ps, created, strict=True):
            if isinstance(result, int):
                self.revisions[p], self.renewed[p] = result, self.monotonic()
                got.append(p)
            elif isinstance(result, nats.js.errors.KeyWrongLastSequenceError):
                continue  # somebody was first
            elif isinstance(result, Exception):
                log.warning("lease of partition %d not created: %s", p, result or type(result).__name__)
            else:
                raise result
        if not got:
            return got
        try:
            states = await asyncio.gather(*(self._load(p) for p in got))
            loaded = dict(zip(got, states, strict=True))
            self.owned.update(got)
            restored = [t for _after, terminals, _how in states for t in terminals]
            adopted = self.fleet.adopt(restored, self.members_of(got), self.clock())
            # The renewal task keeps these leases alive meanwhile, however long starting takes on a busy host.
            await asyncio.gather(*(self.reader.start_partition(p, loaded[p][0]) for p in got))
        except BaseException:
            # Half taken (NATS went away meanwhile): give them back now rather than hold them unread until expiry.
            held = {p: self.revisions[p] for p in got if p in self.revisions}
            await self._drop(got)
            for p, last in held.items():
                with contextlib.suppress(Exception):
                    await kv.delete(f"p.{p}", last=last)
            raise
        for p in got:
            after, _terminals, how = loaded[p]
            self.metrics.takeovers.labels(how).inc()
            log.info("took partition %d (state: %s), reading from stream sequence %s", p, how,
                     after + 1 if after is not None else "the last message of every subject")
        log.info("adopted %d terminals of partitions %s", adopted, got)
        return got

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

    async def _save(self, p: int, terminals: list[Terminal]) -> bool:
        """Write partition p's state object from its terminals (grouped by the caller in the same loop step)."""
        assert self.obs is not None
        applied = self.reader.position(p)
        if applied is None:
            return False  # nothing read yet and nothing restored: no state worth a write
        renewed = self.renewed.get(p)
        if renewed is None or self.monotonic() - renewed > self.cfg.lease_ttl_s:
            return False  # the lease may have passed to another collector: its state is theirs to write
        await self.obs.put(f"p{p}", encode_state(applied, terminals))
        return True

    async def save_all(self) -> int:
        """Write the state of every owned partition; returns how many were written."""
        # Encoded from one synchronous pass: no message is applied between reading a partition's last applied
        # sequence and encoding its terminals (encode_state copies them out before the first await).
        groups = self._group(self.owned)
        states = {p: (self.reader.position(p), encode_state(self.reader.position(p) or 0, ts))
                  for p, ts in groups.items()}
        n = 0
        for p, (applied, data) in sorted(states.items()):
            renewed = self.renewed.get(p)
            if applied is None or renewed is None or self.monotonic() - renewed > self.cfg.lease_ttl_s:
                continue
            try:
                assert self.obs is not None
                await self.obs.put(f"p{p}", data)
                n += 1
            except (nats.errors.Error, OSError, TimeoutError) as err:
                log.error("cannot write the state of partition %d: %s", p, err or type(err).__name__)
        return n

    async def release(self, ps: Sequence[int]) -> None:
        """Hand partitions over cleanly: stop reading, write their state, drop their terminals, delete the leases."""
        assert self.kv is not None
        for p in ps:
            await self.reader.stop_partition(p)
        # Nothing of these partitions is applied any more: their terminals and sequences stay as they are now.
        for p, terminals in self._group(ps).items():
            try:
                await self._save(p, terminals)
            except (nats.errors.Error, OSError, TimeoutError) as err:
                log.error("cannot write the state of partition %d on release: %s", p, err or type(err).__name__)
        revisions = {p: self.revisions.get(p) for p in ps}
        await self._drop(ps)
        for p, rev in revisions.items():
            if rev is None:
                continue
            try:
                await self.kv.delete(f"p.{p}", last=rev)
            except nats.errors.Error as err:
                log.warning("lease of partition %d not deleted (%s): it expires on its own", p, err)
        log.info("released partitions %s", list(ps))

    async def close(self) -> None:
        """Clean shutdown: release every partition (state written) and leave the members."""
        try:
            await self.release(sorted(self.owned))
        except (nats.errors.Error, OSError, TimeoutError) as err:
            log.error("releasing the partitions failed: %s", err or type(err).__name__)
        if self.kv is not None:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self.kv.delete(f"m.{self.instance}")
