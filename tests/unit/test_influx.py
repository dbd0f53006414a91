"""The InfluxDB writer against a scripted HTTP server: batching, outages, 4xx, Retry-After, spool, shutdown."""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from exporters.history.influx import (
    DROP_REASONS,
    RESULTS,
    InfluxConfig,
    InfluxWriter,
    _parse_retry_after,
    resolve_token,
)
from tests.harness.core import free_port

Reply = tuple[int, dict[str, str], str]


@dataclass
class FakeInflux:
    """A /api/v2/write endpoint that answers from a script, then 204; records what it stored."""

    port: int = field(default_factory=free_port)
    script: list[Reply | None] = field(default_factory=list)  # None = hang until the client gives up
    stored: list[str] = field(default_factory=list)
    requests: list[tuple[float, int, int]] = field(default_factory=list)  # (monotonic time, lines, status)
    default: Reply = (204, {}, "")
    delay_s: float = 0.0  # a slow server
    runner: web.AppRunner | None = None
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        lines = body.split("\n") if body else []
        reply = self.script.pop(0) if self.script else self.default
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if reply is None:
            await self.release.wait()
            raise web.HTTPServiceUnavailable()
        status, headers, text = reply
        self.requests.append((time.monotonic(), len(lines), status))
        if status == 204:
            self.stored.extend(lines)
        elif status == 422:
            self.stored.extend(lines[2:])  # like InfluxDB: the rest is written
        return web.Response(status=status, headers=headers, text=text)

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/v2/write", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()  # hanging handlers end, so shutdown does not wait for them
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def server() -> AsyncIterator[FakeInflux]:
    fake = FakeInflux()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def config(url: str, **kw: Any) -> InfluxConfig:
    base: dict[str, Any] = {
        "enabled": True, "url": url, "batch_size": 10, "flush_interval_s": 0.05,
        "backoff_initial_s": 0.05, "backoff_max_s": 0.2, "request_timeout_s": 2.0,
    }
    base.update(kw)
    return InfluxConfig(**base)


def lines(n: int, start: int = 0) -> list[str]:
    return [f"heartbeat,terminal_id=T{i % 7} seq={i}i {1_700_000_000_000_000_000 + i}" for i in range(start, start + n)]


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, labels)
    assert v is not None, f"{name}{labels} missing"
    return v


async def until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# -- configuration --------------------------------------------------------------------------------------


def test_defaults_are_valid_and_disabled() -> None:
    cfg = InfluxConfig()
    assert not cfg.enabled and cfg.batch_size == 5000


def test_unknown_keys_are_errors() -> None:
    with pytest.raises(msgspec.ValidationError, match="bucket_name"):
        msgspec.convert({"bucket_name": "x"}, InfluxConfig)


def test_every_problem_is_reported() -> None:
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert({"url": "influx:8086", "batch_size": 0, "backoff_max_s": -1}, InfluxConfig)
    text = str(err.value)
    assert "url" in text and "batch_size" in text and "backoff_max_s" in text


def test_token_from_environment_wins_over_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    cfg = InfluxConfig(token_file=str(token_file))
    assert resolve_token(cfg, {"POSFLEET_INFLUX_TOKEN": "from-env"}) == "from-env"
    assert resolve_token(cfg, {}) == "from-file"
    assert resolve_token(InfluxConfig(), {}) is None
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_token(cfg, {})


async def test_token_is_sent(server: FakeInflux, tmp_path: Path) -> None:
    seen: list[str] = []
    original = server.handle

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return await original(request)

    server.handle = handle  # type: ignore[method-assign]
    await server.stop()
    await server.start()
    async with InfluxWriter(config(server.url), CollectorRegistry(), tmp_path / "spool", token="s3cret") as w:
        w.write(lines(1)[0])
        assert await w.flush(5)
    assert seen == ["Token s3cret"]


# -- metrics --------------------------------------------------------------------------------------------


async def test_self_metrics_exist_from_the_start(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    InfluxWriter(config("http://127.0.0.1:1"), reg, tmp_path / "spool")
    for result in RESULTS:
        assert value(reg, "posfleet_influx_points_total", result=result) == 0
    for reason in DROP_REASONS:
        assert value(reg, "posfleet_influx_dropped_total", reason=reason) == 0
    assert value(reg, "posfleet_influx_up") == 1
    assert value(reg, "posfleet_influx_spool_bytes") == 0
    assert value(reg, "posfleet_influx_buffer_points") == 0
    assert value(reg, "posfleet_influx_write_seconds_count") == 0


# -- the healthy path -----------------------------------------------------------------------------------


async def test_batches_by_size_and_time_in_order(server: FakeInflux, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    data = lines(25)
    async with InfluxWriter(config(server.url, flush_interval_s=0.2), reg, tmp_path / "spool") as w:
        for line in data:
            w.write(line)
        await until("two full batches", lambda: len(server.requests) >= 2)
        assert [r[1] for r in server.requests[:2]] == [10, 10]
        await until("the partial batch, by time", lambda: len(server.stored) == 25)  # no flush() call
    assert server.stored == data
    assert [r[1] for r in server.requests] == [10, 10, 5]
    assert value(reg, "posfleet_influx_points_total", result="written") == 25
    assert value(reg, "posfleet_influx_write_seconds_count") == 3


async def test_disabled_writer_does_nothing(tmp_path: Path) -> None:
    async with InfluxWriter(InfluxConfig(), CollectorRegistry(), tmp_path / "spool") as w:
        w.write("m f=1i 1")
        assert await w.flush(0.1)
    assert not (tmp_path / "spool").exists()


# -- outages --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_retryable_answers_spool_and_replay_in_order(server: FakeInflux, tmp_path: Path, status: int) -> None:
    reg = CollectorRegistry()
    server.script = [(status, {}, '{"message":"busy"}')] * 6
    data = lines(95)
    async with InfluxWriter(config(server.url), reg, tmp_path / "spool") as w:
        for line in data[:50]:
            w.write(line)
        await until("the server to be marked down", lambda: value(reg, "posfleet_influx_up") == 0)
        for line in data[50:]:
            w.write(line)
        assert await w.flush(10)
        assert value(reg, "posfleet_influx_up") == 1
    assert server.stored == data  # each exactly once, oldest first
    assert value(reg, "posfleet_influx_points_total", result="spooled") > 0
    written = value(reg, "posfleet_influx_points_total", result="written")
    replayed = value(reg, "posfleet_influx_points_total", result="replayed")
    assert written + replayed == 95
    assert value(reg, "posfleet_influx_spool_bytes") == 0
    assert value(reg, "posfleet_influx_spool_points") == 0
    code = "429" if status == 429 else "5xx"
    assert value(reg, "posfleet_influx_responses_total", code=code) == 6
    assert sum(value(reg, "posfleet_influx_dropped_total", reason=r) for r in DROP_REASONS) == 0


async def test_retry_after_is_honoured(server: FakeInflux, tmp_path: Path) -> None:
    server.script = [(429, {"Retry-After": "1"}, "slow down")]
    async with InfluxWriter(config(server.url), CollectorRegistry(), tmp_path / "spool") as w:
        for line in lines(10):
            w.write(line)
        assert await w.flush(10)
    (t_refused, _, s1), (t_retry, _, s2) = server.requests
    assert (s1, s2) == (429, 204)
    assert t_retry - t_refused >= 0.95  # backoff alone would have retried after ~0.05 s


async def test_backoff_grows_exponentially_up_to_its_cap(server: FakeInflux, tmp_path: Path) -> None:
    server.script = [(503, {}, "down")] * 6
    async with InfluxWriter(config(server.url, backoff_initial_s=0.1, backoff_max_s=0.4), CollectorRegistry(),
                            tmp_path / "spool") as w:
        for line in lines(10):
            w.write(line)
        assert await w.flush(20)
    times = [t for t, _, _ in server.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 6
    for k, gap in enumerate(gaps):
        # each delay is between 50 % and 100 % of min(cap, initial * 2^k): check the lower half, which must hold
        assert gap >= 0.5 * min(0.4, 0.1 * 2**k) - 0.01, (k, gaps)
    assert gaps[3] >= 0.2 - 0.01  # grown: 0.8 s would be uncapped; capped at 0.4 -> at least 0.2


@pytest.mark.parametrize(("header", "expected"), [
    ("3", 3.0), ("0", 0.0), ("-5", 0.0), ("99999", 3600.0), ("soon", None), ("", None),
])
def test_retry_after_parsing(header: str, expected: float | None) -> None:
    assert _parse_retry_after(header) == expected


def test_retry_after_as_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = _parse_retry_after(when)
    assert parsed is not None and 25 <= parsed <= 31


async def test_unreachable_server_then_recovery(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    fake = FakeInflux()  # not started yet: connection refused
    data = lines(40)
    async with InfluxWriter(config(fake.url), reg, tmp_path / "spool") as w:
        for line in data:
            w.write(line)
        await until("everything spooled", lambda: value(reg, "posfleet_influx_points_total", result="spooled") == 40)
        assert value(reg, "posfleet_influx_spool_bytes") > 0
        assert value(reg, "posfleet_influx_responses_total", code="connection_error") >= 1
        await fake.start()
        try:
            assert await w.flush(10)
        finally:
            await fake.stop()
    assert fake.stored == data
    assert value(reg, "posfleet_influx_points_total", result="replayed") == 40


async def test_hanging_server_times_out_and_retries(server: FakeInflux, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    server.script = [None]
    data = lines(10)
    async with InfluxWriter(config(server.url, request_timeout_s=0.3), reg, tmp_path / "spool") as w:
        for line in data:
            w.write(line)
        assert await w.flush(10)
    assert server.stored == data  # the timed-out request never reached storage; the retry did
    assert value(reg, "posfleet_influx_responses_total", code="timeout") == 1


async def test_slow_server_overflows_to_the_spool_not_to_drops(server: FakeInflux, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    server.delay_s = 0.1  # 10 lines per 0.1 s: far slower than the offered load
    data = lines(600)
    async with InfluxWriter(config(server.url, max_buffer_bytes=20_000), reg, tmp_path / "spool") as w:
        for i in range(0, 600, 50):
            for line in data[i : i + 50]:
                w.write(line)
            await asyncio.sleep(0.02)
            assert value(reg, "posfleet_influx_buffer_points") * 52 <= 20_000
        assert value(reg, "posfleet_influx_points_total", result="spooled") > 0
        server.delay_s = 0
        assert await w.flush(20)
    assert server.stored == data
    assert value(reg, "posfleet_influx_points_total", result="dropped") == 0
    assert value(reg, "posfleet_influx_up") == 1  # slow is not down


async def test_hanging_request_does_not_fill_memory(server: FakeInflux, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    server.script = [None]  # the first request never gets an answer (a server that stopped responding)
    data = lines(800)
    cfg = config(server.url, max_buffer_bytes=20_000, request_timeout_s=1.0)
    async with InfluxWriter(cfg, reg, tmp_path / "spool") as w:
        for i in range(0, 800, 40):
            for line in data[i : i + 40]:
                w.write(line)
            await asyncio.sleep(0.02)  # 800 lines arrive while the first request hangs
        assert await w.flush(20)
    assert value(reg, "posfleet_influx_points_total", result="dropped") == 0
    assert value(reg, "posfleet_influx_points_total", result="spooled") > 0
    assert sorted(server.stored) == sorted(data)  # each once; the hung batch may come after later ones


# -- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
async def test_4xx_is_counted_and_not_retried(server: FakeInflux, tmp_path: Path, status: int) -> None:
    reg = CollectorRegistry()
    server.script = [(status, {}, '{"code":"invalid","message":"no"}')]
    data = lines(30)
    async with InfluxWriter(config(server.url), reg, tmp_path / "spool") as w:
        for line in data:
            w.write(line)
        assert await w.flush(5)
    assert [r[2] for r in server.requests] == [status, 204, 204]
    assert server.stored == data[10:]
    assert value(reg, "posfleet_influx_dropped_total", reason="rejected_4xx") == 10
    assert value(reg, "posfleet_influx_points_total", result="dropped") == 10
    assert value(reg, "posfleet_influx_responses_total", code=str(status)) == 1
    assert value(reg, "posfleet_influx_up") == 1  # the server works; the data was bad


async def test_partial_write_counts_dropped_points(server: FakeInflux, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    msg = '{"code":"unprocessable entity","message":"partial write: points beyond retention policy dropped=2"}'
    server.script = [(422, {}, msg)]
    async with InfluxWriter(config(server.url), reg, tmp_path / "spool") as w:
        for line in lines(10):
            w.write(line)
        assert await w.flush(5)
    assert len(server.requests) == 1
    assert value(reg, "posfleet_influx_dropped_total", reason="partial_write") == 2
    assert value(reg, "posfleet_influx_points_total", result="written") == 8


# -- shutdown and restart -------------------------------------------------------------------------------


async def test_close_spools_what_it_cannot_send_and_next_start_replays(tmp_path: Path) -> None:
    fake = FakeInflux()
    spool = tmp_path / "spool"
    data = lines(33)
    w = InfluxWriter(config(fake.url, shutdown_deadline_s=0.3), CollectorRegistry(), spool)
    await w.start()
    for line in data:
        w.write(line)
    started = time.monotonic()
    await asyncio.wait_for(w.close(), 10)  # the test fails if close() does not respect its deadline
    assert time.monotonic() - started < 5

    await fake.start()
    try:
        reg = CollectorRegistry()
        async with InfluxWriter(config(fake.url), reg, spool) as w2:
            await until("replay", lambda: len(fake.stored) == 33)
            assert await w2.flush(5)
    finally:
        await fake.stop()
    assert fake.stored == data
    assert value(reg, "posfleet_influx_points_total", result="replayed") == 33


async def test_flush_returns_at_its_deadline(server: FakeInflux, tmp_path: Path) -> None:
    server.script = [None]
    async with InfluxWriter(config(server.url, request_timeout_s=30, shutdown_deadline_s=0.2),
                            CollectorRegistry(), tmp_path / "spool") as w:
        w.write(lines(1)[0])
        assert not await asyncio.wait_for(w.flush(0.3), 5)
    # the cancelled request's batch went to the spool for the next start
    assert any((tmp_path / "spool").glob("*.seg"))


# -- memory and spool bounds ----------------------------------------------------------------------------


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    paths: list[Path] = []
    yield paths
    for p in paths:
        subprocess.run(["chattr", "-i", str(p)], check=False)


async def test_unwritable_spool_is_loud_counted_and_never_blocks_the_caller(
    tmp_path: Path, immutable: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    reg = CollectorRegistry()
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["chattr", "+i", str(spool)], check=True)
    immutable.append(spool)
    cfg = config("http://127.0.0.1:1", max_buffer_bytes=20_000, shutdown_deadline_s=0.2)  # nothing listens on port 1
    with caplog.at_level(logging.ERROR, logger="exporters.history.influx"):
        async with InfluxWriter(cfg, reg, spool) as w:
            for i in range(30):
                for line in lines(100, i * 100):
                    w.write(line)  # plain call: it cannot block; it must not raise
                await asyncio.sleep(0.01)
            await until("spool marked unwritable", lambda: value(reg, "posfleet_influx_spool_writable") == 0)
            await until("drops counted", lambda: value(
                reg, "posfleet_influx_dropped_total", reason="spool_unwritable"
            ) + value(reg, "posfleet_influx_dropped_total", reason="buffer_full") > 0)
            assert value(reg, "posfleet_influx_buffer_points") * 70 <= 20_000 + 10 * 70
    assert any("cannot" in r.getMessage() and "monitoring continues" in r.getMessage() for r in caplog.records)
    lost = sum(value(reg, "posfleet_influx_dropped_total", reason=r) for r in DROP_REASONS)
    assert lost == value(reg, "posfleet_influx_points_total", result="dropped")


async def test_full_spool_drops_oldest_and_counts(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    fake = FakeInflux()
    cfg = config(fake.url, spool_max_bytes=4000, spool_segment_bytes=1000, spool_compress=False)
    async with InfluxWriter(cfg, reg, tmp_path / "spool") as w:
        for i in range(20):
            for line in lines(10, i * 10):
                w.write(line)
            await asyncio.sleep(0.02)
        await until("all data spooled or dropped", lambda: value(
            reg, "posfleet_influx_points_total", result="spooled") == 200)
        dropped = value(reg, "posfleet_influx_dropped_total", reason="spool_full")
        assert dropped > 0
        assert value(reg, "posfleet_influx_spool_bytes") <= 4000
        await fake.start()
        try:
            assert await w.flush(10)
        finally:
            await fake.stop()
    assert len(fake.stored) + dropped == 200
    assert fake.stored == lines(200)[200 - len(fake.stored):]  # the newest survive, in order
