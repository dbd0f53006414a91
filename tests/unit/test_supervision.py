"""Supervised background tasks (restart, readiness, exit code) and host clock jumps in the evaluation tick."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter

from collector.app import Collector, run_collector
from collector.config import Config
from collector.fleet.clockjump import ClockWatch
from collector.fleet.protocol import Heartbeat
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import BOUNDS, Transition
from collector.supervise import RestartPolicy, Supervisor, backoff_delay
from tests.harness.core import Process, http_get, wait_until

T0 = 1_764_510_000.0
FAST = RestartPolicy(backoff_min_s=0.01, backoff_max_s=0.05, max_failures=1000, window_s=60)


# ---- the supervisor on its own ------------------------------------------------------------------------------


@pytest.mark.parametrize(("failures", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (50, 30.0)])
def test_backoff_doubles_up_to_the_cap(failures: int, delay: float) -> None:
    assert backoff_delay(RestartPolicy(), failures) == delay


def supervisor(policy: RestartPolicy, clock: Any = None) -> tuple[Supervisor, CollectorRegistry, list[str]]:
    registry = CollectorRegistry()
    restarts = Counter("posfleet_task_restarts", "", ["task"], registry=registry)
    fatal: list[str] = []
    sup = Supervisor(restarts, fatal.append, policy, **({"clock": clock} if clock else {}))
    return sup, registry, fatal


async def test_a_task_that_dies_is_restarted_and_healthy_again_after_progress(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sup, registry, fatal = supervisor(FAST)
    runs = 0
    healthy = asyncio.Event()

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise ValueError(f"boom {runs}")
        sup.progress("work")
        healthy.set()
        await asyncio.Event().wait()

    sup.start("work", task)
    await asyncio.wait_for(healthy.wait(), 10)
    assert runs == 3 and fatal == [] and sup.problems() == []
    assert registry.get_sample_value("posfleet_task_restarts_total", {"task": "work"}) == 2
    died = [r for r in caplog.records if r.levelno == logging.ERROR and "background task work died" in r.getMessage()]
    assert len(died) == 2 and all(r.exc_info for r in died), "logged with the traceback"
    await sup.aclose()


async def test_too_many_deaths_within_the_window_are_fatal() -> None:
    sup, registry, fatal = supervisor(RestartPolicy(0.001, 0.001, max_failures=3, window_s=60))

    async def task() -> None:
        raise RuntimeError("always")

    sup.start("work", task)
    await asyncio.wait_for(asyncio.to_thread(wait_until, lambda: fatal, 10, "the supervisor giving up"), 15)
    assert fatal == ["work"]
    assert sup.fatal == "background task work died 3 times within 60s"
    assert sup.problems() == [sup.fatal]
    assert registry.get_sample_value("posfleet_task_restarts_total", {"task": "work"}) == 3
    await sup.aclose()


async def test_deaths_spread_beyond_the_window_are_not_fatal() -> None:
    now = [0.0]
    sup, _registry, fatal = supervisor(RestartPolicy(0.001, 0.001, max_failures=3, window_s=60), lambda: now[0])
    runs = 0

    async def task() -> None:
        nonlocal runs
        runs += 1
        now[0] += 45  # each death 45 s after the one before: never 3 within 60 s
        if runs < 8:
            raise RuntimeError("now and then")
        await asyncio.Event().wait()

    sup.start("work", task)
    await asyncio.wait_for(asyncio.to_thread(wait_until, lambda: runs >= 8, 10, "eight runs"), 15)
    assert fatal == [] and sup.fatal is None
    await sup.aclose()


async def test_cancellation_is_clean_and_not_a_death() -> None:
    sup, registry, fatal = supervisor(FAST)
    started = asyncio.Event()

    async def task() -> None:
        started.set()
        await asyncio.sleep(3600)

    sup.start("work", task)
    await started.wait()
    await sup.aclose()
    assert fatal == [] and sup.problems() == []
    assert registry.get_sample_value("posfleet_task_restarts_total", {"task": "work"}) == 0


# ---- the collector's tasks, against a real Mosquitto --------------------------------------------------------


def collector_config(tmp_path: Path, broker_port: int) -> Config:
    return msgspec.convert(
        {
            "mqtt": {"url": f"mqtt://127.0.0.1:{broker_port}", "client_id": f"supervision-{tmp_path.name}"},
            "http": {"host": "127.0.0.1", "port": 0},
            "state": {"snapshot_path": str(tmp_path / "state.snapshot"), "eval_interval_s": 0.05,
                      "snapshot_interval_s": 0.5},
        },
        Config,
    )


def sample(c: Collector, name: str, **labels: str) -> float | None:
    return c.prom_registry.get_sample_value(name, labels)


async def test_a_dying_tick_makes_the_collector_not_ready_and_recovers(tmp_path: Path, mosquitto: Process) -> None:
    async with Collector.load(collector_config(tmp_path, mosquitto.port), restart_policy=FAST) as c:
        assert all(sample(c, "posfleet_task_restarts_total", task=t) == 0
                   for t in ("consume", "tick", "snapshot", "registry")), "pre-initialised"
        await asyncio.to_thread(wait_until, lambda: not c.readiness_problems(), 10, "ready")
        real_tick, failing, good_rounds = c.fleet.tick_slices, True, 0

        def tick(now: float) -> Iterator[list[Transition]]:
            nonlocal good_rounds
            if failing:
                raise RuntimeError("detection bug")
            good_rounds += 1
            return real_tick(now)

        c.fleet.tick_slices = tick  # type: ignore[method-assign]
        url = f"http://127.0.0.1:{c.http_port}/readyz"
        _status, body = await asyncio.to_thread(
            wait_until, lambda: (r := http_get(url))[0] == 503 and r, 10, "/readyz reporting the dead tick"
        )
        assert b"background task tick died (RuntimeError); restarting" in body
        assert b"detection bug" not in body, "the message stays in the log: it may quote data"
        await asyncio.to_thread(
            wait_until, lambda: (sample(c, "posfleet_task_restarts_total", task="tick") or 0) >= 3, 10,
            "the tick restarted several times",
        )
        assert sample(c, "posfleet_task_restarts_total", task="consume") == 0
        failing = False
        await asyncio.to_thread(wait_until, lambda: http_get(url)[0] == 200, 10, "ready again")
        await asyncio.to_thread(wait_until, lambda: good_rounds >= 3, 10, "the tick evaluating again")
        assert c.readiness_problems() == [] and c.supervisor.fatal is None


async def test_a_task_that_cannot_stay_up_ends_run_collector_non_zero(
    tmp_path: Path, mosquitto: Process, caplog: pytest.LogCaptureFixture
) -> None:
    def sabotage(c: Collector) -> None:
        def tick(now: float) -> Iterator[list[Transition]]:
            raise RuntimeError("detection bug")

        c.fleet.tick_slices = tick  # type: ignore[method-assign]

    policy = RestartPolicy(backoff_min_s=0.01, backoff_max_s=0.02, max_failures=4, window_s=300)
    code = await asyncio.wait_for(
        run_collector(collector_config(tmp_path, mosquitto.port), sabotage, restart_policy=policy), 60
    )
    assert code == 1
    assert any("background task tick died 4 times within 300s" in r.getMessage() and r.levelno == logging.CRITICAL
               for r in caplog.records)
    assert (tmp_path / "state.snapshot").exists(), "the shutdown stays clean: final snapshot written"


async def test_a_normal_stop_exits_zero(tmp_path: Path, mosquitto: Process) -> None:
    def stop_soon(c: Collector) -> None:
        asyncio.get_running_loop().call_later(0.2, c.stop)

    code = await asyncio.wait_for(run_collector(collector_config(tmp_path, mosquitto.port), stop_soon), 60)
    assert code == 0


# ---- host clock jumps ---------------------------------------------------------------------------------------


REG = Registry({f"T{i}": RegistryEntry.of(f"T{i}", f"M{i}", "acq", "A920", "s1", "r") for i in range(1, 4)})
INTERVAL = 30


class Host:
    """A fake pair of host clocks driving a (not started) collector the way its ticker does."""

    def __init__(self) -> None:
        self.wall, self.mono = T0, 1000.0
        cfg = msgspec.convert(
            {"state": {"snapshot_path": None, "eval_interval_s": 2}, "software_policy": {"*": "3.0.0"}}, Config
        )
        self.c = Collector.load(cfg, clock=lambda: self.wall, monotonic=lambda: self.mono)
        self.c.fleet.set_registry(REG)
        self.hears = True  # whether the collector hears its broker (no broker here: the test says)
        self.c.hearing = lambda: self.hears  # type: ignore[method-assign]
        self.seq: dict[str, int] = {}

    def advance(self, seconds: float, beating: tuple[str, ...] = ("T1", "T2", "T3")) -> None:
        """Time passes in evaluation rounds; the `beating` terminals heartbeat every INTERVAL seconds."""
        for _ in range(int(seconds / 2)):
            self.wall += 2
            self.mono += 2
            if int(self.mono) % INTERVAL == 0:
                for tid in beating:
                    self.beat(tid)
            self.c.evaluate()

    def beat(self, tid: str) -> None:
        seq = self.seq[tid] = self.seq.get(tid, -1) + 1
        hb = msgspec.convert(
            {"tid": tid, "ts": self.wall, "seq": seq, "interval_s": INTERVAL, "txn_count": 0, "uploaded_count": 0,
             "queue_depth": 0, "oldest_queued_ts": None, "mid": f"M{tid[1:]}", "app_version": "3.1.0",
             "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}},
            Heartbeat,
        )
        self.c.fleet.on_heartbeat(hb, self.wall, [])

    def offline(self) -> set[str]:
        return {tid for tid, t in self.c.fleet.terminals.items() if t.conds and "offline" in t.conds}

    def jumps(self, direction: str) -> float | None:
        return self.c.prom_registry.get_sample_value("posfleet_clock_jumps_total", {"direction": direction})


@pytest.fixture
def host() -> Host:
    h = Host()
    h.advance(300)
    assert h.offline() == set()
    return h


def test_a_forward_jump_of_an_hour_raises_no_offline(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    host.wall += 3600
    with caplog.at_level(logging.WARNING):
        host.advance(2)
    assert host.offline() == set(), "no false offline storm"
    assert (host.jumps("forward"), host.jumps("backward")) == (1, 0)
    assert any("host clock stepped forward by 3600.0 s" in r.getMessage() for r in caplog.records)
    host.advance(600)
    assert host.offline() == set()
    # Silence still counts after the jump: a terminal that stops is called offline within its normal period.
    host.advance(3 * INTERVAL + 4, beating=("T1", "T2"))
    assert host.offline() == {"T3"}


def test_a_backward_jump_of_an_hour_still_lets_a_silent_terminal_go_offline(host: Host) -> None:
    host.wall -= 3600
    host.advance(2)
    assert (host.jumps("forward"), host.jumps("backward")) == (0, 1)
    assert all(t.last_rx is not None and t.last_rx <= host.wall for t in host.c.fleet.terminals.values())
    host.advance(3 * INTERVAL + 4, beating=("T1", "T2"))
    assert host.offline() == {"T3"}, "offline within its normal period, not an hour later"


def test_small_drift_is_not_a_jump(host: Host) -> None:
    host.wall += 5  # within max(10 s, 2 x eval interval): NTP slewing, a slow round
    host.advance(2)
    assert (host.jumps("forward"), host.jumps("backward")) == (0, 0)
    assert host.c.fleet.started_at == T0, "no rebase"


@pytest.mark.parametrize(
    ("wall", "mono", "jump"),
    [(2.0, 2.0, 0.0), (12.0, 2.0, 0.0), (13.0, 2.0, 11.0), (-9.0, 2.0, -11.0), (3602.0, 2.0, 3600.0)],
)
def test_clock_watch_measures_the_difference_of_the_advances(wall: float, mono: float, jump: float) -> None:
    watch = ClockWatch(T0, 500.0, tolerance_s=10)
    assert watch.check(T0 + wall, 500.0 + mono) == jump


# ---- the self-metrics above exist from the first scrape ------------------------------------------------------


def test_new_self_metrics_are_pre_initialised_and_bound_refusals_exported() -> None:
    c = Host().c
    value = c.prom_registry.get_sample_value
    assert [value("posfleet_task_restarts_total", {"task": t}) for t in ("consume", "tick", "snapshot", "registry")] \
        == [0, 0, 0, 0]
    assert [value("posfleet_clock_jumps_total", {"direction": d}) for d in ("forward", "backward")] == [0, 0]
    assert [value("posfleet_snapshot_restore", {"source": s}) for s in ("current", "previous", "empty")] == [0, 0, 1]
    assert value("posfleet_snapshot_corrupt_files") == 0
    assert [value("posfleet_bound_refused_total", {"bound": b}) for b in BOUNDS] == [0] * len(BOUNDS)
    assert {"feeds", "versions", "unregistered"} <= set(BOUNDS)
    c.fleet.refused = collections.Counter({"feeds": 3, "terminal_rejects": 2})  # type: ignore[attr-defined]
    assert value("posfleet_bound_refused_total", {"bound": "feeds"}) == 3
    assert value("posfleet_bound_refused_total", {"bound": "terminal_rejects"}) == 2, "bounds added later show too"
    assert value("posfleet_bound_refused_total", {"bound": "versions"}) == 0


# ---- the collector's own deafness ---------------------------------------------------------------------------


def test_a_broker_outage_raises_no_offline_and_terminals_get_time_to_reconnect() -> None:
    """While the collector hears no broker, no terminal can be called silent. After ten minutes of outage the
    terminals come back on their own backoff: silence counts from reconnect + min(outage, reconnect_grace_s)
    (120 s), so a terminal that stays silent is offline a grace and a full offline period (3 x 30 s) later."""
    host = Host()
    host.advance(4 * INTERVAL)
    assert host.offline() == set()
    host.hears = False
    host.advance(20 * INTERVAL, beating=())  # ten minutes without a broker: nothing heard from anyone
    assert host.offline() == set()
    host.hears = True
    host.advance(6 * INTERVAL, beating=("T1", "T2"))  # 180 s: within the grace (120 s) + offline period (90 s)
    assert host.offline() == set()
    host.advance(2 * INTERVAL, beating=("T1", "T2"))  # 240 s
    assert host.offline() == {"T3"}


def test_a_short_outage_gives_a_short_grace() -> None:
    """A 10 s outage: terminals' backoff is short too, so the grace is 10 s, not 120 s."""
    host = Host()
    host.advance(4 * INTERVAL)
    host.hears = False
    host.advance(10, beating=())
    host.hears = True
    host.advance(3 * INTERVAL, beating=("T1",))  # 90 s < 10 s grace + 90 s
    assert host.offline() == set()
    host.advance(INTERVAL, beating=("T1",))  # 120 s
    assert host.offline() == {"T2", "T3"}


def test_a_round_that_stops_hearing_midway_leaves_the_rest() -> None:
    """The ticker runs a round in slices with ingest in between; losing the broker meanwhile ends the round there:
    the rest of the fleet's silence is no longer evidence (the next round starts deaf)."""
    host = Host()
    host.advance(4 * INTERVAL)
    host.c.fleet.tick_slice = 1
    host.wall += 4 * INTERVAL  # 120 s of silence since the last round: every terminal is due offline in this one
    host.mono += 4 * INTERVAL
    round_ = host.c._evaluation()
    next(round_)
    assert len(host.offline()) == 1
    host.hears = False
    assert list(round_) == []
    assert len(host.offline()) == 1
    host.hears = True
    host.advance(2)  # a whole round again, after a grace as long as the (short) outage
    host.advance(4, beating=())
    assert host.offline() == {"T1", "T2", "T3"}


def test_a_clock_jump_during_the_reconnect_grace_keeps_what_is_left_of_it() -> None:
    """After a ten-minute outage the terminals have 120 s of grace; a host clock step 20 s later must neither
    shorten nor lengthen what is left of it (it used to restart the silence count from the step)."""
    host = Host()
    host.advance(4 * INTERVAL)
    host.hears = False
    host.advance(20 * INTERVAL, beating=())
    host.hears = True
    host.advance(20, beating=())  # reconnected; 100 s of grace left, then a full offline period (90 s)
    left = host.c.fleet.started_at - host.wall
    host.wall += 3600
    host.advance(2, beating=())
    assert host.jumps("forward") == 1
    assert host.c.fleet.started_at - host.wall == pytest.approx(left - 2)
