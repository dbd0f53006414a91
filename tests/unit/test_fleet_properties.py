"""Fleet under hypothesis: random streams of heartbeats (any seq, any finite ts including 0 and far future),
statuses (retained or not), feed batches (own, foreign and unknown acquirers), rejects and ticks, on a fake clock
that mostly advances and sometimes steps back.

After every step: no exception escaped, the incremental counts, problem set and versions equal a full recount,
every sender-chosen map is within its bound, and a terminal that keeps heartbeating is never `offline`.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.config import Config
from collector.fleet.detect import CONDITIONS, SEVERITY
from collector.fleet.protocol import Hardware, Heartbeat, Net, Power, Status, UpstreamBatch, UpstreamTxn
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Fleet, HeartbeatResult, Terminal, Transition, classify
from collector.http.metrics import SparseLines, render_sparse, take_view

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_764_510_000.0
CFG = msgspec.convert(
    {"thresholds": {"upstream_grace_s": 60, "feed_stale_s": 120, "flapping_window_s": 600},
     "software_policy": {"*": "3.0.0"}},
    Config,
)
REG = Registry({
    "A1": RegistryEntry.of("A1", "M1", "acq-a", "A920", "s1", "r"),
    "A2": RegistryEntry.of("A2", "M2", "acq-a", "A920", "s2", "r"),
    "B1": RegistryEntry.of("B1", "M3", "acq-b", "P400", "s1", "r"),
})
TIDS = ("A1", "A2", "B1", "X1", "X2", "X3", "X4", "X5")  # X*: unknown to the registry
ACQUIRERS = ("acq-a", "acq-b", "acq-evil", "unknown", "f1", "f2", "f3", "f4")
REASONS = ("card_data", "bad_json", "bad_type", "out_of_range", "tid_mismatch")

# Any finite terminal clock: around now, the epoch, decades ahead, and far beyond.
ts_values = st.one_of(
    st.floats(T0 - 86400, T0 + 86400), st.just(0.0), st.floats(0, 1e6), st.just(T0 + 30 * 365 * 86400.0),
    st.floats(0, 1e15),
)
counters = st.integers(0, 50)
hw = st.one_of(st.none(), st.builds(Hardware, st.sampled_from(["ok", "paper_out", "fault"]),
                                    st.sampled_from(["ok", "fault"]), st.sampled_from(["ok", "fault"])))


@st.composite
def heartbeats(draw: st.DrawFn, tid: str | None = None) -> Heartbeat:
    return Heartbeat(
        tid=tid or draw(st.sampled_from(TIDS)), ts=draw(ts_values), seq=draw(st.integers(0, 20)),
        interval_s=draw(st.sampled_from([30.0, 60.0, 8.285714285714285])),
        txn_count=draw(counters), uploaded_count=draw(counters), queue_depth=draw(st.integers(0, 30)),
        oldest_queued_ts=draw(st.one_of(st.none(), ts_values)),
        mid=draw(st.sampled_from([None, "M1", "M2", "M9"])),
        model=draw(st.sampled_from([None, "A920", "P400"])),
        app_version=draw(st.one_of(st.none(), st.sampled_from(["3.1.0", "2.0"]), st.text("0123456789.", max_size=6))),
        uptime_s=draw(st.one_of(st.none(), st.floats(0, 1e6))),
        net=draw(st.one_of(st.none(), st.builds(Net, st.sampled_from(["wifi", "cellular"]), st.floats(-120, -40)))),
        power=draw(st.one_of(st.none(), st.builds(Power, st.just("battery"), st.floats(0, 100)))),
        hw=draw(hw),
    )


statuses = st.builds(
    lambda tid, state, reason, ts, retained: ("status", Status(state, ts, reason, tid), retained),
    st.sampled_from(TIDS), st.sampled_from(["online", "offline"]),
    st.sampled_from([None, "shutdown", "connection_lost"]), st.one_of(st.none(), ts_values), st.booleans(),
)
feeds = st.builds(
    lambda acq, tids: ("feed", acq, tids),
    st.sampled_from(ACQUIRERS), st.lists(st.sampled_from((*TIDS, "NOPE")), max_size=4),
)
rejects = st.builds(lambda tid, reason: ("reject", tid, reason), st.sampled_from(TIDS), st.sampled_from(REASONS))
ticks = st.builds(lambda dt: ("tick", dt), st.one_of(st.floats(0, 400), st.floats(-120, 0)))
ops = st.lists(
    st.tuples(
        st.floats(0, 45),  # time since the previous message
        st.one_of(heartbeats().map(lambda hb: ("hb", hb)), statuses, feeds, rejects, ticks),
    ),
    max_size=60,
)


def nonzero(c: dict[Any, int]) -> dict[Any, int]:
    return {k: v for k, v in c.items() if v != 0}


def apply(fleet: Fleet, op: tuple[Any, ...], now: float, out: list[Transition]) -> None:
    kind = op[0]
    if kind == "hb":
        fleet.on_heartbeat(op[1], now, out)
    elif kind == "status":
        fleet.on_status(op[1], now, op[2], out)
    elif kind == "feed":
        batch = UpstreamBatch(now, [UpstreamTxn(t, f"{t}-{n}", now) for n, t in enumerate(op[2])], op[1])
        fleet.on_feed(batch, now, out)
    elif kind == "reject":
        fleet.on_rejected(op[1], op[2], now, out)
    else:
        out.extend(fleet.tick(now))


def check_invariants(fleet: Fleet, registry: Registry) -> None:
    again = fleet.recount()
    assert nonzero(fleet.counts) == nonzero(again.counts)
    assert all(v >= 0 for v in fleet.counts.values())
    assert fleet.problem == again.problem
    # What /metrics keeps text for is numbered for problem terminals and sites only (bounded by problems).
    assert set(fleet.terminal_changes) == fleet.problem and set(fleet.site_changes) == set(fleet.problem_sites)
    assert dict(fleet.versions) == again.versions and 0 not in fleet.versions.values()
    assert len(fleet.terminals) <= len(registry.entries) + fleet.max_unregistered
    assert len(fleet.versions) <= fleet.max_versions
    assert len(fleet.feeds) <= (len(registry.acquirers()) if fleet.registry_loaded else fleet.max_feeds)
    for t in fleet.terminals.values():
        assert t.rejected is None or len(t.rejected) <= 32
        for cond, active in (t.conds or {}).items():
            assert cond in CONDITIONS
            if cond == "messages_rejected":
                assert active.severity == SEVERITY[cond] == "warning"


@SETTINGS
@given(ops=ops, registered=st.booleans())
def test_random_streams_keep_counts_exact_and_memory_bounded(ops: list[tuple[float, Any]], registered: bool) -> None:
    registry = REG if registered else Registry({})
    fleet = Fleet(CFG, started_at=T0, registry=registry)
    fleet.max_unregistered, fleet.max_versions, fleet.max_feeds = 3, 4, 3
    now, out = T0, []
    for gap, op in ops:
        now += gap
        if op[0] == "tick":
            now += op[1]
        apply(fleet, op, now, out)
        check_invariants(fleet, registry)


@SETTINGS
@given(
    beats=st.lists(st.tuples(heartbeats(tid="A1"), st.booleans(), st.integers(0, 3), st.booleans()),
                   min_size=5, max_size=40),
    noise=st.lists(st.tuples(st.floats(0, 1), st.one_of(statuses, feeds, rejects, heartbeats().map(lambda h: ("hb", h)),
                                                          st.just(("tick",)))), max_size=40),
    backsteps=st.lists(st.floats(0, 3600), max_size=3),
)
def test_a_terminal_that_keeps_heartbeating_is_never_offline(
    beats: list[tuple[Heartbeat, bool, int, bool]], noise: list[tuple[float, Any]], backsteps: list[float]
) -> None:
    """Whatever its clock says (0, decades ahead), whether its heartbeats are accepted or rejected, and whatever
    else arrives in between (redeliveries of its own older heartbeats, wills, rejects, other terminals, ticks), a
    terminal heard every interval is never offline."""
    fleet = Fleet(CFG, started_at=T0, registry=REG)
    now, out = T0, []
    seq = txns = 0
    sent: list[Heartbeat] = []
    for n, (hb, reboot, more, rejected) in enumerate(beats):
        interval = 30.0
        seq = 0 if reboot else seq + 1 + more % 2  # a reboot, or the next seq (sometimes one lost on the way)
        txns += more
        mine = msgspec.structs.replace(hb, seq=seq, interval_s=interval, txn_count=txns, uploaded_count=txns)
        if n < len(backsteps):
            now -= backsteps[n]  # the collector host's clock stepped back
        now += interval
        if rejected:
            fleet.on_rejected("A1", "card_data", now, out)  # e.g. a battery float the old guard took for a PAN
        else:
            fleet.on_heartbeat(mine, now, out)
            sent.append(mine)
        for frac, op in noise[n::len(beats)]:
            at = now + frac * interval
            if op[0] == "tick":
                out.extend(fleet.tick(at))
            elif op[0] == "hb" and op[1].tid == "A1":
                if sent:
                    fleet.on_heartbeat(sent[int(frac * (len(sent) - 1))], at, out)  # a redelivery of its own
            elif op[0] == "status" and op[1].tid == "A1" and op[1].reason == "shutdown":
                continue  # a clean shutdown message from a terminal that keeps running is not this property
            else:
                apply(fleet, op, at, out)
        out.extend(fleet.tick(now + interval * 0.99))
        assert "offline" not in (fleet.terminals["A1"].conds or {}), n
        check_invariants(fleet, REG)
    assert not [tr for tr in out if tr.tid == "A1" and tr.condition == "offline"]


@SETTINGS
@given(first=heartbeats(tid="A1"), second=heartbeats(tid="A1"), gap=st.floats(-100, 1000))
def test_classify_is_decided_by_seq_and_arrival_never_by_ts(first: Heartbeat, second: Heartbeat, gap: float) -> None:
    """Changing only the terminal clock of either heartbeat never changes how the second one is classified."""
    fleet = Fleet(CFG, started_at=T0, registry=REG)
    fleet.on_heartbeat(first, T0, [])
    t: Terminal = fleet.terminals["A1"]
    verdict = classify(t, second, T0 + gap)
    for ts in (0.0, T0 + 30 * 365 * 86400.0, second.ts + 1):
        other = classify(t, msgspec.structs.replace(second, ts=ts), T0 + gap)
        if verdict is HeartbeatResult.DUPLICATE or other is HeartbeatResult.DUPLICATE:
            continue  # only the duplicate test reads ts: a redelivery is byte-identical
        assert other is verdict
    if second.seq > first.seq:
        assert verdict is HeartbeatResult.ACCEPTED
    if second.seq < first.seq:
        assert verdict in (HeartbeatResult.REBOOT, HeartbeatResult.STALE)
        since = (T0 + gap) - T0  # as the fleet sees it, after rounding
        if not 0 <= since <= max(first.interval_s, second.interval_s):
            assert verdict is HeartbeatResult.REBOOT, "evidence of age only counts within one interval"


@SETTINGS
@given(ops=ops, registered=st.booleans(), cap=st.integers(1, 12), relabel=st.lists(st.integers(0, 20), max_size=4))
def test_text_kept_between_scrapes_is_the_text_formatted_afresh(
    ops: list[tuple[float, Any]], registered: bool, cap: int, relabel: list[int]
) -> None:
    """/metrics keeps each problem site's and terminal's text between scrapes (collector.http.metrics.SparseLines);
    scraped after every step, including registry reloads that move terminals to other sites and merchants, it is
    the text a first scrape would format."""
    registry = REG if registered else Registry({})
    moved = Registry({tid: RegistryEntry.of(tid, "M7", e.acquirer, "P400", "s9", "r")
                      for tid, e in REG.entries.items()})
    fleet = Fleet(CFG, started_at=T0, registry=registry)
    kept = SparseLines()
    now, out = T0, []
    for n, (gap, op) in enumerate(ops):
        now += gap
        if op[0] == "tick":
            now += op[1]
        apply(fleet, op, now, out)
        if n in relabel and registered:
            fleet.set_registry(moved if fleet.registry is REG else REG)
        assert render_sparse(take_view(fleet, cap, now, kept)) == render_sparse(take_view(fleet, cap, now))
