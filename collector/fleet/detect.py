"""Problem detection: pure functions of a terminal's state, the registry, the thresholds and a clock.

Two kinds of conditions:
- heartbeat-driven (hardware, backlog, registry, software, signal, skew) are observed once per accepted
  heartbeat and pass through count-based hysteresis (`Thresholds.default`, `Thresholds.weak_signal`);
- time-driven (offline, messages_rejected, upstream_missing, flapping) are evaluated on every tick from receive
  times only. The terminal's own clock (`ts`) is never used for liveness or ordering: it is only compared with
  the receive time to report `clock_skew`, and with itself for the age of the upload queue.
A third, fleet-level kind, mass_offline, is a share of one site's or acquirer's terminals offline together
(`mass_offline_step`), evaluated by the fleet on each tick for the sites whose counts changed.
Nothing here reads the wall clock: `now` is always passed in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, NamedTuple

from collector.config import parse_version
from collector.fleet.conditions import CATALOGUE

if TYPE_CHECKING:
    from collector.config import Thresholds
    from collector.fleet.registry import RegistryEntry
    from collector.fleet.state import FeedState, Terminal

__all__ = [
    "BASELINE_CONDITIONS",
    "CONDITIONS",
    "HEARTBEAT_CONDITIONS",
    "SEVERITY",
    "TIME_CONDITIONS",
    "MassOffline",
    "Raw",
    "heartbeat_conditions",
    "mass_offline_step",
    "parse_version",
    "probable_cause",
    "time_conditions",
]

HEARTBEAT_CONDITIONS: Final = (
    "upload_backlog",
    "unregistered",
    "merchant_mismatch",
    "outdated_software",
    "hardware_fault",
    "weak_signal",
    "clock_skew",
)
TIME_CONDITIONS: Final = ("offline", "messages_rejected", "upstream_missing", "flapping")
# Judged against the learned activity baseline when its schedule says (collector.fleet.activity).
BASELINE_CONDITIONS: Final = ("activity_drop",)
# The order of /metrics and the API's lists; messages_rejected goes last so existing series keep their order.
CONDITIONS: Final = (
    "offline", "upstream_missing", *HEARTBEAT_CONDITIONS, "flapping", "messages_rejected", *BASELINE_CONDITIONS
)

# Severity when a condition is active (the catalogue's); hardware_fault is downgraded to warning for paper_out
# alone. messages_rejected is never critical: the collector itself refused those messages, the terminal is alive.
SEVERITY: Final = {c.name: c.severity for c in CATALOGUE.values()}

# condition -> (severity, detail)
Raw = dict[str, tuple[str, str]]

def _outdated(app_version: str | None, model: str, policy: dict[str, tuple[int, ...]]) -> bool:
    minimum = policy.get(model) or policy.get("*")
    if minimum is None:
        return False
    have = parse_version(app_version)
    return have is None or have < minimum


def heartbeat_conditions(
    t: Terminal,
    reg: RegistryEntry | None,
    th: Thresholds,
    policy: dict[str, tuple[int, ...]],
    registry_loaded: bool,
    rx: float,
) -> Raw:
    """Heartbeat-driven conditions that hold for the terminal's latest heartbeat."""
    raw: Raw = {}
    if t.queue_depth >= th.backlog_queue_depth:
        raw["upload_backlog"] = ("critical", "queue_depth")
    elif t.oldest_queued_ts is not None and t.last_ts - t.oldest_queued_ts >= th.backlog_oldest_age_s:
        raw["upload_backlog"] = ("critical", "queue_age")
    if registry_loaded and reg is None:
        raw["unregistered"] = ("warning", "")
    if reg is not None and t.mid is not None and t.mid != reg.merchant_id:
        raw["merchant_mismatch"] = ("critical", t.mid)  # what the terminal reports, for the alert and support
    model = t.model or (reg.model if reg else "")
    if _outdated(t.app_version, model, policy):
        raw["outdated_software"] = ("warning", "")
    faults = [
        name
        for name, value in (("printer", t.printer), ("display", t.display), ("card_reader", t.card_reader))
        if value == "fault"
    ]
    if faults:
        raw["hardware_fault"] = ("critical", "+".join(faults) + "_fault")
    elif t.printer == "paper_out":
        raw["hardware_fault"] = ("warning", "printer_paper_out")
    if t.rssi_dbm is not None and t.rssi_dbm < th.weak_signal_rssi_dbm:
        raw["weak_signal"] = ("warning", t.net_type or "")
    skew = t.last_ts - rx
    if abs(skew) > th.clock_skew_s:
        raw["clock_skew"] = ("warning", "ahead" if skew > 0 else "behind")
    return raw


def time_conditions(
    t: Terminal,
    feed: FeedState | None,
    th: Thresholds,
    now: float,
    started_at: float,
    offline_active: bool,
) -> Raw:
    """Time-driven conditions, evaluated from receive times only.

    Offline is silence of accepted heartbeats for `offline_factor` intervals (measured from the collector's start
    at the earliest). Rejected messages prove the terminal is alive: while they keep arriving (the last one
    within that period), the terminal is `messages_rejected` (warning) instead of `offline`, even if it was
    offline before; once they stop too, it is offline.
    """
    raw: Raw = {}
    interval = t.interval_s or th.default_interval_s
    period = th.offline_factor * interval
    rejecting = t.rejected_rx is not None and now - t.rejected_rx <= period
    if t.status != "shutdown":
        # Silence is measured from the collector's start at the earliest: after a restart every terminal
        # gets a full offline period to be heard again before it is called offline (no false storm).
        ref = max(t.last_rx if t.last_rx is not None else started_at, started_at)
        silent = now - ref
        limit = period
        if t.status == "offline":  # the last will arrived: confirmed by one missed heartbeat, not three
            limit = min(limit, th.will_confirm_factor * interval + th.will_confirm_slack_s)
        if rejecting and (silent > limit or offline_active):
            raw["messages_rejected"] = ("warning", t.rejected_last)
        elif offline_active:
            # Once offline, only a heartbeat, a clean shutdown or rejected messages (above) bring it back.
            raw["offline"] = ("critical", "")
        elif silent > limit and (t.last_rx is not None or t.acquirer != "unknown"):
            # An id neither registered nor ever accepted (it only sent statuses or rejected messages) is not a
            # terminal anyone expects to hear from: calling it offline would page for noise.
            detail = "last_will" if t.status == "offline" else ("silent" if t.last_rx is not None else "never_seen")
            raw["offline"] = ("critical", detail)
    if (
        t.pending_upload_since is not None
        and feed is not None
        and not feed.stale(now, th.feed_stale_s)
        and now - max(t.pending_upload_since, feed.alive_since) > th.upstream_grace_s
    ):
        raw["upstream_missing"] = ("critical", "")
    if t.events:
        recent = sum(1 for e in t.events if now - e <= th.flapping_window_s)
        if recent >= th.flapping_events:
            raw["flapping"] = ("warning", "")
    return raw


class MassOffline(NamedTuple):
    """Where one site's or acquirer's mass-offline condition stands after a tick."""

    active: bool
    streak: int  # ticks in a row the opposite of `active` has held (hysteresis)


def mass_offline_step(state: MassOffline, offline: int, expected: int, th: Thresholds) -> MassOffline:
    """Mass-offline hysteresis for one site or acquirer: raise when at least `mass_offline_share` of the
    `expected` terminals (known minus cleanly shut down) and `mass_offline_min_terminals` are offline for
    `mass_offline.raise_after` ticks in a row; clear below `mass_offline_clear_share` (or the minimum) for
    `clear_after` ticks."""
    share = offline / expected if expected > 0 else 0.0
    if state.active:
        # A clear share above the raise share would flap on every tick: the lower of the two applies.
        low = share < min(th.mass_offline_clear_share, th.mass_offline_share)
        streak = state.streak + 1 if low or offline < th.mass_offline_min_terminals else 0
        return MassOffline(False, 0) if streak >= th.mass_offline.clear_after else MassOffline(True, streak)
    high = offline >= th.mass_offline_min_terminals and share >= th.mass_offline_share
    streak = state.streak + 1 if high else 0
    return MassOffline(True, 0) if streak >= th.mass_offline.raise_after else MassOffline(False, streak)


MassKey = tuple[str, str, str]  # (scope, acquirer, site); site "" for an acquirer
NOT_MASS: Final = MassOffline(False, 0)


def advance_mass(
    mass: dict[MassKey, tuple[MassOffline, float]], key: MassKey, offline: int, expected: int, th: Thresholds,
    now: float,
) -> bool | None:
    """One tick of `key`'s hysteresis in `mass`, which holds only the keys mass-offline or on their way in or out
    (with since when active): the new active state when it changed, else None."""
    old, since = mass.get(key, (NOT_MASS, 0.0))
    new = mass_offline_step(old, offline, expected, th)
    changed = new.active != old.active
    if new == NOT_MASS:
        mass.pop(key, None)
    else:
        mass[key] = (new, now if changed else since)
    return new.active if changed else None


# (condition, detail) -> probable cause, from the catalogue; detail "" is the condition's default.
_CAUSES: Final = {(c.name, detail): cause for c in CATALOGUE.values() for detail, cause in c.causes.items()}


def probable_cause(condition: str, detail: str) -> str:
    """A sentence naming the probable cause, for humans."""
    if condition == "hardware_fault" and detail != "printer_paper_out":
        parts = detail.removesuffix("_fault").replace("_", " ").split("+")
        return (
            f"Hardware fault reported by the terminal ({', '.join(parts)}): the device cannot complete or "
            "record payments reliably and needs repair or replacement."
        )
    return _CAUSES.get((condition, detail)) or _CAUSES.get((condition, ""), condition)
