"""Fleet state and detection with a fake clock: hysteresis, reboots, duplicates, out-of-order, liveness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.config import Config
from collector.fleet.protocol import Heartbeat, Status, UpstreamBatch, UpstreamTxn
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.snapshot import load_snapshot, save_snapshot
from collector.fleet.state import Fleet, HeartbeatResult, Transition

T0 = 1_764_510_000.0
CFG = msgspec.convert(
    {
        "thresholds": {"upstream_grace_s": 60, "feed_stale_s": 120, "flapping_window_s": 600},
        "software_policy": {"*": "3.0.0"},
    },
    Config,
)
REG = Registry(
    {
        "T1": RegistryEntry.of("T1", "M1", "acq", "A920", "s1", "r"),
        "T2": RegistryEntry.of("T2", "M2", "acq", "A920", "s1", "r"),
    }
)


def beat(tid: str = "T1", seq: int = 0, ts: float = T0, **over: Any) -> Heartbeat:
    base: dict[str, Any] = {
        "tid": tid, "ts": ts, "seq": seq, "interval_s": 30, "txn_count": seq, "uploaded_count": seq,
        "queue_depth": 0, "oldest_queued_ts": None, "mid": "M1" if tid == "T1" else "M2", "app_version": "3.1.0",
        "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}, "net": {"type": "wifi", "rssi_dbm": -60},
    }
    base.update(over)
    return msgspec.convert(base, Heartbeat)


class Clock:
    """A fake clock driving the fleet the way the collector does (receive time = clock)."""

    def __init__(self, fleet: Fleet, now: float = T0) -> None:
        self.fleet, self.now = fleet, now
        self.out: list[Transition] = []

    def hb(self, advance: float = 30.0, **kw: Any) -> HeartbeatResult | None:
        self.now += advance
        kw.setdefault("ts", self.now)
        return self.fleet.on_heartbeat(beat(**kw), self.now, self.out)

    def tick(self, advance: float) -> None:
        self.now += advance
        self.out.extend(self.fleet.tick(self.now))


def conds(fleet: Fleet, tid: str = "T1") -> set[str]:
    return set(fleet.terminals[tid].conds or {})


@pytest.fixture
def clock() -> Clock:
    return Clock(Fleet(CFG, started_at=T0, registry=REG))


def test_healthy_heartbeats_raise_nothing(clock: Clock) -> None:
    for seq in range(10):
        assert clock.hb(seq=seq) is HeartbeatResult.ACCEPTED
        clock.tick(1)
    assert conds(clock.fleet) == set() and [tr for tr in clock.out if tr.tid == "T1"] == []


@pytest.mark.parametrize(
    ("fault", "condition", "detail"),
    [
        ({"hw": {"printer": "paper_out"}}, "hardware_fault", "printer_paper_out"),
        ({"hw": {"printer": "fault", "card_reader": "fault"}}, "hardware_fault", "printer+card_reader_fault"),
        ({"hw": {"display": "fault"}}, "hardware_fault", "display_fault"),
        ({"queue_depth": 25, "txn_count": 1000}, "upload_backlog", "queue_depth"),
        ({"mid": "M9"}, "merchant_mismatch", "M9"),  # the merchant id the terminal reports
        ({"app_version": "2.9.9"}, "outdated_software", ""),
        ({"app_version": "garbage"}, "outdated_software", ""),
        ({"clock_offset": 3600}, "clock_skew", "ahead"),
        ({"clock_offset": -3600}, "clock_skew", "behind"),
    ],
)
def test_heartbeat_conditions_need_two_heartbeats_to_raise_and_to_clear(
    clock: Clock, fault: dict[str, Any], condition: str, detail: str
) -> None:
    offset = fault.pop("clock_offset", 0)
    seq = 0
    clock.hb(seq=seq)
    seq += 1
    clock.hb(seq=seq, ts=clock.now + 30 + offset, **fault)
    assert conds(clock.fleet) == set(), "one message must not raise"
    seq += 1
    clock.hb(seq=seq, ts=clock.now + 30 + offset, **fault)
    assert conds(clock.fleet) == {condition}
    active = clock.fleet.terminals["T1"].conds
    assert active is not None and active[condition].detail == detail
    seq += 1
    extra = {"txn_count": 1000, "uploaded_count": 1000} if "txn_count" in fault else {}
    clock.hb(seq=seq, **extra)
    assert conds(clock.fleet) == {condition}, "one good message must not clear"
    seq += 1
    clock.hb(seq=seq, **extra)
    assert conds(clock.fleet) == set()


def test_backlog_by_age_of_oldest_queued_transaction(clock: Clock) -> None:
    clock.hb(seq=0)
    for seq in (1, 2):
        clock.hb(seq=seq, queue_depth=1, oldest_queued_ts=clock.now + 30 - 601)
    assert conds(clock.fleet) == {"upload_backlog"}
    assert clock.fleet.terminals["T1"].conds["upload_backlog"].detail == "queue_age"  # type: ignore[index]


def test_weak_signal_must_be_sustained(clock: Clock) -> None:
    weak = {"net": {"type": "cellular", "rssi_dbm": -110}}
    clock.hb(seq=0, **weak)
    clock.hb(seq=1, **weak)
    assert conds(clock.fleet) == set()
    clock.hb(seq=2, **weak)
    assert conds(clock.fleet) == {"weak_signal"}
    clock.hb(seq=3)
    clock.hb(seq=4, **weak)  # an isolated good reading resets the clear streak
    clock.hb(seq=5)
    clock.hb(seq=6)
    assert conds(clock.fleet) == {"weak_signal"}
    clock.hb(seq=7)
    assert conds(clock.fleet) == set()


def test_unregistered_terminal(clock: Clock) -> None:
    clock.hb(tid="X9", seq=0, mid="M1")
    clock.hb(tid="X9", seq=1, mid="M1")
    assert conds(clock.fleet, "X9") == {"unregistered"}
    assert clock.fleet.terminals["X9"].acquirer == "unknown"


def test_unknown_ids_are_bounded(clock: Clock) -> None:
    clock.fleet.max_unregistered = 3
    results = [clock.hb(tid=f"X{i}", seq=0) for i in range(5)]
    assert results[:3] == [HeartbeatResult.ACCEPTED] * 3 and results[3:] == [HeartbeatResult.REFUSED] * 2
    assert len(clock.fleet.terminals) == 2 + 3


def test_duplicate_and_out_of_order_never_move_state_back(clock: Clock) -> None:
    clock.hb(seq=5, txn_count=50, uploaded_count=50)
    t = clock.fleet.terminals["T1"]
    newest_ts = t.last_ts
    assert clock.fleet.on_heartbeat(beat(seq=5, ts=newest_ts, txn_count=50, uploaded_count=50), clock.now,
                                     clock.out) is HeartbeatResult.DUPLICATE
    assert clock.fleet.on_heartbeat(beat(seq=4, ts=newest_ts - 30, txn_count=40, uploaded_count=40), clock.now,
                                     clock.out) is HeartbeatResult.STALE
    assert (t.seq, t.txn_count, t.last_ts) == (5, 50, newest_ts)


def test_reboot_is_recognised_not_treated_as_replay(clock: Clock) -> None:
    clock.hb(seq=100, txn_count=100, uploaded_count=100)
    assert clock.hb(seq=0, txn_count=101, uploaded_count=101, uptime_s=5) is HeartbeatResult.REBOOT
    assert clock.fleet.terminals["T1"].seq == 0
    # A replayed heartbeat from before the reboot has a higher seq but lower counters: refused, state kept.
    old = beat(seq=99, ts=clock.now - 60, txn_count=99, uploaded_count=99)
    assert clock.fleet.on_heartbeat(old, clock.now, clock.out) is HeartbeatResult.BACKWARDS
    assert (clock.fleet.terminals["T1"].seq, clock.fleet.terminals["T1"].txn_count) == (0, 101)


def test_counters_going_backwards_are_rejected(clock: Clock) -> None:
    clock.hb(seq=1, txn_count=10, uploaded_count=10)
    assert clock.hb(seq=2, txn_count=9, uploaded_count=9) is HeartbeatResult.BACKWARDS
    assert clock.fleet.terminals["T1"].txn_count == 10


def test_clock_stepping_back_does_not_freeze_the_terminal(clock: Clock) -> None:
    clock.hb(seq=1, ts=T0 + 3600 * 5)
    assert clock.hb(seq=2, ts=clock.now) is HeartbeatResult.ACCEPTED  # NTP fixed the clock; seq continues


def test_offline_by_silence_and_back(clock: Clock) -> None:
    clock.hb(seq=0)
    clock.tick(89)
    assert conds(clock.fleet) == set()
    clock.tick(2)  # 91 s > 3 x 30 s
    assert conds(clock.fleet) == {"offline"}
    assert clock.fleet.terminals["T1"].conds["offline"].detail == "silent"  # type: ignore[index]
    clock.hb(seq=1)
    assert conds(clock.fleet) == set()


def test_last_will_is_told_apart_and_confirmed_by_a_missed_heartbeat(clock: Clock) -> None:
    clock.hb(seq=0)
    clock.now += 1
    clock.fleet.on_status(Status("offline", None, "connection_lost", "T1"), clock.now, False, clock.out)
    clock.tick(1)
    assert conds(clock.fleet) == set(), "a will alone (maybe stale) is not yet offline"
    clock.tick(31)
    assert conds(clock.fleet) == {"offline"}
    assert clock.fleet.terminals["T1"].conds["offline"].detail == "last_will"  # type: ignore[index]


def test_clean_shutdown_is_not_offline(clock: Clock) -> None:
    clock.hb(seq=0)
    clock.fleet.on_status(Status("offline", clock.now + 1, "shutdown", "T1"), clock.now + 1, False, clock.out)
    clock.tick(3600)
    assert conds(clock.fleet) == set()
    assert clock.fleet.counts[("acq", "s1", "_shutdown")] == 1
    assert clock.fleet.counts[("acq", "s1", "_online")] == 0


def test_retained_stale_will_never_raises_offline_while_heartbeats_arrive(clock: Clock) -> None:
    clock.hb(seq=0)
    assert clock.fleet.on_status(Status("offline", clock.now, "connection_lost", "T1"), clock.now, True, clock.out)
    assert clock.fleet.on_status(Status("offline", clock.now, "connection_lost", "T1"), clock.now, True,
                                 clock.out) is False, "a replay of the current status changes nothing"
    for seq in range(1, 10):
        clock.hb(seq=seq, advance=30)
        clock.tick(0)
    assert clock.fleet.terminals["T1"].status == "online"
    assert conds(clock.fleet) == set() and [tr for tr in clock.out if tr.tid == "T1"] == []


def test_status_with_a_broken_clock_is_applied(clock: Clock) -> None:
    """Before: a status was dropped when its ts was below the last heartbeat's, so one heartbeat decades ahead
    made every later clean shutdown invisible and the shut-down terminal was raised offline."""
    clock.hb(seq=0, ts=T0 + 30 * 365 * 86400)
    assert clock.hb(seq=2) is HeartbeatResult.ACCEPTED  # seq 1 was lost
    clock.now += 1
    assert clock.fleet.on_status(Status("offline", clock.now, "shutdown", "T1"), clock.now, False, clock.out)
    clock.tick(3600)
    assert conds(clock.fleet) == set() and clock.fleet.counts[("acq", "s1", "_shutdown")] == 1


def test_flapping_on_repeated_reboots_then_clears(clock: Clock) -> None:
    seq_hi = 10
    for i in range(3):
        clock.hb(seq=seq_hi, txn_count=seq_hi * (i + 1), uploaded_count=seq_hi * (i + 1))
        clock.hb(seq=0, txn_count=seq_hi * (i + 1) + 1, uploaded_count=seq_hi * (i + 1) + 1)
    assert "flapping" in conds(clock.fleet)
    clock.tick(601)
    assert "flapping" not in conds(clock.fleet)


def feed(fleet: Fleet, at: float, *tids: str) -> None:
    batch = UpstreamBatch(at, [UpstreamTxn(t, f"{t}-{at}", at) for t in tids], "acq")
    fleet.on_upstream(batch, at, [])


def test_upstream_missing_after_grace_only_while_feed_alive(clock: Clock) -> None:
    clock.hb(seq=0, uploaded_count=0, txn_count=0)
    feed(clock.fleet, clock.now)
    clock.hb(seq=1, uploaded_count=1, txn_count=1)  # uploaded, host will not record it
    for seq in range(2, 6):  # 80 s > upstream_grace_s
        feed(clock.fleet, clock.now + 1)  # the feed is alive, but names other terminals only
        clock.hb(seq=seq, uploaded_count=1, txn_count=1, advance=20)
    assert conds(clock.fleet) == {"upstream_missing"}
    feed(clock.fleet, clock.now, "T1")
    assert conds(clock.fleet) == set()


def test_no_upstream_missing_while_feed_stale(clock: Clock) -> None:
    clock.hb(seq=0, uploaded_count=0, txn_count=0)
    feed(clock.fleet, clock.now)
    clock.hb(seq=1, uploaded_count=1, txn_count=1)
    for seq in range(2, 9):  # the feed says nothing for 210 s > feed_stale_s: maintenance, not missing
        clock.hb(seq=seq, uploaded_count=1, txn_count=1)
    assert conds(clock.fleet) == set()
    assert clock.fleet.feed_stale("acq", clock.now)
    feed(clock.fleet, clock.now)  # feed back: the grace period starts again
    clock.hb(seq=9, uploaded_count=1, txn_count=1)
    assert conds(clock.fleet) == set()
    for seq in range(10, 12):
        feed(clock.fleet, clock.now)
        clock.hb(seq=seq, uploaded_count=1, txn_count=1)
    assert conds(clock.fleet) == {"upstream_missing"}, "after the grace, a live feed without T1 is missing"


def test_feed_arriving_before_the_heartbeat_covers_the_upload(clock: Clock) -> None:
    clock.hb(seq=0, uploaded_count=0, txn_count=0)
    feed(clock.fleet, clock.now + 5, "T1")
    clock.hb(seq=1, uploaded_count=1, txn_count=1)
    for seq in range(2, 7):
        feed(clock.fleet, clock.now + 1)
        clock.hb(seq=seq, uploaded_count=1, txn_count=1, advance=20)
    assert conds(clock.fleet) == set()


def test_restart_from_snapshot_raises_no_offline_storm(tmp_path: Path, clock: Clock) -> None:
    clock.hb(seq=0)
    clock.hb(tid="T2", seq=0, advance=0)
    clock.tick(100)
    assert conds(clock.fleet, "T1") == {"offline"} and conds(clock.fleet, "T2") == {"offline"}
    clock.hb(tid="T2", seq=1)  # T2 comes back before the snapshot
    save_snapshot(clock.fleet, tmp_path / "s")
    # The collector was down for an hour: nobody was heard meanwhile, through no fault of the terminals.
    later = clock.now + 3600
    restored = load_snapshot(tmp_path / "s")
    assert len(restored[0]) == 2
    fleet2 = Fleet(CFG, started_at=later, registry=REG, restored=restored)
    c2 = Clock(fleet2, later)
    c2.tick(1)
    assert conds(fleet2, "T1") == {"offline"}, "what was offline stays offline"
    assert conds(fleet2, "T2") == set(), "no false offline right after the restart"
    c2.tick(91)
    assert conds(fleet2, "T2") == {"offline"}, "but silence after the restart still counts"
    assert fleet2.counts[("acq", "s1", "offline")] == 2


def test_counts_stay_consistent_through_registry_reload(clock: Clock) -> None:
    clock.hb(seq=0, mid="M9")
    clock.hb(seq=1, mid="M9")
    assert clock.fleet.counts[("acq", "s1", "merchant_mismatch")] == 1
    moved = Registry({"T1": RegistryEntry.of("T1", "M9", "acq2", "A920", "s9", "r"), "T2": REG.entries["T2"]})
    clock.fleet.set_registry(moved)
    assert clock.fleet.counts[("acq", "s1", "merchant_mismatch")] == 0
    assert clock.fleet.counts[("acq2", "s9", "merchant_mismatch")] == 1
    clock.hb(seq=2, mid="M9")
    clock.hb(seq=3, mid="M9")
    assert conds(clock.fleet) == set()
    assert clock.fleet.counts[("acq2", "s9", "merchant_mismatch")] == 0


# ---- issue 9: real-world clocks, rejects, foreign feeds, bounded maps -------------------------------------------
DECADES = 30 * 365 * 86400.0


def raw_beat(**over: Any) -> Heartbeat:
    """A heartbeat with any finite ts (the decoder accepts ts >= 0): built past msgspec's range check."""
    ts = over.pop("ts")
    return msgspec.structs.replace(beat(ts=T0, **over), ts=ts)


def run_heartbeats(clock: Clock, ts_of: list[float], start_seq: int = 0) -> list[HeartbeatResult | None]:
    """One heartbeat every interval with the given terminal clocks, ticking in between."""
    results = []
    for n, ts in enumerate(ts_of):
        clock.now += 30
        hb = raw_beat(seq=start_seq + n, ts=ts, txn_count=7, uploaded_count=7)  # counters survive reboots
        results.append(clock.fleet.on_heartbeat(hb, clock.now, clock.out))
        clock.tick(0)
    return results


def raised(clock: Clock, cond: str, tid: str = "T1") -> list[Transition]:
    return [tr for tr in clock.out if tr.tid == tid and tr.condition == cond and tr.raised]


@pytest.mark.parametrize(
    ("name", "bad_ts", "detail"),
    [
        ("decades ahead (RTC battery died, then NTP)", T0 + DECADES, "ahead"),
        ("one day ahead", T0 + 86400, "ahead"),
        ("reset to the epoch", 0.0, "behind"),
        ("a year behind", T0 - 365 * 86400, "behind"),
    ],
)
def test_a_broken_clock_is_clock_skew_and_never_freezes_the_terminal(
    clock: Clock, name: str, bad_ts: float, detail: str
) -> None:
    """Before: after one heartbeat decades (or a day) ahead every later normal heartbeat was STALE and the
    terminal was raised offline while it heartbeated; ts=0 was not reported as skew."""
    bad = run_heartbeats(clock, [bad_ts + 30 * n for n in range(3)])
    assert bad == [HeartbeatResult.ACCEPTED] * 3, name
    assert conds(clock.fleet) == {"clock_skew"}
    assert clock.fleet.terminals["T1"].conds["clock_skew"].detail == detail  # type: ignore[index]
    clock.now += 30  # seq 3 is lost on the way: the next seq is not the consecutive one
    good = run_heartbeats(clock, [clock.now + 30 * (n + 1) for n in range(10)], start_seq=4)
    assert good == [HeartbeatResult.ACCEPTED] * 10, "normal heartbeats after the bad clock are accepted"
    assert clock.fleet.terminals["T1"].seq == 13 and clock.fleet.terminals["T1"].last_rx == clock.now
    assert conds(clock.fleet) == set(), "clock_skew cleared once the clock is right"
    assert raised(clock, "offline") == [] and len(raised(clock, "clock_skew")) == 1


def test_a_reboot_with_the_clock_behind_is_a_reboot(clock: Clock) -> None:
    """Before: a lower seq on an older terminal clock was STALE, so a terminal that rebooted with its clock reset
    froze until its seq overtook the old one (days at one heartbeat per 30 s)."""
    run_heartbeats(clock, [clock.now + 30 * (n + 1) for n in range(5)], start_seq=5000)
    after = run_heartbeats(clock, [0.0 + 30 * n for n in range(4)], start_seq=0)
    assert after[0] is HeartbeatResult.REBOOT and after[1:] == [HeartbeatResult.ACCEPTED] * 3
    t = clock.fleet.terminals["T1"]
    assert t.seq == 3 and t.events is not None and len(t.events) == 1
    assert raised(clock, "offline") == []


def test_a_redelivered_older_heartbeat_of_the_same_boot_is_stale_not_a_reboot(clock: Clock) -> None:
    for seq in range(5):
        clock.hb(seq=seq, uptime_s=3600 + 30 * seq)
    t = clock.fleet.terminals["T1"]
    late = beat(seq=2, ts=0.0 + 1, uptime_s=3660)  # any clock: the uptime says it is older, same boot
    assert clock.fleet.on_heartbeat(late, clock.now + 1, clock.out) is HeartbeatResult.STALE
    assert (t.seq, t.events) == (4, None)
    # A real reboot: uptime restarted after the newest heartbeat arrived.
    assert clock.hb(seq=0, uptime_s=10, txn_count=4, uploaded_count=4) is HeartbeatResult.REBOOT


def test_a_redelivery_stored_after_the_next_heartbeat_is_a_duplicate_not_a_reboot(clock: Clock) -> None:
    """Before: with no uptime_s and unchanged counters (an idle terminal), a QoS 1 redelivery of seq k stored after
    seq k+1 (a NATS node stopped under load: the PUBACK lost, the message stored and resent) was a REBOOT: counted
    as accepted a second time and as a flapping event, and the terminal shown at seq k until the next heartbeat
    (tests/integration/test_nats_cluster.py::test_node_stopped_under_load_no_false_alert_on_the_collectors)."""
    sent = [raw_beat(seq=s, ts=T0 + 30 * s, txn_count=7, uploaded_count=7) for s in range(3)]
    for hb in sent:
        clock.now += 30
        assert clock.fleet.on_heartbeat(hb, clock.now, clock.out) is HeartbeatResult.ACCEPTED
    t = clock.fleet.terminals["T1"]
    assert clock.fleet.on_heartbeat(sent[1], clock.now + 1, clock.out) is HeartbeatResult.DUPLICATE
    assert (t.seq, t.last_ts, t.events) == (2, sent[2].ts, None)
    # Only an exact repeat of the previous heartbeat: the same seq with another clock is still a reboot, ...
    other = raw_beat(seq=1, ts=T0 + 1000, txn_count=7, uploaded_count=7)
    assert clock.fleet.on_heartbeat(other, clock.now + 2, clock.out) is HeartbeatResult.REBOOT
    # ... and after it (prev_ts forgotten: the seq went back) a repeat of the heartbeat before is one too.
    assert clock.fleet.on_heartbeat(sent[0], clock.now + 3, clock.out) is HeartbeatResult.REBOOT
    assert t.seq == 0 and t.events is not None and len(t.events) == 2


def test_host_clock_stepping_back_does_not_leave_last_rx_in_the_future(clock: Clock) -> None:
    clock.hb(seq=0)
    clock.now -= 3600  # the collector host's clock was corrected backwards
    assert clock.hb(seq=1, advance=30) is HeartbeatResult.ACCEPTED
    assert clock.fleet.terminals["T1"].last_rx == clock.now


def reject_every_interval(clock: Clock, n: int, tid: str = "T1", reason: str = "card_data") -> None:
    for _ in range(n):
        clock.now += 30
        clock.fleet.on_rejected(tid, reason, clock.now, clock.out)
        clock.tick(0)


def test_a_terminal_whose_heartbeats_are_all_rejected_is_messages_rejected_not_offline(clock: Clock) -> None:
    """Before: every heartbeat rejected (e.g. a battery float read as a card number) made the terminal offline
    (critical) while it heartbeated every 30 s."""
    clock.hb(seq=0)
    reject_every_interval(clock, 10)
    assert conds(clock.fleet) == {"messages_rejected"}
    active = clock.fleet.terminals["T1"].conds["messages_rejected"]  # type: ignore[index]
    assert (active.severity, active.detail) == ("warning", "card_data")
    assert raised(clock, "offline") == []
    assert clock.fleet.terminals["T1"].rejected == {"card_data": 10}
    assert clock.fleet.counts[("acq", "s1", "messages_rejected")] == 1
    reject_every_interval(clock, 1, reason="bad_type")
    assert clock.fleet.terminals["T1"].conds["messages_rejected"].detail == "bad_type"  # type: ignore[index]
    assert clock.hb(seq=1) is HeartbeatResult.ACCEPTED
    assert conds(clock.fleet) == set(), "an accepted heartbeat clears it"


def test_rejects_from_a_terminal_that_was_offline_bring_it_back_as_messages_rejected(clock: Clock) -> None:
    clock.hb(seq=0)
    clock.tick(100)
    assert conds(clock.fleet) == {"offline"}
    assert clock.fleet.counts[("acq", "s1", "_online")] == 0
    reject_every_interval(clock, 1)
    assert conds(clock.fleet) == {"messages_rejected"}
    assert clock.fleet.counts[("acq", "s1", "_online")] == 1
    clock.tick(91)  # the rejects stopped too: now it is silent
    assert conds(clock.fleet) == {"offline"}


def test_occasional_rejects_between_accepted_heartbeats_raise_nothing(clock: Clock) -> None:
    for seq in range(10):
        clock.hb(seq=seq, advance=15)
        reject_every_interval(clock, 1)
    assert conds(clock.fleet) == set()


def test_rejects_from_unknown_ids_respect_the_unregistered_bound(clock: Clock) -> None:
    clock.fleet.max_unregistered = 2
    for i in range(5):
        clock.fleet.on_rejected(f"X{i}", "bad_json", clock.now, clock.out)
    assert len(clock.fleet.terminals) == 2 + 2 and clock.fleet.refused["unregistered"] == 3


def test_counters_going_backwards_are_a_visible_reject(clock: Clock) -> None:
    clock.hb(seq=1, txn_count=10, uploaded_count=10)
    for seq in range(2, 8):
        assert clock.hb(seq=seq, txn_count=0, uploaded_count=0) is HeartbeatResult.BACKWARDS
        clock.tick(0)
    assert conds(clock.fleet) == {"messages_rejected"}
    assert clock.fleet.terminals["T1"].rejected == {"counter_backwards": 6}


REG3 = Registry({**REG.entries, "B1": RegistryEntry.of("B1", "M3", "acq-b", "A920", "s2", "r")})


def test_a_feed_applies_only_to_its_own_acquirers_terminals() -> None:
    """Before: acquirer acq-b's feed naming acq's terminal T1 cleared T1's upstream_missing."""
    clock = Clock(Fleet(CFG, started_at=T0, registry=REG3))
    clock.hb(seq=0, uploaded_count=0, txn_count=0)
    feed(clock.fleet, clock.now)
    clock.hb(seq=1, uploaded_count=1, txn_count=1)
    for seq in range(2, 6):
        feed(clock.fleet, clock.now + 1)
        clock.hb(seq=seq, uploaded_count=1, txn_count=1, advance=20)
    assert conds(clock.fleet) == {"upstream_missing"}
    foreign = UpstreamBatch(clock.now, [UpstreamTxn("T1", "x1", clock.now), UpstreamTxn("B1", "x2", clock.now),
                                        UpstreamTxn("NOPE", "x3", clock.now)], "acq-b")
    result = clock.fleet.on_feed(foreign, clock.now, clock.out)
    assert (result.refused, result.matched, result.foreign, result.unknown) == (False, 1, 1, 1)
    assert conds(clock.fleet) == {"upstream_missing"}, "another acquirer's record does not clear it"
    assert clock.fleet.terminals["T1"].upstream_txns == 0 and clock.fleet.terminals["B1"].upstream_txns == 1


def test_feeds_of_acquirers_outside_the_registry_are_refused(clock: Clock) -> None:
    batch = UpstreamBatch(clock.now, [UpstreamTxn("T1", "x1", clock.now)], "acq-evil")
    result = clock.fleet.on_feed(batch, clock.now, clock.out)
    assert result.refused and "acq-evil" not in clock.fleet.feeds and clock.fleet.refused["feeds"] == 1
    assert clock.fleet.terminals["T1"].upstream_txns == 0
    assert not clock.fleet.feed_allowed("unknown") and clock.fleet.feed_allowed("acq")


def test_feeds_without_a_registry_are_capped() -> None:
    """Before: 20,000 distinct acquirer topics made 20,000 feeds (and ~60,000 series)."""
    fleet = Fleet(CFG, started_at=T0)
    for i in range(20_000):
        fleet.on_feed(UpstreamBatch(T0, [], f"acq{i}"), T0 + i, [])
    assert len(fleet.feeds) == fleet.max_feeds == 256
    assert fleet.refused["feeds"] == 20_000 - 256
    assert not fleet.on_feed(UpstreamBatch(T0, [], "acq0"), T0, []).refused, "a known feed keeps working"


def test_one_terminal_cycling_through_50000_versions_stays_bounded(clock: Clock) -> None:
    """Before: zero-count version keys were never deleted: 50,000 keys for one terminal."""
    for n in range(50_000):
        clock.fleet.on_heartbeat(beat(seq=n, app_version=f"9.{n}"), clock.now + n, clock.out)
    assert dict(clock.fleet.versions) == {("acq", "", "9.49999"): 1}


def test_distinct_versions_are_capped_and_the_overflow_counted(clock: Clock) -> None:
    clock.fleet.max_unregistered = 100
    clock.fleet.max_versions = 5
    for i in range(20):
        clock.fleet.on_heartbeat(beat(tid=f"X{i}", seq=0, app_version=f"v{i}"), clock.now, clock.out)
    assert len(clock.fleet.versions) == 5 and clock.fleet.refused["versions"] == 15
    again = clock.fleet.recount()
    assert {k: v for k, v in clock.fleet.counts.items() if v} == {k: v for k, v in again.counts.items() if v}
    assert dict(clock.fleet.versions) == again.versions


def test_terminal_view_shows_rejects_and_a_clock_reset_to_the_epoch(clock: Clock) -> None:
    from collector.http.routes import terminal_view

    clock.fleet.on_heartbeat(raw_beat(seq=0, ts=0.0), clock.now, clock.out)
    clock.fleet.on_rejected("T1", "card_data", clock.now + 5, clock.out)
    clock.fleet.on_rejected("T1", "card_data", clock.now + 6, clock.out)
    view = terminal_view(clock.fleet.terminals["T1"], clock.now + 10)
    assert view["rejected"] == {"card_data": 2} and view["last_rejected_received"] == clock.now + 6
    assert view["terminal_clock"] == 0.0, "ts=0 is a fact (clock reset), not 'no clock'"
    assert terminal_view(clock.fleet.terminals["T2"], clock.now)["rejected"] == {}


def test_an_unknown_id_that_only_sent_rejected_messages_is_never_offline(clock: Clock) -> None:
    """Rejects may create state for an unknown id (bounded); when they stop, nothing expects it: no page."""
    reject_every_interval(clock, 5, tid="X1")
    assert conds(clock.fleet, "X1") == {"messages_rejected"}
    clock.fleet.on_status(Status("offline", 0.0, "connection_lost", "X2"), clock.now, True, clock.out)
    clock.tick(3600)
    assert conds(clock.fleet, "X1") == set() and conds(clock.fleet, "X2") == set()
    assert conds(clock.fleet, "T2") == {"offline"}, "a registered terminal never heard from still is"
    assert clock.fleet.terminals["T2"].conds["offline"].detail == "never_seen"  # type: ignore[index]


def test_streak_pairs_set_get_and_remove() -> None:
    from collector.fleet.state import streak_of, streak_pairs, with_streak

    s = with_streak(None, "weak_signal", 1)
    assert s == ("weak_signal", 1) and streak_of(s, "weak_signal") == 1 and streak_of(s, "upload_backlog") == 0
    s = with_streak(with_streak(s, "upload_backlog", 2), "weak_signal", 2)
    assert s == ("upload_backlog", 2, "weak_signal", 2)
    assert with_streak(with_streak(s, "weak_signal", 0), "upload_backlog", 0) is None
    assert streak_pairs({"a": 1, "b": 2}) == ("a", 1, "b", 2) and streak_pairs({}) is None and streak_pairs(()) is None


# ---- an evaluation round in slices (the collector lets ingest run between them) ---------------------------

SLICED_REG = Registry({f"S{i}": RegistryEntry.of(f"S{i}", f"M{i}", "acq", "A920", f"s{i % 3}", "r") for i in range(12)})


def sliced_fleet(ages: list[float], faults: list[bool], now: float) -> Fleet:
    """Twelve registered terminals, the i-th last heard `ages[i]` seconds before `now` (those with a fault report a
    broken printer); the rest of the registry never spoke."""
    fleet = Fleet(CFG, started_at=T0, registry=SLICED_REG)
    for i, (age, fault) in enumerate(zip(ages, faults, strict=False)):
        hw = {"printer": "fault" if fault else "ok", "display": "ok", "card_reader": "ok"}
        fleet.on_heartbeat(beat(f"S{i}", ts=now - age, mid=f"M{i}", hw=hw), now - age, [])
    return fleet


@settings(max_examples=60, deadline=None)
@given(
    ages=st.lists(st.sampled_from([5.0, 60.0, 89.0, 91.0, 200.0, 4000.0]), max_size=12),
    faults=st.lists(st.booleans(), min_size=12, max_size=12),
    size=st.integers(1, 13),
)
def test_a_round_in_slices_is_the_round_at_once(ages: list[float], faults: list[bool], size: int) -> None:
    now = T0 + 5000
    whole, sliced = sliced_fleet(ages, faults, now), sliced_fleet(ages, faults, now)
    sliced.tick_slice = size
    parts = list(sliced.tick_slices(now))
    assert len(parts) == -(-len(sliced.terminals) // size) + 1, "one part per slice, then the fleet-wide part"
    assert [tr for part in parts for tr in part] == whole.tick(now)
    assert sliced.counts == whole.counts and sliced.problem == whole.problem


def test_terminals_that_leave_between_slices_are_skipped_and_new_ones_wait() -> None:
    now = T0 + 5000
    fleet = sliced_fleet([4000.0] * 4, [False] * 4, now)  # S0-S3 long silent, S4-S11 never heard: all offline now
    fleet.tick_slice = 2
    round_ = fleet.tick_slices(now)
    first = next(round_)
    assert sorted(tr.tid for tr in first) == ["S0", "S1"]
    gone = fleet.release(lambda tid: tid in {"S2", "S11"})  # a partition handed over meanwhile
    assert [t.tid for t in gone] == ["S2", "S11"]
    out: list[Transition] = []
    fleet.on_heartbeat(beat("X9", ts=now - 100, mid="M9"), now - 100, out)  # a terminal first heard meanwhile
    rest = [tr.tid for part in round_ for tr in part if tr.condition == "offline"]
    assert "S2" not in rest and "S11" not in rest and "X9" not in rest
    assert sorted(rest) == sorted(f"S{i}" for i in (3, 4, 5, 6, 7, 8, 9, 10))
    assert {k: v for k, v in fleet.recount().counts.items() if v} == {k: v for k, v in fleet.counts.items() if v}
