"""Mass-offline as a fleet-level condition computed in the collector, and a /metrics bounded by problems.

- `mass_offline_step` is a pure hysteresis table (raise at >= share and >= min for 2 ticks, clear below the clear
  share for 2 ticks);
- the fleet evaluates it on each tick for the sites whose counts changed (and those mid-hysteresis) only;
- /metrics has per-acquirer aggregates always, per-site series only for sites with a problem, and its series
  count does not grow with healthy sites; every site's figures are in `GET /api/v1/sites` instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import given
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from collector.app import Collector
from collector.config import Config, Thresholds
from collector.fleet.detect import MassOffline, mass_offline_step
from collector.fleet.protocol import Heartbeat, Status
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Fleet, Transition
from collector.http.metrics import CHUNK, FleetCollector, SelfMetrics, render_exposition, render_exposition_async
from collector.http.routes import build_app
from tests.unit import test_fleet_properties as props

T0 = 1_764_510_000.0
TH = Thresholds()
OFF, ON = MassOffline(False, 0), MassOffline(True, 0)


@pytest.mark.parametrize(
    ("state", "offline", "expected", "after"),
    [
        (OFF, 3, 6, MassOffline(False, 1)),  # 50% and 3: first tick of two
        (MassOffline(False, 1), 3, 6, ON),  # second tick in a row: raised
        (MassOffline(False, 1), 2, 6, OFF),  # the streak is broken
        (OFF, 2, 2, OFF),  # 100% but only 2 terminals: not a mass outage
        (OFF, 2, 5, OFF),  # 40%
        (OFF, 0, 0, OFF),  # nothing expected online (all shut down): never a share
        (ON, 2, 4, MassOffline(True, 1)),  # 50%, but below the minimum count: first tick of clearing
        (ON, 3, 7, ON),  # 43%: under the raise share, above the clear share: stays raised
        (ON, 3, 8, MassOffline(True, 1)),  # 37.5%: first tick below the clear share
        (MassOffline(True, 1), 3, 8, OFF),  # second: cleared
        (MassOffline(True, 1), 4, 8, ON),  # back to 50%: the clear streak is broken
        (MassOffline(True, 1), 1, 2, OFF),  # below the minimum count clears too
    ],
)
def test_mass_offline_hysteresis(state: MassOffline, offline: int, expected: int, after: MassOffline) -> None:
    assert mass_offline_step(state, offline, expected, TH) == after


def test_a_clear_share_above_the_raise_share_cannot_flap() -> None:
    th = msgspec.convert({"mass_offline_share": 0.5, "mass_offline_clear_share": 0.9}, Thresholds)
    assert mass_offline_step(ON, 6, 10, th) == ON  # 60%: above the raise share, so never "below the clear share"


# ---- the fleet --------------------------------------------------------------------------------------------
def registry(sites: dict[str, int], acquirer: str = "acq") -> Registry:
    """`sites` maps a site to its number of terminals, ids <site>-<n>."""
    return Registry({
        f"{site}-{n}": RegistryEntry.of(f"{site}-{n}", "M1", acquirer, "A920", site, "r")
        for site, count in sites.items() for n in range(count)
    })


def beat(tid: str, seq: int, rx: float) -> Heartbeat:
    return msgspec.convert(
        {"tid": tid, "ts": rx, "seq": seq, "interval_s": 30, "txn_count": 0, "uploaded_count": 0, "queue_depth": 0,
         "oldest_queued_ts": None, "mid": "M1"},
        Heartbeat,
    )


class Fleetclock:
    """Drives a fleet as the collector does: heartbeats at receive time, a tick every 2 s."""

    def __init__(self, reg: Registry) -> None:
        self.fleet = Fleet(Config(), started_at=T0, registry=reg)
        self.now, self.seq = T0, 0
        self.out: list[Transition] = []

    def beat(self, tids: list[str]) -> None:
        self.seq += 1
        for tid in tids:
            self.fleet.on_heartbeat(beat(tid, self.seq, self.now), self.now, self.out)

    def tick(self, advance: float = 2.0) -> None:
        self.now += advance
        self.out.extend(self.fleet.tick(self.now))

    def silence(self, heard: list[str], seconds: float) -> None:
        """Only `heard` heartbeat (every 30 s) for `seconds`, ticking every 2 s."""
        end = self.now + seconds
        while self.now < end:
            if int(self.now - T0) % 30 == 0:
                self.beat(heard)
            self.tick()

    def mass(self) -> set[tuple[str, str, str]]:
        return {(scope, acq, site) for scope, acq, site, _ in self.fleet.mass_offline()}


def tids(site: str, n: int, start: int = 0) -> list[str]:
    return [f"{site}-{i}" for i in range(start, start + n)]


def test_a_site_losing_most_terminals_is_mass_offline_and_healthy_sites_raise_nothing() -> None:
    fc = Fleetclock(registry({"s1": 5, "s2": 5, "s3": 5, "s4": 5, "s5": 5, "s6": 5}))
    everyone = [tid for s in ("s1", "s2", "s3", "s4", "s5", "s6") for tid in tids(s, 5)]
    fc.silence(everyone, 60)
    assert fc.mass() == set()
    # 3 of s1's 5 terminals lose power; everything else keeps heartbeating.
    fc.silence([t for t in everyone if t not in tids("s1", 3)], 90)
    offline = {tr.tid for tr in fc.out if tr.condition == "offline" and tr.raised}
    assert offline == set(tids("s1", 3))
    # Raised 2 ticks after the third went offline, the acquirer (3 of 30) is not mass-offline.
    assert fc.mass() == {("site", "acq", "s1")}
    # They come back: cleared below 40% after 2 ticks.
    fc.beat(tids("s1", 3))
    fc.tick()
    assert fc.mass() == {("site", "acq", "s1")}, "clearing takes two ticks too"
    fc.tick()
    assert fc.mass() == set()


def test_raised_only_after_two_ticks_in_a_row(caplog: pytest.LogCaptureFixture) -> None:
    fc = Fleetclock(registry({"s1": 4}))
    fc.beat(tids("s1", 4))
    fc.tick()
    out: list[Transition] = []
    for tid in tids("s1", 3):  # three last wills, confirmed offline on the next tick
        fc.fleet.on_status(msgspec.convert({"tid": tid, "ts": fc.now, "state": "offline"}, Status), fc.now, False,
                           out)
    caplog.set_level(logging.INFO, logger="collector.fleet.state")
    fc.tick(40)
    assert {tr.tid for tr in fc.out if tr.condition == "offline"} == set(tids("s1", 3))
    assert fc.mass() == set(), "one tick at 75% is not enough"
    fc.tick()
    assert fc.mass() == {("site", "acq", "s1"), ("acquirer", "acq", "")}
    raised = [r.getMessage() for r in caplog.records if "mass_offline" in r.getMessage()]
    assert sorted(raised) == [
        "raised mass_offline on acquirer acq (3 of 4 terminals that should be online are offline)",
        "raised mass_offline on site acq/s1 (3 of 4 terminals that should be online are offline)",
    ]


def test_cleanly_shut_down_terminals_are_not_expected_online() -> None:
    fc = Fleetclock(registry({"s1": 10}))
    fc.beat(tids("s1", 10))
    fc.tick()
    out: list[Transition] = []
    for tid in tids("s1", 6):  # closing time: six shut down cleanly
        fc.fleet.on_status(
            msgspec.convert({"tid": tid, "ts": fc.now, "state": "offline", "reason": "shutdown"}, Status), fc.now,
            False, out,
        )
    fc.silence(tids("s1", 4, start=6), 200)
    assert fc.mass() == set() and not [tr for tr in fc.out if tr.raised]
    # Then 3 of the 4 still expected online go silent: 75% of those that should be online.
    fc.silence([tids("s1", 10)[9]], 200)
    assert fc.mass() == {("site", "acq", "s1"), ("acquirer", "acq", "")}


def test_unregistered_terminals_are_never_mass_offline() -> None:
    fc = Fleetclock(registry({"s1": 1}))
    fc.beat(["s1-0", "X1", "X2", "X3", "X4"])  # four unregistered ids, all "unknown/unknown"
    fc.silence(["s1-0"], 200)
    assert {tr.tid for tr in fc.out if tr.condition == "offline"} == {"X1", "X2", "X3", "X4"}
    assert fc.mass() == set()
    # Counted per acquirer as "unknown", but no feed series: no feed may speak for unregistered terminals.
    fams = exposition(fc.fleet)
    assert {s.labels["acquirer"]: s.value for s in fams["posfleet_fleet_terminals"]} == {"acq": 1, "unknown": 4}
    assert {s.labels["acquirer"] for s in fams["posfleet_acquirer_feed_stale"]} == {"acq"}


def test_a_tick_evaluates_only_what_changed() -> None:
    fc = Fleetclock(registry({f"s{n}": 3 for n in range(100)}))
    fc.beat([f"s{n}-{i}" for n in range(100) for i in range(3)])
    fc.tick()
    assert fc.fleet.mass_dirty == set(), "the tick consumed the dirty set"
    fc.beat(["s7-0", "s8-1"])  # heartbeats that change no count leave nothing to evaluate
    assert fc.fleet.mass_dirty == set()
    fc.fleet.on_status(msgspec.convert({"tid": "s7-0", "ts": fc.now, "state": "offline", "reason": "shutdown"},
                                       Status), fc.now, False, [])
    assert fc.fleet.mass_dirty == {("acq", "s7")}


def test_registry_reload_moving_terminals_is_judged_again() -> None:
    fc = Fleetclock(registry({"s1": 4}))
    fc.beat(tids("s1", 4))
    fc.silence(["s1-3"], 200)
    assert ("site", "acq", "s1") in fc.mass()
    # The three silent terminals move to a new site in a registry reload: s1 keeps one healthy terminal.
    entries = dict(registry({"s1": 4}).entries)
    for tid in tids("s1", 3):
        entries[tid] = RegistryEntry.of(tid, "M1", "acq", "A920", "s9", "r")
    fc.fleet.set_registry(Registry(entries))
    fc.tick()
    fc.tick()
    assert ("site", "acq", "s1") not in fc.mass() and ("site", "acq", "s9") in fc.mass()


def test_derived_counts_equal_a_recount_from_the_site_counts() -> None:
    fc = Fleetclock(registry({"s1": 4, "s2": 3}))
    fc.beat(tids("s1", 4) + tids("s2", 3))
    fc.silence(["s1-0", "s2-0"], 200)
    fc.beat(tids("s1", 4))
    fc.tick()
    fleet = fc.fleet
    per_acquirer: Counter[tuple[str, str]] = Counter()
    sites: Counter[tuple[str, str]] = Counter()
    for (acq, site, cond), n in fleet.counts.items():
        per_acquirer[(acq, cond)] += n
        if not cond.startswith("_"):
            sites[(acq, site)] += n
    assert +fleet.acquirer_counts == +per_acquirer
    assert fleet.problem_sites == dict(+sites) == {("acq", "s2"): 2}


# ---- /metrics ---------------------------------------------------------------------------------------------
def exposition(fleet: Fleet) -> dict[str, list[Any]]:
    reg = CollectorRegistry(auto_describe=False)
    collector = FleetCollector(fleet, SelfMetrics(reg), 5000, lambda: T0)
    reg.register(collector)
    text = render_exposition(reg, collector.view()).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def fleet_with(healthy_sites: int) -> Fleet:
    """`healthy_sites` sites of 3 heard terminals each, plus site `bad` whose 3 terminals went silent."""
    reg = registry({"bad": 3, **{f"h{n}": 3 for n in range(healthy_sites)}})
    fc = Fleetclock(reg)
    fc.beat(list(reg.entries))
    fc.silence([t for t in reg.entries if not t.startswith("bad")], 200)
    return fc.fleet


def test_series_count_does_not_grow_with_healthy_sites() -> None:
    small, large = exposition(fleet_with(10)), exposition(fleet_with(10_000))
    assert {name: len(s) for name, s in small.items()} == {name: len(s) for name, s in large.items()}
    assert sum(len(s) for s in large.values()) < 300


def test_per_site_series_only_for_problem_sites_and_mass_offline_exported() -> None:
    fams = exposition(fleet_with(5))
    assert {(s.labels["site"], s.labels["condition"], s.value) for s in fams["posfleet_site_condition_terminals"]} == {
        ("bad", "offline", 3)
    }
    assert [(s.labels["site"], s.value) for s in fams["posfleet_site_terminals"]] == [("bad", 3)]
    mass = {(s.labels["scope"], s.labels["site"]): s.value for s in fams["posfleet_fleet_mass_offline"]}
    assert mass == {("site", "bad"): 1}, "3 of 18 is no mass outage of the acquirer"
    since = [s for s in fams["posfleet_fleet_mass_offline_since_seconds"]]
    assert len(since) == 1 and since[0].value > T0
    # Per acquirer: every condition pre-initialised, the counts exact.
    by_cond = {s.labels["condition"]: s.value for s in fams["posfleet_fleet_condition_terminals"]}
    assert by_cond["offline"] == 3 and by_cond["hardware_fault"] == 0
    assert [s.value for s in fams["posfleet_fleet_terminals"]] == [18]
    assert [s.value for s in fams["posfleet_fleet_online_terminals"]] == [15]
    assert [s.value for s in fams["posfleet_fleet_problem_sites"]] == [1]
    # A silent terminal stays a positive signal: its problem series, with the since series joined by id.
    problem = {s.labels["terminal_id"] for s in fams["posfleet_terminal_problem"]}
    assert problem == {"bad-0", "bad-1", "bad-2"}
    assert {s.labels["terminal_id"] for s in fams["posfleet_terminal_problem_since_seconds"]} == problem


# ---- GET /api/v1/sites ------------------------------------------------------------------------------------
@pytest.fixture
async def client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    path = tmp_path / "terminals.csv"
    rows = [f"{s}-{n},M1,{acq},A920,{s},r" for acq, s in (("acq-a", "a1"), ("acq-a", "a2"), ("acq-b", "b1"))
            for n in range(3)]
    path.write_text("terminal_id,merchant_id,acquirer,model,site,region\n" + "\n".join(rows) + "\n")
    monkeypatch.setenv("POSFLEET_API_TOKENS", "tok-a-0123456789abcdef read:acq-a;tok-all-0123456789abcdef read:*")
    cfg = msgspec.convert({"registry": {"path": str(path)}, "state": {"snapshot_path": None}}, Config)
    collector = Collector.load(cfg, clock=lambda: T0)
    out: list[Transition] = []
    for tid in ("a1-0", "a1-1", "a1-2", "a2-0", "b1-0"):
        collector.fleet.on_heartbeat(beat(tid, 1, T0), T0, out)
    collector.fleet.tick(T0 + 200)  # everything not heard again is offline now
    collector.fleet.on_heartbeat(beat("a1-0", 2, T0 + 200), T0 + 200, out)
    async with TestClient(TestServer(build_app(collector))) as c:
        yield c


async def test_sites_api_lists_every_site_with_counts_within_the_token_scope(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.get("/api/v1/sites", headers={"Authorization": "Bearer tok-a-0123456789abcdef"})
    assert resp.status == 200
    body = await resp.json()
    assert body["total"] == 2 and [s["site"] for s in body["sites"]] == ["a1", "a2"], "acq-b is not in the scope"
    a1 = body["sites"][0]
    assert a1 == {"acquirer": "acq-a", "site": "a1", "terminals": 3, "online": 1, "shutdown": 0,
                  "conditions": {"offline": 2}, "mass_offline_since": None}
    every = await (await client.get("/api/v1/sites?problem=1&acquirer=acq-b",
                                    headers={"Authorization": "Bearer tok-all-0123456789abcdef"})).json()
    assert [(s["site"], s["conditions"]) for s in every["sites"]] == [("b1", {"offline": 3})]
    paged = await (await client.get("/api/v1/sites?limit=1&offset=1",
                                    headers={"Authorization": "Bearer tok-all-0123456789abcdef"})).json()
    assert paged["total"] == 3 and [s["site"] for s in paged["sites"]] == ["a2"]
    bad = await client.get("/api/v1/sites?limit=x", headers={"Authorization": "Bearer tok-all-0123456789abcdef"})
    assert bad.status == 400


def test_problem_series_and_sites_are_capped_and_the_drop_counted() -> None:
    fleet = fleet_with(0)  # site "bad": 3 offline terminals
    reg = CollectorRegistry(auto_describe=False)
    collector = FleetCollector(fleet, SelfMetrics(reg), 2, lambda: T0)
    reg.register(collector)
    text = render_exposition(reg, collector.view()).decode()
    fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
    assert len(fams["posfleet_terminal_problem"]) == 2 == len(fams["posfleet_terminal_problem_since_seconds"])
    assert [s.value for s in fams["posfleet_terminal_problem_series_dropped"]] == [1]


async def test_the_chunked_render_yields_to_the_loop_and_writes_the_same_body() -> None:
    reg = registry({f"s{n}": 2 for n in range(3 * CHUNK)})
    fc = Fleetclock(reg)
    fc.beat(list(reg.entries))
    fc.silence([t for t in reg.entries if t.endswith("-1")], 200)  # one silent terminal on each site
    registry_ = CollectorRegistry(auto_describe=False)
    collector = FleetCollector(fc.fleet, SelfMetrics(registry_), 5000, lambda: T0)
    registry_.register(collector)
    view = collector.view()
    ticks = 0

    async def count() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    body = await render_exposition_async(registry_, view)
    counter.cancel()
    assert body == render_exposition(registry_, view)
    assert body.count(b"\nposfleet_terminal_problem{") == 3 * CHUNK
    assert ticks >= 6, "the loop ran between the chunks"


# ---- incremental equals full evaluation (hypothesis) --------------------------------------------------------
MIN1 = msgspec.convert(
    {"thresholds": {"upstream_grace_s": 60, "feed_stale_s": 120, "flapping_window_s": 600,
                    "mass_offline_min_terminals": 1}},
    Config,
)


@props.SETTINGS
@given(ops=props.ops)
def test_incremental_mass_offline_equals_evaluating_every_site_every_tick(ops: list[tuple[float, Any]]) -> None:
    """Random message streams (tests/unit/test_fleet_properties.py's): after every tick, the mass outages of the
    dirty-set evaluation equal those of an oracle that evaluates every site and acquirer on every tick, and the
    per-acquirer and problem-site views equal their recount from the site counts."""
    fleet = Fleet(MIN1, started_at=props.T0, registry=props.REG)
    oracle: dict[tuple[str, str, str], MassOffline] = {}

    def evaluate_everything() -> None:
        keys = {("site", a, s) for a, s, _ in fleet.counts} | {("acquirer", a, "") for a, _, _ in fleet.counts}
        for scope, acq, site in keys:
            if acq == "unknown":
                continue
            if scope == "site":
                c = fleet.counts
                offline, expected = c[(acq, site, "offline")], c[(acq, site, "_known")] - c[(acq, site, "_shutdown")]
            else:
                a = fleet.acquirer_counts
                offline, expected = a[(acq, "offline")], a[(acq, "_known")] - a[(acq, "_shutdown")]
            key = (scope, acq, site)
            oracle[key] = mass_offline_step(oracle.get(key, OFF), offline, expected, MIN1.thresholds)
        assert {k for k, st in oracle.items() if st.active} == {(s, a, si) for s, a, si, _ in fleet.mass_offline()}

    now, out = props.T0, []
    for gap, op in ops:
        now += gap
        props.apply(fleet, op, now, out)
        if op[0] == "tick":
            evaluate_everything()
        # A tick after every message as well: ticks without a count change in between are where a pending
        # (mid-hysteresis) site must still be evaluated.
        out.extend(fleet.tick(now))
        evaluate_everything()
    per_acquirer: Counter[tuple[str, str]] = Counter()
    sites: Counter[tuple[str, str]] = Counter()
    for (acq, site, cond), n in fleet.counts.items():
        per_acquirer[(acq, cond)] += n
        if not cond.startswith("_"):
            sites[(acq, site)] += n
    assert +fleet.acquirer_counts == +per_acquirer and fleet.problem_sites == dict(+sites)
