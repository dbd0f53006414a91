"""Fleet state and detection with a fake clock: hysteresis, reboots, duplicates, out-of-order, liveness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from collector.config import Config
from collector.protocol import Heartbeat, Status, UpstreamBatch, UpstreamTxn
from collector.registry import Registry, RegistryEntry
from collector.snapshot import load_snapshot, save_snapshot
from collector.state import Fleet, HeartbeatResult, Transition

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
        "T1": RegistryEntry("T1", "M1", "acq", "A920", "s1", "r"),
        "T2": RegistryEntry("T2", "M2", "acq", "A920", "s1", "r"),
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
        ({"mid": "M9"}, "merchant_mismatch", ""),
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
    assert results[:3] == [HeartbeatResult.ACCEPTED] * 3 and results[3:] == [None, None]
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
    # A replayed heartbeat from before the reboot is older by the terminal's clock: stale.
    old = beat(seq=99, ts=clock.now - 60, txn_count=99, uploaded_count=99)
    assert clock.fleet.on_heartbeat(old, clock.now, clock.out) is HeartbeatResult.STALE


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


def test_retained_stale_status_is_ignored(clock: Clock) -> None:
    clock.hb(seq=0)
    old = Status("offline", clock.now - 3600, "connection_lost", "T1")
    assert clock.fleet.on_status(old, clock.now, True, clock.out) is False
    assert clock.fleet.terminals["T1"].status != "offline"


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
    moved = Registry({"T1": RegistryEntry("T1", "M9", "acq2", "A920", "s9", "r"), "T2": REG.entries["T2"]})
    clock.fleet.set_registry(moved)
    assert clock.fleet.counts[("acq", "s1", "merchant_mismatch")] == 0
    assert clock.fleet.counts[("acq2", "s9", "merchant_mismatch")] == 1
    clock.hb(seq=2, mid="M9")
    clock.hb(seq=3, mid="M9")
    assert conds(clock.fleet) == set()
    assert clock.fleet.counts[("acq2", "s9", "merchant_mismatch")] == 0
