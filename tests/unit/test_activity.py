"""Activity baselines wired into the fleet (collector/fleet/activity.py) on a fake clock: a terminal that stops
selling is flagged and cleared, quiet hours, quiet shops, terminals without a baseline, other conditions and holidays
are not; the baselines survive a snapshot byte for byte, old snapshots load, corrupt ones start empty and counted;
the registry's `tz` column and the acquirer's volume."""

from __future__ import annotations

import zlib
from array import array
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from collector.config import Config, ConfigError, load_config
from collector.fleet.activity import ActivitySnapshot
from collector.fleet.baseline import RECORD
from collector.fleet.protocol import UpstreamBatch, UpstreamTxn
from collector.fleet.registry import Registry, RegistryEntry, RegistryError, load_registry
from collector.fleet.snapshot import _HEADER, FORMAT, MAGIC, load_snapshot, save_snapshot
from collector.fleet.state import FeedState, Fleet, Terminal
from tests.harness.activity import Feeder

MON = 1_772_409_600.0  # Monday 2026-03-02 00:00 UTC
DAY, HOUR = 86_400.0, 3_600.0
TUE2 = MON + 8 * DAY  # Tuesday of the second week: the baselines have learned 8 days
REG = Registry({
    "BUSY": RegistryEntry.of("BUSY", "M-BUSY", "acq", "A920", "s1", "north"),
    "QUIET": RegistryEntry.of("QUIET", "M-QUIET", "acq", "A920", "s1", "north"),
    "NEW": RegistryEntry.of("NEW", "M-NEW", "acq", "A920", "s2", "north"),
})


def config(**activity: Any) -> Config:
    return msgspec.convert({"activity": activity, "thresholds": {"feed_stale_s": 300}}, Config)


def trading(per_h: float, open_h: int = 8, close_h: int = 20) -> Any:
    """Sales per hour by UTC time: `per_h` from open to close, every day."""
    return lambda t: per_h if open_h <= datetime.fromtimestamp(t, UTC).hour < close_h else 0.0


def learned_fleet(cfg: Config | None = None) -> Feeder:
    """BUSY (30/h) and QUIET (1/h) learned for 8 days from Monday, NEW only for the last day."""
    f = Feeder(Fleet(cfg or config(), started_at=MON, registry=REG))
    f.learn("BUSY", MON, TUE2 + 10 * HOUR, trading(30))
    f.learn("QUIET", MON, TUE2 + 10 * HOUR, trading(1))
    f.learn("NEW", TUE2 - DAY, TUE2 + 10 * HOUR, trading(30))
    return f


def run(f: Feeder, start: float, end: float, selling: dict[str, float], step: float = 300.0, **over: Any) -> None:
    """Heartbeats every `step` from `start` to `end` (those in `selling` keep selling at that rate), ticking after
    each round as the collector does."""
    t, acc = start, dict.fromkeys(selling, 0.0)
    while t <= end:
        for tid in REG.entries:
            count = None
            if tid in selling:
                acc[tid] += selling[tid] * step / HOUR
                count = f.count[tid] + int(acc[tid])
                acc[tid] -= int(acc[tid])
            f.beat(tid, t, count, **over)
        f.out.extend(f.fleet.tick(t + 1))
        t += step


def conds(f: Feeder, tid: str) -> set[str]:
    return set(f.fleet.terminals[tid].conds or {})


def raised(f: Feeder, cond: str = "activity_drop") -> list[tuple[str, float]]:
    return [(tr.tid, tr.at) for tr in f.out if tr.condition == cond and tr.raised]


def test_a_busy_terminal_that_stops_is_flagged_within_the_hour_and_a_sale_clears_it() -> None:
    f = learned_fleet()
    f.out.clear()
    stop = TUE2 + 10 * HOUR
    run(f, stop + 300, stop + 2 * HOUR, {"QUIET": 1, "NEW": 30})
    flags = raised(f)
    assert [tid for tid, _ in flags] == ["BUSY"], "only the busy terminal that stopped"
    assert flags[0][1] - stop <= 3600, f"flagged {flags[0][1] - stop:.0f} s after it stopped"
    active = f.fleet.terminals["BUSY"].conds
    assert active is not None
    assert active["activity_drop"].severity == "warning"
    assert active["activity_drop"].detail.startswith("expected ")
    assert active["activity_drop"].detail.endswith(" transactions since 10:00 local, none seen")
    assert f.fleet.activity_view(f.fleet.terminals["BUSY"], stop + 2 * HOUR)["state"] == "evaluated"
    new = f.fleet.activity_view(f.fleet.terminals["NEW"], stop + 2 * HOUR)
    assert new["state"] == "no_baseline" and "no baseline yet" in str(new["note"])
    f.beat("BUSY", stop + 2 * HOUR + 60, f.count["BUSY"] + 1)
    assert "activity_drop" not in conds(f, "BUSY")
    assert [tr.tid for tr in f.out if tr.condition == "activity_drop" and not tr.raised] == ["BUSY"]


def test_a_silent_night_is_never_flagged() -> None:
    f = learned_fleet()
    run(f, TUE2 + 10 * HOUR + 300, TUE2 + 20 * HOUR, {"BUSY": 30, "QUIET": 1, "NEW": 30})
    f.out.clear()
    # Every terminal stops at closing time (20:00) and heartbeats through the night until 07:45.
    run(f, TUE2 + 20 * HOUR + 300, TUE2 + DAY + 7.75 * HOUR, {})
    assert raised(f) == []


def test_only_healthy_online_terminals_are_judged() -> None:
    f = learned_fleet()
    f.out.clear()
    stop = TUE2 + 10 * HOUR
    # The card reader reports a fault: hardware_fault explains the silence, activity_drop stays quiet.
    run(f, stop + 300, stop + 2 * HOUR, {"QUIET": 1, "NEW": 30},
        hw={"printer": "ok", "display": "ok", "card_reader": "fault"})
    assert "hardware_fault" in conds(f, "BUSY")
    assert raised(f) == []


def test_an_activity_drop_clears_when_another_condition_explains_the_silence() -> None:
    f = learned_fleet()
    stop = TUE2 + 10 * HOUR
    run(f, stop + 300, stop + 2 * HOUR, {"QUIET": 1, "NEW": 30})
    assert "activity_drop" in conds(f, "BUSY")
    # Then it goes silent altogether: offline, and the activity condition leaves it to offline.
    t = stop + 2 * HOUR
    for _ in range(30):
        t += 120
        f.out.extend(f.fleet.tick(t))
    assert conds(f, "BUSY") == {"offline"}


def test_a_configured_holiday_counts_for_nothing() -> None:
    day = datetime.fromtimestamp(TUE2, UTC).date().isoformat()
    f = learned_fleet(config(holidays={"north": [day]}))
    f.out.clear()
    run(f, TUE2 + 10 * HOUR + 300, TUE2 + 12 * HOUR, {})
    assert raised(f) == []
    with pytest.raises(msgspec.ValidationError, match="not a date"):
        msgspec.convert({"activity": {"holidays": {"north": ["2026-02-30"]}}}, Config)


def test_baselines_survive_a_snapshot_byte_for_byte(tmp_path: Path) -> None:
    f = learned_fleet()
    save_snapshot(f.fleet, tmp_path / "s")
    restored = load_snapshot(tmp_path / "s")
    again = Fleet(config(), started_at=TUE2 + 10 * HOUR, registry=REG, restored=restored.state,
                  baselines=restored.activity)
    for tid in REG.entries:
        before, after = f.fleet.activity.slot_of(tid), again.activity.slot_of(tid)
        assert after >= 0 and again.activity.tids[after] is again.terminals[tid].tid
        assert again.activity.store.record(after) == f.fleet.activity.store.record(before), tid
    assert again.activity.counts() == f.fleet.activity.counts() == {"evaluated": 2, "learning": 1}
    assert again.activity.restore_problems == 0
    # ... and the restored fleet flags the same stop.
    g = Feeder(again)
    g.seq, g.count = dict(f.seq), dict(f.count)
    stop = TUE2 + 10 * HOUR
    run(g, stop + 300, stop + 2 * HOUR, {"QUIET": 1, "NEW": 30})
    assert [tid for tid, _ in raised(g)] == ["BUSY"]


class _OldSnapshot(msgspec.Struct):
    """The snapshot body before the baselines existed."""

    format: int
    terminals: list[Terminal]
    feeds: list[tuple[str, float, float, int]]


def _write(path: Path, body: bytes) -> None:
    path.write_bytes(_HEADER.pack(MAGIC, FORMAT, len(body), zlib.crc32(body)) + body)


def test_a_snapshot_from_before_the_baselines_still_loads(tmp_path: Path) -> None:
    f = learned_fleet()
    _write(tmp_path / "s", msgspec.msgpack.encode(_OldSnapshot(FORMAT, list(f.fleet.terminals.values()), [])))
    restored = load_snapshot(tmp_path / "s")
    assert restored.activity is None and len(restored.terminals) == 3
    fleet = Fleet(config(), started_at=TUE2, registry=REG, restored=restored.state, baselines=restored.activity)
    assert {fleet.activity.slot_of(tid) for tid in fleet.terminals} == {-1}
    assert fleet.terminals["BUSY"].txn_count == f.count["BUSY"]
    assert fleet.activity.restore_problems == 0 and fleet.activity.tracked() == 0


@pytest.mark.parametrize(
    "activity",
    [
        ActivitySnapshot(RECORD, memoryview(b"\x01" * (RECORD * 2 + 5)), memoryview(bytes(8))),  # not whole records
        ActivitySnapshot(32, memoryview(b"\x01" * 96), memoryview(bytes(12))),  # another record size
        ActivitySnapshot(RECORD, memoryview(b"\x01" * RECORD * 3), memoryview(bytes(8))),  # owners do not match
        "not a baseline at all",  # does not decode
    ],
)
def test_a_corrupt_baseline_buffer_starts_empty_and_is_counted(tmp_path: Path, activity: object) -> None:
    f = learned_fleet()
    body = msgspec.msgpack.encode(
        {"format": FORMAT, "terminals": list(f.fleet.terminals.values()), "feeds": [], "activity": activity}
    )
    _write(tmp_path / "s", body)
    restored = load_snapshot(tmp_path / "s")
    assert len(restored.terminals) == 3, "the terminals' state is kept"
    fleet = Fleet(config(), started_at=TUE2, registry=REG, restored=restored.state, baselines=restored.activity)
    assert fleet.activity.restore_problems == 1
    assert {fleet.activity.slot_of(tid) for tid in fleet.terminals} == {-1} and fleet.activity.tracked() == 0
    g = Feeder(fleet)
    g.seq, g.count = dict(f.seq), dict(f.count)
    g.beat("BUSY", TUE2 + 60, f.count["BUSY"] + 5)  # and it learns again from the next heartbeat
    assert fleet.activity.tracked() == 1


def test_slots_naming_no_terminal_or_a_taken_one_are_dropped() -> None:
    terminals = [Terminal("BUSY"), Terminal("QUIET"), Terminal("NEW")]
    owners = array("i", [0, 0, 7, 2])  # BUSY twice, a position past the list, NEW
    buf = bytes(range(64)) + bytes(64) * 2 + bytes(range(1, 65))
    fleet = Fleet(config(), started_at=MON, registry=REG, restored=(terminals, []),
                  baselines=ActivitySnapshot(RECORD, memoryview(buf), memoryview(owners).cast("B")))
    assert fleet.activity.slot_of("BUSY") == 0 and fleet.activity.store.record(0) == bytes(range(64))
    assert fleet.activity.slot_of("NEW") == 3 and fleet.activity.store.record(3) == bytes(range(1, 65))
    assert fleet.activity.slot_of("QUIET") == -1
    assert fleet.activity.restore_problems == 1 and fleet.activity.tracked() == 2
    assert fleet.activity.slot_for("QUIET") in (1, 2), "a dropped slot is reused"


def test_the_slot_index_finds_every_terminal_through_growth_and_release() -> None:
    activity = Fleet(config(), started_at=MON).activity
    tids = [f"T{i}" for i in range(5000)]
    slots = [activity.slot_for(t) for t in tids]
    assert slots == list(range(5000)) and [activity.slot_of(t) for t in tids] == slots
    for t in tids[::3]:
        activity.release(t)
    assert all(activity.slot_of(t) == (-1 if i % 3 == 0 else i) for i, t in enumerate(tids))
    again = [activity.slot_for(t) for t in ("X1", "X2")]
    assert set(again) <= set(slots[::3]) and activity.slot_of("X2") == again[1]
    assert activity.tracked() == 5000 - len(tids[::3]) + 2


def test_registry_tz_column_is_validated_and_every_bad_row_reported(tmp_path: Path) -> None:
    path = tmp_path / "reg.csv"
    path.write_text(
        "terminal_id,merchant_id,acquirer,model,site,region,tz\n"
        "T1,M1,acq,A920,s1,north,Europe/Berlin\n"
        "T2,M2,acq,A920,s1,north,\n"
        "T3,M3,acq,A920,s1,north,Mars/Olympus\n"
        "T4,M4,acq,A920,s1,north,UTC+2\n"
    )
    with pytest.raises(RegistryError) as err:
        load_registry(path)
    assert "line 4: tz 'Mars/Olympus'" in str(err.value) and "line 5: tz 'UTC+2'" in str(err.value)
    path.write_text(path.read_text().replace("Mars/Olympus", "Asia/Kolkata").replace("UTC+2", ""))
    reg = load_registry(path)
    assert [reg.entries[t].tz for t in ("T1", "T2", "T3", "T4")] == ["Europe/Berlin", "", "Asia/Kolkata", ""]
    fleet = Fleet(config(acquirer_tz={"acq": "America/New_York"}), started_at=MON, registry=reg)
    zone = {t: str(fleet.activity_zone(fleet.terminals[t])[0]) for t in ("T1", "T2")}
    assert zone == {"T1": "Europe/Berlin", "T2": "America/New_York"}


def test_activity_config_reports_every_bad_zone(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("activity:\n  default_tz: Nowhere/City\n  acquirer_tz: {acq: Bad/Zone}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "default_tz: unknown time zone 'Nowhere/City'" in str(err.value)
    assert "acquirer_tz.acq: unknown time zone 'Bad/Zone'" in str(err.value)


def test_an_acquirer_whose_recorded_volume_halves_is_flagged_within_30_minutes() -> None:
    fleet = Fleet(config(), started_at=MON, registry=REG)
    f = Feeder(fleet)
    f.beat("BUSY", MON, 0)
    full = UpstreamBatch(MON, [UpstreamTxn("BUSY", f"x{i}", MON) for i in range(10)], "acq")
    half = UpstreamBatch(MON, full.txns[:5], "acq")
    t, drop_at = MON, TUE2 + 10 * HOUR
    flagged: float | None = None
    while t < drop_at + HOUR:
        fleet.on_feed(full if t < drop_at else half, t, f.out)  # 600 records an hour, then 300
        if int(t) % 120 == 0:
            fleet.tick(t)
            if flagged is None and fleet.volume_drop("acq") is not None:
                flagged = t
        t += 60
    assert flagged is not None and drop_at < flagged <= drop_at + 1800, flagged
    since, expected, seen, window = fleet.volume_drop("acq") or (0.0, 0.0, 0, 0)
    assert since == flagged and seen <= 0.6 * expected and window in (600, 1800)


def regional_fleet(**activity: Any) -> tuple[Feeder, Registry]:
    """Eight shops of one region (30/h, 8:00-20:00) learned for 8 days."""
    reg = Registry({f"S{i}": RegistryEntry.of(f"S{i}", f"M-S{i}", "acq", "A920", "s1", "west") for i in range(8)})
    activity = {"holiday_min_peers": 5, "holiday_scan_s": 600, **activity}
    f = Feeder(Fleet(config(**activity), started_at=MON, registry=reg))
    for tid in reg.entries:
        f.learn(tid, MON, TUE2 - 4 * HOUR, trading(30))  # the evening before: each sold until 20:00 on Monday
    return f, reg


def run_region(f: Feeder, reg: Registry, start: float, end: float, selling: dict[str, float]) -> None:
    t, acc = start, dict.fromkeys(selling, 0.0)
    while t <= end:
        for tid in reg.entries:
            count = None
            if tid in selling:
                acc[tid] += selling[tid] * 300 / HOUR
                count = f.count[tid] + int(acc[tid])
                acc[tid] -= int(acc[tid])
            f.beat(tid, t, count)
        f.out.extend(f.fleet.tick(t + 1))
        t += 300


def test_a_region_silent_together_is_a_holiday_and_flags_nothing(tmp_path: Path) -> None:
    f, reg = regional_fleet()
    f.out.clear()
    # Tuesday is an unannounced holiday in the region: nobody opens. Heartbeats from midnight to 14:00.
    run_region(f, reg, TUE2 - 4 * HOUR + 300, TUE2 + 14 * HOUR, {})
    assert raised(f) == [] and all(f.fleet.terminals[tid].conds is None for tid in reg.entries)
    assert f.fleet.activity.quiet_days == {"west": [(TUE2, TUE2 + DAY)]}
    view = f.fleet.activity_view(f.fleet.terminals["S0"], TUE2 + 14 * HOUR)
    assert view["state"] == "regional_quiet"
    save_snapshot(f.fleet, tmp_path / "s")  # the declared day survives a restart
    restored = load_snapshot(tmp_path / "s")
    again = Fleet(f.fleet.cfg, started_at=TUE2 + 14 * HOUR, registry=reg, restored=restored.state,
                  baselines=restored.activity)
    assert again.activity.quiet_days == {"west": [(TUE2, TUE2 + DAY)]}
    # Without the guard (more peers needed than the region has) the same day flags every shop.
    f, reg = regional_fleet(holiday_min_peers=9)
    run_region(f, reg, TUE2 - 4 * HOUR + 300, TUE2 + 14 * HOUR, {})
    assert sorted(tid for tid, _ in raised(f)) == sorted(reg.entries)


def test_one_shop_of_a_trading_region_that_stops_is_flagged_despite_the_guard() -> None:
    f, reg = regional_fleet()
    f.out.clear()
    # A normal Tuesday: everybody opens at 8:00, S0 sells until 10:00 and then stops.
    run_region(f, reg, TUE2 - 4 * HOUR + 300, TUE2 + 10 * HOUR, {tid: 30 for tid in reg.entries})
    run_region(f, reg, TUE2 + 10 * HOUR + 300, TUE2 + 12 * HOUR, {tid: 30 for tid in reg.entries if tid != "S0"})
    assert [tid for tid, _ in raised(f)] == ["S0"]
    assert f.fleet.activity.quiet_days == {}


def test_the_diagnosis_says_expected_seen_and_since_for_a_terminal_and_its_acquirer() -> None:
    from collector.config import Thresholds
    from collector.support.diagnose import diagnose, facts_from

    f = learned_fleet()
    stop = TUE2 + 10 * HOUR
    run(f, stop + 300, stop + 2 * HOUR, {"QUIET": 1, "NEW": 30})
    now = stop + 2 * HOUR
    fleet, t = f.fleet, f.fleet.terminals["BUSY"]
    facts = facts_from(t, REG.get("BUSY"), True, None, Thresholds(), {}, now,
                       activity=fleet.activity_facts(t, now), volume_drop=(now - 600, 400.0, 150, 600))
    d = diagnose(facts, now)
    assert d.primary is not None and d.primary.code == "activity_drop" and d.primary.step == "local_records"
    ev = d.primary.evidence
    # Two hours at ~30 an hour, less what the silent hour 10:00 already taught (an improbable zero, learned fast).
    assert ev["seen_transactions"] == 0 and ev["expected_transactions"] > 30
    assert ev["silent_since"].startswith("2026-03-10T10:00") and ev["local_tz"] == "UTC"
    assert "since 2026-03-10 10:00" in d.merchant_message["en"] and "BUSY" in d.merchant_message["zh-CN"]
    local = next(s for s in d.steps if s["step"] == "local_records")
    assert local["status"] == "warning" and local["evidence"]["activity_baseline"] == "evaluated"
    # The feed is stale here (no feed at all), so the acquirer's volume drop is not claimed ...
    assert "acquirer_volume_drop" not in [x.code for x in d.others]
    # ... and with a live feed it is, with expected vs recorded and since when.
    live = FeedState("acq")
    live.last_rx = now - 5
    facts = facts_from(t, REG.get("BUSY"), True, live, Thresholds(), {}, now,
                       activity=fleet.activity_facts(t, now), volume_drop=(now - 600, 400.0, 150, 600))
    d = diagnose(facts, now)
    found = {x.code: x for x in (d.primary, *d.others) if x is not None}
    assert found["acquirer_volume_drop"].step == "acquirer_records"
    assert found["acquirer_volume_drop"].evidence == {
        "acquirer": "acq", "since": "2026-03-10T11:50:00Z", "window_s": 600, "expected_transactions": 400,
        "recorded_transactions": 150,
    }


def test_acquirer_volume_series_exist_before_the_first_feed_batch() -> None:
    """Every registry acquirer has its volume series from the first scrape (0, no drop), so a feed's first batch
    adds no series (a flood test counting series saw 4 appear mid-run)."""
    from collector.http.metrics import take_view

    fleet = Fleet(config(), started_at=MON, registry=REG)
    assert take_view(fleet, 100, MON).volumes == [("acq", 0.0, False)]
    fleet.on_feed(UpstreamBatch(ts=MON, acquirer="acq", txns=[UpstreamTxn(tid="BUSY", txn_id="1", ts=MON)]), MON, [])
    assert [acq for acq, _, _ in take_view(fleet, 100, MON + 60).volumes] == ["acq"]
