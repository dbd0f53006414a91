"""Terminal history to InfluxDB: batched writes on the v2 write API, a disk spool through outages, self-metrics.

Data path: `write()` appends a line to the current batch (O(1), never blocks, never raises); full batches and,
every `flush_interval_s`, the partial one are sealed into an in-memory FIFO. One pump task sends the oldest
data first: the spool's head while the spool holds anything, otherwise the memory FIFO's head. A transport
error, 5xx or 429 marks the server down: from then on sealed batches go to the spool (durable, bounded in
bytes) and only the spool's head is retried, after an exponential backoff with jitter (at least Retry-After).
Everything in the spool is older than everything in memory, so replay keeps the original order. Points carry
the receive time as timestamp, so a batch sent twice overwrites itself instead of duplicating.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from collector.config import TOKEN_ENV, InfluxConfig, resolve_token
from exporters.history.spool import Spool

__all__ = ["DROP_REASONS", "TOKEN_ENV", "InfluxConfig", "InfluxWriter", "resolve_token"]

log = logging.getLogger(__name__)

RESULTS = ("written", "spooled", "replayed", "dropped")
DROP_REASONS = (
    "spool_full",  # the spool reached spool_max_bytes: its oldest segment was deleted
    "rejected_4xx",  # the server refused the batch (400, 401, 403, 404, 413, ...): retrying cannot help
    "partial_write",  # 422: the server stored the batch except `dropped=N` points (e.g. beyond retention)
    "spool_unwritable",  # the spool could not be written while the server was down and memory was full
    "buffer_full",  # memory bound reached while neither the server nor the spool could take data
    "spool_corrupt",  # records found damaged in the spool (torn write at a crash, disk corruption)
)
RESPONSE_CODES = (
    "2xx", "400", "401", "403", "404", "413", "422", "429", "other_4xx", "5xx", "timeout", "connection_error",
)
_SPOOL_REOPEN_S = 30.0  # how often an unusable spool directory is tried again
_LOG_EVERY_S = 60.0  # repeated errors of one kind are logged at most this often
_PARTIAL_RE = re.compile(rb"dropped=(\d+)")

T = TypeVar("T")


class _Metrics:
    """Writer self-metrics, every label value present from the start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.points = Counter("posfleet_influx_points", "Points by outcome.", ["result"], registry=registry)
        self.dropped = Counter("posfleet_influx_dropped", "Points lost, by reason.", ["reason"],
                               registry=registry)
        self.responses = Counter("posfleet_influx_responses", "Write requests by answer.", ["code"],
                                 registry=registry)
        self.write_seconds = Histogram(
            "posfleet_influx_write_seconds", "Duration of one write request.", registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
        )
        self.spool_bytes = Gauge("posfleet_influx_spool_bytes", "Bytes in the disk spool.", registry=registry)
        self.spool_points = Gauge("posfleet_influx_spool_points", "Points waiting in the disk spool.",
                                  registry=registry)
        self.spool_writable = Gauge("posfleet_influx_spool_writable",
                                    "1 when the spool directory can be written.", registry=registry)
        self.buffer_points = Gauge("posfleet_influx_buffer_points", "Points waiting in memory.",
                                   registry=registry)
        self.up = Gauge("posfleet_influx_up", "0 while writes fail and are retried after a backoff, else 1.",
                        registry=registry)
        self.result = {r: self.points.labels(r) for r in RESULTS}
        self.reason = {r: self.dropped.labels(r) for r in DROP_REASONS}
        self.code = {c: self.responses.labels(c) for c in RESPONSE_CODES}
        self.up.set(1)
        self.spool_writable.set(1)


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: str  # "ok", "retry", "reject", "cancelled"
    dropped: int = 0  # points the server refused (all of a rejected batch, N of a partial write)
    reason: str = "rejected_4xx"
    retry_after: float | None = None


class InfluxWriter:
    """Buffered, batched, spooled InfluxDB writer; use as `async with InfluxWriter(...) as w: w.write(line)`."""

    def __init__(
        self,
        cfg: InfluxConfig,
        registry: CollectorRegistry,
        spool_dir: str | os.PathLike[str],
        *,
        token: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._m = _Metrics(registry)
        self._spool = Spool(Path(spool_dir), cfg.spool_max_bytes, cfg.spool_segment_bytes,
                            fsync=cfg.spool_fsync, compress=cfg.spool_compress)
        self._token = token if token is not None else (resolve_token(cfg) if cfg.enabled else None)
        self._clock = clock
        self._batch_size = cfg.batch_size
        self._buf: list[str] = []
        self._ready: deque[list[str]] = deque()
        self._ready_points = 0
        self._mem_bytes = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._up = True
        self._attempt = 0
        self._retry_at = 0.0
        self._down_since = 0.0
        self._spool_ok = False
        self._spool_opened = False
        self._spool_retry_at = 0.0
        self._spool_points = 0
        self._stopping = False
        self._post_task: asyncio.Task[_Outcome] | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._write_api: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_log: dict[str, float] = {}
        self._m.buffer_points.set_function(lambda: len(self._buf) + self._ready_points)

    # -- public API -----------------------------------------------------------------------------------

    async def __aenter__(self) -> InfluxWriter:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the pump task (no-op when disabled); the spool is opened and replayed in the background."""
        if not self._cfg.enabled or self._task is not None:
            return
        options: dict[str, Any] = {"token": self._token}  # None: no Authorization header at all
        self._client = InfluxDBClientAsync(
            url=self._cfg.url, org=self._cfg.org, timeout=int(self._cfg.request_timeout_s * 1000),
            enable_gzip=self._cfg.gzip, **options,
        )
        self._write_api = self._client.write_api()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="influx-spool")
        self._task = asyncio.create_task(self._run(), name="influx-writer")
        self._task.add_done_callback(self._pump_ended)

    def _pump_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._stopping:
            # history stops here, monitoring does not: say so loudly and show it on /metrics
            log.critical("influx writer stopped: %r; history is no longer written", task.exception())
            self._m.up.set(0)

    def write(self, line: str) -> None:
        """Queue one line of line protocol (no trailing newline); O(1), never blocks, never raises."""
        if self._task is None:
            return
        if self._mem_bytes >= self._cfg.max_buffer_bytes:
            self._drop("buffer_full", 1)
            return
        buf = self._buf
        buf.append(line)
        self._mem_bytes += len(line) + 1
        if len(buf) >= self._batch_size:
            self._seal()

    async def flush(self, deadline_s: float) -> bool:
        """Send everything queued so far (memory and spool) within `deadline_s`; True if nothing is left."""
        if self._task is None:
            return True
        self._seal()
        end = self._clock() + deadline_s
        while not self._drained():
            remaining = end - self._clock()
            if remaining <= 0 or self._task.done():
                return False
            self._progress.clear()
            self._wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), min(remaining, 0.5))
        return True

    async def close(self) -> None:
        """Flush within `shutdown_deadline_s`, spool what is left, release everything."""
        if self._task is None:
            return
        flushed = await self.flush(self._cfg.shutdown_deadline_s)
        self._stopping = True
        if self._post_task is not None:
            self._post_task.cancel()  # a request still in flight at the deadline is spooled instead
        self._wake.set()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("influx writer: the pump task had failed")
        self._seal()
        if self._ready_points:
            if not self._spool_ok:
                await self._open_spool()  # one last try: the directory may have been fixed meanwhile
            await self._spool_ready()
        if self._ready_points:
            log.error("influx writer closed with %d points neither written nor spooled: lost",
                      self._ready_points)
            while self._ready:
                self._drop("spool_unwritable", len(self._pop_ready()))
        log.info("influx writer closed: %s; %d points left in the spool for the next start",
                 "all data written" if flushed else "flush deadline reached", self._spool_points)
        await self._client.close()
        assert self._executor is not None
        await self._in_thread(self._spool.close)
        self._executor.shutdown(wait=True)
        self._task = None

    # -- pump -----------------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._open_spool()
        tick = self._clock() + self._cfg.flush_interval_s
        while not self._stopping:
            now = self._clock()
            if now >= tick:
                if self._buf:
                    self._seal()
                tick = now + self._cfg.flush_interval_s
            if not self._spool_ok and now >= self._spool_retry_at:
                await self._open_spool()
            try:
                busy = await self._step()
            except Exception:
                # never let a bug end history writing silently: log, back off, carry on
                self._log_limited("bug", logging.ERROR, "influx writer: unexpected error", exc_info=True)
                busy = False
                self._set_down(None)
            self._progress.set()
            if busy:
                continue
            wait_until = tick
            if not self._up and (self._ready or self._spool_points):
                wait_until = min(wait_until, self._retry_at)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, wait_until - self._clock()))

    async def _step(self) -> bool:
        """Do one unit of work; False when there was nothing to do now."""
        cfg = self._cfg
        if not self._up and self._clock() < self._retry_at:
            # down: keep memory small and durable until the next retry
            if self._ready and self._spool_ok:
                return await self._spool_ready()
            self._shed_if_full()
            return False
        if self._ready and self._spool_ok and self._mem_bytes > cfg.max_buffer_bytes // 2:
            # the server is slower than ingest: memory stays bounded, the excess (oldest first) waits on disk
            return await self._spool_ready(keep_bytes=cfg.max_buffer_bytes // 4)
        if self._spool_points > 0:
            rec = await self._in_thread(self._spool.peek)
            self._account_corrupt()
            if rec is None:
                self._spool_points = 0
                return True
            outcome = await self._post(rec.payload, from_memory=False)
            if outcome.kind in ("ok", "reject"):
                await self._in_thread(self._spool.ack, rec)
                self._spool_points = self._spool.points
                self._sync_spool_gauges()
                self._m.result["replayed"].inc(rec.points - outcome.dropped)
                self._account_outcome(outcome)
                if self._spool_points == 0:
                    log.info("influx spool drained")
            return outcome.kind != "cancelled"
        if self._ready:
            batch = self._ready[0]
            outcome = await self._post("\n".join(batch).encode(), from_memory=True)
            if outcome.kind in ("ok", "reject"):
                self._pop_ready()
                self._m.result["written"].inc(len(batch) - outcome.dropped)
                self._account_outcome(outcome)
            elif outcome.kind == "retry" and self._mem_bytes > cfg.max_buffer_bytes // 2:
                self._shed_if_full()
            return outcome.kind != "cancelled"
        return False

    async def _post(self, body: bytes, from_memory: bool) -> _Outcome:
        """One write request, run as a task so memory can be spooled while it is in flight."""
        half = self._cfg.max_buffer_bytes // 2
        task = asyncio.create_task(self._request(body))
        self._post_task = task
        try:
            while True:
                # wake up for every sealed batch, not only every flush interval: memory is checked promptly
                self._wake.clear()
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({task, woken}, timeout=self._cfg.flush_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if task.done():
                    break
                if not from_memory and self._ready and (not self._up or self._mem_bytes > half):
                    # the spool's head is in flight: memory goes to the spool's tail, order kept
                    await self._spool_ready()
                elif from_memory and self._mem_bytes > half:
                    # a memory batch hangs (e.g. a server that stopped answering, up to request_timeout_s):
                    # the batches behind it go to the spool; if it then fails it follows them, so order is
                    # inverted by at most the batches spooled meanwhile (timestamps are in the points)
                    await self._spool_ready(keep_bytes=half // 2, skip_first=True)
        finally:
            self._post_task = None
        if task.cancelled():
            return _Outcome("cancelled")
        outcome = task.result()
        if outcome.kind == "retry":
            self._set_down(outcome.retry_after)
        elif outcome.kind in ("ok", "reject"):
            self._set_up()
        return outcome

    async def _request(self, body: bytes) -> _Outcome:
        cfg = self._cfg
        started = time.perf_counter()
        try:
            await self._write_api.write(bucket=cfg.bucket, org=cfg.org, record=body,
                                        write_precision=WritePrecision.NS)
        except ApiException as e:
            return self._classify(e, body)
        except TimeoutError:
            self._m.code["timeout"].inc()
            self._log_limited("timeout", logging.WARNING, "influx write timed out after %.1f s",
                              cfg.request_timeout_s)
            return _Outcome("retry")
        except (aiohttp.ClientError, OSError) as e:
            self._m.code["connection_error"].inc()
            self._log_limited("conn", logging.WARNING, "influx write failed: %s", e)
            return _Outcome("retry")
        finally:
            self._m.write_seconds.observe(time.perf_counter() - started)
        self._m.code["2xx"].inc()
        return _Outcome("ok")

    def _classify(self, e: ApiException, body: bytes) -> _Outcome:
        status = int(e.status or 0)
        text = e.body if isinstance(e.body, bytes) else str(e.body or e.reason or "").encode()
        points = body.count(b"\n") + 1
        if status == 429 or status >= 500 or status == 0:
            self._m.code["429" if status == 429 else "5xx"].inc()
            self._log_limited(f"http{status}", logging.WARNING, "influx write answered %d: %s",
                              status, text[:300])
            return _Outcome("retry", retry_after=_parse_retry_after(getattr(e, "retry_after", None)))
        code = str(status) if str(status) in RESPONSE_CODES else "other_4xx"
        self._m.code[code].inc()
        if status == 422:
            match = _PARTIAL_RE.search(text)
            dropped = min(points, int(match.group(1))) if match else points
            self._log_limited("http422", logging.WARNING, "influx partial write, %d of %d points dropped: %s",
                              dropped, points, text[:300])
            return _Outcome("reject", dropped=dropped, reason="partial_write")
        self._log_limited(f"http{status}", logging.ERROR,
                          "influx write rejected with %d, %d points dropped (not retried): %s",
                          status, points, text[:300])
        return _Outcome("reject", dropped=points)

    def _account_outcome(self, outcome: _Outcome) -> None:
        if outcome.kind == "reject":
            self._drop(outcome.reason, outcome.dropped)

    # -- spool ----------------------------------------------------------------------------------------

    async def _open_spool(self) -> None:
        try:
            report = await self._in_thread(self._spool.open)
        except OSError as e:
            self._spool_failed("open", e)
            return
        self._spool_opened = True
        self._spool_ok = True
        self._m.spool_writable.set(1)
        self._spool_points = report.points
        self._sync_spool_gauges()
        if report.corrupt_points or report.corrupt_bytes:
            self._drop("spool_corrupt", report.corrupt_points)
        if report.points:
            log.info("influx spool %s holds %d points (%d bytes) from before; replaying them first",
                     self._spool.directory, report.points, report.size_bytes)

    async def _spool_ready(self, keep_bytes: int = 0, skip_first: bool = False) -> bool:
        """Move sealed batches, oldest first, from memory to the spool's tail until memory is <= `keep_bytes`."""
        moved = False
        first = 1 if skip_first else 0  # the batch in flight stays where it is
        while len(self._ready) > first and self._mem_bytes > keep_bytes and self._spool_ok:
            batch = self._ready[first]
            try:
                result = await self._in_thread(self._spool.append, "\n".join(batch).encode(), len(batch))
            except OSError as e:
                self._spool_failed("append", e)
                break
            self._pop_ready(first)
            moved = True
            if result.stored:
                self._m.result["spooled"].inc(len(batch))
                self._spool_points = self._spool.points
            if result.dropped_points:
                self._drop("spool_full", result.dropped_points)
                self._log_limited("spool_full", logging.ERROR,
                                  "influx spool full (%d bytes): dropped the %d oldest points",
                                  self._cfg.spool_max_bytes, result.dropped_points)
            self._sync_spool_gauges()
        self._account_corrupt()
        return moved

    def _spool_failed(self, what: str, e: OSError) -> None:
        self._spool_ok = False
        self._spool_retry_at = self._clock() + _SPOOL_REOPEN_S
        self._m.spool_writable.set(0)
        self._log_limited("spool", logging.ERROR,
                          "influx spool %s: cannot %s (%s); history is kept in memory only (%d bytes max) "
                          "and lost beyond that; monitoring continues", self._spool.directory, what, e,
                          self._cfg.max_buffer_bytes)

    def _shed_if_full(self) -> None:
        """Without a usable spool, memory is the only buffer: drop the oldest batches beyond its bound."""
        if self._spool_ok:
            return
        while self._ready and self._mem_bytes > self._cfg.max_buffer_bytes * 3 // 4:
            batch = self._pop_ready()
            self._drop("spool_unwritable", len(batch))

    def _account_corrupt(self) -> None:
        if self._spool.corrupt_points:
            self._drop("spool_corrupt", self._spool.corrupt_points)
            self._spool.corrupt_points = 0

    def _sync_spool_gauges(self) -> None:
        self._m.spool_bytes.set(self._spool.size_bytes)
        self._m.spool_points.set(self._spool.points)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- state ----------------------------------------------------------------------------------------

    def _seal(self) -> None:
        if self._buf:
            self._ready.append(self._buf)
            self._ready_points += len(self._buf)
            self._buf = []
            self._wake.set()

    def _pop_ready(self, index: int = 0) -> list[str]:
        batch = self._ready.popleft() if index == 0 else self._ready[index]
        if index:
            del self._ready[index]
        self._ready_points -= len(batch)
        self._mem_bytes -= sum(len(line) + 1 for line in batch)
        return batch

    def _drained(self) -> bool:
        return not self._buf and not self._ready and self._spool_points == 0 and self._post_task is None

    def _drop(self, reason: str, n: int) -> None:
        if n:
            self._m.reason[reason].inc(n)
            self._m.result["dropped"].inc(n)

    def _set_down(self, retry_after: float | None) -> None:
        now = self._clock()
        if self._up:
            self._up = False
            self._down_since = now
            self._m.up.set(0)
            log.warning("influx server unavailable; spooling to %s and retrying with backoff",
                        self._spool.directory)
        delay = min(self._cfg.backoff_max_s, self._cfg.backoff_initial_s * 2.0 ** min(self._attempt, 30))
        delay = delay / 2 + random.uniform(0, delay / 2)  # jitter: collectors restarted together spread out
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._attempt += 1
        self._retry_at = now + delay

    def _set_up(self) -> None:
        if not self._up:
            log.info("influx server back after %.1f s; replaying %d spooled points",
                     self._clock() - self._down_since, self._spool_points)
        self._up = True
        self._attempt = 0
        self._m.up.set(1)

    def _log_limited(self, key: str, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        now = self._clock()
        if now - self._last_log.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_log[key] = now
            log.log(level, msg, *args, exc_info=exc_info)


def _parse_retry_after(value: object) -> float | None:
    """Retry-After as seconds (delta-seconds or HTTP date), capped at one hour."""
    if not value:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(text).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), 3600.0)
