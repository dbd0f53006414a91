"""NATS JetStream ingest: the partitions this collector owns, read by durable pull consumers, plus the acquirer feed.

- The terminals' MQTT messages reach the NATS servers' MQTT gateway, are mapped by the servers to
  `<subject_prefix>.<partition>.<tid>.<kind>` and stored in one stream (collector/cluster/streams.py: sourced from
  the gateway's own stream, limits retention: a replay source after an outage or a takeover). Per owned
  partition one durable pull consumer `posfleet-p<N>` with AckPolicy.ALL: acknowledging the last applied message
  of a partition acknowledges everything before it, so acks stay one per partition and batch (FIELD-NOTES:
  per-message acks with a small max_ack_pending read 504 msg/s instead of 30k).
- Acknowledged only after the collector applied the message (the app's sliding `ack`), and the last applied
  stream sequence per partition is kept (`applied`): the partition's snapshot records it, and the next owner
  replays from the one after.
- Receive time is the message's JetStream stored timestamp, not the time we read it: a replay after a takeover
  or an outage makes no terminal look fresher (or staler) than it is.
- The subject is turned back into the MQTT topic (`topic_of`) so collector.fleet.protocol.decode, unchanged,
  does the rest. The acquirer feed stream is unpartitioned: every collector reads all of it with its own
  durable consumer and applies it to its own terminals.
- Backpressure: fetch tasks wait while the queue of unapplied messages is full; JetStream keeps the rest.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from collector.cluster.partition import topic_of
from collector.cluster.streams import FEED_SUBJECT, MQTT_MESSAGES_STREAM, stream_configs
from collector.config import NatsConfig
from collector.ingest.source import IngestMetrics

__all__ = ["FEED", "NatsInbound", "NatsIngest", "connect_options"]

log = logging.getLogger(__name__)

FEED = -1  # the `partition` of an acquirer feed message
# An unapplied message is redelivered after this long: far above the time a full queue takes to drain.
ACK_WAIT_S = 60.0
# The feed consumer of a collector that has not read for this long is deleted by the server.
FEED_INACTIVE_S = 24 * 3600.0
# How long one fetch waits on the server for a partition with nothing new (a long poll, cheap).
FETCH_WAIT_S = 2.0


@dataclass(frozen=True, slots=True)
class NatsInbound:
    """One stored message as the collector applies it (the fields of collector.ingest.source.Message, and where it
    came from so it can be acknowledged and its partition's progress recorded)."""

    topic: str
    payload: bytes
    rx: float
    partition: int
    seq: int  # stream sequence
    msg: Msg = field(repr=False)
    retain: bool = False  # JetStream has no retained flag; the last status per subject plays that part


def connect_options(cfg: NatsConfig, name: str) -> dict[str, Any]:
    """nats.connect() keyword arguments from the config: servers, credentials, TLS, reconnect for ever."""
    opts: dict[str, Any] = {
        "servers": list(cfg.servers), "name": name, "connect_timeout": 5, "max_reconnect_attempts": -1,
        "reconnect_time_wait": 1, "allow_reconnect": True,
    }
    if cfg.user is not None:
        password = os.environ.get("POSFLEET_NATS_PASSWORD")
        if cfg.password_file:
            with open(cfg.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        opts["user"], opts["password"] = cfg.user, password
    if cfg.token_file:
        with open(cfg.token_file, encoding="utf-8") as fh:
            opts["token"] = fh.read().strip()
    if cfg.creds_file:
        opts["user_credentials"] = cfg.creds_file
    if cfg.tls is not None or any(s.startswith("tls://") for s in cfg.servers):
        ctx = ssl.create_default_context(cafile=cfg.tls.ca_file if cfg.tls else None)
        if cfg.tls is not None and cfg.tls.cert_file:
            ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
        opts["tls"] = ctx
    return opts


class _Partition:
    """One owned partition: its pull subscription and fetch task."""

    __slots__ = ("number", "sub", "task")

    def __init__(self, number: int, sub: JetStreamContext.PullSubscription) -> None:
        self.number, self.sub = number, sub
        self.task: asyncio.Task[None] | None = None


class NatsIngest:
    """Owns the NATS connection and the consumers of the partitions it is told to read; `async with` connects."""

    def __init__(self, cfg: NatsConfig, topic_prefix: str, metrics: IngestMetrics, instance: str,
                 capacity: int = 10_000) -> None:
        self.cfg = cfg
        self.topic_prefix = topic_prefix
        self.metrics = metrics
        self.instance = instance
        self.capacity = capacity
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._queue: collections.deque[NatsInbound] = collections.deque()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._parts: dict[int, _Partition] = {}
        self.applied: dict[int, int] = {}  # partition -> last applied (and acknowledged) stream sequence
        self.pending: dict[int, int] = {}  # partition -> messages left in the stream after the last one fetched
        self._acks: dict[int, Msg] = {}
        self._ack_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        metrics.queue_capacity.set(capacity)
        metrics.mqtt_connected.set(0)

    # ---- connection ----------------------------------------------------------------------------------------
    async def __aenter__(self) -> NatsIngest:
        async def disconnected() -> None:
            self.metrics.mqtt_connected.set(0)
            if not self._closing:
                log.warning("NATS connection lost; reconnecting")

        async def reconnected() -> None:
            self.metrics.mqtt_connected.set(1)
            self.metrics.mqtt_connects.inc()
            log.info("NATS reconnected to %s", self.nc.connected_url.netloc if self.nc and self.nc.connected_url
                     else "?")

        async def error(err: Exception) -> None:
            if not self._closing:
                log.warning("NATS: %s", err)

        opts = connect_options(self.cfg, f"posfleet-{self.instance}")
        delay = 1.0
        while True:  # a cluster that is not up yet is waited for, and said so
            try:
                self.nc = await nats.connect(**opts, disconnected_cb=disconnected, reconnected_cb=reconnected,
                                             error_cb=error)
                break
            except (OSError, nats.errors.Error) as err:
                log.warning("NATS connect to %s failed: %s; retrying in %.0f s", ", ".join(self.cfg.servers),
                            err or type(err).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.metrics.mqtt_connected.set(1)
        self.metrics.mqtt_connects.inc()
        self.js = self.nc.jetstream(timeout=self.cfg.api_timeout_s)
        for stream in stream_configs(self.cfg):
            await self._ensure_stream(stream)
        log.info("NATS connected to %s; stream %s, %d partitions", self.nc.connected_url.netloc
                 if self.nc.connected_url else "?", self.cfg.stream, self.cfg.partitions)
        self._tasks.append(asyncio.create_task(self._acker(), name="nats-ack"))
        self._tasks.append(asyncio.create_task(self._feed(), name="nats-feed"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        for p in list(self._parts):
            await self.stop_partition(p)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._flush_acks()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        self.metrics.mqtt_connected.set(0)

    async def _ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream when it is missing (an existing one is left as the operator made it)."""
        assert self.js is not None and config.name is not None
        try:
            await self.js.stream_info(config.name)
            return
        except nats.js.errors.NotFoundError:
            pass
        await self.js.add_stream(config)
        log.info("created stream %s (sourced from the MQTT gateway's %s, %d replicas)", config.name,
                 MQTT_MESSAGES_STREAM, self.cfg.replicas)

    @property
    def subscribed(self) -> bool:
        """Connected and reading at least one partition: only then is a silence of our terminals evidence."""
        return self.nc is not None and self.nc.is_connected and bool(self._parts)

    def connected(self) -> bool:
        """The NATS connection is up."""
        return self.nc is not None and self.nc.is_connected

    def thread_alive(self) -> bool:
        """The connection is not closed for good and the background tasks run."""
        return self.nc is not None and not self.nc.is_closed and all(not t.done() for t in self._tasks)

    def owned(self) -> frozenset[int]:
        """The partitions being read."""
        return frozenset(self._parts)

    # ---- partitions ----------------------------------------------------------------------------------------
    def consumer_name(self, p: int) -> str:
        """The durable consumer of partition p."""
        return f"posfleet-p{p}"

    async def start_partition(self, p: int, after_seq: int | None, *, keep_position: bool = False) -> None:
        """Read partition p: from stream sequence `after_seq` + 1 (its snapshot's), or, without one, from where the
        durable consumer stands (`keep_position`, static shards) or from the last message of every subject."""
        assert self.js is not None
        if p in self._parts:
            return
        name = self.consumer_name(p)
        existing = True
        try:
            await self.js.consumer_info(self.cfg.stream, name)
        except nats.js.errors.NotFoundError:
            existing = False
        if existing and not (keep_position and after_seq is None):
            # Whatever the consumer's ack floor says, the state we hold is the snapshot's: replay from there.
            await self.js.delete_consumer(self.cfg.stream, name)
            existing = False
        if not existing:
            if after_seq is not None:
                policy, start = DeliverPolicy.BY_START_SEQUENCE, after_seq + 1
            else:
                # No state: the newest heartbeat and status of every terminal, then what follows.
                policy, start = DeliverPolicy.LAST_PER_SUBJECT, None
            await self.js.add_consumer(self.cfg.stream, ConsumerConfig(
                name=name, durable_name=name, filter_subject=f"{self.cfg.subject_prefix}.{p}.>",
                ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_S, max_ack_pending=self.cfg.max_ack_pending,
                deliver_policy=policy, opt_start_seq=start, max_waiting=16,
            ))
        sub = await self.js.pull_subscribe_bind(consumer=name, stream=self.cfg.stream)
        part = self._parts[p] = _Partition(p, sub)
        if after_seq is not None:
            self.applied[p] = after_seq
        part.task = asyncio.create_task(self._fetch(part), name=f"nats-p{p}")

    async def stop_partition(self, p: int) -> None:
        """Stop reading partition p; its fetched but unapplied messages are dropped (the next reader replays them
        from the partition's snapshot). Its last acknowledgement still goes out."""
        part = self._parts.pop(p, None)
        if part is None:
            return
        if part.task is not None:
            part.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await part.task
        if any(i.partition == p for i in self._queue):
            self._queue = collections.deque(i for i in self._queue if i.partition != p)
        with contextlib.suppress(Exception):
            await part.sub.unsubscribe()
        self.pending.pop(p, None)
        await self._flush_acks()

    def forget(self, p: int) -> None:
        """Drop what is known of partition p's progress (after it was released)."""
        self.applied.pop(p, None)
        self._acks.pop(p, None)

    async def _fetch(self, part: _Partition) -> None:
        """Fetch the partition's messages into the shared queue for ever (errors: wait a little, try again)."""
        backoff = 0.5
        while True:
            while len(self._queue) >= self.capacity:
                self._space.clear()
                await self._space.wait()
            try:
                msgs = await part.sub.fetch(self.cfg.fetch_batch, timeout=FETCH_WAIT_S)
            except TimeoutError:
                self.pending[part.number] = 0
                continue
            except asyncio.CancelledError:
                raise
            except Exception as err:  # disconnected, leader change, consumer gone: said, then retried
                if not self._closing:
                    log.warning("NATS fetch of partition %d failed: %s", part.number, err or type(err).__name__)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            self._enqueue(part.number, msgs)

    def _enqueue(self, p: int, msgs: list[Msg]) -> None:
        queue, prefix = self._queue, self.topic_prefix
        for m in msgs:
            mapped = topic_of(m.subject, prefix)
            md = m.metadata
            self.pending[p] = md.num_pending
            topic = mapped[1] if mapped is not None else m.subject
            queue.append(NatsInbound(topic, m.data, md.timestamp.timestamp(), p, md.sequence.stream, m))
        if msgs:
            self._ready.set()

    async def _feed(self) -> None:
        """Every acquirer feed message, for every collector: a durable consumer of our own on the feed stream."""
        assert self.js is not None
        name = f"posfleet-feed-{self.instance}"
        while True:
            try:
                sub = await self.js.pull_subscribe(
                    FEED_SUBJECT, durable=name, stream=self.cfg.feed_stream,
                    # A collector gone for good (a renamed host) leaves no consumer behind for ever.
                    config=ConsumerConfig(ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_S,
                                          max_ack_pending=self.cfg.max_ack_pending, deliver_policy=DeliverPolicy.NEW,
                                          inactive_threshold=FEED_INACTIVE_S),
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("NATS: cannot create the feed consumer %s: %s; retrying", name, err)
                await asyncio.sleep(2.0)
        while True:
            while len(self._queue) >= self.capacity:
                self._space.clear()
                await self._space.wait()
            try:
                msgs = await sub.fetch(self.cfg.fetch_batch, timeout=FETCH_WAIT_S)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as err:
                if not self._closing:
                    log.warning("NATS fetch of the acquirer feed failed: %s", err or type(err).__name__)
                await asyncio.sleep(1.0)
                continue
            for m in msgs:
                md = m.metadata
                topic = "/".join(tok.replace("//", ".") for tok in m.subject.split("."))
                self._queue.append(NatsInbound(topic, m.data, md.timestamp.timestamp(), FEED, md.sequence.stream, m))
            if msgs:
                self._ready.set()

    # ---- consumer side -------------------------------------------------------------------------------------
    async def batches(self, max_batch: int = 2000) -> list[NatsInbound]:
        """Wait for messages and take up to `max_batch` of them."""
        queue = self._queue
        while not queue:
            self._ready.clear()
            await self._ready.wait()
        n = min(len(queue), max_batch)
        batch = [queue.popleft() for _ in range(n)]
        if len(queue) < self.capacity:
            self._space.set()
        self.metrics.queue_depth.set(len(queue))
        return batch

    def ack(self, items: list[NatsInbound]) -> None:
        """Record applied messages: the last of each partition is acknowledged (AckPolicy.ALL covers the rest)."""
        acks, applied, parts = self._acks, self.applied, self._parts
        for item in items:
            if item.partition == FEED or item.partition in parts:
                acks[item.partition] = item.msg
                if item.partition != FEED:
                    applied[item.partition] = item.seq
        if items:
            self._ack_ready.set()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for msg in acks.values():
            with contextlib.suppress(Exception):  # lost with the connection: redelivered, deduplicated by seq
                await msg.ack()

    async def _acker(self) -> None:
        while True:
            await self._ack_ready.wait()
            self._ack_ready.clear()
            await self._flush_acks()
