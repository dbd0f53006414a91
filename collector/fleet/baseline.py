"""Learned activity baselines: expected transactions per hour, per terminal and per acquirer, and the silence tests.

Invariant: every terminal's baseline is one fixed 64-byte record in a single preallocated `bytearray`, addressed
by a slot the caller assigns; the store never grows after construction and holds no Python object per terminal
(a million terminals cost 64 MB plus one object header). A record is:

    bytes 0..23   log-quantised rates (transactions per hour) by local hour, Monday to Friday
    bytes 24..35  the same for Saturday, by two-hour block      (many shops trade on Saturday only,
    bytes 36..47  the same for Sunday, by two-hour block         or close on Sunday: the two must differ)
    bytes 48..63  state: hour being accumulated (UTC hour index mod 65535, + 1; 0 = none), its count in 1/8
                  transactions, seconds of it covered by heartbeats, covered hours learned per day type
                  (weekday, Saturday, Sunday), receive time of the last transaction

Learning: each heartbeat's `txn_count` delta is spread evenly over the time since the previous heartbeat, cut at
UTC hour boundaries; when an hour ends its rate is folded into the bucket of its local hour (the zone is passed
in, so DST and zones with half-hour offsets are handled by zoneinfo) with an exponentially weighted mean whose
half-life is in calendar days. Hours the terminal was not heard for (offline, switched off) teach nothing.

Deciding: `activity_drop` integrates the baseline over the silent stretch and flags when the expected count makes
silence improbable even after allowing for the number of gaps a busy day has (a scan statistic, see
`threshold`), with extra slack for a day's first sale and nothing counted on days the caller declares quiet
(a regional holiday). `flag_due` says when that will first happen, so a caller schedules instead of polling.
`acquirer_volume_drop` compares an acquirer feed's recent volume with its baseline. Everything is a pure
function of the stored bytes and the time passed in; nothing reads the wall clock.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

__all__ = [
    "PARAMS",
    "RECORD",
    "BaselineStore",
    "Drop",
    "NotEvaluated",
    "Params",
    "Quiet",
    "VolumeBaseline",
    "VolumeDrop",
    "acquirer_volume_drop",
    "activity_drop",
    "bucket",
    "expected_between",
    "flag_due",
    "local_midnight",
    "poisson_tail_low",
    "quiet_today",
    "threshold",
]

RECORD = 64  # bytes per terminal: 48 rates + 16 of state
_STATE = struct.Struct("<HHHHHHI")  # cur hour + 1, count x 8, covered s, learned h (wd, sat, sun), last txn s
_R0 = 0.05  # rate scale (txn/h): codes are linear below ~0.05/h and logarithmic above
_K = 16.0  # codes per doubling: 4.4% steps, so a rate is kept within +-2.2%; code 255 is ~3,100/h
_RATE: tuple[float, ...] = tuple(_R0 * (2.0 ** (q / _K) - 1.0) for q in range(256))
_U16 = 0xFFFF
_WRAP = 0xFFFF  # the hour being accumulated is kept modulo this (7.5 years); only its recency matters
_HOURS_PER_BUCKET = (1, 2, 2)  # weekday, Saturday, Sunday


@dataclass(frozen=True, slots=True)
class Params:
    """Every knob of the model; the defaults' reasons are in docs/activity.md."""

    # Half-life of the weighted mean, in calendar days: a shop that changes its hours stops being expected in
    # the old ones after ~2 half-lives (two weeks), while one odd day (a holiday) moves a bucket by only ~13%.
    half_life_days: float = 7.0
    # A fully heard hour with no transaction where the bucket expected >= ln(1000) (silence improbable) is
    # learned with this shorter half-life: a shop that now closes earlier stops being expected in ~4 days,
    # while a single holiday lowers those hours by ~30% for a week (slower, never false, detection).
    fast_half_life_days: float = 2.0
    # An hour is learned only when heartbeats covered at least half of it: a terminal switched off mid-hour
    # must not teach "no transactions".
    min_cover_s: int = 1800
    # A txn_count delta is spread over the gap only when the gap is a normal heartbeat gap; after a longer
    # silence (offline) the transactions are counted as seen but their hour is unknown, so nothing is learned.
    max_gap_s: float = 600.0
    # Covered hours before the terminal is evaluated at all: one week, so every hour of every day type has
    # been seen (twice or more for weekdays) and a single busy day cannot set an expectation on its own.
    min_learned_h: int = 168
    # P(no transaction in the stretch) must be below this (the 1/1000) ...
    p_stretch: float = 1e-3
    # ... and also below p_day / (expected transactions per day): a day with E transactions has ~E gaps, each
    # a chance for a long one, so this keeps the false flags per terminal-day near p_day (target 1e-4).
    p_day: float = 1e-5
    # A silent stretch is integrated over at most this many hours (bounded work per evaluation).
    horizon_h: int = 336
    # Holiday guard: when at least this share of a region's terminals that normally have traded by now have
    # not traded today (`quiet_today`, over >= holiday_min_peers of them), the caller declares the local day
    # quiet and passes it to `activity_drop` as counting for nothing: faults are independent per terminal, a
    # whole region quiet together is a calendar (or the acquirer, which `acquirer_volume_drop` watches).
    holiday_share: float = 0.5
    holiday_min_peers: int = 20
    # Acquirer volume: windows tested (seconds), "far below" ratio, one-sided Poisson level, minimum expected.
    volume_windows_s: tuple[int, ...] = (600, 1800)
    volume_ratio: float = 0.6
    volume_p: float = 1e-6
    volume_min_expected: float = 200.0  # a halving is then a deficit of >= 100, ~7 standard deviations
    # Feed batches arrive late or early by a batch or two: the expected volume is the least of the window and
    # the window shifted by this much either way, so a steep evening fall is not mistaken for a drop.
    volume_slack_s: float = 120.0
    # Shops open up to ~20 minutes late, so in the first minutes of an opening hour (one that usually has more
    # than twice the volume of the hour before) the acquirer's volume is still the previous hour's: expect that.
    volume_ramp_s: float = 1200.0
    # A stretch that began before today's local midnight has no transaction today: the first sale of a day is
    # not a Poisson event (shops open late), so it must also outlast this many hours of the busiest rate.
    opening_slack_h: float = 0.5

    def alpha(self, day_type: int, fast: bool = False) -> float:
        """Per-observation weight of a bucket: a weekday bucket is seen 5 times a week, a weekend one twice."""
        per_week = 2.0 if day_type else 5.0
        half_life = self.fast_half_life_days if fast else self.half_life_days
        return 1.0 - math.pow(2.0, -7.0 / (per_week * half_life))


PARAMS = Params()


class NotEvaluated(enum.Enum):
    """Why a terminal or acquirer was not evaluated (never a flag)."""

    NO_BASELINE = "no_baseline"
    REGIONAL_QUIET = "regional_quiet"


@dataclass(frozen=True, slots=True)
class Drop:
    """A terminal silent since `since` while `expected` transactions were due (threshold `needed`)."""

    expected: float
    since: float
    needed: float


@dataclass(frozen=True, slots=True)
class VolumeDrop:
    """An acquirer feed that recorded `observed` where `expected` were due in the last `window_s`."""

    expected: float
    observed: int
    window_s: int


@lru_cache(maxsize=1 << 16)
def bucket(tz: ZoneInfo, hour: int) -> int:
    """The bucket of UTC hour index `hour` in zone `tz`, read at the hour's middle (see the record layout)."""
    local = datetime.fromtimestamp(hour * 3600 + 1800, tz)
    wd = local.weekday()
    if wd < 5:
        return local.hour
    return (24 if wd == 5 else 36) + local.hour // 2


@lru_cache(maxsize=1 << 16)
def _cell(tz: ZoneInfo, hour: int) -> tuple[int, int]:
    """The bucket of a UTC hour and the bucket of its outer neighbour when it is half of a two-hour block.

    A two-hour block that holds an opening or a closing averages a trading hour with a closed one; using the
    lower of the block and its neighbour on that side keeps the expectation from leaking into the closed hour
    (it can only make the test more conservative).
    """
    b = bucket(tz, hour)
    if b < 24:
        return b, b
    local = datetime.fromtimestamp(hour * 3600 + 1800, tz)
    return b, bucket(tz, hour - 1 if local.hour % 2 == 0 else hour + 1)


def _day_type(b: int) -> int:
    """0 weekday, 1 Saturday, 2 Sunday."""
    return 0 if b < 24 else 1 if b < 36 else 2


def _encode(rate: float, dither: float) -> int:
    """The code of `rate`; `dither` in [0, 1) rounds up or down so repeated small updates are not lost."""
    if rate <= 0.0:
        return 0
    return min(255, int(math.log2(1.0 + rate / _R0) * _K + dither))


def _dither(hour: int, b: int) -> float:
    """A fixed pseudo-random fraction per (hour, bucket): deterministic, so a backfill equals live learning."""
    return (((hour * 2654435761) ^ (b * 40503)) & _U16) / 65536.0


class BaselineStore:
    """All terminals' baselines in one preallocated bytearray, one RECORD per slot."""

    __slots__ = ("buf", "capacity", "params")

    def __init__(self, capacity: int, params: Params = PARAMS) -> None:
        self.capacity = capacity
        self.params = params
        self.buf = bytearray(capacity * RECORD)

    def grow(self, capacity: int) -> None:
        """Make room for `capacity` slots (new slots are empty); the only way the store grows."""
        if capacity > self.capacity:
            self.buf.extend(bytes((capacity - self.capacity) * RECORD))
            self.capacity = capacity

    def rates(self, slot: int) -> list[float]:
        """The 48 expected rates (txn/h) of a slot: weekday hours, then Saturday and Sunday two-hour blocks."""
        off = slot * RECORD
        return [_RATE[q] for q in self.buf[off : off + 48]]

    def last_txn(self, slot: int) -> float | None:
        """Receive time of the heartbeat that last showed new transactions (or the first one heard)."""
        v = _STATE.unpack_from(self.buf, slot * RECORD + 48)[6]
        return float(v) if v else None

    def learned_hours(self, slot: int) -> tuple[int, int, int]:
        """Covered hours folded so far: (weekday, Saturday, Sunday)."""
        s = _STATE.unpack_from(self.buf, slot * RECORD + 48)
        return s[3], s[4], s[5]

    def evaluated(self, slot: int) -> bool:
        """True once the slot has learned enough to be judged."""
        return sum(self.learned_hours(slot)) >= self.params.min_learned_h

    def clear(self, slot: int) -> None:
        """Forget a slot (a terminal removed, or its slot reused)."""
        off = slot * RECORD
        self.buf[off : off + RECORD] = bytes(RECORD)

    def record(self, slot: int) -> bytes:
        """One slot's bytes (for a snapshot)."""
        off = slot * RECORD
        return bytes(self.buf[off : off + RECORD])

    def load(self, slot: int, data: bytes) -> None:
        """Restore one slot's bytes; refuses anything but a whole record."""
        if len(data) != RECORD:
            raise ValueError(f"baseline record must be {RECORD} bytes, got {len(data)}")
        off = slot * RECORD
        self.buf[off : off + RECORD] = data

    def observe(
        self, slot: int, tz: ZoneInfo | Callable[[], ZoneInfo], prev_rx: float | None, prev_count: int, rx: float,
        count: int,
    ) -> bool:
        """Learn from one heartbeat: `count` at receive time `rx`, after `prev_count` at `prev_rx` (None: first).

        `tz` may be given as a function: it is called only when an hour is folded into its bucket (once an hour per
        terminal), not on every heartbeat. True when an hour was folded (only then can `evaluated` change).
        """
        off = slot * RECORD + 48
        cur, c8, cover, l0, l1, l2, last = _STATE.unpack_from(self.buf, off)
        if prev_rx is not None and count >= prev_count:
            # The common case, the loop below in one step: the previous heartbeat was heard in the hour being
            # accumulated and this one is in it too (same arithmetic, so the same bytes).
            gap = rx - prev_rx
            hour = int(prev_rx // 3600)
            if 0.0 < gap <= self.params.max_gap_s and cur == hour % _WRAP + 1 and rx < (hour + 1) * 3600.0:
                if count > prev_count:
                    last = int(rx)
                c8 = min(_U16, c8 + round(8.0 * (count - prev_count) / gap * (rx - prev_rx)))
                cover = min(3600, cover + round(rx - prev_rx))
                _STATE.pack_into(self.buf, off, cur, c8, cover, l0, l1, l2, last)
                return False
        return self._observe_hours(slot, tz, prev_rx, prev_count, rx, count)

    def _observe_hours(
        self, slot: int, tz: ZoneInfo | Callable[[], ZoneInfo], prev_rx: float | None, prev_count: int, rx: float,
        count: int,
    ) -> bool:
        """`observe` hour by hour: any gap, a first heartbeat, a counter reset, hours to fold."""
        off = slot * RECORD + 48
        cur, c8, cover, l0, l1, l2, last = _STATE.unpack_from(self.buf, off)
        learned = [l0, l1, l2]
        folded = False
        if prev_rx is None:
            last = last or int(rx)  # silence is measured from when the collector first heard the terminal
        elif count > prev_count:
            last = int(rx)
        gap = rx - prev_rx if prev_rx is not None else 0.0
        if prev_rx is None or count < prev_count or not 0.0 < gap <= self.params.max_gap_s:
            # Transactions of an unknown hour (first heartbeat, after a gap): counted for `last`, not learned.
            t, per_s = rx, 0.0
        else:
            t, per_s = prev_rx, 8.0 * (count - prev_count) / gap
        while True:
            hour = int(t // 3600)
            tag = hour % _WRAP + 1
            if cur != tag:
                if cur:
                    zone = tz if isinstance(tz, ZoneInfo) else tz()
                    self._fold(slot, zone, hour - (hour - (cur - 1)) % _WRAP, c8, cover, learned)
                    folded = True
                cur, c8, cover = tag, 0, 0
            if t >= rx:
                break
            end = min(rx, (hour + 1) * 3600.0)
            c8 = min(_U16, c8 + round(per_s * (end - t)))
            cover = min(3600, cover + round(end - t))
            t = end
        _STATE.pack_into(self.buf, off, cur, c8, cover, *learned, last)
        return folded

    def _fold(self, slot: int, tz: ZoneInfo, hour: int, c8: int, cover: int, learned: list[int]) -> None:
        """Fold a finished hour into its bucket and count it in `learned` (when it was covered enough)."""
        if cover < self.params.min_cover_s:
            return
        b = bucket(tz, hour)
        kind = _day_type(b)
        seen = learned[kind]
        # Until a bucket has a few observations its mean is the plain average (1/n), then the EWMA weight.
        hpb = _HOURS_PER_BUCKET[kind]
        n = seen // 24 * hpb + seen % hpb + 1  # observations of this bucket so far, assuming whole days
        i = slot * RECORD + b
        old = _RATE[self.buf[i]]
        # Heard all hour (within a minute of per-heartbeat rounding) and not one sale where silence was improbable.
        improbable_zero = c8 == 0 and cover >= 3540 and old >= -math.log(self.params.p_stretch)
        alpha = max(self.params.alpha(kind, improbable_zero), 1.0 / n)
        rate = c8 / 8.0 * 3600.0 / cover
        self.buf[i] = _encode(old + alpha * (rate - old), _dither(hour, b))
        learned[kind] = min(_U16, seen + 1)


Quiet = Sequence[tuple[float, float]]  # [start, end) intervals that count for nothing (holidays, calendars)


def _pieces(
    store: BaselineStore, slot: int, tz: ZoneInfo, start: float, end: float, quiet: Quiet
) -> Iterator[tuple[float, float, float]]:
    """(from, to, rate per second) for [start, end) cut at UTC hours, skipping the quiet intervals."""
    off = slot * RECORD
    buf = store.buf
    t = start
    while t < end:
        nxt = min(end, (int(t // 3600) + 1) * 3600.0)
        for qa, qb in quiet:
            if qa <= t < qb:
                nxt = min(end, qb)  # skip the quiet part
                break
            if t < qa < nxt:
                nxt = qa
        else:
            b, nb = _cell(tz, int(t // 3600))
            yield t, nxt, min(_RATE[buf[off + b]], _RATE[buf[off + nb]]) / 3600.0
        t = nxt


def expected_between(
    store: BaselineStore, slot: int, tz: ZoneInfo, start: float, end: float, quiet: Quiet = ()
) -> float:
    """Transactions the baseline expects between `start` and `end` (at most `horizon_h` hours back from end)."""
    start = max(start, end - store.params.horizon_h * 3600.0)
    return sum((b - a) * r for a, b, r in _pieces(store, slot, tz, start, end, quiet))


def threshold(store: BaselineStore, slot: int) -> float:
    """Expected count a silent stretch needs before it is flagged: -ln(min(p_stretch, p_day / E_day))."""
    r = store.rates(slot)
    per_day = max(sum(r[:24]), 2.0 * sum(r[24:36]), 2.0 * sum(r[36:]), 1.0)
    p = store.params
    return max(-math.log(p.p_stretch), math.log(per_day / p.p_day))


def local_midnight(tz: ZoneInfo, now: float) -> float:
    """The epoch time of the local midnight that starts `now`'s local day."""
    local = datetime.fromtimestamp(now, tz)
    return datetime(local.year, local.month, local.day, tzinfo=tz).timestamp()


def quiet_today(store: BaselineStore, slot: int, tz: ZoneInfo, now: float, last_txn_at: float) -> bool | None:
    """For a region's holiday share: None if not expected to have traded today yet, else whether it has not."""
    if not store.evaluated(slot):
        return None
    midnight = local_midnight(tz, now)
    if expected_between(store, slot, tz, midnight, now) < -math.log(store.params.p_stretch):
        return None
    return last_txn_at < midnight


def _needed(store: BaselineStore, slot: int, tz: ZoneInfo, since: float, now: float, quiet: Quiet) -> float:
    """The threshold for a stretch judged at `now`, plus the opening slack when nothing was sold today."""
    needed = threshold(store, slot)
    midnight = local_midnight(tz, now)
    # A stretch that began before today and was not already improbable by midnight: nothing sold today yet,
    # and the first sale of a day is not a Poisson event (shops open late).
    if since < midnight and expected_between(store, slot, tz, since, midnight, quiet) < needed:
        needed += store.params.opening_slack_h * max(store.rates(slot))
    return needed


def activity_drop(
    store: BaselineStore, slot: int, tz: ZoneInfo, now: float, last_txn_at: float, quiet: Quiet = ()
) -> Drop | NotEvaluated | None:
    """Is the silence since `last_txn_at` improbable under the baseline? None: no; NotEvaluated: cannot say.

    `quiet` are intervals the caller declares to count for nothing: a local day on which at least
    `holiday_share` of the terminal's region (over >= `holiday_min_peers`, see `quiet_today`) sold nothing
    although they normally had, or a configured holiday. A drop that exists only thanks to them is
    REGIONAL_QUIET, never a flag.
    """
    if not store.evaluated(slot):
        return NotEvaluated.NO_BASELINE
    if now <= last_txn_at:
        return None
    expected = expected_between(store, slot, tz, last_txn_at, now, quiet)
    needed = _needed(store, slot, tz, last_txn_at, now, quiet)
    if expected >= needed:
        return Drop(expected, last_txn_at, needed)
    if quiet and expected_between(store, slot, tz, last_txn_at, now) >= _needed(store, slot, tz, last_txn_at, now, ()):
        return NotEvaluated.REGIONAL_QUIET
    return None


def flag_due(
    store: BaselineStore, slot: int, tz: ZoneInfo, since: float, until: float, quiet: Quiet = ()
) -> float | None:
    """When silence since `since` is first flagged under the current baseline (None: not before `until`).

    Lets a caller schedule one evaluation per silent terminal instead of re-integrating every tick; it agrees
    with `activity_drop` given the same quiet intervals.
    """
    if not store.evaluated(slot):
        return None
    stop = min(until, since + store.params.horizon_h * 3600.0)
    base = threshold(store, slot)
    slack = store.params.opening_slack_h * max(store.rates(slot))
    total = 0.0
    crossed, before_midnight = False, 0.0  # passed a local midnight; expected from `since` to the latest one
    day_end = local_midnight(tz, local_midnight(tz, since) + 30 * 3600.0)  # days are 23-25 h long
    for a, b, r in _pieces(store, slot, tz, since, stop, quiet):
        t = a
        while t < b:
            while t >= day_end:  # quiet pieces count nothing, so `total` is the same at every skipped midnight
                crossed, before_midnight = True, total
                day_end = local_midnight(tz, day_end + 30 * 3600.0)
            needed = base + slack if crossed and before_midnight < base else base
            if total >= needed:
                return t  # a midnight ended the slack: flagged from then
            seg_end = min(b, day_end)
            add = (seg_end - t) * r
            if total + add >= needed:
                return t + (needed - total) / r
            total += add
            t = seg_end
    return None


def poisson_tail_low(k: int, lam: float) -> float:
    """An upper bound on P(X <= k) for X ~ Poisson(lam), k < lam (Chernoff: never overstates significance)."""
    if k >= lam:
        return 1.0
    if k <= 0:
        return math.exp(-lam)
    return math.exp(-lam + k - k * math.log(k / lam))


_BINS = 64  # minutes of recent feed volume kept (>= the longest window + slack)


class VolumeBaseline:
    """One acquirer feed's hourly baseline (48 float buckets) and its last minutes' volume (fixed bins)."""

    __slots__ = (
        "alive_since",
        "count",
        "cover",
        "cur",
        "last_rx",
        "learned",
        "minute_ids",
        "minutes",
        "params",
        "rates",
    )

    def __init__(self, params: Params = PARAMS) -> None:
        self.params = params
        self.rates = [0.0] * 48
        self.learned = [0, 0, 0]  # covered hours by day type
        self.cur = -1
        self.count = 0.0
        self.cover = 0.0
        self.last_rx: float | None = None
        self.alive_since = 0.0
        # Fixed minute bins: any number of batches per minute is merged, nothing is dropped, memory is constant.
        self.minute_ids = [-1] * _BINS
        self.minutes = [0] * _BINS

    def observe(self, n: int, rx: float, tz: ZoneInfo) -> None:
        """Learn from a feed batch of `n` transactions received at `rx` (receive order)."""
        minute = int(rx // 60)
        i = minute % _BINS
        if self.minute_ids[i] != minute:
            self.minute_ids[i], self.minutes[i] = minute, 0
        self.minutes[i] += n
        prev = self.last_rx
        if prev is not None and rx < prev:
            self.count += n  # out of receive order (a host clock step): counted, and the feed is still alive
            return
        if prev is None or rx - prev > self.params.max_gap_s:
            self.alive_since = rx
            self._roll(int(rx // 3600), tz)
            self.last_rx = rx
            return
        t = prev
        per_s = n / (rx - prev) if rx > prev else 0.0
        if rx == prev:
            self.count += n
        while t < rx:
            hour = int(t // 3600)
            end = min(rx, (hour + 1) * 3600.0)
            self._roll(hour, tz)
            self.count += per_s * (end - t)
            self.cover += end - t
            t = end
        self.last_rx = rx

    def _roll(self, hour: int, tz: ZoneInfo) -> None:
        """Fold the accumulated hour when `hour` is a new one."""
        if hour == self.cur:
            return
        if self.cur >= 0 and self.cover >= self.params.min_cover_s:
            b = bucket(tz, self.cur)
            kind = _day_type(b)
            seen = self.learned[kind]
            hpb = _HOURS_PER_BUCKET[kind]
            alpha = max(self.params.alpha(kind), 1.0 / (seen // 24 * hpb + seen % hpb + 1))
            self.rates[b] += alpha * (self.count * 3600.0 / self.cover - self.rates[b])
            self.learned[kind] = seen + 1
        self.cur, self.count, self.cover = hour, 0.0, 0.0

    def observed_since(self, start: float) -> int:
        """Transactions in batches received in the minutes after `start` (within the kept bins)."""
        first = int(start // 60) + 1
        return sum(c for m, c in zip(self.minute_ids, self.minutes, strict=True) if m >= first)

    def expected_between(self, tz: ZoneInfo, start: float, end: float) -> float:
        """Transactions the baseline expects between `start` and `end`."""
        total, t = 0.0, start
        ramp = self.params.volume_ramp_s
        while t < end:
            hour = int(t // 3600)
            b, nb = _cell(tz, hour)  # a weekend block's opening or closing hour: the lower of it and its neighbour
            rate = min(self.rates[b], self.rates[nb])
            ramp_end = hour * 3600.0 + ramp
            before = min(self.rates[c] for c in _cell(tz, hour - 1)) if t < ramp_end else rate
            if before < 0.5 * rate:  # early in an opening hour: still the hour before's volume
                nxt = min(end, ramp_end)
                total += before * (nxt - t) / 3600.0
                t = nxt
            nxt = min(end, (hour + 1) * 3600.0)
            total += rate * (nxt - t) / 3600.0
            t = nxt
        return total


def acquirer_volume_drop(
    vb: VolumeBaseline, tz: ZoneInfo, now: float, feed_alive: bool
) -> VolumeDrop | NotEvaluated | None:
    """Is the feed, still arriving, recording far fewer transactions than usual for this hour?"""
    p = vb.params
    if not feed_alive or vb.last_rx is None:
        return None  # a stopped feed is upstream_feed_stale, not this
    if sum(vb.learned) < p.min_learned_h:
        return NotEvaluated.NO_BASELINE
    # Windows end at the last batch, not at `now`: batches arrive in steps and the tail is not yet reported.
    end = min(now, vb.last_rx)
    for w in p.volume_windows_s:
        start = end - w
        if start < vb.alive_since:
            continue  # the feed has not been back long enough to fill this window
        expected = min(vb.expected_between(tz, start + d, end + d) for d in (-p.volume_slack_s, 0.0, p.volume_slack_s))
        observed = vb.observed_since(start)
        if (
            expected >= p.volume_min_expected
            and observed <= p.volume_ratio * expected
            and poisson_tail_low(observed, expected) < p.volume_p
        ):
            return VolumeDrop(expected, observed, w)
    return None
