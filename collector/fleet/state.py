"""Per-terminal and per-acquirer state, and the rules that move it forward (never backwards).

`Fleet` applies decoded messages with the receive time they came with, runs detection (collector.fleet.detect)
and keeps condition counts per (acquirer, site) incrementally, so /metrics never walks the whole fleet.

Two invariants hold whatever senders do:
- Order and liveness come from seq and arrival, never from the terminal's clock (`classify`): a clock decades
  ahead, reset to 0 or stepping back is reported as `clock_skew` and can never freeze a terminal's state.
- Every map keyed by something a sender chooses (unknown terminal ids, feeds, software versions, reject reasons,
  shared floats) is bounded, and what a bound refused is counted in `Fleet.refused` by bound name.
"""

from __future__ import annotations

import enum
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final
from zoneinfo import ZoneInfo

import msgspec

from collector.config import Config
from collector.fleet.activity import CONDITION as ACTIVITY
from collector.fleet.activity import Activity, ActivitySnapshot, drop_detail
from collector.fleet.baseline import Drop, Quiet
from collector.fleet.detect import (
    HEARTBEAT_CONDITIONS,
    SEVERITY,
    TIME_CONDITIONS,
    MassKey,
    MassOffline,
    Raw,
    advance_mass,
    heartbeat_conditions,
    parse_version,
    time_conditions,
)
from collector.fleet.protocol import Heartbeat, Status, UpstreamBatch
from collector.fleet.registry import EMPTY, Registry, RegistryEntry

__all__ = [
    "BOUNDS",
    "MAX_FEEDS",
    "MAX_REJECT_REASONS",
    "MAX_VERSIONS",
    "TICK_SLICE",
    "Active",
    "FeedState",
    "Fleet",
    "HeartbeatResult",
    "Recount",
    "Terminal",
    "Transition",
    "UpstreamResult",
    "classify",
    "share_float",
]

log = logging.getLogger(__name__)

UNKNOWN: Final = "unknown"
# Counts whose change can move a site's mass-offline share (what marks the site dirty for the next tick).
_MASS_INPUTS: Final = frozenset({"_known", "_shutdown", "offline"})
MAX_EVENTS: Final = 8  # reboot/reconnect times kept for flapping detection
# Terminals per slice of an evaluation round (`Fleet.tick_slices`): ~1 ms of the loop's time each on a busy core.
TICK_SLICE: Final = 5_000
# Without a registry (demo) any acquirer id can start a feed; a real deployment has a handful of acquirers, 256
# is far above that and keeps a topic-spraying sender from adding thousands of feeds and their series.
MAX_FEEDS: Final = 256
# Distinct (acquirer, model, app_version) series: a real fleet runs a few hundred; 10,000 bounds what terminals
# that report a new version string on every heartbeat can add to /metrics.
MAX_VERSIONS: Final = 10_000
# Reject reasons are a small fixed set (protocol.REJECT_REASONS and a few of the collector's); the bound only
# guards against a caller passing free text.
MAX_REJECT_REASONS: Final = 32
# Shared float objects (interval, signal, battery): bounded by the values' range on a real fleet, by this number
# against a sender cycling through values.
MAX_FLOATS: Final = 100_000
# A redelivered heartbeat may reach us this long after the newest one was sent (broker and network transit).
TRANSIT_SLACK_S: Final = 5.0
# Names of the bounds counted in Fleet.refused (label values of posfleet_bound_refused_total).
BOUNDS: Final = ("unregistered", "feeds", "versions", "reject_reasons", "floats")

_FLOATS: dict[float, float] = {}


def share_float(value: float) -> float:
    """The fleet's one float object equal to `value` (24 bytes saved per terminal and field that repeat it).

    Past MAX_FLOATS distinct values, `value` itself comes back unshared; `Fleet._shared` counts that.
    """
    shared = _FLOATS.get(value)
    if shared is not None:
        return shared
    if len(_FLOATS) < MAX_FLOATS:
        _FLOATS[value] = value
    return value


class HeartbeatResult(enum.Enum):
    """What a heartbeat did to the state."""

    ACCEPTED = "accepted"
    REBOOT = "reboot"  # accepted, seq went back (or repeated with other content): the terminal restarted
    DUPLICATE = "duplicate"
    STALE = "stale"  # evidently an older message of a boot still running: state does not move back
    BACKWARDS = "counter_backwards"  # newer, but a cumulative counter decreased: rejected
    REFUSED = "unknown_terminal_overflow"  # an unknown terminal while the fleet holds its maximum of those


class Active(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """An active condition on one terminal."""

    since: float
    severity: str
    detail: str


@dataclass(frozen=True, slots=True)
class Transition:
    """A condition raised or cleared (for history and logs)."""

    tid: str
    condition: str
    raised: bool
    at: float
    severity: str
    detail: str


class Terminal(msgspec.Struct, array_like=True, gc=False):
    """Everything known about one terminal.

    A msgspec Struct: no per-object dict, no GC header (`gc=False` is safe, a Terminal never takes part in a
    reference cycle), and the snapshot encodes and decodes it directly as a compact array, with no
    intermediate dict per terminal. Field order is the snapshot format: append new fields at the end.
    """

    tid: str
    acquirer: str = UNKNOWN  # from the registry ("unknown" when unregistered)
    site: str = UNKNOWN
    merchant: str = ""  # registry merchant, else the heartbeat's mid
    mid: str | None = None  # merchant id the terminal reports
    model: str | None = None
    app_version: str | None = None
    os_version: str | None = None
    interval_s: float = 0.0
    last_rx: float | None = None  # receive time of the newest heartbeat
    last_ts: float = 0.0  # terminal clock of the newest heartbeat
    seq: int = -1
    uptime_s: float | None = None
    txn_count: int = 0
    uploaded_count: int = 0
    queue_depth: int = 0
    oldest_queued_ts: float | None = None
    net_type: str | None = None
    rssi_dbm: float | None = None
    power_source: str | None = None
    battery_pct: float | None = None
    printer: str | None = None
    display: str | None = None
    card_reader: str | None = None
    status: str = ""  # "", "online", "offline" (last will / connection lost), "shutdown"
    status_rx: float = 0.0
    upstream_rx: float = 0.0  # receive time of the acquirer's last record of this terminal
    upstream_txns: int = 0
    pending_upload_since: float | None = None  # uploads acknowledged but not yet seen in the feed, since
    events: list[float] | None = None  # recent reboots / offline->online cycles (flapping)
    conds: dict[str, Active] | None = None  # active conditions
    # Hysteresis counters of conditions about to change, as flat (condition, count, ...) pairs: a tuple of one
    # pair is 56 B where a dict is 184. Snapshots written before this hold a map: see `streak_pairs`.
    streaks: tuple[str | int, ...] | dict[str, int] | None = None
    rejected: dict[str, int] | None = None  # messages the collector rejected, by reason (bounded)
    rejected_rx: float | None = None  # receive time of the last rejected message
    rejected_last: str = ""  # reason of the last rejected message
    # Terminal clock of the heartbeat before the newest when that one's seq was the newest's - 1 (else None): a
    # QoS 1 redelivery of it stored after the newest (a broker that lost the PUBACK, then the resend) is then a
    # duplicate, not a reboot. The float object is the newest's old `last_ts`, kept alive instead of freed.
    prev_ts: float | None = None


Streaks = tuple[str | int, ...]


def streak_pairs(streaks: Streaks | dict[str, int] | None) -> Streaks | None:
    """The flat (condition, count, ...) form of a terminal's streaks, whatever form a snapshot gave."""
    if isinstance(streaks, dict):
        return tuple(x for c, n in streaks.items() for x in (sys.intern(c), n)) or None
    return streaks or None


def streak_of(streaks: Streaks | None, cond: str) -> int:
    """The hysteresis count of `cond` (0 when it has none)."""
    if streaks:
        for i in range(0, len(streaks), 2):
            if streaks[i] == cond:
                count = streaks[i + 1]
                assert isinstance(count, int)
                return count
    return 0


def with_streak(streaks: Streaks | None, cond: str, n: int) -> Streaks | None:
    """`streaks` with `cond` set to `n` (removed when `n` is 0); None when nothing is left."""
    kept: Streaks = ()
    if streaks:
        kept = tuple(x for i in range(0, len(streaks), 2) if streaks[i] != cond for x in streaks[i:i + 2])
    return (*kept, cond, n) if n else (kept or None)


def classify(t: Terminal, hb: Heartbeat, rx: float) -> HeartbeatResult:
    """Where a heartbeat received at `rx` stands against the terminal's newest one: by seq and arrival, never `ts`.

    - The first heartbeat, or a higher seq: ACCEPTED (newer).
    - The same seq, ts and uptime: DUPLICATE (a QoS 1 redelivery is byte-identical); so is the seq just before
      the newest with that heartbeat's ts (`prev_ts`): a redelivery stored after the newer one, as a broker losing
      a node does (the PUBACK lost, the message stored and resent). A reboot cannot repeat both.
    - A lower seq, or the same seq with other content: REBOOT, whatever the terminal clock says (a clock reset to
      1970 or corrected from decades ahead is no evidence of age) ...
    - ... unless it arrives within one interval of the newest heartbeat and is evidently an older message:
      a cumulative counter is lower (a reboot keeps them), or both carry `uptime_s` and this one's is lower and
      larger than the time since the newest heartbeat arrived plus transit slack (its boot began before that
      heartbeat, which a reboot since cannot have): STALE. The one-interval clause bounds a wrong guess (a
      reset device, an odd uptime): the next heartbeat an interval later is judged a reboot (and a reset
      device's lower counters then make it BACKWARDS, a visible reject), so no terminal is ever frozen.
    Counters are checked after this (BACKWARDS), for newer heartbeats and reboots alike.
    """
    if t.last_rx is None or hb.seq > t.seq:
        return HeartbeatResult.ACCEPTED
    if hb.seq == t.seq and hb.ts == t.last_ts and hb.uptime_s == t.uptime_s:
        return HeartbeatResult.DUPLICATE
    if hb.seq == t.seq - 1 and hb.ts == t.prev_ts:
        return HeartbeatResult.DUPLICATE
    since = rx - t.last_rx
    # A negative `since` is the collector host's clock stepping back: no evidence either way, so a reboot.
    if 0 <= since <= max(hb.interval_s, t.interval_s):
        if hb.txn_count < t.txn_count or hb.uploaded_count < t.uploaded_count:
            return HeartbeatResult.STALE
        if (
            hb.uptime_s is not None
            and t.uptime_s is not None
            and since + TRANSIT_SLACK_S < hb.uptime_s < t.uptime_s
        ):
            return HeartbeatResult.STALE
    return HeartbeatResult.REBOOT


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """What an acquirer's batch did: refused (unknown acquirer, or too many feeds), or how its records matched."""

    refused: bool = False
    matched: int = 0  # records of this acquirer's own terminals: applied
    foreign: int = 0  # records naming another acquirer's (or an unregistered) terminal: ignored
    unknown: int = 0  # records naming a terminal id the fleet does not know: ignored
    elsewhere: int = 0  # records of terminals another collector materialises (partitioned collectors): not ours


@dataclass(frozen=True, slots=True)
class Recount:
    """The derived counts recomputed from scratch (to check the incremental ones)."""

    counts: dict[tuple[str, str, str], int]
    problem: set[str]
    versions: dict[tuple[str, str, str], int]


class FeedState:
    """One acquirer's upstream feed."""

    __slots__ = ("acquirer", "alive_since", "last_rx", "txns")

    def __init__(self, acquirer: str) -> None:
        self.acquirer = acquirer
        self.last_rx = 0.0
        self.alive_since = 0.0
        self.txns = 0

    def stale(self, now: float, stale_after: float) -> bool:
        """True when the feed has been silent longer than allowed (or never spoke)."""
        return self.last_rx == 0.0 or now - self.last_rx > stale_after


class Fleet:
    """The whole fleet's state and the counts derived from it."""

    def __init__(
        self,
        cfg: Config,
        started_at: float,
        registry: Registry = EMPTY,
        restored: tuple[list[Terminal], list[FeedState]] = ([], []),
        baselines: ActivitySnapshot | None = None,
        materialise: Callable[[str], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        # Partitioned collectors (collector/cluster): which registered terminals this one materialises; None: all.
        self.materialise = materialise
        # Terminals adopted from another collector's partition -> when: silence is measured from then at the
        # earliest, like from `started_at` after a restart (pruned once the terminal is heard after it).
        self.adopted: dict[str, float] = {}
        self.th = cfg.thresholds
        self.policy: dict[str, tuple[int, ...]] = {
            m: v for m, v in ((m, parse_version(s)) for m, s in cfg.software_policy.items()) if v is not None
        }
        self.started_at = started_at
        self.tick_slice = TICK_SLICE  # terminals per slice of an evaluation round (`tick_slices`)
        # Restored terminals go in before the registry creates the missing ones, so none is built twice.
        self.terminals: dict[str, Terminal] = {t.tid: t for t in restored[0]}
        self.feeds: dict[str, FeedState] = {f.acquirer: f for f in restored[1]}
        self.registry = EMPTY
        self.registry_loaded = False
        self._registry_acquirers: frozenset[str] = frozenset()
        # (acquirer, site, condition) -> terminals; the pseudo-conditions "_known", "_online" and "_shutdown"
        # ride along, so /metrics never walks the fleet. All four maps below change only through `_count`.
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.acquirer_counts: Counter[tuple[str, str]] = Counter()  # (acquirer, condition): the same, per acquirer
        # (acquirer, site) -> active conditions of its terminals, only sites with at least one: what /metrics
        # renders per site, so its size follows problems and not the number of sites.
        self.problem_sites: dict[tuple[str, str], int] = {}
        # Problem site or terminal -> when what /metrics shows of it (counts; conditions and labels) last changed,
        # a running number (`changes`): /metrics formats its lines again only when that moved
        # (collector.http.metrics.SparseLines). Problem sites and terminals only.
        self.changes = 0
        self.site_changes: dict[tuple[str, str], int] = {}
        self.terminal_changes: dict[str, int] = {}
        # Sites whose known, shutdown or offline count changed since the last tick: the only ones (with their
        # acquirers and those mid-hysteresis) whose mass-offline condition the tick evaluates, O(changes).
        self.mass_dirty: set[tuple[str, str]] = set()
        # (scope, acquirer, site) -> (state, active since) for sites and acquirers ("site" is "" for an acquirer)
        # that are mass-offline or on their way in or out; everything else is implicitly not mass-offline.
        self.mass: dict[MassKey, tuple[MassOffline, float]] = {}
        self.problem: set[str] = set()  # terminals with at least one active condition
        self.versions: Counter[tuple[str, str, str]] = Counter()  # (acquirer, model, app_version), no zero keys
        # Terminals whose version is not in `versions` because MAX_VERSIONS keys were taken when it changed.
        self.versions_uncounted: set[str] = set()
        self.max_versions = MAX_VERSIONS
        self.max_feeds = MAX_FEEDS
        self.unregistered_seen = 0
        self.max_unregistered = 10_000  # bounds state and series that unknown ids can create
        self.refused: Counter[str] = Counter(dict.fromkeys(BOUNDS, 0))  # what each bound refused
        # Room for every terminal the registry or the snapshot names (the two mostly overlap); it grows if needed.
        self.activity = Activity(cfg.activity, max(len(registry.entries), len(restored[0])))
        self._restore_activity(baselines, restored[0])
        self.set_registry(registry)

    # ---- registry -------------------------------------------------------------------------------------
    def set_registry(self, registry: Registry) -> None:
        """Install a (re)loaded registry: relabel terminals and rebuild the counts."""
        self.registry = registry
        self.registry_loaded = registry is not EMPTY
        self._registry_acquirers = frozenset(registry.acquirers())
        wanted = self.materialise
        for tid in registry.entries:
            if tid not in self.terminals and (wanted is None or wanted(tid)):
                self.terminals[tid] = Terminal(tid)
        for t in self.terminals.values():
            self._label(t, registry.get(t.tid))
        self._rebuild_counts()

    def adopt(self, restored: Iterable[Terminal], belongs: Callable[[str], bool], now: float) -> int:
        """Take over a partition: its terminals from the snapshot, plus the registered ones the snapshot lacks,
        each given a full offline period from `now` (no false offline storm while the stream is replayed).
        `belongs` tells the partition's ids; returns the number of terminals adopted."""
        n = 0
        for t in restored:
            if belongs(t.tid) and t.tid not in self.terminals:
                self.terminals[t.tid] = t
                self.adopted[t.tid] = now
                n += 1
        for tid in self.registry.entries:
            if belongs(tid) and tid not in self.terminals:
                self.terminals[tid] = Terminal(tid)
                self.adopted[tid] = now
                n += 1
        for tid, t in self.terminals.items():
            if tid in self.adopted:
                self._label(t, self.registry.get(tid))
        self._rebuild_counts()
        return n

    def release(self, belongs: Callable[[str], bool]) -> list[Terminal]:
        """Give up a partition: its terminals leave the fleet (and every count); returned for a last snapshot."""
        gone = [t for tid, t in self.terminals.items() if belongs(tid)]
        for t in gone:
            del self.terminals[t.tid]
            self.adopted.pop(t.tid, None)
            if self.activity.enabled:
                self.activity.release(t.tid)  # not carried in the partition state: the next owner learns it anew
        if gone:
            self._rebuild_counts()
        return gone

    def _label(self, t: Terminal, reg: RegistryEntry | None) -> None:
        if reg is not None:
            t.acquirer, t.site, t.merchant = reg.acquirer, reg.site, reg.merchant_id
        else:
            t.acquirer, t.site, t.merchant = UNKNOWN, UNKNOWN, t.mid or ""

    def _rebuild_counts(self) -> None:
        # Which terminals' versions fit under the cap is decided again, in fleet order (a relabel may merge or
        # split keys); everything else is the plain recount.
        self.versions_uncounted = set()
        keys: set[tuple[str, str, str]] = set()
        for t in self.terminals.values():
            if t.app_version is not None:
                key = (t.acquirer, t.model or "", t.app_version)
                if key not in keys and len(keys) >= self.max_versions:
                    self.versions_uncounted.add(t.tid)
                else:
                    keys.add(key)
        again = self.recount()
        self.counts = Counter(again.counts)
        self.acquirer_counts = Counter()
        self.problem_sites = {}
        for (acq, site, cond), n in self.counts.items():
            self.acquirer_counts[(acq, cond)] += n
            if not cond.startswith("_") and n:
                self.problem_sites[(acq, site)] = self.problem_sites.get((acq, site), 0) + n
        self.changes += 1  # every count made again, terminals perhaps relabelled
        self.site_changes = dict.fromkeys(self.problem_sites, self.changes)
        # A relabel can move terminals between sites: every site, and every one with a mass state, is judged again.
        self.mass_dirty = {(acq, site) for acq, site, _ in self.counts} | {(a, s) for _, a, s in self.mass if s}
        self.problem = again.problem
        self.terminal_changes = dict.fromkeys(self.problem, self.changes)
        self.versions = Counter(again.versions)
        self.unregistered_seen = sum(1 for t in self.terminals.values() if t.acquirer == UNKNOWN)

    def recount(self) -> Recount:
        """Counts, problem set and versions recomputed from the terminals (what the incremental ones must equal)."""
        # No zero keys per site and condition: at 300,000 sites they were 3.3 million keys nobody reads (/metrics
        # pre-initialises per acquirer, and per site only renders what is non-zero).
        counts: Counter[tuple[str, str, str]] = Counter()
        problem: set[str] = set()
        versions: Counter[tuple[str, str, str]] = Counter()
        for t in self.terminals.values():
            counts[(t.acquirer, t.site, "_known")] += 1
            if t.status == "shutdown":
                counts[(t.acquirer, t.site, "_shutdown")] += 1
            if self._online(t):
                counts[(t.acquirer, t.site, "_online")] += 1
            if t.app_version is not None and t.tid not in self.versions_uncounted:
                versions[(t.acquirer, t.model or "", t.app_version)] += 1
            if t.conds:
                problem.add(t.tid)
                for c in t.conds:
                    counts[(t.acquirer, t.site, c)] += 1
        return Recount(dict(counts), problem, dict(versions))

    # ---- bounded maps ----------------------------------------------------------------------------------
    def _shared(self, value: float) -> float:
        """One float object per distinct value for fields that repeat across the fleet (interval, signal, battery):
        24 bytes per terminal and field saved; past MAX_FLOATS values the value is kept unshared (counted)."""
        if value not in _FLOATS and len(_FLOATS) >= MAX_FLOATS:
            self.refused["floats"] += 1
        return share_float(value)

    def _set_version(self, t: Terminal, model: str | None, version: str | None) -> None:
        """Move the terminal between version keys; zero keys are deleted and new keys are capped."""
        if t.app_version is not None and t.tid not in self.versions_uncounted:
            old = (t.acquirer, t.model or "", t.app_version)
            left = self.versions[old] - 1
            if left > 0:
                self.versions[old] = left
            else:
                del self.versions[old]
        self.versions_uncounted.discard(t.tid)
        if version is not None:
            new = (t.acquirer, model or "", version)
            if new in self.versions or len(self.versions) < self.max_versions:
                self.versions[new] += 1
            else:
                self.versions_uncounted.add(t.tid)
                self.refused["versions"] += 1
        if t.conds and model != t.model:
            self._shown_changed(t)
        t.model, t.app_version = model, version

    def feed_allowed(self, acquirer: str) -> bool:
        """Whether a feed of this acquirer may be applied: registry acquirers only, else at most MAX_FEEDS feeds."""
        if not acquirer or acquirer == UNKNOWN:
            return False  # "unknown" labels unregistered terminals: no feed may speak for them
        if self.registry_loaded:
            return acquirer in self._registry_acquirers
        return acquirer in self.feeds or len(self.feeds) < self.max_feeds

    def owns(self, acquirer: str, tid: str) -> bool:
        """True when the terminal belongs to this acquirer by the registry (what a feed may apply to)."""
        t = self.terminals.get(tid)
        return t is not None and acquirer != UNKNOWN and t.acquirer == acquirer

    # ---- counts -----------------------------------------------------------------------------------------
    def _count(self, acq: str, site: str, cond: str, delta: int) -> None:
        """Move one terminal in or out of a count, keeping the per-acquirer, problem-site and dirty views in step."""
        self.counts[(acq, site, cond)] += delta
        self.acquirer_counts[(acq, cond)] += delta
        if cond in _MASS_INPUTS:
            self.mass_dirty.add((acq, site))
        key = (acq, site)
        if not cond.startswith("_"):
            left = self.problem_sites.get(key, 0) + delta
            if left > 0:
                self.problem_sites[key] = left
            else:
                self.problem_sites.pop(key, None)
        if key in self.problem_sites:
            self.changes += 1
            self.site_changes[key] = self.changes
        elif self.site_changes:
            self.site_changes.pop(key, None)

    # ---- conditions -----------------------------------------------------------------------------------
    def _raise(self, t: Terminal, cond: str, severity: str, detail: str, now: float, out: list[Transition]) -> None:
        if t.conds is None:
            t.conds = {}
            self.problem.add(t.tid)
        t.conds[cond] = Active(now, severity, detail)
        self._shown_changed(t)
        self._count(t.acquirer, t.site, cond, 1)
        out.append(Transition(t.tid, cond, True, now, severity, detail))

    def _clear(self, t: Terminal, cond: str, now: float, out: list[Transition]) -> None:
        assert t.conds is not None
        active = t.conds.pop(cond)
        if not t.conds:
            t.conds = None
            self.problem.discard(t.tid)
            self.terminal_changes.pop(t.tid, None)
        else:
            self._shown_changed(t)
        self._count(t.acquirer, t.site, cond, -1)
        out.append(Transition(t.tid, cond, False, now, active.severity, active.detail))

    def _update(self, t: Terminal, cond: str, hit: tuple[str, str]) -> None:
        """Severity or detail changed while active: keep `since`."""
        assert t.conds is not None
        t.conds[cond] = Active(t.conds[cond].since, hit[0], hit[1])
        self._shown_changed(t)

    def _shown_changed(self, t: Terminal) -> None:
        """What /metrics shows of a problem terminal (its conditions or labels) changed."""
        self.changes += 1
        self.terminal_changes[t.tid] = self.changes

    def _observe(self, t: Terminal, raw: Raw, now: float, out: list[Transition]) -> None:
        """Count-based hysteresis for heartbeat-driven conditions."""
        if not raw and t.conds is None and not t.streaks:
            return  # the common case: nothing holds, nothing is active, no streak to reset
        for cond in HEARTBEAT_CONDITIONS:
            hyst = self.th.weak_signal if cond == "weak_signal" else self.th.default
            hit = raw.get(cond)
            active = t.conds is not None and cond in t.conds
            streaks = t.streaks
            assert not isinstance(streaks, dict)  # snapshots' maps are converted on restore
            if (hit is not None) == active:
                if streaks and cond in streaks:
                    t.streaks = with_streak(streaks, cond, 0)
                if hit is not None and t.conds is not None and t.conds[cond].detail != hit[1]:
                    self._update(t, cond, hit)
                continue
            n = streak_of(streaks, cond) + 1
            if n >= (hyst.clear_after if active else hyst.raise_after):
                t.streaks = with_streak(streaks, cond, 0)
                if active:
                    self._clear(t, cond, now, out)
                else:
                    assert hit is not None
                    self._raise(t, cond, hit[0], hit[1], now, out)
            else:
                t.streaks = with_streak(streaks, cond, n)

    def _time_step(self, t: Terminal, now: float, out: list[Transition]) -> None:
        offline_active = t.conds is not None and "offline" in t.conds
        feed = self.feeds.get(t.acquirer)
        started = self.started_at
        if self.adopted:
            adopted = self.adopted.get(t.tid)
            if adopted is not None and adopted > started:
                started = adopted
        raw = time_conditions(t, feed, self.th, now, started, offline_active)
        if not raw and t.conds is None:
            return  # the common case on every heartbeat: nothing to raise, nothing to clear
        for cond in TIME_CONDITIONS:
            active = t.conds is not None and cond in t.conds
            hit = raw.get(cond)
            if hit is not None and not active:
                was_online = self._online(t)
                self._raise(t, cond, hit[0], hit[1], now, out)
                self._sync_online(t, was_online)
            elif hit is None and active:
                was_online = self._online(t)
                self._clear(t, cond, now, out)
                self._sync_online(t, was_online)
            elif hit is not None and t.conds is not None and cond != "offline" and t.conds[cond].detail != hit[1]:
                self._update(t, cond, hit)  # e.g. messages_rejected names the latest reason

    @staticmethod
    def _online(t: Terminal) -> bool:
        return t.last_rx is not None and t.status != "shutdown" and not (t.conds and "offline" in t.conds)

    def _sync_online(self, t: Terminal, was_online: bool) -> None:
        is_online = self._online(t)
        if is_online != was_online:
            self._count(t.acquirer, t.site, "_online", 1 if is_online else -1)

    def _set_status(self, t: Terminal, new: str) -> None:
        if t.status == "shutdown" and new != "shutdown":
            self._count(t.acquirer, t.site, "_shutdown", -1)
        elif new == "shutdown" and t.status != "shutdown":
            self._count(t.acquirer, t.site, "_shutdown", 1)
        t.status = new

    def _event(self, t: Terminal, at: float) -> None:
        events = t.events or []
        events.append(at)
        t.events = events[-MAX_EVENTS:]

    # ---- messages -------------------------------------------------------------------------------------
    def _terminal_for(self, tid: str) -> Terminal | None:
        t = self.terminals.get(tid)
        if t is None:
            if self.unregistered_seen >= self.max_unregistered:
                self.refused["unregistered"] += 1
                return None
            t = self.terminals[tid] = Terminal(tid)
            self.unregistered_seen += 1
            self._count(UNKNOWN, UNKNOWN, "_known", 1)
        return t

    def on_heartbeat(self, hb: Heartbeat, rx: float, out: list[Transition]) -> HeartbeatResult:
        """Apply a heartbeat received at `rx`; REFUSED when the fleet is full of unknown terminals.

        A BACKWARDS heartbeat is recorded as a rejected message of the terminal (reason counter_backwards):
        callers must not report it to `on_rejected` again.
        """
        t = self.terminals.get(hb.tid)
        if t is None:
            t = self._terminal_for(hb.tid)
            if t is None:
                return HeartbeatResult.REFUSED
        result = classify(t, hb, rx)
        if result is HeartbeatResult.DUPLICATE or result is HeartbeatResult.STALE:
            return result
        first = t.last_rx is None
        if not first and (hb.txn_count < t.txn_count or hb.uploaded_count < t.uploaded_count):
            self._reject(t, "counter_backwards", rx, out)
            return HeartbeatResult.BACKWARDS
        if self.activity.enabled:
            self._learn(t, first, rx, hb.txn_count, out)
        was_online = self._online(t)
        if result is HeartbeatResult.REBOOT:
            self._event(t, rx)
        # The feed may beat the heartbeat that reports the same upload: a record within two intervals before
        # counts as covering it.
        if (
            not first
            and hb.uploaded_count > t.uploaded_count
            and t.pending_upload_since is None
            and t.upstream_rx < rx - 2 * hb.interval_s - 5
        ):
            t.pending_upload_since = rx
        t.prev_ts = t.last_ts if not first and hb.seq == t.seq + 1 else None
        t.seq, t.last_ts = hb.seq, hb.ts
        if hb.interval_s != t.interval_s:
            t.interval_s = self._shared(hb.interval_s)
        # Arrival order is the truth: a host clock stepping back must not leave last_rx in the future.
        t.last_rx = rx
        # Unchanged values keep their long-lived objects: the message's copies die with it instead of being kept
        # between other messages' garbage, where each one pins a page of the heap (peak RSS under a burst).
        if hb.txn_count != t.txn_count:
            t.txn_count = hb.txn_count
        if hb.uploaded_count == t.txn_count:  # everything uploaded, the usual case: one int object for both
            t.uploaded_count = t.txn_count
        elif hb.uploaded_count != t.uploaded_count:
            t.uploaded_count = hb.uploaded_count
        t.queue_depth = hb.queue_depth
        if hb.oldest_queued_ts != t.oldest_queued_ts:
            t.oldest_queued_ts = hb.oldest_queued_ts
        if hb.mid is not None and hb.mid != t.mid:
            t.mid = sys.intern(hb.mid)  # ids and versions repeat across the fleet: share one string each
            if t.acquirer == UNKNOWN:
                t.merchant = t.mid
                if t.conds:
                    self._shown_changed(t)
        model, version = hb.model or t.model, hb.app_version or t.app_version
        if (model, version) != (t.model, t.app_version):
            self._set_version(
                t, sys.intern(model) if model else model, sys.intern(version) if version else version
            )
        if hb.os_version and hb.os_version != t.os_version:
            t.os_version = sys.intern(hb.os_version)
        t.uptime_s = hb.uptime_s
        if hb.net is not None:
            if hb.net.rssi_dbm != t.rssi_dbm:
                t.rssi_dbm = None if hb.net.rssi_dbm is None else self._shared(hb.net.rssi_dbm)
            t.net_type = hb.net.type
        if hb.power is not None:
            if hb.power.battery_pct != t.battery_pct:
                t.battery_pct = None if hb.power.battery_pct is None else self._shared(hb.power.battery_pct)
            t.power_source = hb.power.source
        if hb.hw is not None:
            t.printer, t.display, t.card_reader = hb.hw.printer, hb.hw.display, hb.hw.card_reader
        if t.status in ("offline", "shutdown"):
            self._set_status(t, "online")
        if t.conds is not None and "offline" in t.conds:
            self._clear(t, "offline", rx, out)
            self._event(t, rx)  # an offline -> online cycle counts towards flapping
        self._sync_online(t, was_online)
        raw = heartbeat_conditions(
            t, self.registry.get(t.tid), self.th, self.policy, self.registry_loaded, rx
        )
        self._observe(t, raw, rx, out)
        self._time_step(t, rx, out)
        return result

    def on_status(self, st: Status, rx: float, retained: bool, out: list[Transition]) -> bool:
        """Apply a status message; False when it was a replay of the current status.

        The status's own `ts` is not compared with anything: the terminal clock may be reset or decades ahead.
        A retained status replays whatever was published last, possibly long ago; a stale last will is harmless
        because a will only becomes `offline` after a heartbeat is missed as well (time_conditions).
        """
        t = self._terminal_for(st.tid)
        if t is None:
            return False
        new = "online" if st.state == "online" else ("shutdown" if st.reason == "shutdown" else "offline")
        if retained and new == t.status:
            return False  # replayed to us on (re)subscribe
        was_online = self._online(t)
        self._set_status(t, new)
        if new == "shutdown" and t.conds is not None and "offline" in t.conds:
            self._clear(t, "offline", rx, out)
        t.status_rx = rx
        self._sync_online(t, was_online)
        self._time_step(t, rx, out)
        return True

    def _reject(self, t: Terminal, reason: str, rx: float, out: list[Transition]) -> None:
        counts = t.rejected if t.rejected is not None else {}
        if reason not in counts and len(counts) >= MAX_REJECT_REASONS:
            self.refused["reject_reasons"] += 1
            reason = "other"
        counts[reason] = counts.get(reason, 0) + 1
        t.rejected = counts
        t.rejected_rx, t.rejected_last = rx, reason
        self._time_step(t, rx, out)

    def on_rejected(self, tid: str, reason: str, rx: float, out: list[Transition]) -> None:
        """A message of terminal `tid` (a valid id) was rejected for `reason`: count it, and let it prove life.

        A terminal whose messages all arrive but are rejected becomes `messages_rejected` (warning), never
        `offline`: the collector, not the terminal, refused them.
        """
        t = self._terminal_for(tid)
        if t is not None:
            self._reject(t, reason, rx, out)

    def on_upstream(self, batch: UpstreamBatch, rx: float, out: list[Transition]) -> int:
        """`on_feed`, returning only how many records matched (the collector's call until it takes the result)."""
        return self.on_feed(batch, rx, out).matched

    def on_feed(self, batch: UpstreamBatch, rx: float, out: list[Transition]) -> UpstreamResult:
        """Apply a batch the acquirer recorded, to that acquirer's own terminals only; refuse unknown acquirers."""
        acquirer = batch.acquirer
        feed = self.feeds.get(acquirer)
        if feed is None:
            if not self.feed_allowed(acquirer):
                self.refused["feeds"] += 1
                return UpstreamResult(refused=True)
            feed = self.feeds[acquirer] = FeedState(acquirer)
        elif self.registry_loaded and acquirer not in self._registry_acquirers:
            # A feed restored from a snapshot (or kept across a reload) whose acquirer left the registry.
            self.refused["feeds"] += 1
            return UpstreamResult(refused=True)
        if feed.stale(rx, self.th.feed_stale_s):
            feed.alive_since = rx
        feed.last_rx = rx
        feed.txns += len(batch.txns)
        matched = foreign = unknown = elsewhere = 0
        wanted = self.materialise
        for txn in batch.txns:
            t = self.terminals.get(txn.tid)
            if t is None:
                if wanted is not None and not wanted(txn.tid):
                    elsewhere += 1  # its owner applies (or counts) it
                else:
                    unknown += 1
                continue
            if t.acquirer != acquirer:
                foreign += 1  # another acquirer's terminal: this feed cannot vouch for its uploads
                continue
            matched += 1
            t.upstream_rx = rx
            t.upstream_txns += 1
            t.pending_upload_since = None
            if t.conds is not None and "upstream_missing" in t.conds:
                self._clear(t, "upstream_missing", rx, out)
        if self.activity.enabled:
            self.activity.observe_feed(acquirer, matched, rx, self.activity.zone("", acquirer))
        return UpstreamResult(False, matched, foreign, unknown, elsewhere)

    def tick(self, now: float) -> list[Transition]:
        """Evaluate time-driven conditions for every terminal, then mass-offline for the sites that changed."""
        out: list[Transition] = []
        for part in self.tick_slices(now):
            out.extend(part)
        return out

    def tick_slices(self, now: float) -> Iterator[list[Transition]]:
        """`tick` in slices of `tick_slice` terminals, each slice's transitions as it ends, for a caller that lets other
        work run between slices: the whole round over 100,000 terminals held the loop for 15 to 55 ms on two busy
        cores, long enough for a broker's queue to overflow behind it.

        The terminals are those present when the round starts. Meanwhile messages may update them (a heartbeat
        received after `now` only shortens its terminal's silence), add terminals (the next round sees them) or
        remove them (a registry reload, a partition handed over): those are skipped.
        """
        step = self._time_step
        factor, default_interval = self.th.offline_factor, self.th.default_interval_s
        everyone, size = list(self.terminals.values()), self.tick_slice
        for start in range(0, len(everyone), size):
            out: list[Transition] = []
            terminals, feeds = self.terminals, self.feeds
            for t in everyone[start : start + size]:
                # Fast path for the common case: a quiet, recently heard terminal with nothing pending can change
                # no time-driven condition (its silence, measured from max(last_rx, start), is under the limit).
                if (
                    t.conds is None
                    and t.events is None
                    and (t.pending_upload_since is None or t.acquirer not in feeds)
                    and t.last_rx is not None
                    and t.status != "offline"
                    and now - t.last_rx <= factor * (t.interval_s or default_interval)
                ) or terminals.get(t.tid) is not t:
                    continue
                step(t, now, out)
            yield out
        out = []
        if self.adopted:  # heard since adoption: its own silence counts again
            terminals = self.terminals
            heard = [tid for tid, at in self.adopted.items()
                     if tid not in terminals or (terminals[tid].last_rx or 0.0) >= at]
            for tid in heard:
                del self.adopted[tid]
        if self.activity.enabled:
            self._activity_tick(now, out)
        self.mass_tick(now)
        yield out

    def mass_tick(self, now: float) -> list[tuple[str, str, str, bool]]:
        """Mass-offline hysteresis for the sites (and their acquirers) whose counts changed since the last tick
        and for those mid-hysteresis: O(changes), never O(sites). Returns the transitions, also logged."""
        dirty, self.mass_dirty = self.mass_dirty, set()
        keys = {("site", a, s) for a, s in dirty} | {("acquirer", a, "") for a, _ in dirty}
        keys.update(k for k, (st, _) in self.mass.items() if st.streak)
        counts, acq_counts, th = self.counts, self.acquirer_counts, self.th
        changed: list[tuple[str, str, str, bool]] = []
        for key in keys:
            scope, acq, site = key
            if acq == UNKNOWN:
                continue  # unregistered terminals share one pseudo-site: they have no place to be offline together
            if scope == "site":
                offline = counts[(acq, site, "offline")]
                expected = counts[(acq, site, "_known")] - counts[(acq, site, "_shutdown")]
            else:
                offline = acq_counts[(acq, "offline")]
                expected = acq_counts[(acq, "_known")] - acq_counts[(acq, "_shutdown")]
            raised = advance_mass(self.mass, key, offline, expected, th, now)
            if raised is not None:
                changed.append((scope, acq, site, raised))
                log.info(
                    "%s mass_offline on %s %s%s (%d of %d terminals that should be online are offline)",
                    "raised" if raised else "cleared", scope, acq, f"/{site}" if site else "", offline, expected,
                )
        return changed

    def mass_offline(self) -> list[tuple[str, str, str, float]]:
        """Active mass-offline conditions as (scope, acquirer, site, since); site is "" for an acquirer."""
        return [(scope, acq, site, since) for (scope, acq, site), (st, since) in self.mass.items() if st.active]

    # ---- derived views ---------------------------------------------------------------------------------
    def feed_stale(self, acquirer: str, now: float) -> bool:
        """True when the acquirer's feed is stale (or never spoke)."""
        feed = self.feeds.get(acquirer)
        return feed is None or feed.stale(now, self.th.feed_stale_s)

    def acquirers(self) -> set[str]:
        """Acquirers known from the registry or from their feed (the registry's set is kept at load: no fleet walk)."""
        return set(self._registry_acquirers) | set(self.feeds)

    # ---- activity baselines (collector.fleet.activity) ---------------------------------------------------
    def _restore_activity(self, snap: ActivitySnapshot | None, restored: list[Terminal]) -> None:
        self.activity.restore(snap, [t.tid for t in restored], self.started_at)

    def activity_zone(self, t: Terminal) -> tuple[ZoneInfo, Quiet]:
        """The terminal's zone (registry tz, else its acquirer's, else the default) and the intervals that count for
        nothing for it (configured holidays, days its region was quiet together)."""
        reg = self.registry.get(t.tid)
        tz = self.activity.zone(reg.tz if reg is not None else "", t.acquirer)
        return tz, self.activity.quiet(reg.region if reg is not None else "", tz)

    def _activity_tz(self, t: Terminal) -> ZoneInfo:
        reg = self.registry.get(t.tid)
        return self.activity.zone(reg.tz if reg is not None else "", t.acquirer)

    def _learn(self, t: Terminal, first: bool, rx: float, count: int, out: list[Transition]) -> None:
        """Learn from an accepted heartbeat before the terminal's last_rx and txn_count are overwritten."""
        slot = self.activity.slot_for(t.tid)
        # The zone is looked up only when an hour is folded, not on every heartbeat.
        self.activity.observe(slot, lambda: self._activity_tz(t), None if first else t.last_rx, t.txn_count, rx, count)
        if count > t.txn_count and t.conds is not None and ACTIVITY in t.conds:
            self._clear(t, ACTIVITY, rx, out)  # it sells again

    def _activity_tick(self, now: float, out: list[Transition]) -> None:
        """Check the terminals whose silence may have become improbable (activity_drop), and the feeds' volume.

        Only online terminals with no other active condition are judged: offline, a backlog, rejected messages or
        a fault explain silence better, and the condition clears when one of them appears.
        """
        activity = self.activity
        for slot, tid in activity.due_slots(now):
            t = self.terminals.get(tid)
            if t is None:
                continue
            tz, quiet = self.activity_zone(t)
            active = t.conds is not None and ACTIVITY in t.conds
            judged = (
                self._online(t) and t.status != "offline" and (t.conds is None or t.conds.keys() <= {ACTIVITY})
            )
            found = activity.judge(slot, tz, now, quiet) if judged else None
            if isinstance(found, Drop):
                if not active:
                    self._raise(t, ACTIVITY, SEVERITY[ACTIVITY], drop_detail(found, tz), now, out)
            elif active:
                self._clear(t, ACTIVITY, now, out)
            activity.reschedule(slot, tz, now, quiet)
        activity.scan(now, self._activity_owner)
        stale_s = self.th.feed_stale_s
        alive = {a: not f.stale(now, stale_s) for a, f in self.feeds.items()}
        activity.volume_tick(now, alive)

    def _activity_owner(self, tid: str) -> tuple[str, ZoneInfo] | None:
        """An online terminal's region key (registry region, else its zone's name) and zone, for the holiday guard."""
        t = self.terminals.get(tid)
        if t is None or not self._online(t) or t.status == "offline":
            return None
        reg = self.registry.get(tid)
        tz = self.activity.zone(reg.tz if reg is not None else "", t.acquirer)
        return (reg.region if reg is not None and reg.region else str(tz)), tz

    def activity_view(self, t: Terminal, now: float) -> dict[str, object]:
        """The terminal's `activity` in the API: state, learned hours, expected rate now, last transaction."""
        tz, quiet = self.activity_zone(t)
        return self.activity.view(self.activity.slot_of(t.tid), tz, now, quiet).as_dict()

    def activity_facts(self, t: Terminal, now: float) -> tuple[str, float | None, float | None, str]:
        """(state, transactions expected since the last one, its time, zone) for the diagnosis."""
        tz, quiet = self.activity_zone(t)
        slot = self.activity.slot_of(t.tid)
        view = self.activity.view(slot, tz, now, quiet)
        found = self.activity.expected_since(slot, tz, now)
        return view.state, found[0] if found else None, view.last_txn_at, str(tz)

    def volume_drop(self, acquirer: str) -> tuple[float, float, int, int] | None:
        """The acquirer's active acquirer_volume_drop as (since, expected, recorded, window_s), or None."""
        found = self.activity.volume_drops.get(acquirer)
        if found is None:
            return None
        since, drop = found
        return since, drop.expected, drop.observed, drop.window_s
