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
import json
import logging
import os
import ssl
import time
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from collector.cluster.partition import topic_of
from collector.cluster.streams import FEED_SUBJECT, MQTT_MESSAGES_STREAM, stream_configs
from collector.config import NatsConfig
from collector.ingest.source import IngestMetrics, ack_step, take_batch

__all__ = ["FEED", "NatsInbound", "NatsIngest", "connect_options", "inbound", "next_cseq"]

log = logging.getLogger(__name__)

FEED = -1  # the `partition` of an acquirer feed message
STREAM = -2  # in `NatsIngest.deaf`: the partitioned stream has no leader (nothing new is stored)
# An unapplied message is redelivered after this long: far above the time a full queue takes to drain.
ACK_WAIT_S = 60.0
# Unsubscribing and acknowledging are local writes; while the client reconnects they can wait on its buffers:
# never longer than this (an acknowledgement lost that way only means a redelivery).
IO_TIMEOUT_S = 2.0
# How often (and how long at most) the partitioned stream's leader is asked after.
STREAM_CHECK_S = 1.0
# The feed consumer of a collector that has not read for this long is deleted by the server.
FEED_INACTIVE_S = 24 * 3600.0
# How long one pull request waits on the server for a partition with nothing new (a long poll, cheap), and how
# often the server says it is still there meanwhile: four heartbeats without a word mark the partition deaf (its
# consumer's leader is gone) within a second.
FETCH_WAIT_S = 1.5
FETCH_HEARTBEAT_S = 0.25


class NatsInbound(msgspec.Struct, frozen=True):
    """One stored message as the collector applies it (the fields of collector.ingest.source.Message, and where it
    came from so it can be acknowledged and its partition's progress recorded)."""

    topic: str
    payload: bytes
    rx: float
    partition: int
    seq: int  # stream sequence
    msg: Msg
    retain: bool = False  # JetStream has no retained flag; the last status per subject plays that part


def next_cseq(last: int | None, msgs: list[Msg]) -> int | None:
    """The consumer sequence of the last of `msgs` when they follow `last` without a gap, else None.

    A fetch answered through a node that died on the way is lost, but the consumer counts it as delivered; with
    AckPolicy.ALL, acknowledging the next message would acknowledge the lost ones too, and they would never come
    again. So a gap is never acknowledged past: the consumer is recreated from the last applied sequence + 1
    (`NatsIngest._resync`), as nats' own ordered consumers do.
    """
    for m in msgs:
        got = m.metadata.sequence.consumer
        if last is not None and got != last + 1:
            return None
        last = got
    return last


def inbound(m: Msg, topic_prefix: str, partition: int) -> NatsInbound:
    """A stored message as the collector applies it: the MQTT topic back (feed subjects keep their own prefix),
    rx = the stream's stored timestamp, and where it came from."""
    md = m.metadata
    if partition == FEED:
        topic = "/".join(tok.replace("//", ".") for tok in m.subject.split("."))
    else:
        mapped = topic_of(m.subject, topic_prefix)
        topic = mapped[1] if mapped is not None else m.subject
    return NatsInbound(topic, m.data, md.timestamp.timestamp(), partition, md.sequence.stream, m)


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
    """One consumer being read (an owned partition, or FEED) with our own pull requests.

    nats-py's `fetch` waits with `asyncio.wait_for(queue.get(), timeout)`, which on Python 3.11 drops a message
    that arrives as the wait times out: the consumer counts it as delivered, and with AckPolicy.ALL the next
    acknowledgement covered it (measured: a consumer-sequence gap every few seconds per collector on idle
    partitions). Here a pull request (`batch`, `expires`, idle heartbeats) is answered into a subscription with a
    callback, which never drops anything; one request is outstanding at a time, and the next goes out when it
    is used up or expired.
    """

    __slots__ = ("consumer", "cseq", "heard", "inbox", "number", "owed", "resync", "stream", "sub", "task", "wake")

    def __init__(self, number: int, stream: str, consumer: str) -> None:
        self.number, self.stream, self.consumer = number, stream, consumer
        self.inbox = ""
        self.sub: Subscription | None = None
        self.task: asyncio.Task[None] | None = None
        self.cseq: int | None = None  # consumer sequence of the last delivery (a jump: a delivery was lost)
        self.owed = 0  # messages the outstanding request may still bring
        self.heard = 0.0  # monotonic time the server last said anything on this request (message, heartbeat)
        self.resync = False  # a delivery was lost or the consumer deleted: recreate it before reading on
        self.wake = asyncio.Event()


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
        # Partitions (and FEED) whose last fetch got no answer from the server or failed: while any is deaf the
        # collector is not `subscribed`, so a silence it cannot hear raises nothing (as with a lost MQTT broker).
        self.deaf: set[int] = set()
        self.created: dict[int, object] = {}  # partition -> creation time of the consumer we read (who made it)
        # partition -> the stream's last sequence when it was started from the newest message of every subject:
        # what comes after is all delivered, in order, after those.
        self.floor: dict[int, int] = {}
        self.feed_consumer = f"posfleet-feed-{instance}"
        self.resyncs = 0  # consumers recreated after a lost delivery
        self.stolen: set[int] = set()  # partitions another collector took over (their consumer is not ours)
        self._feed_part: _Partition | None = None
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
            # Requests outstanding on the lost connection will never be answered: every consumer is deaf until it
            # answers a new one.
            self.deaf.update(self._parts)
            self.deaf.add(FEED)
            if not self._closing:
                log.warning("NATS connection lost; reconnecting")

        async def reconnected() -> None:
            self.metrics.mqtt_connected.set(1)
            self.metrics.mqtt_connects.inc()
            for part in [*self._parts.values(), *([self._feed_part] if self._feed_part else [])]:
                part.owed = 0  # ask again at once, on this connection
                part.wake.set()
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
        self._tasks.append(asyncio.create_task(self._watch_stream(), name="nats-stream"))
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
        """Connected, reading at least one partition and hearing all of them: only then is a silence of our
        terminals evidence."""
        return self.nc is not None and self.nc.is_connected and bool(self._parts) and not self.deaf

    def connected(self) -> bool:
        """The NATS connection is up."""
        return self.nc is not None and self.nc.is_connected

    def thread_alive(self) -> bool:
        """The connection is not closed for good and the background tasks (and every partition's reader) run."""
        return (self.nc is not None and not self.nc.is_closed and all(not t.done() for t in self._tasks)
                and all(part.task is not None and not part.task.done() for part in self._parts.values()))

    def owned(self) -> frozenset[int]:
        """The partitions being read."""
        return frozenset(self._parts)

    # ---- partitions ----------------------------------------------------------------------------------------
    def consumer_name(self, p: int) -> str:
        """The durable consumer of partition p."""
        return f"posfleet-p{p}"

    async def start_partition(self, p: int, after_seq: int | None, *, keep_position: bool = False) -> None:
        """Read partition p from stream sequence `after_seq` + 1 (its state object's).

        Without one: `keep_position` (static shards) reads on from where the durable consumer stands. Otherwise
        an existing consumer's ack floor is where the previous owner got to (it died before its first state
        write): replay after it. With no consumer either (a new stream), the newest message of every subject,
        then what follows; `position` then counts from the stream's last sequence at that moment, so a release
        before anything was applied still records where the next owner must start.
        """
        assert self.js is not None
        if p in self._parts:
            return
        name = self.consumer_name(p)
        try:
            info = await self.js.consumer_info(self.cfg.stream, name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None and not (keep_position and after_seq is None):
            if after_seq is None and info.ack_floor is not None and (info.ack_floor.stream_seq or 0) > 0:
                after_seq = info.ack_floor.stream_seq
            # Whatever the consumer's ack floor says, the state we hold is the snapshot's: replay from there.
            await self.js.delete_consumer(self.cfg.stream, name)
            info = None
        if info is None:
            config = self._partition_config(p)
            if after_seq is not None:
                config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, after_seq + 1
            else:
                # No state: the newest heartbeat and status of every terminal, then what follows.
                self.floor[p] = (await self.js.stream_info(self.cfg.stream)).state.last_seq
            await self.js.add_consumer(self.cfg.stream, config)
            info = await self.js.consumer_info(self.cfg.stream, name)
        self.created[p] = info.created
        part = _Partition(p, self.cfg.stream, name)
        await self._bind(part)
        self._parts[p] = part
        if after_seq is not None:
            self.applied[p] = after_seq
        part.task = asyncio.create_task(self._pull(part), name=f"nats-p{p}")
        part.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("NATS reader %s died", task.get_name(), exc_info=task.exception())

    def position(self, p: int) -> int | None:
        """The stream sequence up to which partition p is applied (None: unknown, nothing read yet)."""
        applied, floor = self.applied.get(p), self.floor.get(p)
        if applied is None:
            return floor
        return applied if floor is None else max(applied, floor)

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
            self._drop_queued(p)
        await self._unbind(part)
        self.pending.pop(p, None)
        self.deaf.discard(p)
        await self._flush_acks()

    def forget(self, p: int) -> None:
        """Drop what is known of partition p's progress (after it was released)."""
        self.applied.pop(p, None)
        self._acks.pop(p, None)
        self.created.pop(p, None)
        self.floor.pop(p, None)
        self.stolen.discard(p)

    async def consumer_unchanged(self, p: int) -> bool:
        """Whether partition p's consumer is still the one we started reading (nobody took the partition over and
        recreated it meanwhile)."""
        assert self.js is not None
        try:
            info = await self.js.consumer_info(self.cfg.stream, self.consumer_name(p))
        except nats.js.errors.NotFoundError:
            return False
        return p in self.created and info.created == self.created[p]

    async def _bind(self, part: _Partition) -> None:
        """A fresh inbox for the consumer's deliveries, read by a callback (in order, nothing dropped)."""
        assert self.nc is not None

        inbox = self.nc.new_inbox()

        async def on_msg(m: Msg) -> None:
            if part.inbox == inbox:  # not a late answer to a request of a consumer since recreated
                self._on_msg(part, m)

        part.inbox = inbox
        part.sub = await self.nc.subscribe(part.inbox, cb=on_msg)
        part.owed, part.cseq = 0, None

    async def _unbind(self, part: _Partition) -> None:
        if part.sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(part.sub.unsubscribe(), IO_TIMEOUT_S)
            part.sub = None

    async def _request(self, part: _Partition) -> None:
        """Ask the consumer for the next batch; answered into the inbox until used up or `expires`."""
        assert self.nc is not None
        body = {"batch": self.cfg.fetch_batch, "expires": int(FETCH_WAIT_S * 1e9),
                "idle_heartbeat": int(FETCH_HEARTBEAT_S * 1e9)}
        await self.nc.publish(f"$JS.API.CONSUMER.MSG.NEXT.{part.stream}.{part.consumer}",
                              json.dumps(body).encode(), reply=part.inbox)
        part.owed, part.heard = self.cfg.fetch_batch, time.monotonic()

    def _on_msg(self, part: _Partition, m: Msg) -> None:
        """One answer to our requests: a delivery (in consumer order, else a resync), or a status."""
        if part.resync or part.sub is None:
            return  # read again after the resync
        part.heard = time.monotonic()
        p = part.number
        status = m.headers.get("Status") if m.headers else None
        if status is not None and not m.data:
            if status == "100":  # idle heartbeat: the consumer is there
                self.deaf.discard(p)
                return
            # 404 no messages, 408 request expired, 409 leadership change / consumer deleted / limits: this request
            # is over; a deleted consumer is recreated from what was applied.
            part.owed = 0
            if status == "409" and "deleted" in (m.headers or {}).get("Description", "").lower():
                part.resync = True
            elif status not in ("404", "408"):
                log.info("NATS: %s answered %s %s", part.consumer, status, (m.headers or {}).get("Description", ""))
            part.wake.set()
            return
        self.deaf.discard(p)
        md = m.metadata
        cseq = next_cseq(part.cseq, [m])
        if cseq is None:
            log.warning("NATS: a delivery of %s was lost (consumer sequence %s after %s): reading it again from "
                        "the last applied message", "the acquirer feed" if p == FEED else f"partition {p}",
                        md.sequence.consumer, part.cseq)
            part.resync = True
            part.wake.set()
            return
        part.cseq = cseq
        part.owed -= 1
        self._queue.append(inbound(m, self.topic_prefix, p))
        if p != FEED:
            self.pending[p] = md.num_pending
        self._ready.set()
        if part.owed <= 0:
            part.wake.set()

    async def _pull(self, part: _Partition) -> None:
        """Keep one request outstanding while there is room in the queue; notice a consumer that stopped answering
        (deaf) and lost deliveries (resync)."""
        backoff = 0.5
        silent_after = 4 * FETCH_HEARTBEAT_S  # heartbeats come every 0.25 s while a request is outstanding
        while True:
            if part.resync:
                if not await self._resync(part):
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.5
            while len(self._queue) >= self.capacity:
                self._space.clear()
                await self._space.wait()
            now = time.monotonic()
            if part.owed <= 0 or now - part.heard > silent_after:
                if part.owed > 0:  # the request got no answer at all, not even a heartbeat
                    self._deafen(part.number, "no answer from the server")
                try:
                    await self._request(part)
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # disconnected: said, then retried
                    self._deafen(part.number, str(err) or type(err).__name__)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            part.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(part.wake.wait(), FETCH_HEARTBEAT_S)

    async def _resync(self, part: _Partition) -> bool:
        """Recreate a consumer from its last applied stream sequence + 1 after a lost delivery; False (said, and
        the partition deaf) when NATS cannot do it now."""
        p = part.number
        try:
            await self._recreate(part)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._deafen(p, f"recreating its consumer failed: {err or type(err).__name__}")
            return False
        part.resync = False
        return True

    async def _recreate(self, part: _Partition) -> None:
        assert self.js is not None
        p = part.number
        if p != FEED and not await self.consumer_unchanged(p):
            # Another collector took the partition (its lease expired while we could not renew it): not ours to
            # recreate. The keeper drops it on its next round.
            self.stolen.add(p)
            raise RuntimeError("its consumer was recreated by another collector")
        start = self.applied.get(FEED) if p == FEED else self.position(p)
        log.warning("NATS: reading %s again from stream sequence %s", "the acquirer feed" if p == FEED
                    else f"partition {p}", start + 1 if start is not None else "the newest")
        self.resyncs += 1
        await self._flush_acks()  # acknowledgements of what was applied go to the consumer they came from
        if any(i.partition == p for i in self._queue):
            self._drop_queued(p)
        await self._unbind(part)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_consumer(part.stream, part.consumer)
        config = self._feed_config() if p == FEED else self._partition_config(p)
        if start is not None:
            config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start + 1
        await self.js.add_consumer(part.stream, config)
        if p != FEED:
            self.created[p] = (await self.js.consumer_info(part.stream, part.consumer)).created
        await self._bind(part)

    def _partition_config(self, p: int) -> ConsumerConfig:
        name = self.consumer_name(p)
        return ConsumerConfig(
            name=name, durable_name=name, filter_subject=f"{self.cfg.subject_prefix}.{p}.>",
            ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_S, max_ack_pending=self.cfg.max_ack_pending,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT, max_waiting=16,
        )

    def _feed_config(self) -> ConsumerConfig:
        # A collector gone for good (a renamed host) leaves no consumer behind for ever: inactive_threshold.
        return ConsumerConfig(
            name=self.feed_consumer, durable_name=self.feed_consumer, filter_subject=FEED_SUBJECT,
            ack_policy=AckPolicy.ALL, ack_wait=ACK_WAIT_S, max_ack_pending=self.cfg.max_ack_pending,
            deliver_policy=DeliverPolicy.NEW, inactive_threshold=FEED_INACTIVE_S, max_waiting=16,
        )

    def _drop_queued(self, p: int) -> None:
        """Forget the fetched, unapplied messages of p, in place: `batches` may hold the deque while it waits, and a
        second deque would let it apply (and acknowledge) what was meant to be read again."""
        keep = [i for i in self._queue if i.partition != p]
        self._queue.clear()
        self._queue.extend(keep)

    def _deafen(self, p: int, why: str) -> None:
        if p not in self.deaf and not self._closing:
            what = "the acquirer feed" if p == FEED else f"partition {p}"
            log.warning("NATS: cannot read %s (%s): not judging silences until it answers again", what, why)
        self.deaf.add(p)

    async def _watch_stream(self) -> None:
        """While the partitioned stream elects a new leader (a node died), nothing new is stored, yet the consumers
        still answer with heartbeats: the terminals' silence then says nothing about them. Asked every second."""
        assert self.nc is not None
        js = self.nc.jetstream(timeout=STREAM_CHECK_S)
        while True:
            try:
                info = await js.stream_info(self.cfg.stream)
                healthy = info.cluster is None or bool(info.cluster.leader)
                why = "no leader"
            except asyncio.CancelledError:
                raise
            except Exception as err:
                healthy, why = False, str(err) or type(err).__name__
            if healthy:
                self.deaf.discard(STREAM)
            elif STREAM not in self.deaf:
                if not self._closing:
                    log.warning("NATS: stream %s cannot store now (%s): not judging silences until it can",
                                self.cfg.stream, why)
                self.deaf.add(STREAM)
            await asyncio.sleep(STREAM_CHECK_S)

    async def _feed(self) -> None:
        """Every acquirer feed message, for every collector: a durable consumer of our own on the feed stream."""
        assert self.js is not None
        name = self.feed_consumer
        while True:
            try:
                try:
                    await self.js.consumer_info(self.cfg.feed_stream, name)
                except nats.js.errors.NotFoundError:
                    await self.js.add_consumer(self.cfg.feed_stream, self._feed_config())
                break
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning("NATS: cannot create the feed consumer %s: %s; retrying", name, err)
                await asyncio.sleep(2.0)
        part = self._feed_part = _Partition(FEED, self.cfg.feed_stream, name)
        await self._bind(part)
        try:
            await self._pull(part)
        finally:
            await self._unbind(part)

    # ---- consumer side -------------------------------------------------------------------------------------
    async def batches(self, max_batch: int = 2000) -> list[NatsInbound]:
        """Wait for messages and take up to `max_batch` of them."""
        queue = self._queue
        batch = await take_batch(queue, self._ready, max_batch)
        if len(queue) < self.capacity:
            self._space.set()
        self.metrics.queue_depth.set(len(queue))
        return batch

    @staticmethod
    def ack_every(batch_size: int) -> int:
        """How many applied messages to record as acknowledged at a time: a batch is at most what the consumer's
        ack window let through."""
        return ack_step(batch_size)

    def ack(self, items: list[NatsInbound]) -> None:
        """Record applied messages: the last of each partition is acknowledged (AckPolicy.ALL covers the rest)."""
        acks, applied, parts = self._acks, self.applied, self._parts
        for item in items:
            if item.partition == FEED or item.partition in parts:
                acks[item.partition] = item.msg
                applied[item.partition] = item.seq
        if items:
            self._ack_ready.set()

    async def _flush_acks(self) -> None:
        acks, self._acks = self._acks, {}
        for msg in acks.values():
            with contextlib.suppress(Exception):  # lost with the connection: redelivered, deduplicated by seq
                await asyncio.wait_for(msg.ack(), IO_TIMEOUT_S)

    async def _acker(self) -> None:
        while True:
            await self._ack_ready.wait()
            self._ack_ready.clear()
            await self._flush_acks()
