"""The collector's lifecycle: one owner for the MQTT client, background tasks, writer and HTTP runner.

    mqtt (paho on the loop) -> protocol.decode -> state.Fleet (+ detect) -> exporters (metrics, history)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from collector.cluster.fleetwide import FleetWide
from collector.cluster.forward import Forwarder, kv_members
from collector.cluster.keeper import ClusterMetrics, Keeper
from collector.cluster.partition import parse_shard, partition_of, shard_partitions
from collector.config import Config
from collector.fleet.clockjump import ClockWatch, rebase_after_jump
from collector.fleet.hooks import MessageSink, TransitionSink
from collector.fleet.protocol import DecodeError, Heartbeat, Status, TxnReceipt, UpstreamBatch, decode
from collector.fleet.registry import Registry, RegistryError, load_registry
from collector.fleet.snapshot import Restored, SnapshotError, Source, corrupt_files, load_snapshot, save_snapshot
from collector.fleet.state import Fleet, HeartbeatResult, Transition, UpstreamResult
from collector.http.auth import Tokens, load_tokens
from collector.http.host import RouteHook
from collector.http.metrics import FleetCollector, SelfMetrics
from collector.http.routes import build_app, build_metrics_app
from collector.ingest.mqtt import MqttIngest
from collector.ingest.nats import NatsIngest
from collector.ingest.source import Message
from collector.ingest.source import Source as IngestSource
from collector.supervise import DEFAULT_POLICY, RestartPolicy, Supervisor
from collector.support.routes import install as install_support

if TYPE_CHECKING:
    from exporters.history.influx import InfluxWriter

__all__ = ["Collector", "RateLimitedLog", "run_collector"]

log = logging.getLogger(__name__)


class RateLimitedLog:
    """At most one log line per reason per period, with the number suppressed since. Never the payload."""

    def __init__(self, logger: logging.Logger, period_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.logger, self.period, self.clock = logger, period_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, reason: str, msg: str, *args: object) -> bool:
        """Log unless this reason logged within the period; returns whether it logged."""
        now = self.clock()
        last = self._last.get(reason)
        if last is not None and now - last < self.period:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return False
        self._last[reason] = now
        n = self._suppressed.pop(reason, 0)
        self.logger.warning(msg + (f" (+{n} more like it suppressed)" if n else ""), *args)
        return True


_KIND = {Heartbeat: "heartbeat", Status: "status", UpstreamBatch: "upstream", TxnReceipt: "txn"}


def _kind_of_topic(topic: str) -> str:
    tail = topic.rsplit("/", 1)[-1]
    return {"heartbeat": "heartbeat", "status": "status", "txn": "txn", "transactions": "upstream"}.get(tail, "other")


def _load_registry(cfg: Config) -> Registry:
    return load_registry(cfg.registry.path) if cfg.registry.path else Registry({})


def _restore(cfg: Config, now: float, registry: Registry) -> Restored:
    """Load the newest good snapshot generation; say loudly what was set aside and what is used instead."""
    path = cfg.state.snapshot_path
    if not path:
        return Restored([], [], Source.EMPTY)
    restored = load_snapshot(path, now, registry)
    for bad in restored.set_aside:
        where = f"moved to {bad.moved_to}" if bad.moved_to else "left in place"
        log.error("state snapshot %s is corrupt (%s): %s", bad.original, bad.reason, where)
    if restored.set_aside or restored.source is Source.PREVIOUS:
        used = {
            Source.CURRENT: f"the current snapshot {path}",
            Source.PREVIOUS: f"the previous snapshot generation {path}.prev",
            Source.EMPTY: "an empty state (every terminal gets a full offline period to be heard)",
        }[restored.source]
        log.log(logging.ERROR if restored.set_aside else logging.WARNING, "restoring state from %s", used)
    if restored.terminals:
        log.info("restored state of %d terminals (%s)", len(restored.terminals), restored.source.value)
    return restored


class Collector:
    """The running collector. Use `async with Collector(cfg) as c:`; `await c.wait_stopped()`."""

    def __init__(
        self,
        cfg: Config,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        restart_policy: RestartPolicy = DEFAULT_POLICY,
        *,
        registry: Registry | None = None,
        restored: Restored | None = None,
        corrupt_snapshots: int = 0,
        tokens: Tokens | None = None,
    ) -> None:
        """Wire the rooms from what is given, without I/O; `Collector.load(cfg)` reads the registry file, the state
        snapshot and the API tokens first (what `run_collector` and the demo use)."""
        self.cfg = cfg
        self.clock = clock
        self.monotonic = monotonic
        self.prom_registry = CollectorRegistry(auto_describe=False)
        self.metrics = SelfMetrics(self.prom_registry)
        self.metrics.snapshot_enabled = bool(cfg.state.snapshot_path)
        self.registry_file = registry if registry is not None else Registry({})
        if restored is None:
            restored = Restored([], [], Source.EMPTY)
        self.metrics.snapshot_restore.labels(restored.source.value).set(1)
        self.metrics.snapshot_corrupt_files.set(corrupt_snapshots)
        # Partitioned collectors (ingest.source: nats) materialise only their partitions' terminals.
        self.partitions: set[int] = set()
        owns = None
        if cfg.ingest.source == "nats":
            n, owned = cfg.nats.partitions, self.partitions
            if cfg.nats.ownership == "static" and cfg.nats.shard:
                owned.update(shard_partitions(parse_shard(cfg.nats.shard), n))

            def owns(tid: str) -> bool:
                return partition_of(tid, n) in owned

        self.fleet = Fleet(cfg, started_at=clock(), registry=self.registry_file, restored=restored.state,
                           materialise=owns, baselines=restored.activity)
        # What happened at restore, without a second reference to every restored terminal (8 B each).
        self.restored = restored._replace(terminals=[], feeds=[], activity=None)
        # A wall-clock step beyond two evaluation rounds (10 s at least: NTP slews smaller offsets) is a jump.
        self.clock_watch = ClockWatch(clock(), monotonic(), max(10.0, 2 * cfg.state.eval_interval_s))
        # When the collector stopped hearing the broker (None while it hears it); from start until subscribed too.
        self.deaf_since: float | None = None
        self.exit_code = 0
        self.supervisor = Supervisor(self.metrics.task_restarts, self._task_gave_up, restart_policy, monotonic)
        self.fleet_collector = FleetCollector(self.fleet, self.metrics, cfg.metrics.max_problem_series, clock)
        self.prom_registry.register(self.fleet_collector)
        self.tokens: Tokens = tokens if tokens is not None else Tokens({})
        self.route_hooks: list[RouteHook] = []
        self.transition_hooks: list[TransitionSink] = []
        self.message_hooks: list[MessageSink] = []
        self.ingest: IngestSource[Any] | None = None
        self.nats: NatsIngest | None = None
        self.keeper: Keeper | None = None  # partition leases (ingest.source: nats, nats.ownership: lease)
        self.forwarder: Forwarder | None = None  # the API across collectors (collector/cluster/forward.py)
        self.fleetwide: FleetWide | None = None  # mass_offline across collectors (collector/cluster/fleetwide.py)
        self.writer: InfluxWriter | None = None
        self.http_port: int | None = None
        self._stack = AsyncExitStack()
        self._stopped = asyncio.Event()
        self._reject_log = RateLimitedLog(log)
        # Bound counter children: labels() costs a lock and a dict lookup per message on the hot path.
        self._hb_counters = {
            r: self.metrics.messages.labels("heartbeat", r) for r in ("accepted", "duplicate", "stale")
        }
        self.accepted_heartbeats = 0  # accepted since the last _count_accepted
        install_support(self)  # ledger, diagnosis/reconcile API, /support page

    # ---- setup -----------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        cfg: Config,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        restart_policy: RestartPolicy = DEFAULT_POLICY,
    ) -> Collector:
        """Read the terminal registry, the newest good state snapshot and the API tokens; build the collector."""
        registry = _load_registry(cfg)
        leased = cfg.ingest.source == "nats" and cfg.nats.ownership == "lease"
        # Leased partitions come with their state from NATS; a local file may hold partitions owned elsewhere now.
        restored = Restored([], [], Source.EMPTY) if leased else _restore(cfg, clock(), registry)
        corrupt = len(corrupt_files(cfg.state.snapshot_path)) if cfg.state.snapshot_path else 0
        return cls(cfg, clock, monotonic, restart_policy, registry=registry, restored=restored,
                   corrupt_snapshots=corrupt, tokens=load_tokens(cfg.http.tokens_file))

    def _load_registry(self) -> Registry:
        return _load_registry(self.cfg)

    def _task_gave_up(self, task: str) -> None:
        # Limping on without the tick or the consumer would hide every fault: exit non-zero so systemd or the
        # orchestrator restarts the process (and PosCollectorDown pages if that keeps failing).
        self.exit_code = 1
        self.stop()

    async def __aenter__(self) -> Collector:
        try:
            # The registry and restored state are long-lived: moving them out of the collector's generations
            # keeps full collections (150+ ms at 1M objects, FIELD-NOTES) from pausing the loop.
            gc.collect()
            gc.freeze()
            loop = asyncio.get_running_loop()
            if self.cfg.influx.enabled:
                # Imported only when history is on: influxdb-client and what it pulls in (urllib3, reactivex,
                # dateutil) are ~18 MB of RSS that a collector without InfluxDB does not need.
                from exporters.history.influx import InfluxWriter
                from exporters.history.lines import HistoryRecorder

                # Entered first, so it is closed last: what the loop drains on shutdown still reaches it.
                self.writer = await self._stack.enter_async_context(
                    InfluxWriter(self.cfg.influx, self.prom_registry, self.cfg.state.spool_dir)
                )
                recorder = HistoryRecorder(self.writer.write, self.fleet.terminals.get)
                self.message_hooks.append(recorder.on_message)
                self.transition_hooks.append(recorder.on_transitions)
            if self.cfg.ingest.source == "nats":
                self.nats = await self._stack.enter_async_context(NatsIngest(
                    self.cfg.nats, self.cfg.mqtt.topic_prefix, self.metrics, self.instance, self.cfg.mqtt.queue_size))
                self.ingest = self.nats
                if self.cfg.nats.ownership == "lease":
                    assert self.nats.nc is not None
                    self.keeper = Keeper(self.nats.nc, self.cfg.nats, self.instance, self.fleet, self.nats,
                                         self.partitions, ClusterMetrics(self.prom_registry), self.monotonic,
                                         self.clock)
                    await self.keeper.setup()
                    self._stack.push_async_callback(self.keeper.close)  # after the tasks stop, before NATS closes
                else:
                    for p in sorted(self.partitions):
                        await self.nats.start_partition(p, None, keep_position=True)
                    log.info("reading partitions %s of %d (static shard %s)", sorted(self.partitions),
                             self.cfg.nats.partitions, self.cfg.nats.shard)
                assert self.nats.nc is not None  # any terminal from any collector: forwarded to its owner
                self.forwarder = await self._stack.enter_async_context(
                    Forwarder(self, self.nats.nc, kv_members(self.keeper) if self.keeper else None))
                self.fleetwide = await self._stack.enter_async_context(FleetWide(self, self.nats.nc, self.clock))
                self.fleet_collector.fleet_level = self.fleetwide.exported
            else:
                self.ingest = await self._stack.enter_async_context(MqttIngest(self.cfg.mqtt, self.metrics, loop))
            self._stack.push_async_callback(self._final_snapshot)

            async def serve(app: web.Application, host: str, port: int) -> int:
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                await runner.setup()
                self._stack.push_async_callback(runner.cleanup)
                await web.TCPSite(runner, host, port).start()
                return int(runner.addresses[0][1])  # the bound port (the real one when configured as 0)

            http, mc = self.cfg.http, self.cfg.metrics
            self.http_port = await serve(build_app(self), http.host, http.port)
            self.metrics_port: int | None = None
            if mc.port is None:
                log.info("HTTP API and /metrics on http://%s:%s", http.host, self.http_port)
            else:  # /metrics names every acquirer's problem terminals: only on the listener Prometheus reaches
                self.metrics_port = await serve(build_metrics_app(self), mc.host or http.host, mc.port)
                log.info("HTTP API on http://%s:%s, /metrics only on http://%s:%s", http.host, self.http_port,
                         mc.host or http.host, self.metrics_port)
            self._stack.push_async_callback(self.supervisor.aclose)
            for name, factory in (
                ("consume", self._consume), ("tick", self._ticker), ("snapshot", self._snapshotter),
                ("registry", self._registry_watcher),
            ):
                self.supervisor.start(name, factory)
            if self.keeper is not None:
                self.supervisor.start("partitions", self.keeper.run)
            if self.forwarder is not None:
                self.supervisor.start("forward", self.forwarder.run)
            if self.fleetwide is not None:
                self.supervisor.start("fleetwide", self.fleetwide.run)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _final_snapshot(self) -> None:
        self.snapshot_now()

    def stop(self) -> None:
        """Ask the collector to stop (signal handlers call this)."""
        self._stopped.set()

    async def wait_stopped(self) -> None:
        """Block until stop() is called."""
        await self._stopped.wait()

    # ---- pipeline ----------------------------------------------------------------------------------------
    def count_reject(self, kind: str, err: DecodeError) -> None:
        """Count and (rate-limited) log a rejected message; the payload is never logged."""
        self._count_rejected(kind, err.reason, str(err))

    def _count_rejected(self, kind: str, reason: str, text: str = "") -> None:
        self.metrics.messages.labels(kind, "rejected").inc()
        self.metrics.rejected.labels(reason).inc()
        self._reject_log.warning(reason, "rejected %s message: %s", kind, text or reason)

    def apply_upstream(self, batch: UpstreamBatch, rx: float) -> UpstreamResult:
        """Apply an acquirer batch (from MQTT or HTTP) to that acquirer's own terminals."""
        m = self.metrics
        for reason in batch.dropped:  # transactions the decoder left out; the rest of the batch is applied
            m.rejected.labels(reason).inc()
        if batch.dropped:
            self._reject_log.warning(
                "upstream_txn", "dropped %d of %d transactions in a batch of acquirer %s (%s)",
                len(batch.dropped), len(batch.txns) + len(batch.dropped), batch.acquirer,
                ", ".join(sorted(set(batch.dropped))),
            )
        out: list[Transition] = []
        result = self.fleet.on_feed(batch, rx, out)
        if result.refused:
            self._count_rejected("upstream", "unknown_acquirer", f"unknown_acquirer: {batch.acquirer}")
            return result
        m.messages.labels("upstream", "accepted").inc()
        records = m.feed_records
        records.labels("matched").inc(result.matched)
        records.labels("foreign").inc(result.foreign)
        records.labels("unknown").inc(result.unknown)
        records.labels("elsewhere").inc(result.elsewhere)
        for hook in self.message_hooks:
            hook(batch, rx, None)
        self._emit(out)
        return result

    def _emit(self, out: list[Transition]) -> None:
        if not out:
            return
        for tr in out:
            log.info(
                "%s %s on %s%s", "raised" if tr.raised else "cleared", tr.condition, tr.tid,
                f" ({tr.detail})" if tr.detail else "",
            )
        for hook in self.transition_hooks:
            hook(out)

    @property
    def instance(self) -> str:
        """This collector's name among partitioned collectors (nats.instance, else the host name)."""
        return self.cfg.nats.instance or "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())

    def process(self, item: Message) -> None:
        """Decode and apply one message; never raises for bad input."""
        m = self.metrics
        cfg = self.cfg.mqtt
        try:
            msg = decode(item.topic, item.payload, cfg.topic_prefix, cfg.upstream_prefix, self.fleet.terminals)
        except DecodeError as err:
            self.count_reject(_kind_of_topic(item.topic), err)
            if err.tid is not None:  # the terminal is talking, but not in a way we can use: say so, not offline
                rejected: list[Transition] = []
                self.fleet.on_rejected(err.tid, err.reason, item.rx, rejected)
                self._emit(rejected)
            return
        out: list[Transition] = []
        if isinstance(msg, Heartbeat):
            result = self.fleet.on_heartbeat(msg, item.rx, out)
            if result is HeartbeatResult.REFUSED or result is HeartbeatResult.BACKWARDS:
                self._count_rejected("heartbeat", result.value)  # the state's verdict, not the decoder's
                return
            if result in (HeartbeatResult.DUPLICATE, HeartbeatResult.STALE):
                self._hb_counters[result.value].inc()
                return
            self.accepted_heartbeats += 1  # counted per batch (_count_accepted): a Counter.inc costs ~1 µs
        elif isinstance(msg, Status):
            applied = self.fleet.on_status(msg, item.rx, item.retain, out)
            m.messages.labels("status", "accepted" if applied else "stale").inc()
            if not applied:
                return
        elif isinstance(msg, UpstreamBatch):
            self.apply_upstream(msg, item.rx)
            return
        else:
            m.messages.labels("txn", "accepted").inc()
        terminal = self.fleet.terminals.get(msg.tid)
        for hook in self.message_hooks:
            hook(msg, item.rx, terminal)
        self._emit(out)

    async def _consume(self) -> None:
        assert self.ingest is not None
        ingest, process = self.ingest, self.process
        while True:
            batch = await ingest.batches()
            step = ingest.ack_every(len(batch))
            acked = 0
            for n, item in enumerate(batch, 1):
                try:
                    process(item)
                except Exception:  # a bug must not make the collector deaf; it is logged with its traceback
                    log.exception("internal error processing a message on %s", item.topic)
                    self.metrics.rejected.labels("internal_error").inc()
                if n - acked >= step:
                    # Acknowledged only once applied (a crash before this means redelivery), but without waiting
                    # for the rest of the batch: the broker refills its in-flight window meanwhile.
                    ingest.ack(batch[acked:n])
                    acked = n
            ingest.ack(batch[acked:])
            self._count_accepted()
            if batch:
                self.metrics.mqtt_last_message.set(batch[-1].rx)
            self.supervisor.progress("consume")

    def _count_accepted(self) -> None:
        """Add the heartbeats accepted since the last call to posfleet_messages_total (once per batch)."""
        if self.accepted_heartbeats:
            self._hb_counters["accepted"].inc(self.accepted_heartbeats)
            self.accepted_heartbeats = 0

    async def _ticker(self) -> None:
        interval = self.cfg.state.eval_interval_s
        while True:
            await asyncio.sleep(interval)
            for _ in self._evaluation():
                await asyncio.sleep(0)  # ingest runs between slices: the round is too long to hold the loop
            self.supervisor.progress("tick")

    def evaluate(self) -> None:
        """One whole evaluation round at once (the ticker lets ingest run between its slices)."""
        for _ in self._evaluation():
            pass

    def _evaluation(self) -> Iterator[None]:
        """One evaluation round, pausing after each slice of the fleet: notice a step of the host clock first,
        then the time-driven conditions. A round that stops hearing the broker midway leaves the rest (the next
        round starts deaf)."""
        now = self.clock()
        jump = self.clock_watch.check(now, self.monotonic())
        if jump:
            direction = "forward" if jump > 0 else "backward"
            self.metrics.clock_jumps.labels(direction).inc()
            log.warning(
                "host clock stepped %s by %.1f s (wall clock vs monotonic clock): silence is measured from now, "
                "every terminal gets a full offline period", direction, abs(jump),
            )
            rebase_after_jump(self.fleet, now, jump)
        if not self.hearing():
            # Deaf (broker down, link lost, not yet subscribed): a silent terminal cannot be told from our own
            # silence, so time-driven conditions wait; PosCollectorMqttDisconnected pages once instead of every
            # terminal paging offline.
            if self.deaf_since is None:
                self.deaf_since = now
            return
        if self.deaf_since is not None:
            deaf_for, self.deaf_since = now - self.deaf_since, None
            # Terminals were cut off too and come back on their own backoff, at most about as long as the outage.
            grace = min(deaf_for, self.cfg.thresholds.reconnect_grace_s)
            if deaf_for > 0:
                log.warning("hearing the broker again after %.1f s: silence is measured from %.1f s from now, every "
                            "terminal gets a full offline period after that", deaf_for, grace)
            self.fleet.started_at = max(self.fleet.started_at, now + grace)
            if self.nats is not None:
                # The feed's records of uploads made meanwhile may still be on their way (its consumer recovers on
                # its own): upstream_missing gets its full grace from now, as silence does.
                for feed in self.fleet.feeds.values():
                    feed.alive_since = max(feed.alive_since, now + grace)
        for out in self.fleet.tick_slices(now):
            self._emit(out)
            yield
            if not self.hearing():
                return

    def hearing(self) -> bool:
        """True while subscribed to the broker: only then is a terminal's silence evidence about the terminal."""
        return self.ingest is not None and self.ingest.subscribed

    def snapshot_now(self) -> bool:
        """Write a snapshot now; failures are counted and logged, never fatal."""
        path = self.cfg.state.snapshot_path
        if not path or self.keeper is not None:  # leased partitions keep their state in NATS (Keeper.save)
            return False
        # Recounted on every round: a person moving the corrupt files away resolves PosCollectorSnapshotCorrupt.
        self.metrics.snapshot_corrupt_files.set(len(corrupt_files(path)))
        try:
            save_snapshot(self.fleet, path)
        except SnapshotError as err:
            self.metrics.snapshot_failures.inc()
            log.error("%s", err)
            return False
        self.metrics.snapshot_time = self.clock()
        return True

    async def _snapshotter(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.state.snapshot_interval_s)
            if self.keeper is not None:  # per partition, in NATS (the next owner reads it)
                await self.keeper.save_all()
            else:
                self.snapshot_now()
            self.supervisor.progress("snapshot")

    def reload_registry(self) -> bool:
        """Re-read the registry file; a bad file keeps the old registry."""
        try:
            registry = self._load_registry()
        except (OSError, RegistryError) as err:
            self.metrics.registry_reloads.labels("error").inc()
            log.error("registry reload failed, keeping the previous one: %s", err)
            return False
        self.registry_file = registry
        self.fleet.set_registry(registry)
        self.metrics.registry_reloads.labels("ok").inc()
        log.info("registry loaded: %d terminals", len(registry.entries))
        return True

    async def _registry_watcher(self) -> None:
        path = self.cfg.registry.path
        if not path:
            return
        while True:
            await asyncio.sleep(self.cfg.registry.reload_interval_s)
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            if mtime != self.registry_file.mtime:
                self.reload_registry()
            self.supervisor.progress("registry")

    def readiness_problems(self) -> list[str]:
        """Why the collector is not ready (empty when ready)."""
        problems = []
        if self.nats is not None:
            if not self.nats.connected():
                problems.append("cannot reach NATS")
            elif not self.nats.thread_alive():
                problems.append("NATS ingest tasks ended")
            elif not self.nats.owned():
                problems.append("owns no partition")
            if self.nats.deaf:
                problems.append(f"NATS does not answer for partitions {sorted(self.nats.deaf)} (-1: the acquirer "
                                f"feed, -2: the stream itself)")
            if self.keeper is not None and not self.keeper.connected:
                problems.append("cannot renew partition leases in NATS KV")
        elif self.ingest is None or not self.ingest.subscribed:
            problems.append("not connected/subscribed to the MQTT broker")
        elif not self.ingest.thread_alive():
            problems.append("MQTT connection task ended")
        problems.extend(self.supervisor.problems())
        return problems


async def run_collector(
    cfg: Config,
    on_ready: Callable[[Collector], None] | None = None,
    restart_policy: RestartPolicy = DEFAULT_POLICY,
) -> int:
    """Run until SIGTERM/SIGINT (exit code 0) or a background task that cannot stay up (1); final snapshot."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    try:
        async with Collector.load(cfg, restart_policy=restart_policy) as collector:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, collector.stop)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, collector.reload_registry)
            if on_ready is not None:
                on_ready(collector)
            await collector.wait_stopped()
            if collector.supervisor.fatal:
                log.critical("stopping with exit code %d: %s", collector.exit_code, collector.supervisor.fatal)
            else:
                log.info("stopping: draining, final snapshot")
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
    return collector.exit_code

