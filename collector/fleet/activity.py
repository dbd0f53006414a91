"""The fleet's activity baselines: one `BaselineStore` for every terminal, one `VolumeBaseline` per acquirer feed,
and the schedule that checks silent terminals without walking the fleet (the model is collector.fleet.baseline).

Invariants:
- A terminal's baseline lives in one 64-byte slot of the store; `tids[slot]` is the terminal it belongs to (the
  fleet's own id string, so 8 bytes) and an open-addressing index of 4-byte entries finds a terminal's
  slot by its id: no Python int and no dict entry per terminal, and nothing added to `Terminal`. Besides that,
  a 4-byte scheduled minute (`due`) and one 4-byte entry in the check wheel. A slot is never shared.
- Every evaluated slot is in the wheel exactly once (a stale entry, whose minute differs from `due[slot]`, is
  skipped): it is checked at the minute `flag_due` says its silence becomes improbable, and at least every
  `recheck_s` (a baseline that changed, a first sale that moved the stretch). A tick pops the due minutes only:
  O(terminals due), never O(fleet).
- Everything is a function of receive times passed in; nothing reads the wall clock.
"""

from __future__ import annotations

import datetime
import logging
import math
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from zoneinfo import ZoneInfo

import msgspec

from collector.fleet.baseline import (
    RECORD,
    BaselineStore,
    Drop,
    NotEvaluated,
    Params,
    Quiet,
    VolumeBaseline,
    VolumeDrop,
    acquirer_volume_drop,
    activity_drop,
    expected_between,
    flag_due,
    local_midnight,
    quiet_today,
)

if TYPE_CHECKING:
    from collector.config import ActivityConfig

__all__ = [
    "CONDITION",
    "VOLUME_FINDING",
    "Activity",
    "ActivitySnapshot",
    "ActivityView",
    "VolumeState",
    "drop_detail",
    "params_of",
]

log = logging.getLogger(__name__)

CONDITION: Final = "activity_drop"
VOLUME_FINDING: Final = "acquirer_volume_drop"
_GROW: Final = 4096  # slots added at a time when the store is full (256 KB)
_MAX_REGION_DAYS: Final = 100_000  # region-days counted in one holiday pass


def params_of(cfg: ActivityConfig) -> Params:
    """The model's parameters from the `activity:` config section."""
    return Params(
        half_life_days=cfg.half_life_days,
        fast_half_life_days=cfg.fast_half_life_days,
        min_cover_s=cfg.min_cover_s,
        max_gap_s=cfg.max_gap_s,
        min_learned_h=cfg.min_learned_h,
        p_stretch=cfg.p_stretch,
        p_day=cfg.p_day,
        horizon_h=cfg.horizon_h,
        opening_slack_h=cfg.opening_slack_h,
        holiday_share=cfg.holiday_share,
        holiday_min_peers=cfg.holiday_min_peers,
        volume_windows_s=tuple(cfg.volume_windows_s),
        volume_ratio=cfg.volume_ratio,
        volume_p=cfg.volume_p,
        volume_min_expected=cfg.volume_min_expected,
        volume_slack_s=cfg.volume_slack_s,
        volume_ramp_s=cfg.volume_ramp_s,
    )


class VolumeState(msgspec.Struct, array_like=True):
    """One acquirer feed's `VolumeBaseline`, as the snapshot keeps it."""

    acquirer: str
    rates: list[float]
    learned: list[int]
    cur: int
    count: float
    cover: float
    last_rx: float | None
    alive_since: float
    minute_ids: list[int]
    minutes: list[int]


class ActivitySnapshot(msgspec.Struct):
    """The baselines in a snapshot: the store's bytes as one field (slots ride with each Terminal as `bl`).

    `buf` is a view both ways: encoding does not copy the store, and decoding does not copy the file's bytes
    before `restore` copies them into the store (a 64 MB transient copy at a million terminals otherwise)."""

    record: int
    buf: memoryview
    owners: memoryview  # int32 per slot: the position of its terminal in the snapshot's terminals (-1: free)
    volumes: list[VolumeState] = []
    quiet_days: list[tuple[str, float, float]] = []  # (region key, start, end) found quiet together


@dataclass(frozen=True, slots=True)
class ActivityView:
    """What the API says about one terminal's baseline."""

    state: str  # evaluated | regional_quiet | no_baseline | not_tracked | disabled
    learned_hours: tuple[int, int, int]
    learned_days: float
    expected_per_hour_now: float | None
    last_txn_at: float | None
    tz: str
    note: str

    def as_dict(self) -> dict[str, object]:
        """The view as JSON-ready data."""
        return {
            "state": self.state,
            "learned_hours": list(self.learned_hours),
            "learned_days": self.learned_days,
            "expected_per_hour_now": self.expected_per_hour_now,
            "last_txn_at": self.last_txn_at,
            "tz": self.tz,
            "note": self.note,
        }


def drop_detail(drop: Drop, tz: ZoneInfo) -> str:
    """The condition's detail: how many were expected and since when (local time of the terminal's site)."""
    since = datetime.datetime.fromtimestamp(drop.since, tz).strftime("%H:%M")
    return f"expected {drop.expected:.0f} transactions since {since} local, none seen"


class Activity:
    """Baselines of the whole fleet, owned by `Fleet` (which applies the decisions to its terminals)."""

    def __init__(self, cfg: ActivityConfig, capacity: int) -> None:
        self.cfg = cfg
        self.enabled = cfg.enabled
        self.params = params_of(cfg)
        self.store = BaselineStore(max(capacity, 1) if cfg.enabled else 0, self.params)
        self.tids: list[str | None] = []  # slot -> terminal id (None: free)
        self._index = array("i", bytes(64))  # open addressing by hash(tid): 0 empty, -1 tombstone, else slot + 1
        self._mask = 15
        self.free = array("I")
        self.due = array("I")  # slot -> minute of its scheduled check (0: not scheduled)
        self.wheel: dict[int, array[int]] = {}  # minute -> slots to check then
        self.volumes: dict[str, VolumeBaseline] = {}
        self.volume_drops: dict[str, tuple[float, VolumeDrop]] = {}  # acquirer -> (since, drop)
        self.restore_problems = 0  # snapshot baselines that could not be used (counted, never fatal)
        # Evaluated slots, kept as they change so /metrics never walks the store: a slot is evaluated exactly
        # when it is scheduled (due != 0), and learning never un-evaluates it.
        self.evaluated = 0
        self._zones: dict[str, ZoneInfo] = {}
        self._quiet: dict[tuple[str, str], Quiet] = {}
        # Regional holiday guard: days found quiet per region key, and the pass in progress.
        self.quiet_days: dict[str, list[tuple[float, float]]] = {}
        self._scan_pos = 0
        self._scan_at: float | None = None
        self._scan_counts: dict[tuple[str, float, float], list[int]] = {}

    # ---- zones and holidays -----------------------------------------------------------------------------
    def zone(self, tz: str, acquirer: str) -> ZoneInfo:
        """The zone of a terminal: its registry `tz`, else its acquirer's, else the default (all validated)."""
        name = tz or self.cfg.acquirer_tz.get(acquirer) or self.cfg.default_tz
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = ZoneInfo(name)
        return zone

    def quiet(self, region: str, tz: ZoneInfo) -> Quiet:
        """The intervals that count for nothing for a terminal of `region` in zone `tz`: the configured holidays
        of the region (and of "*") as those local days, and the days the region was found quiet together."""
        configured: Quiet = ()
        if self.cfg.holidays:
            key = (region, str(tz))
            cached = self._quiet.get(key)
            if cached is None:
                days = sorted({*self.cfg.holidays.get(region, ()), *self.cfg.holidays.get("*", ())})
                spans = []
                for day in days:
                    d = datetime.date.fromisoformat(day)
                    start = datetime.datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()
                    spans.append((start, local_midnight(tz, start + 30 * 3600.0)))
                cached = self._quiet[key] = tuple(spans)
            configured = cached
        found = self.quiet_days.get(region or str(tz))
        return (*configured, *found) if found else configured

    # ---- the regional holiday guard -------------------------------------------------------------------------
    def scan(self, now: float, owner: Callable[[str], tuple[str, ZoneInfo] | None]) -> None:
        """One step of the pass over the evaluated slots that finds regions quiet together (an unannounced
        holiday): per region and local day, the terminals that normally have sold by now (`quiet_today`) and how
        many of them have not. A pass takes `holiday_scan_s`, a share of the slots per call (O(fleet / pass), not
        O(fleet) per tick). `owner(tid)` gives an online terminal's region key and zone (None: not counted).

        When a pass ends, a region-day with at least `holiday_min_peers` such terminals of which at least
        `holiday_share` have not sold is declared quiet: it counts for nothing in `activity_drop` (faults are
        independent per terminal; a whole region silent together is a calendar, or the acquirer, which
        `acquirer_volume_drop` watches). Declared days are kept `horizon_h`."""
        n = len(self.tids)
        if not n:
            return
        last = self._scan_at if self._scan_at is not None else now - self.cfg.holiday_scan_s / n
        self._scan_at = now
        share = min(1.0, max(0.0, now - last) / self.cfg.holiday_scan_s)
        end = min(n, self._scan_pos + max(1, math.ceil(n * share)))
        counts = self._scan_counts
        for slot in range(self._scan_pos, end):
            tid = self.tids[slot]
            if tid is None or not self.due[slot]:
                continue  # free, or not evaluated (learning)
            found = owner(tid)
            since = self.store.last_txn(slot)
            if found is None or since is None:
                continue
            region, tz = found
            q = quiet_today(self.store, slot, tz, now, since)
            if q is None:
                continue
            key = (region, local_midnight(tz, now), local_midnight(tz, local_midnight(tz, now) + 30 * 3600.0))
            c = counts.get(key)
            if c is None:
                if len(counts) >= _MAX_REGION_DAYS:
                    continue  # bounded: regions come from the registry, but a bound costs nothing
                c = counts[key] = [0, 0]
            c[0] += 1
            c[1] += q
        self._scan_pos = end
        if end >= n:
            self._end_pass(now)

    def _end_pass(self, now: float) -> None:
        for (region, start, stop), (expected, silent) in self._scan_counts.items():
            days = self.quiet_days.setdefault(region, [])
            if (
                expected >= self.params.holiday_min_peers
                and silent >= self.params.holiday_share * expected
                and (start, stop) not in days
            ):
                days.append((start, stop))
                log.warning(
                    "region %s is quiet together today (%d of %d terminals that normally have sold by now have "
                    "not): a holiday, the day counts for nothing in activity_drop", region, silent, expected,
                )
        keep = now - self.params.horizon_h * 3600.0
        for region in list(self.quiet_days):
            self.quiet_days[region] = [d for d in self.quiet_days[region] if d[1] > keep]
            if not self.quiet_days[region]:
                del self.quiet_days[region]
        self._scan_counts, self._scan_pos = {}, 0

    # ---- slots ------------------------------------------------------------------------------------------
    def slot_of(self, tid: str) -> int:
        """The terminal's slot, or -1 when it has none."""
        index, tids, mask = self._index, self.tids, self._mask
        h = hash(tid) & mask
        while True:
            entry = index[h]
            if entry == 0:
                return -1
            if entry > 0 and tids[entry - 1] == tid:
                return entry - 1
            h = (h + 1) & mask

    def slot_for(self, tid: str) -> int:
        """The terminal's slot, allocating an empty one when it has none."""
        slot = self.slot_of(tid)
        if slot >= 0:
            return slot
        if self.free:
            slot = self.free.pop()
            self.tids[slot] = tid
            self.due[slot] = 0
        else:
            slot = len(self.tids)
            self.tids.append(tid)
            self.due.append(0)
            if slot >= self.store.capacity:
                self.store.grow(slot + _GROW)
        self.store.clear(slot)
        self._insert(tid, slot)
        return slot

    def _insert(self, tid: str, slot: int) -> None:
        if 2 * (len(self.tids) + 1) > len(self._index):
            self._rebuild(4 * (len(self.tids) + 1))  # at most half full: short probe chains
            return
        index, mask = self._index, self._mask
        h = hash(tid) & mask
        while index[h] > 0:
            h = (h + 1) & mask
        index[h] = slot + 1

    def _rebuild(self, at_least: int) -> None:
        """A new index for the current slots (no tombstones), its size a power of two >= `at_least`."""
        size = 1 << max(4, (at_least - 1).bit_length())
        index, mask = array("i", bytes(4 * size)), size - 1
        for slot, tid in enumerate(self.tids):
            if tid is not None:
                h = hash(tid) & mask
                while index[h]:
                    h = (h + 1) & mask
                index[h] = slot + 1
        self._index, self._mask = index, mask

    def release(self, tid: str) -> None:
        """Forget a removed terminal's baseline and free its slot."""
        slot = self.slot_of(tid)
        if slot < 0:
            return
        if self.due[slot]:
            self.evaluated -= 1
        index, mask = self._index, self._mask
        h = hash(tid) & mask
        while index[h] != slot + 1:
            h = (h + 1) & mask
        index[h] = -1  # a tombstone keeps the probe chains through it intact
        self.tids[slot] = None
        self.due[slot] = 0
        self.store.clear(slot)
        self.free.append(slot)

    def tracked(self) -> int:
        """Slots in use."""
        return len(self.tids) - len(self.free)

    def counts(self) -> dict[str, int]:
        """Terminals by baseline state (posfleet_activity_baselines): evaluated, learning."""
        return {"evaluated": self.evaluated, "learning": self.tracked() - self.evaluated}

    def volume_view(self, now: float) -> list[tuple[str, float, bool]]:
        """Per acquirer feed: its usual volume per hour now, and whether acquirer_volume_drop is active."""
        out = []
        for acquirer, vb in sorted(self.volumes.items()):
            usual = vb.expected_between(self.zone("", acquirer), now - 1800.0, now + 1800.0)
            out.append((acquirer, usual, acquirer in self.volume_drops))
        return out

    # ---- learning ---------------------------------------------------------------------------------------
    def observe(
        self, slot: int, tz: ZoneInfo | Callable[[], ZoneInfo], prev_rx: float | None, prev_count: int, rx: float,
        count: int,
    ) -> None:
        """Learn from one accepted heartbeat; a slot that just became evaluated joins the check wheel. `tz` may be
        a function, called only when an hour is folded (BaselineStore.observe)."""
        if self.store.observe(slot, tz, prev_rx, prev_count, rx, count) and not self.due[slot] and self.store.evaluated(
            slot
        ):
            self.evaluated += 1
            self._schedule(slot, int(rx // 60) + 1)

    def observe_feed(self, acquirer: str, n: int, rx: float, tz: ZoneInfo) -> None:
        """Learn from one batch of an acquirer's feed (`n` of its own terminals' records)."""
        vb = self.volumes.get(acquirer)
        if vb is None:
            vb = self.volumes[acquirer] = VolumeBaseline(self.params)
        vb.observe(n, rx, tz)

    # ---- checking ---------------------------------------------------------------------------------------
    def _schedule(self, slot: int, minute: int) -> None:
        self.due[slot] = minute
        entries = self.wheel.get(minute)
        if entries is None:
            entries = self.wheel[minute] = array("I")
        entries.append(slot)

    def reschedule(self, slot: int, tz: ZoneInfo, now: float, quiet: Quiet) -> None:
        """Check the slot again when its silence becomes improbable, and at least every `recheck_s`."""
        until = now + self.cfg.recheck_s
        since = self.store.last_txn(slot)
        at = flag_due(self.store, slot, tz, since, until, quiet) if since is not None else None
        at = until if at is None else min(max(at, now), until)
        self._schedule(slot, max(int(now // 60) + 1, math.ceil(at / 60)))

    def due_slots(self, now: float) -> Iterator[tuple[int, str]]:
        """The slots whose check is due at `now`, each once, with their terminal (unscheduled as they go)."""
        minute = int(now // 60)
        for key in sorted(k for k in self.wheel if k <= minute):
            for slot in self.wheel.pop(key):
                tid = self.tids[slot] if slot < len(self.tids) else None
                if tid is None or self.due[slot] != key:
                    continue  # freed, or rescheduled since
                self.due[slot] = 0
                yield slot, tid

    def judge(self, slot: int, tz: ZoneInfo, now: float, quiet: Quiet) -> Drop | NotEvaluated | None:
        """activity_drop for a slot, silence measured from the heartbeat that last showed new transactions."""
        since = self.store.last_txn(slot)
        if since is None:
            return NotEvaluated.NO_BASELINE
        return activity_drop(self.store, slot, tz, now, since, quiet)

    def volume_tick(self, now: float, alive: dict[str, bool]) -> list[tuple[str, bool]]:
        """acquirer_volume_drop for every feed; returns the (acquirer, raised) changes, also logged."""
        changes = []
        for acquirer, vb in self.volumes.items():
            tz = self.zone("", acquirer)
            found = acquirer_volume_drop(vb, tz, now, alive.get(acquirer, False))
            active = acquirer in self.volume_drops
            if isinstance(found, VolumeDrop):
                if not active:
                    self.volume_drops[acquirer] = (now, found)
                    changes.append((acquirer, True))
                    log.warning(
                        "acquirer_volume_drop raised for %s: %d transactions recorded in the last %d minutes, "
                        "%.0f expected", acquirer, found.observed, found.window_s // 60, found.expected,
                    )
            elif active:
                del self.volume_drops[acquirer]
                changes.append((acquirer, False))
                log.info("acquirer_volume_drop cleared for %s", acquirer)
        return changes

    # ---- API ----------------------------------------------------------------------------------------------
    def view(self, slot: int, tz: ZoneInfo, now: float, quiet: Quiet = ()) -> ActivityView:
        """The terminal's baseline as the API shows it; "no baseline yet" is said explicitly."""
        if not self.enabled:
            return ActivityView("disabled", (0, 0, 0), 0.0, None, None, str(tz), "activity baselines are off")
        if slot < 0 or slot >= len(self.tids):
            return ActivityView(
                "not_tracked", (0, 0, 0), 0.0, None, None, str(tz), "no baseline yet: no heartbeat heard"
            )
        learned = self.store.learned_hours(slot)
        days = round(sum(learned) / 24.0, 1)
        last = self.store.last_txn(slot)
        if not self.store.evaluated(slot):
            need = self.params.min_learned_h / 24.0
            return ActivityView(
                "no_baseline", learned, days, None, last, str(tz),
                f"no baseline yet: learning ({days:g} of {need:g} days), not evaluated",
            )
        per_hour = round(expected_between(self.store, slot, tz, now - 1800.0, now + 1800.0), 2)
        if any(a <= now < b for a, b in quiet):
            return ActivityView(
                "regional_quiet", learned, days, per_hour, last, str(tz),
                "baseline learned; today is a holiday or its region is quiet together: not judged today",
            )
        return ActivityView("evaluated", learned, days, per_hour, last, str(tz), "baseline learned: evaluated")

    def expected_since(self, slot: int, tz: ZoneInfo, now: float) -> tuple[float, float] | None:
        """(expected transactions, since) of the current silent stretch, for the diagnosis; None: no baseline."""
        since = self.store.last_txn(slot) if 0 <= slot < len(self.tids) else None
        if since is None or not self.store.evaluated(slot):
            return None
        return expected_between(self.store, slot, tz, since, now), since

    # ---- snapshot -------------------------------------------------------------------------------------------
    def snapshot(self, order: Iterable[str]) -> ActivitySnapshot:
        """The baselines as the snapshot keeps them: the store's used part as one bytes field, and per slot the
        position of its terminal in `order` (the snapshot's terminal list), so no id is written twice."""
        position = {tid: i for i, tid in enumerate(order)}
        owners = array("i", (-1 if tid is None else position.get(tid, -1) for tid in self.tids))
        used = len(self.tids) * RECORD
        volumes = [
            VolumeState(
                a, list(v.rates), list(v.learned), v.cur, v.count, v.cover, v.last_rx, v.alive_since,
                list(v.minute_ids), list(v.minutes),
            )
            for a, v in self.volumes.items()
        ]
        quiet = [(region, a, b) for region, days in self.quiet_days.items() for a, b in days]
        return ActivitySnapshot(
            RECORD, memoryview(self.store.buf)[:used], memoryview(owners).cast("B"), volumes, quiet
        )

    def restore(self, snap: ActivitySnapshot | None, order: list[str], started_at: float) -> None:
        """Install restored baselines; `order` are the restored terminals' ids in the snapshot's order. A corrupt
        or mismatched buffer starts empty, counted in `restore_problems` and logged, never fatal."""
        if snap is None or not self.enabled:
            return
        for region, a, b in snap.quiet_days[:_MAX_REGION_DAYS]:
            self.quiet_days.setdefault(region, []).append((a, b))
        n = len(snap.buf) // RECORD if snap.record == RECORD else 0
        if snap.record != RECORD or len(snap.buf) % RECORD or len(snap.owners) != 4 * n:
            self.restore_problems += 1
            log.error(
                "activity baselines in the snapshot are unusable (%d-byte records, %d bytes, %d owner bytes): "
                "starting empty", snap.record, len(snap.buf), len(snap.owners),
            )
            return
        self.store.grow(n)
        self.store.buf[: len(snap.buf)] = snap.buf
        owners = array("i")
        owners.frombytes(snap.owners)
        self.tids = [None] * n
        self.due = array("I", bytes(4 * n))
        bad = 0
        for slot, pos in enumerate(owners):
            if 0 <= pos < len(order):
                self.tids[slot] = order[pos]
            elif pos != -1:
                bad += 1
        seen: set[str] = set()
        for slot, tid in enumerate(self.tids):  # a terminal named by two slots keeps the first
            if tid is not None:
                if tid in seen:
                    self.tids[slot] = None
                    bad += 1
                seen.add(tid)
        seen.clear()
        if bad:
            self.restore_problems += 1
            log.error("%d baseline slots in the snapshot named no restored terminal or a taken one: dropped", bad)
        self.free = array("I", (s for s in range(n - 1, -1, -1) if self.tids[s] is None))
        for s in self.free:
            self.store.clear(s)
        self._rebuild(2 * (n + 1))
        # Spread the first checks over the recheck period: a restart does not integrate the whole fleet at once.
        spread = max(1, int(self.cfg.recheck_s // 60))
        first = int(started_at // 60) + 1
        for s, owner in enumerate(self.tids):
            if owner is not None and self.store.evaluated(s):
                self.evaluated += 1
                self._schedule(s, first + s % spread)
        for v in snap.volumes:
            if len(v.rates) != 48 or len(v.learned) != 3 or len(v.minute_ids) != len(v.minutes):
                self.restore_problems += 1
                continue
            vb = VolumeBaseline(self.params)
            vb.rates, vb.learned, vb.cur, vb.count, vb.cover = list(v.rates), list(v.learned), v.cur, v.count, v.cover
            vb.last_rx = v.last_rx
            # The feed's batches during the restart were not heard: no window reaching before it is judged.
            vb.alive_since = max(v.alive_since, started_at)
            if len(v.minute_ids) == len(vb.minute_ids):
                vb.minute_ids, vb.minutes = list(v.minute_ids), list(v.minutes)
            self.volumes[v.acquirer] = vb
