"""Activity baselines over weeks of accelerated time: false `activity_drop`s per healthy terminal-day, time to flag
a busy terminal whose transactions stop, and time to flag an acquirer whose volume halves.

Through the collector (the default, `run_collector`): the fleet below drives the collector's own code path,
`Fleet.on_feed`, `Fleet.on_heartbeat` and `Fleet.tick` once a minute on an injected clock (no broker, no sleeps),
with a registry giving each terminal its zone, region and acquirer; flags are read from the transitions the fleet
returns and from its acquirer volume drops. Two acquirer feeds per zone (one with 10% of its terminals) carry
every sale; on `--stop-day` (a weekday in week 4) each records only every second sale for two hours from 10:00
local. 2,000 terminals for 28 days take 6-11 minutes on one core of the shared 2-core machine.

The model alone (`--through model`, `run_fleet` and `run_acquirer`): collector/fleet/baseline.py driven directly,
hour by hour, with one synthetic acquirer profile; five times the terminals in a similar time.

Fleet (seeded): terminals in Berlin, New York, Kolkata (+05:30) and Sydney; quiet (1/h), medium (6/h), busy
(25/h) and very busy (40/h) shops opening at 7-10 for 8-12 hours, shorter Saturdays or closed, most closed on
Sunday; a lunch peak; opening 10 min early to 20 min late each day; day-to-day volume noise (sd 15%); seasonal
drift of +-20% (an 8-week season, so up to 15% a week); Good Friday (2026-04-03) a public holiday in Berlin and
Sydney (90% of shops closed, terminals left on and heartbeating); 3% of shops close two hours earlier from
day 12; 1% of busy shops stop transacting (heartbeats continue) on a weekday in week 4, at a random time in
their trading day.

Transactions are Poisson events at exact times. Through the collector, a terminal heartbeats at the end of every
minute in which it sold (the heartbeat a 60-s terminal would send, so silence is measured from the same receive
time) and otherwise every 10 minutes on the UTC grid (interval_s 600; a heartbeat on every hour edge keeps each
hour's learned count exactly that of 60-s heartbeats). Model alone: learning sees hourly heartbeats (the spread
is linear, so this is what 60-s heartbeats teach, up to one interval at each hour edge); detection uses the time
of the heartbeat that reported the last transaction (60-s heartbeats), evaluated at the exact moment a stretch
would be flagged (`flag_due`), confirmed by `activity_drop` with the holiday share computed as the collector
would.

    .venv/bin/python bench/sim_activity.py                       # through the collector, 2,000 terminals
    .venv/bin/python bench/sim_activity.py --through model       # the model alone, 10,000 terminals
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collector.config import Config
from collector.fleet.baseline import (
    BaselineStore,
    Drop,
    Params,
    VolumeBaseline,
    VolumeDrop,
    acquirer_volume_drop,
    activity_drop,
    flag_due,
    local_midnight,
    quiet_today,
    threshold,
)
from collector.fleet.protocol import Hardware, Heartbeat, Net, UpstreamBatch, UpstreamTxn
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Fleet, Transition

START = datetime(2026, 3, 9, tzinfo=ZoneInfo("UTC")).timestamp()  # a Monday; EU DST 03-29, AU DST ends 04-05
START_DAY = datetime(2026, 3, 9).toordinal()
ZONES = [("Europe/Berlin", 0.40), ("America/New_York", 0.25), ("Asia/Kolkata", 0.15), ("Australia/Sydney", 0.20)]
HOLIDAY = ("2026-04-03", {"Europe/Berlin", "Australia/Sydney"})
HOLIDAY_AND_NEXT = ("2026-04-03", "2026-04-04")
CLASSES = [(1.0, 0.25), (6.0, 0.35), (25.0, 0.25), (40.0, 0.15)]


@dataclass
class Shop:
    """One simulated terminal and its shop's habits."""

    slot: int
    tz: ZoneInfo
    per_h: float
    open_h: int
    close_h: int
    sat: tuple[int, int] | None
    sun: tuple[int, int] | None
    phase: float
    change_day: int | None = None
    stop_at: float | None = None
    since: float = 0.0  # receive time of the heartbeat that reported the last transaction
    flagged: bool = False
    day_factor: dict[int, float] = field(default_factory=dict)
    events: int = 0


def pick(rng: random.Random, table: list[tuple[object, float]]) -> object:
    """A weighted choice."""
    return rng.choices([v for v, _ in table], [w for _, w in table])[0]


def build(n: int, rng: random.Random) -> list[Shop]:
    """The fleet."""
    shops = []
    for i in range(n):
        tz = ZoneInfo(str(pick(rng, ZONES)))  # type: ignore[arg-type]
        per_h = float(pick(rng, CLASSES))  # type: ignore[arg-type]
        open_h = rng.choice([7, 8, 9, 10])
        close_h = open_h + rng.choice([8, 10, 12])
        sat = None if rng.random() < 0.2 else (open_h, close_h - 2)
        sun = (open_h + 1, close_h - 3) if rng.random() < 0.4 else None
        shops.append(Shop(i, tz, per_h, open_h, close_h, sat, sun, rng.uniform(0, 2 * math.pi)))
    for s in rng.sample(shops, n * 3 // 100):
        s.change_day = 12
    busy = [s for s in shops if s.per_h >= 25 and s.change_day is None]
    for s in rng.sample(busy, max(1, n // 100)):
        s.stop_at = -1.0  # chosen once its local day is known
    return shops


def zone_short(tz: ZoneInfo) -> str:
    """A zone's city in lower case (an id: acquirer and region names)."""
    return tz.key.rsplit("/", 1)[-1].lower()


class Clock:
    """Local calendar facts per zone and UTC hour, computed once."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, int], tuple[int, int, int, str, float]] = {}

    def local(self, tz: ZoneInfo, hour: int) -> tuple[int, int, int, str, float]:
        """(weekday, local hour, day index from START, ISO date, epoch of local midnight) of a UTC hour."""
        key = (tz.key, hour)
        v = self.cache.get(key)
        if v is None:
            d = datetime.fromtimestamp(hour * 3600, tz)
            midnight = datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()
            day = d.date().toordinal() - START_DAY  # the local day: a shop's day starts at its own midnight
            v = (d.weekday(), d.hour, day, d.date().isoformat(), midnight)
            self.cache[key] = v
        return v


def hours_open(s: Shop, weekday: int, day: int, holiday: bool, rng: random.Random) -> tuple[float, float] | None:
    """Opening and closing local hour of a shop on a day (None: closed)."""
    if holiday:
        return None
    if weekday == 5:
        span = s.sat
    elif weekday == 6:
        span = s.sun
    else:
        span = (s.open_h, s.close_h)
    if span is None:
        return None
    o, c = span
    if s.change_day is not None and day >= s.change_day:
        c -= 2
    return o + rng.uniform(-10, 20) / 60.0, float(c)


def rate(s: Shop, weekday: int, h: int, day: int) -> float:
    """The shop's true rate at local hour `h` (before opening-time trimming)."""
    r = s.per_h * (0.5 if weekday == 6 else 1.0)
    if 12 <= h < 14:
        r *= 1.4
    r *= 1.0 + 0.2 * math.sin(2 * math.pi * day / 56.0 + s.phase)  # an 8-week season: +-20%
    return r * s.day_factor[day]


def sales_in_hour(
    s: Shop, hour: int, clock: Clock, spans: dict[tuple[int, int], tuple[float, float] | None],
    rng: random.Random, stop_day: int,
) -> tuple[list[float], int, bool]:
    """One shop's sales in one UTC hour (Poisson at its rate while open, cut at its stop), drawing from `rng` in a
    fixed order; also its local day number and whether that day is its holiday."""
    weekday, h, day, date, midnight = clock.local(s.tz, hour)
    holiday = date == HOLIDAY[0] and s.tz.key in HOLIDAY[1] and s.slot % 10 != 0
    if day not in s.day_factor:
        s.day_factor[day] = math.exp(rng.gauss(0.0, 0.15))
    key = (s.slot, day)
    if key not in spans:
        spans[key] = hours_open(s, weekday, day, holiday, rng)
        if s.stop_at == -1.0 and day == stop_day and weekday < 5 and spans[key] is not None:
            o, c = spans[key]  # type: ignore[misc]
            s.stop_at = midnight + rng.uniform(o + 1.0, c - 3.0) * 3600.0
    span = spans[key]
    events: list[float] = []
    if span is not None and span[0] < h + 1 and h < span[1]:
        t0 = hour * 3600.0
        lo = t0 + max(0.0, span[0] - h) * 3600.0
        hi = t0 + min(1.0, span[1] - h) * 3600.0
        if s.stop_at is not None and s.stop_at > 0:
            hi = min(hi, s.stop_at)
        r = rate(s, weekday, h, day) / 3600.0
        t = lo
        while r > 0:
            t += rng.expovariate(r)
            if t >= hi:
                break
            events.append(t)
    return events, day, holiday


def run_fleet(n: int, days: int, seed: int) -> dict[str, object]:
    """The terminal experiment."""
    rng = random.Random(seed)
    params = Params(max_gap_s=3600.0)
    store = BaselineStore(n, params)
    shops = build(n, rng)
    clock = Clock()
    groups: dict[str, list[Shop]] = {}
    for s in shops:
        groups.setdefault(s.tz.key, []).append(s)
    share_cache: dict[tuple[str, int], float | None] = {}
    holidays: dict[str, list[tuple[float, float]]] = {}
    seen_days: set[tuple[float, float]] = set()
    counts = {
        "counted_days": 0,
        "false": 0,
        "holiday_false": 0,
        "holiday_suppressed": 0,
        "holiday_days": 0,
        "not_evaluated": 0,
    }
    changer: dict[int, int] = {}
    detect: list[float] = []
    missed = 0
    flags_by_day: dict[int, int] = {}
    prev_count = [0] * n
    counts_now = [0] * n
    spans: dict[tuple[int, int], tuple[float, float] | None] = {}
    first_hour = int(START // 3600)

    def share(tz: ZoneInfo, at: float) -> float | None:
        # What the collector's tick computes per region, here once per region and 10 minutes.
        key = (tz.key, int(at // 600))
        if key not in share_cache:
            due, quiet = 0, 0
            for o in groups[tz.key]:
                q = quiet_today(store, o.slot, tz, at, o.since)
                if q is not None:
                    due += 1
                    quiet += q
            share_cache[key] = quiet / due if due >= params.holiday_min_peers else None
        return share_cache[key]

    def check(s: Shop, until: float, hour: int, day: int, holiday: bool) -> None:
        nonlocal missed
        if s.flagged:
            return
        quiet = holidays.setdefault(s.tz.key, [])
        due = flag_due(store, s.slot, s.tz, s.since, until, quiet)
        if due is None:
            return
        midnight = local_midnight(s.tz, due)
        if s.since < midnight and (midnight, midnight) not in seen_days:
            # As the collector's tick would: a region whose terminals mostly have not sold today is on holiday.
            sh = share(s.tz, due)
            if sh is not None and sh >= params.holiday_share:
                quiet.append((midnight, local_midnight(s.tz, midnight + 30 * 3600.0)))
                seen_days.add((midnight, midnight))
                counts["holiday_days"] += 1
                due = flag_due(store, s.slot, s.tz, s.since, until, quiet)
                if due is None:
                    counts["holiday_suppressed"] += 1
                    return
        verdict = activity_drop(store, s.slot, s.tz, due + 1e-6, s.since, quiet)
        if not isinstance(verdict, Drop):
            return
        s.flagged = True
        if s.stop_at is not None and s.stop_at > 0 and due >= s.stop_at:
            detect.append((due - s.stop_at) / 60.0)
            s.stop_at = 0.0  # measured
        elif s.tz.key in HOLIDAY[1] and clock.local(s.tz, int(due // 3600))[3] in HOLIDAY_AND_NEXT:
            counts["holiday_false"] += 1
        elif s.change_day is not None and day >= s.change_day:
            changer[day - s.change_day] = changer.get(day - s.change_day, 0) + 1
        elif s.stop_at is None or s.stop_at == -1.0:
            counts["false"] += 1
            flags_by_day[day] = flags_by_day.get(day, 0) + 1

    for hour in range(first_hour, first_hour + days * 24):
        t0 = hour * 3600.0
        for s in shops:
            events, day, holiday = sales_in_hour(s, hour, clock, spans, rng, 22)
            for e in events:
                if e - s.since > 600:  # a stretch shorter than 10 min never reaches 6.9 at <= 40/h
                    check(s, e, hour, day, holiday)
                s.since = math.ceil(e / 60.0) * 60.0
                s.flagged = False
            if t0 + 3600 - s.since > 600:
                check(s, t0 + 3600, hour, day, holiday)
            counts_now[s.slot] += len(events)
            store.observe(
                s.slot, s.tz, t0 if hour > first_hour else None, prev_count[s.slot], t0 + 3600, counts_now[s.slot]
            )
            prev_count[s.slot] = counts_now[s.slot]
    healthy = [s for s in shops if s.change_day is None and s.stop_at is None]
    counts["counted_days"] = len(healthy) * (days - 8)  # evaluated from day 7 (one learned week) + margin
    false_days = sum(v for d, v in flags_by_day.items() if d >= 8)
    missed = sum(1 for s in shops if s.stop_at is not None and s.stop_at > 0)
    return {
        "healthy_days": counts["counted_days"],
        "false": false_days,
        "false_all": counts["false"],
        "holiday_false": counts["holiday_false"],
        "holiday_suppressed": counts["holiday_suppressed"],
        "holiday_days": counts["holiday_days"],
        "holiday_terminals": sum(1 for s in shops if s.tz.key in HOLIDAY[1]),
        "changers": sum(1 for s in shops if s.change_day is not None),
        "changer_flags": dict(sorted(changer.items())),
        "detect": detect,
        "missed": missed,
        "stopped": sum(1 for s in shops if s.stop_at is not None),
        "thresholds": sorted({round(threshold(store, s.slot), 1) for s in shops if s.per_h >= 25})[:3],
    }


def run_acquirer(days: int, seed: int, terminals: int, halve_day: int | None) -> dict[str, object]:
    """One acquirer in Berlin with `terminals` shops' worth of volume, per-minute batches; halves on `halve_day`."""
    rng = random.Random(seed)
    tz = ZoneInfo("Europe/Berlin")
    vb = VolumeBaseline()
    false, holiday_flags, halve_at, flagged_at = 0, 0, None, None
    flagging = False
    day_factor = 1.0
    for minute in range(int(START // 60), int(START // 60) + days * 1440):
        now = minute * 60.0
        local = datetime.fromtimestamp(now - 60.0, tz)  # the batch at `now` carries the minute before it
        day = int((now - START) // 86400)
        if local.hour == 0 and local.minute == 0:
            day_factor = math.exp(rng.gauss(0.0, 0.05))
        per_h = terminals * (8.0 if 8 <= local.hour < 20 else 0.3) * (0.6 if local.weekday() == 6 else 1.0)
        per_h *= day_factor * (1.0 + 0.2 * math.sin(2 * math.pi * day / 56.0 + 2.0))
        holiday = local.date().isoformat() == HOLIDAY[0]
        if holiday:
            per_h *= 0.15
        if day == halve_day and halve_at is None and local.hour == 10:
            halve_at = now
        if halve_at is not None:
            per_h /= 2
        lam = per_h / 60.0
        k = max(0, round(rng.gauss(lam, math.sqrt(lam)))) if lam > 30 else poisson(rng, lam)
        vb.observe(k, now, tz)
        verdict = acquirer_volume_drop(vb, tz, now, True)
        hit = isinstance(verdict, VolumeDrop)
        if hit and not flagging:
            if halve_at is not None:
                flagged_at = flagged_at or now
            elif holiday:
                holiday_flags += 1
            elif day >= 7:
                false += 1
        flagging = hit
        if flagged_at is not None:
            break
    return {
        "false": false,
        "days": max(0, min(days, halve_day or days) - 7),
        "holiday": holiday_flags,
        "minutes": None if flagged_at is None or halve_at is None else (flagged_at - halve_at) / 60,
    }


HB_S = 600.0  # the background heartbeat: every 10 minutes on the UTC 10-minute grid (so on every hour edge)
HALVED_S = 2 * 3600.0  # how long an acquirer's recorded volume stays halved


def halve_start(tz: ZoneInfo, day: int) -> float:
    """10:00 local on day `day` of the run: when an acquirer in zone `tz` starts recording half its volume."""
    d = datetime.fromordinal(START_DAY + day)
    return datetime(d.year, d.month, d.day, 10, tzinfo=tz).timestamp()


def run_collector(n: int, days: int, seed: int, stop_day: int = 22, halve_day: int = 22) -> dict[str, object]:
    """The same fleet through the collector's code path: `Fleet.on_feed`, `Fleet.on_heartbeat` and `Fleet.tick`
    once a minute on an injected clock, the flags read from the transitions the fleet returns.

    Heartbeats: every terminal heartbeats at the end of every minute in which it sold (the heartbeat a 60-s
    terminal would send, so the silence is measured from the same receive time) and every 10 minutes on the UTC
    grid otherwise (interval_s 600: the silent 60-s heartbeats in between carry nothing a baseline uses, and a
    heartbeat on every hour edge keeps each hour's learned count exactly that of 60-s heartbeats). Acquirer feeds:
    two per zone (one with 10% of its terminals), a batch a minute carrying every sale of its terminals, just
    before the heartbeats that report them; on `halve_day` at 10:00 local each feed records only every second
    sale for two hours."""
    rng = random.Random(seed)
    shops = build(n, rng)
    clock = Clock()
    tids = [f"T{s.slot:06d}" for s in shops]
    acq: list[str] = []
    entries: dict[str, RegistryEntry] = {}
    acquirer_tz: dict[str, str] = {}
    for s, tid in zip(shops, tids, strict=True):
        city = zone_short(s.tz)
        a = f"acq-{city}" + ("-small" if s.slot % 10 == 3 else "")
        acq.append(a)
        acquirer_tz[a] = s.tz.key
        entries[tid] = RegistryEntry.of(tid, f"M{s.slot:06d}", a, "A920", f"site-{s.slot}", city, s.tz.key)
    fleet = Fleet(msgspec.convert({"activity": {"acquirer_tz": acquirer_tz}}, Config), START, Registry(entries))
    acquirers = sorted(acquirer_tz)
    halving = {a: halve_start(ZoneInfo(acquirer_tz[a]), halve_day) for a in acquirers}
    kept = dict.fromkeys(acquirers, 0)
    hw, net = Hardware(printer="ok", display="ok", card_reader="ok"), Net(type="wifi", rssi_dbm=-60.0)
    seq, count = [0] * n, [0] * n
    spans: dict[tuple[int, int], tuple[float, float] | None] = {}
    grid = set(range(10, 61, 10))
    counts = {"false": 0, "false_all": 0, "holiday_false": 0, "heartbeats": 0, "batches": 0, "records": 0}
    flags_by_day: dict[int, int] = {}
    changer: dict[int, int] = {}
    other: dict[str, int] = {}
    detect: list[float] = []
    volume = {"false": 0, "holiday": 0, "learning": 0}
    volume_false_at: list[str] = []  # acquirer and local time of each false acquirer_volume_drop
    volume_detect: dict[str, float] = {}
    volume_active: set[str] = set()
    out: list[Transition] = []
    first_hour = int(START // 3600)

    def judge(tr: Transition) -> None:
        if tr.condition != "activity_drop":
            other[tr.condition] = other.get(tr.condition, 0) + 1
            return
        s = shops[int(tr.tid[1:])]
        _, _, day, date, _ = clock.local(s.tz, int(tr.at // 3600))
        if s.stop_at is not None and s.stop_at > 0 and tr.at >= s.stop_at:
            detect.append((tr.at - s.stop_at) / 60.0)
            s.stop_at = 0.0  # measured
        elif s.tz.key in HOLIDAY[1] and date in HOLIDAY_AND_NEXT:
            counts["holiday_false"] += 1
        elif s.change_day is not None and day >= s.change_day:
            changer[day - s.change_day] = changer.get(day - s.change_day, 0) + 1
        elif s.stop_at is None or s.stop_at == -1.0:
            counts["false_all"] += 1
            flags_by_day[day] = flags_by_day.get(day, 0) + 1

    for hour in range(first_hour, first_hour + days * 24):
        beats: list[list[tuple[int, int]]] = [[] for _ in range(61)]  # minute of the hour (1..60) -> (slot, count)
        sales: list[list[tuple[int, float]]] = [[] for _ in range(61)]  # minute -> (slot, time of the sale)
        for s in shops:
            events, day, _ = sales_in_hour(s, hour, clock, spans, rng, stop_day)
            minutes = {int(e // 60) - hour * 60 + 1 for e in events} | grid
            if hour == first_hour:
                minutes.add(1)  # every terminal is heard in the first minute
            c, i = count[s.slot], 0
            for m in sorted(minutes):
                limit = (hour * 60 + m) * 60.0
                while i < len(events) and events[i] < limit:
                    sales[m].append((s.slot, events[i]))
                    i, c = i + 1, c + 1
                beats[m].append((s.slot, c))
            count[s.slot] = c
        for m in range(1, 61):
            now = (hour * 60 + m) * 60.0
            batch: dict[str, list[UpstreamTxn]] = {a: [] for a in acquirers}
            for slot, e in sales[m]:
                a = acq[slot]
                if halving[a] <= e < halving[a] + HALVED_S:
                    kept[a] += 1
                    if kept[a] % 2:
                        continue  # the host records every second sale
                batch[a].append(UpstreamTxn(tids[slot], f"{slot}-{e:.3f}", e))
            for a in acquirers:
                fleet.on_feed(UpstreamBatch(now, batch[a], a), now, out)
                counts["records"] += len(batch[a])
            counts["batches"] += len(acquirers)
            for slot, c in beats[m]:
                seq[slot] += 1
                hb = Heartbeat(
                    tid=tids[slot], ts=now, seq=seq[slot], interval_s=HB_S, txn_count=c, uploaded_count=c,
                    queue_depth=0, oldest_queued_ts=None, mid=f"M{slot:06d}", model="A920", app_version="3.1.0",
                    uptime_s=now - START + 600.0, net=net, hw=hw,
                )
                fleet.on_heartbeat(hb, now, out)
            counts["heartbeats"] += len(beats[m])
            out.extend(fleet.tick(now + 1.0))
            for tr in out:
                if tr.raised:
                    judge(tr)
            out.clear()
            active = set(fleet.activity.volume_drops)
            for a in active - volume_active:
                tz = ZoneInfo(acquirer_tz[a])
                _, _, day, date, _ = clock.local(tz, hour)
                if halving[a] <= now <= halving[a] + HALVED_S + 1800.0:
                    volume_detect.setdefault(a, (now + 1.0 - halving[a]) / 60.0)
                elif tz.key in HOLIDAY[1] and date in HOLIDAY_AND_NEXT:
                    volume["holiday"] += 1
                elif day >= 7:
                    volume["false"] += 1
                    volume_false_at.append(f"{a} {datetime.fromtimestamp(now, tz):%a %m-%d %H:%M}")
                else:
                    volume["learning"] += 1
            volume_active = active
    healthy = [s for s in shops if s.change_day is None and s.stop_at is None]
    return {
        "healthy_days": len(healthy) * max(0, days - 8),
        "false": sum(v for d, v in flags_by_day.items() if d >= 8),
        "false_all": counts["false_all"],
        "holiday_false": counts["holiday_false"],
        "holiday_terminals": sum(1 for s in shops if s.tz.key in HOLIDAY[1]),
        "quiet_days": {r: len(d) for r, d in fleet.activity.quiet_days.items()},
        "changers": sum(1 for s in shops if s.change_day is not None),
        "changer_flags": dict(sorted(changer.items())),
        "detect": detect,
        "missed": sum(1 for s in shops if s.stop_at is not None and s.stop_at > 0),
        "stopped": sum(1 for s in shops if s.stop_at is not None),
        "acquirers": {a: entries_of(acq, a) for a in acquirers},
        "volume": volume,
        "volume_detect": volume_detect,
        "volume_false_at": volume_false_at,
        "other": other,
        "heartbeats": counts["heartbeats"],
        "batches": counts["batches"],
        "records": counts["records"],
    }


def entries_of(acq: list[str], a: str) -> int:
    """Terminals of acquirer `a`."""
    return sum(1 for x in acq if x == a)


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw (Knuth; small lam only)."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def rss() -> int:
    """This process's resident set size in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def memory(sizes: list[int]) -> None:
    """Bytes per terminal of the baseline store, by tracemalloc and by RSS, every record filled."""
    import tracemalloc

    tz = ZoneInfo("Europe/Berlin")
    seed = BaselineStore(1)
    prev = None
    for i in range(14 * 24 * 4):  # two weeks of learning, so the record is a real one
        t = START + i * 900.0
        seed.observe(0, tz, prev, i * 5, t, i * 5 + 5)
        prev = t
    record = seed.record(0)
    print(f"{'terminals':>10} {'tracemalloc B/terminal':>24} {'RSS B/terminal':>16}")
    for n in sizes:
        tracemalloc.start()
        before, r0 = tracemalloc.get_traced_memory()[0], rss()
        store = BaselineStore(n)
        for slot in range(n):
            store.load(slot, record)
        traced = tracemalloc.get_traced_memory()[0] - before
        grown = rss() - r0
        tracemalloc.stop()
        print(f"{n:>10,} {traced / n:>24.2f} {grown / n:>16.2f}")
        del store


def cost() -> None:
    """Microseconds per call of observe (60-s heartbeats), activity_drop (1-hour stretch) and flag_due."""
    tz = ZoneInfo("Europe/Berlin")
    store = BaselineStore(50)
    started, calls = time.perf_counter(), 0
    for slot in range(50):
        prev, count = None, 0
        for i in range(8 * 1440):
            t = START + i * 60.0
            new = count + (i % 3 == 0)
            store.observe(slot, tz, prev, count, t, new)
            prev, count, calls = t, new, calls + 1
    print(f"observe        {(time.perf_counter() - started) / calls * 1e6:6.1f} us per heartbeat")
    now = START + 8 * 86400 + 10 * 3600
    for name, call in (
        ("activity_drop", lambda slot, j: activity_drop(store, slot, tz, now + j * 60, now - 3600)),
        ("flag_due", lambda slot, j: flag_due(store, slot, tz, now - j * 60, now + 86400)),
    ):
        started = time.perf_counter()
        for slot in range(50):
            for j in range(200):
                call(slot, j)
        print(f"{name:14} {(time.perf_counter() - started) / 10000 * 1e6:6.1f} us per call")


def collector_rows(f: dict[str, object], days: int) -> list[tuple[str, str]]:
    """The collector experiment's table."""
    det: list[float] = f["detect"]  # type: ignore[assignment]
    vol: dict[str, int] = f["volume"]  # type: ignore[assignment]
    found: dict[str, float] = f["volume_detect"]  # type: ignore[assignment]
    sizes: dict[str, int] = f["acquirers"]  # type: ignore[assignment]
    healthy: int = f["healthy_days"]  # type: ignore[assignment]
    false: int = f["false"]  # type: ignore[assignment]
    rows = [
        ("heartbeats / feed batches / feed records", f"{f['heartbeats']:,} / {f['batches']:,} / {f['records']:,}"),
        ("healthy terminal-days evaluated (day 8 on)", f"{healthy:,}"),
        ("false activity_drop on healthy terminals", f"{false}"),
        ("  per 10,000 terminal-days", f"{10000 * false / max(1, healthy):.2f}"),
        ("  incl. learning week (days 7-8)", f"{f['false_all']}"),
        ("Good Friday: terminals in holiday zones", f"{f['holiday_terminals']}"),
        ("  flagged on the holiday or the day after", f"{f['holiday_false']}"),
        ("  region-days the holiday guard declared quiet", str(f["quiet_days"])),
        (f"shops closing 2 h earlier from day 12 ({f['changers']})", "flags by day after change"),
        ("  (day: flags)", str(f["changer_flags"])),
        ("busy shops stopped in week 4: flagged / stopped", f"{len(det)} / {f['stopped']}"),
    ]
    if det:
        p95 = sorted(det)[int(0.95 * (len(det) - 1))]
        rows.append(
            ("  minutes to flag: median / p95 / max", f"{statistics.median(det):.0f} / {p95:.0f} / {max(det):.0f}")
        )
    rows.append((f"acquirer_volume_drop: false flags, days 7-{days}", f"{vol['false']}"))
    rows.append(("  flags on Good Friday or the day after", f"{vol['holiday']}"))
    when: dict[str, int] = {}
    for where in f["volume_false_at"]:  # type: ignore[attr-defined]
        key = where.split(" ")[1]  # the local weekday
        when[key] = when.get(key, 0) + 1
    if when:
        rows.append(("  false flags by local weekday", str(when)))
    for a, n in sizes.items():
        minutes = found.get(a)
        rows.append((f"  {a} ({n} terminals): minutes to flag a halving", "-" if minutes is None else f"{minutes:.0f}"))
    rows.append(("other conditions raised", str(f["other"])))
    return rows


def main() -> None:
    """Run the experiments and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--through", choices=("collector", "model"), default="collector",
                    help="drive the collector's Fleet (default), or the model alone")
    ap.add_argument("--terminals", type=int, help="default 2000 through the collector, 10000 through the model")
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stop-day", type=int, default=22, help="the weekday busy shops stop and acquirers halve")
    ap.add_argument("--memory", type=int, nargs="*", help="only measure the store's bytes per terminal at these sizes")
    ap.add_argument("--cost", action="store_true", help="only time the model's calls")
    a = ap.parse_args()
    if a.cost:
        cost()
        return
    if a.memory is not None:
        memory(a.memory or [100_000, 1_000_000])
        return
    started = time.perf_counter()
    if a.through == "collector":
        n = a.terminals or 2000
        rows = collector_rows(run_collector(n, a.days, a.seed, a.stop_day, a.stop_day), a.days)
        print(f"through the collector: terminals {n}, {a.days} days from 2026-03-09 (seed {a.seed}), "
              f"{time.perf_counter() - started:.0f} s")
        print(f"{'measure':58} {'value':>24}")
        for k, v in rows:
            print(f"{k:58} {v:>24}")
        return
    n = a.terminals or 10000
    f = run_fleet(n, a.days, a.seed)
    acq = [(k, run_acquirer(a.days, a.seed, k, None), run_acquirer(a.days, a.seed, k, 22)) for k in (2000, 100)]
    det: list[float] = f["detect"]  # type: ignore[assignment]
    print(
        f"model only: terminals {n}, {a.days} days from 2026-03-09 (seed {a.seed}), "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(f"{'measure':58} {'value':>24}")
    rows = [
        ("healthy terminal-days evaluated (day 8 on)", f"{f['healthy_days']:,}"),
        ("false activity_drop on healthy terminals", f"{f['false']}"),
        ("  per 10,000 terminal-days", f"{10000 * f['false'] / max(1, f['healthy_days']):.2f}"),  # type: ignore[operator,call-overload]
        ("  incl. learning week (days 7-8)", f"{f['false_all']}"),
        ("Good Friday: terminals in holiday zones", f"{f['holiday_terminals']}"),
        ("  flagged on the holiday or the day after", f"{f['holiday_false']}"),
        ("  region-days the holiday guard declared quiet", f"{f['holiday_days']}"),
        (f"shops closing 2 h earlier from day 12 ({f['changers']})", "flags by day after change"),
        ("  (day: flags)", str(f["changer_flags"])),
        ("busy shops stopped in week 4: flagged / stopped", f"{len(det)} / {f['stopped']}"),
    ]
    if det:
        p95 = sorted(det)[int(0.95 * (len(det) - 1))]
        rows.append(
            ("  minutes to flag: median / p95 / max", f"{statistics.median(det):.0f} / {p95:.0f} / {max(det):.0f}")
        )
    for n, r, h in acq:
        rows.append((f"acquirer ({n} shops' volume): false flags, days 7-{a.days}", f"{r['false']}"))
        rows.append(("  flags on the holiday (volume x0.15)", f"{r['holiday']}"))
        rows.append(("  minutes to flag after volume halves (day 22, 10:00)", f"{h['minutes']}"))
    for k, v in rows:
        print(f"{k:58} {v:>24}")


if __name__ == "__main__":
    main()
