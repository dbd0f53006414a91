"""Activity baselines (collector/fleet/baseline.py) on a fake clock: learning, decay, the silence test, time zones and
DST, the acquirer volume test, and hypothesis properties (the store never grows, decisions are deterministic)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.fleet.baseline import (
    RECORD,
    BaselineStore,
    Drop,
    NotEvaluated,
    VolumeBaseline,
    VolumeDrop,
    acquirer_volume_drop,
    activity_drop,
    bucket,
    expected_between,
    flag_due,
    poisson_tail_low,
    quiet_today,
    threshold,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")
Profile = Callable[[datetime], float]


def at(tz: ZoneInfo, y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> float:
    """Epoch seconds of a local wall-clock time."""
    return datetime(y, mo, d, h, mi, tzinfo=tz).timestamp()


def shop(open_h: int, close_h: int, per_h: float, sunday: bool = False) -> Profile:
    """Rate by local time: `per_h` between open and close, Monday to Saturday (and Sunday if `sunday`)."""

    def rate(local: datetime) -> float:
        if local.weekday() == 6 and not sunday:
            return 0.0
        return per_h if open_h <= local.hour < close_h else 0.0

    return rate


class Terminal:
    """A fake terminal: heartbeats every `hb` seconds whose txn_count grows by the profile (deterministic)."""

    def __init__(self, store: BaselineStore, slot: int, tz: ZoneInfo, now: float, hb: float = 60.0) -> None:
        self.store, self.slot, self.tz, self.now, self.hb = store, slot, tz, now, hb
        self.count, self.acc = 0, 0.0
        self.prev: float | None = None
        self.last_txn = now

    def run(self, until: float, profile: Profile) -> None:
        """Heartbeat until `until`, transactions following `profile`."""
        while self.now < until:
            self.now += self.hb
            self.acc += profile(datetime.fromtimestamp(self.now, self.tz)) * self.hb / 3600.0
            k = int(self.acc)
            if k:
                self.acc -= k
                self.count += k
                self.last_txn = self.now
            self.store.observe(self.slot, self.tz, self.prev, self.count - k, self.now, self.count)
            self.prev = self.now


def learned(profile: Profile, days: int, tz: ZoneInfo = BERLIN, start: float | None = None) -> Terminal:
    """A terminal that has run `days` days from `start` (default Monday 2026-01-05 00:00 local)."""
    t = Terminal(BaselineStore(2), 1, tz, start if start is not None else at(tz, 2026, 1, 5))
    t.run(t.now + days * 86400, profile)
    return t


def test_learns_hourly_rates_by_day_type() -> None:
    t = learned(shop(9, 19, 25.0), 21)
    r = t.store.rates(1)
    assert r[10] == pytest.approx(25.0, rel=0.06)  # weekday 10:00
    assert r[3] == 0.0 and r[20] == 0.0  # night, after closing
    assert r[24 + 5] == pytest.approx(25.0, rel=0.06)  # Saturday 10-12
    assert r[36 + 5] == 0.0  # Sunday closed: not mixed with Saturday
    assert t.store.learned_hours(1) == (15 * 24, 3 * 24, 3 * 24)
    assert t.store.rates(0) == [0.0] * 48  # the neighbour slot is untouched


@pytest.mark.parametrize(
    ("days", "expect"),
    [(3, NotEvaluated.NO_BASELINE), (6, NotEvaluated.NO_BASELINE), (7, "drop")],
)
def test_no_baseline_before_a_week(days: int, expect: object) -> None:
    t = learned(shop(0, 24, 25.0, sunday=True), days)
    verdict = activity_drop(t.store, 1, t.tz, t.now + 3 * 3600, t.now)
    assert verdict is expect if expect != "drop" else isinstance(verdict, Drop)


@pytest.mark.parametrize(
    ("hour", "silent_min", "flagged"),
    [
        (11, 30, False),  # a busy shop's half hour without a sale is normal
        (11, 45, True),  # within its first silent hour: ~41 min at 25/h
        (19, 300, False),  # closed in the evening and at night
        (2, 60, False),
    ],
)
def test_busy_weekday(hour: int, silent_min: int, flagged: bool) -> None:
    t = learned(shop(9, 19, 25.0), 21)  # ends Monday 2026-01-26 00:00
    now = at(BERLIN, 2026, 1, 26, hour) + silent_min * 60
    since = now - silent_min * 60
    if hour < 9:  # silent since yesterday's closing
        since = at(BERLIN, 2026, 1, 24, 19)
    verdict = activity_drop(t.store, 1, BERLIN, now, since)
    assert isinstance(verdict, Drop) is flagged, verdict
    if flagged:
        assert isinstance(verdict, Drop) and verdict.since == since and verdict.expected >= verdict.needed


def test_flag_due_matches_activity_drop() -> None:
    t = learned(shop(9, 19, 25.0), 21)
    since = at(BERLIN, 2026, 1, 26, 11)
    due = flag_due(t.store, 1, BERLIN, since, since + 86400)
    assert due is not None and 30 * 60 < due - since < 60 * 60
    assert activity_drop(t.store, 1, BERLIN, due - 1, since) is None
    assert isinstance(activity_drop(t.store, 1, BERLIN, due + 1, since), Drop)


def test_quiet_shop_and_slow_sunday_never_flagged() -> None:
    quiet = learned(shop(9, 19, 1.0), 21)
    since = at(BERLIN, 2026, 1, 26, 9)
    assert activity_drop(quiet.store, 1, BERLIN, at(BERLIN, 2026, 1, 26, 19), since) is None

    def slow_sunday(local: datetime) -> float:
        return (2.0 if local.weekday() == 6 else 30.0) if 10 <= local.hour < 18 else 0.0

    t = learned(slow_sunday, 21)  # ends Monday 2026-01-26; Sunday 2026-01-25 was the last day
    sunday = at(BERLIN, 2026, 2, 1, 10)
    assert activity_drop(t.store, 1, BERLIN, sunday + 3 * 3600, sunday) is None
    assert isinstance(activity_drop(t.store, 1, BERLIN, at(BERLIN, 2026, 1, 26, 12), at(BERLIN, 2026, 1, 26, 11)), Drop)


def test_changed_hours_are_relearned_within_two_weeks() -> None:
    t = learned(shop(9, 19, 25.0), 21)
    evening = (at(BERLIN, 2026, 1, 26, 17), at(BERLIN, 2026, 1, 26, 19))
    assert isinstance(activity_drop(t.store, 1, BERLIN, evening[1], evening[0]), Drop)
    t.run(t.now + 14 * 86400, shop(9, 17, 25.0))  # now closes at 17:00
    since, now = at(BERLIN, 2026, 2, 9, 17), at(BERLIN, 2026, 2, 9, 19)
    assert activity_drop(t.store, 1, BERLIN, now, since) is None
    assert t.store.rates(1)[18] < 25.0 * 0.3  # two half-lives: ~1/4 of the old rate


@pytest.mark.parametrize("hb", [60.0, 30.4])  # 30.4 s: per-heartbeat rounding leaves an hour ~3,570 s covered
def test_improbable_silence_is_relearned_in_days(hb: float) -> None:
    t = Terminal(BaselineStore(2), 1, BERLIN, at(BERLIN, 2026, 1, 5), hb=hb)
    t.run(t.now + 21 * 86400, shop(9, 19, 25.0))
    t.run(t.now + 7 * 86400, shop(9, 17, 25.0))  # one week of closing at 17:00: five weekdays
    assert t.store.rates(1)[18] < 25.0 / 4  # the 2-day half-life; the 7-day one would leave ~12.5
    assert t.store.rates(1)[12] == pytest.approx(25.0, rel=0.1)  # trading hours untouched


def test_zones_and_dst() -> None:
    # Learned in winter (CET), judged after the spring change (CEST): opening hours follow local time.
    t = learned(shop(9, 19, 25.0), 84, start=at(BERLIN, 2026, 1, 5))  # to 2026-03-30, DST began 03-29
    assert bucket(BERLIN, int(at(BERLIN, 2026, 3, 30, 9, 30) // 3600)) == 9
    before_open = at(BERLIN, 2026, 3, 30, 8, 55)
    assert activity_drop(t.store, 1, BERLIN, before_open, at(BERLIN, 2026, 3, 28, 19)) is None
    # Opening at 09:00 CEST; nothing sold today, so 41 min + 30 min at 25/h of opening slack: flagged by 10:30
    # (a baseline keyed by UTC would still expect the shop to open at 10:00 CEST and stay quiet until 11:40).
    assert isinstance(
        activity_drop(t.store, 1, BERLIN, at(BERLIN, 2026, 3, 30, 10, 30), at(BERLIN, 2026, 3, 28, 19)), Drop
    )
    # The same shop hours in New York and in Kolkata (+05:30) are their own local hours.
    ny = learned(shop(9, 19, 25.0), 14, tz=NEW_YORK)
    assert ny.store.rates(1)[10] == pytest.approx(25.0, rel=0.06) and ny.store.rates(1)[5] == 0.0
    kol = learned(shop(9, 19, 25.0), 14, tz=KOLKATA)
    assert kol.store.rates(1)[12] == pytest.approx(25.0, rel=0.06)


def test_holiday_guard() -> None:
    t = learned(shop(9, 19, 25.0), 21)
    since, now = at(BERLIN, 2026, 1, 24, 19), at(BERLIN, 2026, 1, 26, 11)  # closed on a Monday holiday
    holiday = [(at(BERLIN, 2026, 1, 26), at(BERLIN, 2026, 1, 27))]
    assert quiet_today(t.store, 1, BERLIN, now, since) is True
    assert quiet_today(t.store, 1, BERLIN, at(BERLIN, 2026, 1, 26, 8), since) is None  # not due to trade yet
    assert isinstance(activity_drop(t.store, 1, BERLIN, now, since), Drop)
    assert activity_drop(t.store, 1, BERLIN, now, since, holiday) is NotEvaluated.REGIONAL_QUIET
    assert flag_due(t.store, 1, BERLIN, since, at(BERLIN, 2026, 1, 27, 9), holiday) is None
    # The day after: the holiday counts for nothing, so no flood at midnight; flagged when it does not open.
    tuesday = at(BERLIN, 2026, 1, 27)
    assert activity_drop(t.store, 1, BERLIN, tuesday + 1800, since, holiday) is NotEvaluated.REGIONAL_QUIET
    due = flag_due(t.store, 1, BERLIN, since, tuesday + 86400, holiday)
    assert due is not None and at(BERLIN, 2026, 1, 27, 9, 30) < due < at(BERLIN, 2026, 1, 27, 10, 30)
    assert isinstance(activity_drop(t.store, 1, BERLIN, due + 1, since, holiday), Drop)
    # Silent since the last trading day's morning: already a drop then, a holiday does not excuse it.
    hung = at(BERLIN, 2026, 1, 23, 11)
    assert isinstance(activity_drop(t.store, 1, BERLIN, now, hung, holiday), Drop)


@pytest.mark.parametrize(
    ("since", "now", "flagged"),
    [
        # Nothing sold yet today: a shop opening late is not a fault; the opening slack (30 min at 25/h) applies.
        ((1, 24, 19), (1, 26, 9, 45), False),
        ((1, 24, 19), (1, 26, 10, 15), True),
        # Sold this morning, then silent: the plain threshold (~41 min at 25/h).
        ((1, 26, 9, 30), (1, 26, 10, 15), True),
    ],
)
def test_first_sale_of_the_day_gets_opening_slack(since: tuple[int, ...], now: tuple[int, ...], flagged: bool) -> None:
    t = learned(shop(9, 19, 25.0), 21)
    s, n = at(BERLIN, 2026, *since), at(BERLIN, 2026, *now)
    assert isinstance(activity_drop(t.store, 1, BERLIN, n, s), Drop) is flagged
    due = flag_due(t.store, 1, BERLIN, s, n + 86400)
    assert due is not None and (due <= n) is flagged


def test_gaps_and_first_heartbeat_teach_nothing() -> None:
    store = BaselineStore(1)
    t0 = at(BERLIN, 2026, 1, 5, 10)
    store.observe(0, BERLIN, None, 500, t0, 500)  # first heartbeat: counter already at 500
    store.observe(0, BERLIN, t0, 500, t0 + 4 * 3600, 900)  # after 4 h unheard: hour unknown
    store.observe(0, BERLIN, t0 + 4 * 3600, 900, t0 + 5 * 3600 + 60, 900)
    assert store.rates(0) == [0.0] * 48
    assert store.last_txn(0) == t0 + 4 * 3600


def test_acquirer_volume_drop() -> None:
    vb = VolumeBaseline()
    now = at(BERLIN, 2026, 1, 5)

    def run(until: float, per_h: Callable[[datetime], float]) -> None:
        nonlocal now
        acc = 0.0
        while now < until:
            now += 60
            acc += per_h(datetime.fromtimestamp(now, BERLIN)) / 60
            n = int(acc)
            acc -= n
            vb.observe(n, now, BERLIN)

    def volume(local: datetime) -> float:
        return 6000.0 if 8 <= local.hour < 20 else 300.0

    run(now + 5 * 86400, volume)
    assert acquirer_volume_drop(vb, BERLIN, now, True) is NotEvaluated.NO_BASELINE
    run(now + 16 * 86400, volume)  # to Monday 00:00
    assert acquirer_volume_drop(vb, BERLIN, now, True) is None
    run(at(BERLIN, 2026, 1, 26, 10), volume)
    assert acquirer_volume_drop(vb, BERLIN, now, True) is None
    halved = now
    run(halved + 9 * 60, lambda local: volume(local) * 0.8)  # 20% down: not flagged
    assert acquirer_volume_drop(vb, BERLIN, now, True) is None
    while not isinstance(acquirer_volume_drop(vb, BERLIN, now, True), VolumeDrop):
        run(now + 60, lambda local: volume(local) / 2)
        assert now - halved < 30 * 60
    drop = acquirer_volume_drop(vb, BERLIN, now, True)
    assert isinstance(drop, VolumeDrop) and drop.observed < drop.expected * 0.6
    assert acquirer_volume_drop(vb, BERLIN, now, False) is None  # stopped feed: feed_stale's business
    # A batch out of receive order is counted and does not restart the feed (its windows stay judged).
    alive, observed = vb.alive_since, vb.observed_since(now - 600)
    vb.observe(7, now - 30, BERLIN)
    assert vb.alive_since == alive and vb.observed_since(now - 600) == observed + 7


@pytest.mark.parametrize(("k", "lam"), [(0, 7.0), (3, 20.0), (50, 100.0), (400, 1000.0)])
def test_poisson_bound_is_an_upper_bound(k: int, lam: float) -> None:
    import math

    exact = sum(math.exp(-lam + i * math.log(lam) - math.lgamma(i + 1)) for i in range(k + 1))
    assert exact <= poisson_tail_low(k, lam) * (1 + 1e-9)


def test_record_round_trip_and_bad_record() -> None:
    t = learned(shop(9, 19, 25.0), 8)
    other = BaselineStore(1)
    other.load(0, t.store.record(1))
    assert other.rates(0) == t.store.rates(1) and threshold(other, 0) == threshold(t.store, 1)
    with pytest.raises(ValueError, match="64 bytes"):
        other.load(0, b"\0" * 10)


heartbeats = st.lists(st.tuples(st.integers(0, 3), st.floats(0, 7200), st.integers(0, 500)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None)
@given(heartbeats, st.sampled_from([BERLIN, NEW_YORK, KOLKATA]))
def test_store_never_grows_and_is_deterministic(steps: list[tuple[int, float, int]], tz: ZoneInfo) -> None:
    def play() -> tuple[BaselineStore, list[object]]:
        store = BaselineStore(4)
        size = len(store.buf)
        now = at(tz, 2026, 3, 28, 20)  # across a DST change
        state: dict[int, tuple[float, int]] = {}
        verdicts: list[object] = []
        for slot, advance, add in steps:
            now += advance
            prev = state.get(slot)
            count = (prev[1] if prev else 0) + add
            store.observe(slot, tz, prev[0] if prev else None, prev[1] if prev else 0, now, count)
            state[slot] = (now, count)
            assert len(store.buf) == size == 4 * RECORD
            last = store.last_txn(slot)
            assert last is not None
            verdicts.append(activity_drop(store, slot, tz, now + 3600, last))
            verdicts.append(expected_between(store, slot, tz, last, now + 3600))
        return store, verdicts

    a, va = play()
    b, vb = play()
    assert a.buf == b.buf and va == vb


@settings(max_examples=150, deadline=None)
@given(heartbeats, st.sampled_from([BERLIN, NEW_YORK, KOLKATA]), st.integers(0, 4 * 3600))
def test_the_same_hour_shortcut_learns_what_the_hour_loop_learns(
    steps: list[tuple[int, float, int]], tz: ZoneInfo, start: int
) -> None:
    """`observe` takes a shortcut when a heartbeat stays in the hour being accumulated; byte for byte it must be
    the general hour-by-hour path, and it must say "folded" exactly when that path folds."""
    fast, slow = BaselineStore(4), BaselineStore(4)
    now = at(tz, 2026, 3, 28, 20) + start
    state: dict[int, tuple[float, int]] = {}
    zone_asked: list[int] = []

    def zone() -> ZoneInfo:
        zone_asked.append(1)
        return tz

    for slot, advance, add in steps:
        now += advance / 8  # mostly within the hour
        prev = state.get(slot)
        args = (prev[0] if prev else None, prev[1] if prev else 0, now, (prev[1] if prev else 0) + add)
        asked = len(zone_asked)
        folded = fast.observe(slot, zone, *args)
        assert folded == slow._observe_hours(slot, tz, *args)
        assert (len(zone_asked) > asked) == folded  # the zone is looked up only to fold an hour
        state[slot] = (now, args[3])
        assert fast.buf == slow.buf


BUSY = learned(shop(8, 20, 30.0, sunday=True), 21)  # learned once; the properties below only read it


@settings(max_examples=150, deadline=None)
@given(
    st.floats(0, 14 * 86400),
    st.sampled_from([None, 0, 1, 2, 5]),
)
def test_flag_due_agrees_with_activity_drop(offset: float, quiet_day: int | None) -> None:
    since = BUSY.now + offset
    quiet = []
    if quiet_day is not None:
        m = local_midnight_of(since, quiet_day)
        quiet = [(m, local_midnight_of(m, 1))]
    until = since + 4 * 86400
    due = flag_due(BUSY.store, 1, BERLIN, since, until, quiet)
    if due is None:
        assert not isinstance(activity_drop(BUSY.store, 1, BERLIN, until, since, quiet), Drop)
        return
    assert isinstance(activity_drop(BUSY.store, 1, BERLIN, due + 1e-3, since, quiet), Drop)
    if due - 1.0 > since:
        assert not isinstance(activity_drop(BUSY.store, 1, BERLIN, due - 1.0, since, quiet), Drop)


def local_midnight_of(t: float, days_later: int) -> float:
    """Local midnight `days_later` days after the day of `t` (Berlin)."""
    d = datetime.fromtimestamp(t, BERLIN).date().toordinal() + days_later
    day = datetime.fromordinal(d)
    return datetime(day.year, day.month, day.day, tzinfo=BERLIN).timestamp()
