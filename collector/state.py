"""Per-terminal and per-acquirer state, and the rules that move it forward (never backwards).

`Fleet` applies decoded messages with the receive time they came with, runs detection (collector.detect)
and keeps condition counts per (acquirer, site) incrementally, so /metrics never walks the whole fleet.
"""

from __future__ import annotations

import enum
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Final, overload

import msgspec

from .config import Config
from .detect import (
    CONDITIONS,
    HEARTBEAT_CONDITIONS,
    Raw,
    heartbeat_conditions,
    parse_version,
    time_conditions,
)
from .protocol import Heartbeat, Status, UpstreamBatch
from .registry import EMPTY, Registry, RegistryEntry

__all__ = ["Active", "FeedState", "Fleet", "HeartbeatResult", "Terminal", "Transition"]

UNKNOWN: Final = "unknown"
MAX_EVENTS: Final = 8  # reboot/reconnect times kept for flapping detection


_FLOATS: dict[float, float] = {}


@overload
def _shared(value: float) -> float: ...
@overload
def _shared(value: None) -> None: ...
def _shared(value: float | None) -> float | None:
    """One float object per distinct value for fields that repeat across the fleet (interval, signal, battery):
    24 bytes per terminal and field saved; the table is bounded by the values' range, not the fleet."""
    if value is None or len(_FLOATS) >= 100_000:
        return value
    return _FLOATS.setdefault(value, value)


class HeartbeatResult(enum.Enum):
    """What a heartbeat did to the state."""

    ACCEPTED = "accepted"
    REBOOT = "reboot"  # accepted, seq went back to a lower value on a newer clock: the terminal restarted
    DUPLICATE = "duplicate"
    STALE = "stale"  # older than what we have: out of order or replayed; state does not move back
    BACKWARDS = "counter_backwards"  # newer, but a cumulative counter decreased: rejected


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
    streaks: dict[str, int] | None = None  # hysteresis counters of conditions about to change


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
    ) -> None:
        self.cfg = cfg
        self.th = cfg.thresholds
        self.policy: dict[str, tuple[int, ...]] = {
            m: v for m, v in ((m, parse_version(s)) for m, s in cfg.software_policy.items()) if v is not None
        }
        self.started_at = started_at
        # Restored terminals go in before the registry creates the missing ones, so none is built twice.
        self.terminals: dict[str, Terminal] = {t.tid: t for t in restored[0]}
        self.feeds: dict[str, FeedState] = {f.acquirer: f for f in restored[1]}
        self.registry = EMPTY
        self.registry_loaded = False
        # (acquirer, site, condition) -> terminals; the pseudo-conditions "_known", "_online" and "_shutdown"
        # ride along, so /metrics never walks the fleet.
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.problem: set[str] = set()  # terminals with at least one active condition
        self.versions: Counter[tuple[str, str, str]] = Counter()  # (acquirer, model, app_version)
        self.unregistered_seen = 0
        self.max_unregistered = 10_000  # bounds state and series that unknown ids can create
        self.set_registry(registry)

    # ---- registry -------------------------------------------------------------------------------------
    def set_registry(self, registry: Registry) -> None:
        """Install a (re)loaded registry: relabel terminals and rebuild the counts."""
        self.registry = registry
        self.registry_loaded = registry is not EMPTY
        for tid in registry.entries:
            if tid not in self.terminals:
                self.terminals[tid] = Terminal(tid)
        for t in self.terminals.values():
            self._label(t, registry.get(t.tid))
        self._rebuild_counts()

    def _label(self, t: Terminal, reg: RegistryEntry | None) -> None:
        if reg is not None:
            t.acquirer, t.site, t.merchant = reg.acquirer, reg.site, reg.merchant_id
        else:
            t.acquirer, t.site, t.merchant = UNKNOWN, UNKNOWN, t.mid or ""

    def _rebuild_counts(self) -> None:
        counts: Counter[tuple[str, str, str]] = Counter()
        for acq, site in self.registry.sites():
            for c in CONDITIONS:
                counts[(acq, site, c)] += 0
        self.problem = set()
        self.versions = Counter()
        self.unregistered_seen = 0
        for t in self.terminals.values():
            if t.acquirer == UNKNOWN:
                self.unregistered_seen += 1
            counts[(t.acquirer, t.site, "_known")] += 1
            if t.status == "shutdown":
                counts[(t.acquirer, t.site, "_shutdown")] += 1
            if self._online(t):
                counts[(t.acquirer, t.site, "_online")] += 1
            if t.app_version is not None:
                self.versions[(t.acquirer, t.model or "", t.app_version)] += 1
            if t.conds:
                self.problem.add(t.tid)
                for c in t.conds:
                    counts[(t.acquirer, t.site, c)] += 1
        self.counts = counts

    # ---- conditions -----------------------------------------------------------------------------------
    def _raise(self, t: Terminal, cond: str, severity: str, detail: str, now: float, out: list[Transition]) -> None:
        if t.conds is None:
            t.conds = {}
            self.problem.add(t.tid)
        t.conds[cond] = Active(now, severity, detail)
        self.counts[(t.acquirer, t.site, cond)] += 1
        out.append(Transition(t.tid, cond, True, now, severity, detail))

    def _clear(self, t: Terminal, cond: str, now: float, out: list[Transition]) -> None:
        assert t.conds is not None
        active = t.conds.pop(cond)
        if not t.conds:
            t.conds = None
            self.problem.discard(t.tid)
        self.counts[(t.acquirer, t.site, cond)] -= 1
        out.append(Transition(t.tid, cond, False, now, active.severity, active.detail))

    def _update(self, t: Terminal, cond: str, hit: tuple[str, str]) -> None:
        """Severity or detail changed while active: keep `since`."""
        assert t.conds is not None
        t.conds[cond] = Active(t.conds[cond].since, hit[0], hit[1])

    def _observe(self, t: Terminal, raw: Raw, now: float, out: list[Transition]) -> None:
        """Count-based hysteresis for heartbeat-driven conditions."""
        for cond in HEARTBEAT_CONDITIONS:
            hyst = self.th.weak_signal if cond == "weak_signal" else self.th.default
            hit = raw.get(cond)
            active = t.conds is not None and cond in t.conds
            if (hit is not None) == active:
                if t.streaks and cond in t.streaks:
                    del t.streaks[cond]
                    if not t.streaks:
                        t.streaks = None
                if hit is not None and t.conds is not None and t.conds[cond].detail != hit[1]:
                    self._update(t, cond, hit)
                continue
            streaks = t.streaks if t.streaks is not None else {}
            n = streaks.get(cond, 0) + 1
            if n >= (hyst.clear_after if active else hyst.raise_after):
                streaks.pop(cond, None)
                if active:
                    self._clear(t, cond, now, out)
                else:
                    assert hit is not None
                    self._raise(t, cond, hit[0], hit[1], now, out)
            else:
                streaks[cond] = n
            t.streaks = streaks or None

    def _time_step(self, t: Terminal, now: float, out: list[Transition]) -> None:
        offline_active = t.conds is not None and "offline" in t.conds
        feed = self.feeds.get(t.acquirer)
        raw = time_conditions(t, feed, self.th, now, self.started_at, offline_active)
        for cond in ("offline", "upstream_missing", "flapping"):
            active = t.conds is not None and cond in t.conds
            hit = raw.get(cond)
            if cond == "offline" and offline_active:
                continue
            if hit is not None and not active:
                if cond == "offline" and self._online(t):
                    self.counts[(t.acquirer, t.site, "_online")] -= 1
                self._raise(t, cond, hit[0], hit[1], now, out)
            elif hit is None and active:
                self._clear(t, cond, now, out)

    @staticmethod
    def _online(t: Terminal) -> bool:
        return t.last_rx is not None and t.status != "shutdown" and not (t.conds and "offline" in t.conds)

    def _event(self, t: Terminal, at: float) -> None:
        events = t.events or []
        events.append(at)
        t.events = events[-MAX_EVENTS:]

    # ---- messages -------------------------------------------------------------------------------------
    def _terminal_for(self, tid: str) -> Terminal | None:
        t = self.terminals.get(tid)
        if t is None:
            if self.unregistered_seen >= self.max_unregistered:
                return None
            t = self.terminals[tid] = Terminal(tid)
            self.unregistered_seen += 1
            self.counts[(UNKNOWN, UNKNOWN, "_known")] += 1
            for c in CONDITIONS:
                self.counts[(UNKNOWN, UNKNOWN, c)] += 0
        return t

    def on_heartbeat(self, hb: Heartbeat, rx: float, out: list[Transition]) -> HeartbeatResult | None:
        """Apply a heartbeat received at `rx`; None when the fleet is full of unknown terminals."""
        t = self._terminal_for(hb.tid)
        if t is None:
            return None
        result = HeartbeatResult.ACCEPTED
        first = t.last_rx is None
        was_online = self._online(t)
        if not first:
            if hb.seq == t.seq and hb.ts == t.last_ts:
                return HeartbeatResult.DUPLICATE
            # Ordered by the terminal's clock, then seq; the next seq of the same boot is accepted even when
            # the clock stepped back (an NTP correction of a skewed clock must not freeze the terminal).
            newer = hb.ts > t.last_ts or (hb.ts == t.last_ts and hb.seq > t.seq) or hb.seq == t.seq + 1
            if not newer:
                return HeartbeatResult.STALE
            if hb.txn_count < t.txn_count or hb.uploaded_count < t.uploaded_count:
                return HeartbeatResult.BACKWARDS
            if hb.seq < t.seq:
                result = HeartbeatResult.REBOOT
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
        t.seq, t.last_ts = hb.seq, hb.ts
        if hb.interval_s != t.interval_s:
            t.interval_s = _shared(hb.interval_s)
        t.last_rx = rx if t.last_rx is None else max(t.last_rx, rx)
        t.txn_count, t.uploaded_count = hb.txn_count, hb.uploaded_count
        t.queue_depth, t.oldest_queued_ts = hb.queue_depth, hb.oldest_queued_ts
        if hb.mid is not None and hb.mid != t.mid:
            t.mid = sys.intern(hb.mid)  # ids and versions repeat across the fleet: share one string each
            if t.acquirer == UNKNOWN:
                t.merchant = t.mid
        model, version = hb.model or t.model, hb.app_version or t.app_version
        if (model, version) != (t.model, t.app_version):
            model = sys.intern(model) if model else model
            version = sys.intern(version) if version else version
            if t.app_version is not None:
                self.versions[(t.acquirer, t.model or "", t.app_version)] -= 1
            if version is not None:
                self.versions[(t.acquirer, model or "", version)] += 1
            t.model, t.app_version = model, version
        if hb.os_version and hb.os_version != t.os_version:
            t.os_version = sys.intern(hb.os_version)
        t.uptime_s = hb.uptime_s
        if hb.net is not None:
            if hb.net.rssi_dbm != t.rssi_dbm:
                t.rssi_dbm = _shared(hb.net.rssi_dbm)
            t.net_type = hb.net.type
        if hb.power is not None:
            if hb.power.battery_pct != t.battery_pct:
                t.battery_pct = _shared(hb.power.battery_pct)
            t.power_source = hb.power.source
        if hb.hw is not None:
            t.printer, t.display, t.card_reader = hb.hw.printer, hb.hw.display, hb.hw.card_reader
        if t.status in ("offline", "shutdown"):
            if t.status == "shutdown":
                self.counts[(t.acquirer, t.site, "_shutdown")] -= 1
            t.status = "online"
        if t.conds is not None and "offline" in t.conds:
            self._clear(t, "offline", rx, out)
            self._event(t, rx)  # an offline -> online cycle counts towards flapping
        if not was_online:
            self.counts[(t.acquirer, t.site, "_online")] += 1
        raw = heartbeat_conditions(
            t, self.registry.get(t.tid), self.th, self.policy, self.registry_loaded, rx
        )
        self._observe(t, raw, rx, out)
        self._time_step(t, rx, out)
        return result

    def on_status(self, st: Status, rx: float, retained: bool, out: list[Transition]) -> bool:
        """Apply a status message; False when it was stale or a replay."""
        t = self._terminal_for(st.tid)
        if t is None:
            return False
        if st.ts is not None and t.last_rx is not None and st.ts < t.last_ts:
            return False  # older than the last heartbeat (e.g. a retained status from before a restart)
        new = "online" if st.state == "online" else ("shutdown" if st.reason == "shutdown" else "offline")
        if retained and new == t.status:
            return False  # replayed to us on (re)subscribe
        was_online = self._online(t)
        if t.status == "shutdown" and new != "shutdown":
            self.counts[(t.acquirer, t.site, "_shutdown")] -= 1
        if new == "shutdown" and t.status != "shutdown":
            self.counts[(t.acquirer, t.site, "_shutdown")] += 1
            if t.conds is not None and "offline" in t.conds:
                self._clear(t, "offline", rx, out)
        t.status, t.status_rx = new, rx
        if self._online(t) != was_online:
            self.counts[(t.acquirer, t.site, "_online")] += 1 if not was_online else -1
        self._time_step(t, rx, out)
        return True

    def on_upstream(self, batch: UpstreamBatch, rx: float, out: list[Transition]) -> int:
        """Apply a batch the acquirer recorded; returns how many transactions named known terminals."""
        feed = self.feeds.get(batch.acquirer)
        if feed is None:
            feed = self.feeds[batch.acquirer] = FeedState(batch.acquirer)
        if feed.stale(rx, self.th.feed_stale_s):
            feed.alive_since = rx
        feed.last_rx = rx
        feed.txns += len(batch.txns)
        matched = 0
        for txn in batch.txns:
            t = self.terminals.get(txn.tid)
            if t is None:
                continue
            matched += 1
            t.upstream_rx = rx
            t.upstream_txns += 1
            t.pending_upload_since = None
            if t.conds is not None and "upstream_missing" in t.conds:
                self._clear(t, "upstream_missing", rx, out)
        return matched

    def tick(self, now: float) -> list[Transition]:
        """Evaluate time-driven conditions for every terminal."""
        out: list[Transition] = []
        step = self._time_step
        factor, default_interval, feeds = self.th.offline_factor, self.th.default_interval_s, self.feeds
        for t in self.terminals.values():
            # Fast path for the common case: a quiet, recently heard terminal with nothing pending can change no
            # time-driven condition (its silence, measured from max(last_rx, start), is under the limit).
            if (
                t.conds is None
                and t.events is None
                and (t.pending_upload_since is None or t.acquirer not in feeds)
                and t.last_rx is not None
                and t.status != "offline"
                and now - t.last_rx <= factor * (t.interval_s or default_interval)
            ):
                continue
            step(t, now, out)
        return out

    # ---- derived views ---------------------------------------------------------------------------------
    def feed_stale(self, acquirer: str, now: float) -> bool:
        """True when the acquirer's feed is stale (or never spoke)."""
        feed = self.feeds.get(acquirer)
        return feed is None or feed.stale(now, self.th.feed_stale_s)

    def acquirers(self) -> set[str]:
        """Acquirers known from the registry or from their feed."""
        return self.registry.acquirers() | set(self.feeds)
