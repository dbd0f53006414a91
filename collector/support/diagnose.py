"""Per-terminal diagnosis of "why can't this terminal's transactions be found?": a pure function of facts.

It walks the field checklist in its order — network and power, printer/display/card reader, software, merchant
registration, the terminal's own records, the acquirer's records, the acquirer's host — and returns, with the
evidence (values and times) of every step: one primary cause, the other findings, ordered next steps for
operations and a short message for the merchant in English and Simplified Chinese.

The primary cause is the finding that best explains transactions not reaching the acquirer (`RANK`): a
terminal that cannot send anything explains more than an old app version that might be refused. Nothing here
reads the clock or the collector: `facts_from` copies what is needed, `diagnose(facts, now)` decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from collector.fleet.conditions import CATALOGUE, FINDINGS, RANK, STEPS, step_of
from collector.fleet.detect import probable_cause

if TYPE_CHECKING:
    from collector.config import Thresholds
    from collector.fleet.registry import RegistryEntry
    from collector.fleet.state import FeedState, Terminal

__all__ = ["RANK", "STEPS", "Diagnosis", "Facts", "Finding", "LedgerFacts", "diagnose", "facts_from"]

# The checklist (STEPS), the rank of findings (RANK), their steps, causes and merchant messages come from
# the catalogue (collector.fleet.conditions); the evidence and next steps, which read the facts, are here.
STEP_OF: Final = {code: step_of(code) for code in (*CATALOGUE, *FINDINGS)}


@dataclass(frozen=True, slots=True)
class LedgerFacts:
    """What the transaction ledger says about the terminal (receipts against the acquirer's records)."""

    receipts: int = 0
    recorded: int = 0
    unrecorded: int = 0  # expected in the acquirer's records, past the grace period, not there
    pending: int = 0  # completed within the grace period, not recorded yet
    oldest_unrecorded_at: float | None = None
    unrecorded_sample: tuple[str, ...] = ()
    last_recorded_at: float | None = None


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything the diagnosis looks at, copied out of the collector's state."""

    terminal_id: str
    merchant_id: str = ""
    acquirer: str = "unknown"
    site: str = "unknown"
    model: str | None = None
    registry_loaded: bool = True
    registry_merchant_id: str | None = None  # None: not in the registry
    heartbeat_mid: str | None = None
    status: str = ""  # "", online, offline (last will), shutdown
    status_at: float | None = None
    last_heartbeat_at: float | None = None
    terminal_clock: float | None = None
    interval_s: float | None = None
    uptime_s: float | None = None
    app_version: str | None = None
    min_app_version: str | None = None
    net_type: str | None = None
    rssi_dbm: float | None = None
    power_source: str | None = None
    battery_pct: float | None = None
    printer: str | None = None
    display: str | None = None
    card_reader: str | None = None
    txn_count: int = 0
    uploaded_count: int = 0
    queue_depth: int = 0
    oldest_queued_ts: float | None = None
    last_recorded_at: float | None = None
    recorded_txns: int = 0
    restarts: tuple[float, ...] = ()
    conditions: Mapping[str, tuple[float, str, str]] = field(default_factory=dict)  # cond -> since, sev, detail
    feed_last_at: float | None = None
    feed_stale: bool = False
    ledger: LedgerFacts | None = None
    rejected: Mapping[str, int] = field(default_factory=dict)  # messages the collector rejected, by reason
    last_rejected_at: float | None = None
    # Thresholds, copied so the evidence can say what a value was compared with.
    offline_factor: float = 3.0
    backlog_queue_depth: int = 20
    backlog_oldest_age_s: float = 600.0
    upstream_grace_s: float = 900.0
    feed_stale_s: float = 300.0
    weak_signal_rssi_dbm: float = -95.0
    clock_skew_s: float = 300.0
    flapping_events: int = 3
    flapping_window_s: float = 3600.0
    # Activity baseline (collector.fleet.activity): state, transactions expected since the last one, and when.
    activity_state: str | None = None
    activity_expected: float | None = None
    activity_since: float | None = None
    activity_tz: str | None = None
    # The acquirer's recorded volume far below its usual: (since, expected, recorded, window_s).
    volume_drop: tuple[float, float, int, int] | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing found wrong (or worth noting) on one checklist step."""

    code: str
    step: str
    severity: str  # critical, warning, info
    since: float | None
    detail: str
    cause: str
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view."""
        return {"code": self.code, "step": self.step, "severity": self.severity, "since": iso(self.since),
                "detail": self.detail, "cause": self.cause, "evidence": self.evidence}


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """The answer."""

    terminal_id: str
    merchant_id: str
    acquirer: str
    site: str
    at: float
    healthy: bool
    summary: str
    primary: Finding | None
    others: tuple[Finding, ...]
    steps: tuple[dict[str, Any], ...]
    next_steps: tuple[str, ...]
    merchant_message: dict[str, str]
    reaching_acquirer_until: float | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (the API's body)."""
        return {
            "terminal_id": self.terminal_id, "merchant_id": self.merchant_id, "acquirer": self.acquirer,
            "site": self.site, "at": iso(self.at), "healthy": self.healthy, "summary": self.summary,
            "primary_cause": None if self.primary is None else self.primary.to_dict(),
            "other_findings": [f.to_dict() for f in self.others],
            "checklist": list(self.steps),
            "next_steps": list(self.next_steps),
            "merchant_message": self.merchant_message,
            "transactions_reaching_acquirer_until": iso(self.reaching_acquirer_until),
        }


def _datetime(t: float) -> datetime | None:
    # A terminal clock may be anything finite (reset to 0, decades or millennia ahead): beyond year 9999 there is
    # no datetime, and that must not turn a diagnosis into a server error.
    try:
        return datetime.fromtimestamp(t, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def iso(t: float | None) -> str | None:
    """Unix seconds -> ISO 8601 UTC (None when absent or beyond what a date can express)."""
    d = None if t is None else _datetime(t)
    return None if d is None else d.strftime("%Y-%m-%dT%H:%M:%SZ")


def human(t: float | None) -> str:
    """Unix seconds -> '2026-11-30 14:03 UTC' for sentences."""
    if t is None:
        return "never"
    d = _datetime(t)
    return f"{t:.0f} (Unix seconds, out of range)" if d is None else d.strftime("%Y-%m-%d %H:%M UTC")


def _age(now: float, t: float | None) -> float | None:
    return None if t is None else round(now - t, 1)


def facts_from(
    t: Terminal,
    reg: RegistryEntry | None,
    registry_loaded: bool,
    feed: FeedState | None,
    th: Thresholds,
    policy: Mapping[str, str],
    now: float,
    ledger: LedgerFacts | None = None,
    activity: tuple[str, float | None, float | None, str] | None = None,
    volume_drop: tuple[float, float, int, int] | None = None,
) -> Facts:
    """Copy the facts out of the collector's state objects (`activity`: state, expected, since, zone)."""
    model = t.model or (reg.model if reg else None)
    return Facts(
        terminal_id=t.tid, merchant_id=t.merchant, acquirer=t.acquirer, site=t.site, model=model,
        registry_loaded=registry_loaded, registry_merchant_id=reg.merchant_id if reg else None,
        heartbeat_mid=t.mid, status=t.status, status_at=t.status_rx or None, last_heartbeat_at=t.last_rx,
        # ts = 0 is a clock reset to the epoch, a fact worth showing: "no clock" is only "never heard".
        terminal_clock=None if t.last_rx is None else t.last_ts, interval_s=t.interval_s or None, uptime_s=t.uptime_s,
        app_version=t.app_version, min_app_version=policy.get(model or "") or policy.get("*"),
        net_type=t.net_type, rssi_dbm=t.rssi_dbm, power_source=t.power_source, battery_pct=t.battery_pct,
        printer=t.printer, display=t.display, card_reader=t.card_reader,
        txn_count=t.txn_count, uploaded_count=t.uploaded_count, queue_depth=t.queue_depth,
        oldest_queued_ts=t.oldest_queued_ts, last_recorded_at=t.upstream_rx or None, recorded_txns=t.upstream_txns,
        restarts=tuple(t.events or ()),
        conditions={c: (a.since, a.severity, a.detail) for c, a in (t.conds or {}).items()},
        feed_last_at=(feed.last_rx or None) if feed else None,
        feed_stale=feed is None or feed.stale(now, th.feed_stale_s),
        ledger=ledger, rejected=dict(t.rejected or {}), last_rejected_at=t.rejected_rx,
        offline_factor=th.offline_factor, backlog_queue_depth=th.backlog_queue_depth,
        backlog_oldest_age_s=th.backlog_oldest_age_s, upstream_grace_s=th.upstream_grace_s,
        feed_stale_s=th.feed_stale_s, weak_signal_rssi_dbm=th.weak_signal_rssi_dbm, clock_skew_s=th.clock_skew_s,
        flapping_events=th.flapping_events, flapping_window_s=th.flapping_window_s,
        activity_state=activity[0] if activity else None, activity_expected=activity[1] if activity else None,
        activity_since=activity[2] if activity else None, activity_tz=activity[3] if activity else None,
        volume_drop=volume_drop,
    )


# ---- findings ------------------------------------------------------------------------------------------------
def _evidence(code: str, f: Facts, now: float) -> dict[str, Any]:
    """The values and times that support a finding."""
    if code == "offline":
        return {
            "status": f.status or "unknown", "last_heartbeat_at": iso(f.last_heartbeat_at),
            "last_heartbeat_age_s": _age(now, f.last_heartbeat_at), "interval_s": f.interval_s,
            "offline_after_s": None if f.interval_s is None else f.offline_factor * f.interval_s,
            "last_will_at": iso(f.status_at) if f.status == "offline" else None,
            "power_source": f.power_source, "battery_pct": f.battery_pct, "net_type": f.net_type,
            "rssi_dbm": f.rssi_dbm, "queue_depth_at_last_heartbeat": f.queue_depth,
        }
    if code == "acquirer_maintenance":
        waiting = (f.ledger.pending + f.ledger.unrecorded) if f.ledger else None
        return {
            "acquirer": f.acquirer, "feed_last_message_at": iso(f.feed_last_at),
            "feed_silent_s": _age(now, f.feed_last_at), "feed_stale_after_s": f.feed_stale_s,
            "transactions_waiting_for_records": waiting,
        }
    if code == "upload_backlog":
        return {
            "queue_depth": f.queue_depth, "queue_depth_threshold": f.backlog_queue_depth,
            "oldest_queued_at": iso(f.oldest_queued_ts),
            "oldest_queued_age_s": None if f.oldest_queued_ts is None or f.terminal_clock is None
            else round(f.terminal_clock - f.oldest_queued_ts, 1),
            "oldest_age_threshold_s": f.backlog_oldest_age_s,
            "txn_count": f.txn_count, "uploaded_count": f.uploaded_count,
        }
    if code in ("upstream_missing", "unrecorded_transactions"):
        led = f.ledger
        return {
            "uploaded_count": f.uploaded_count, "last_recorded_at": iso(f.last_recorded_at),
            "recorded_txns": f.recorded_txns, "grace_s": f.upstream_grace_s,
            "unrecorded_transactions": led.unrecorded if led else None,
            "oldest_unrecorded_at": iso(led.oldest_unrecorded_at) if led else None,
            "unrecorded_txn_ids": list(led.unrecorded_sample) if led else [],
        }
    if code == "merchant_mismatch":
        return {"heartbeat_merchant_id": f.heartbeat_mid, "registered_merchant_id": f.registry_merchant_id}
    if code == "unregistered":
        return {"terminal_id": f.terminal_id, "heartbeat_merchant_id": f.heartbeat_mid,
                "registry_loaded": f.registry_loaded}
    if code == "outdated_software":
        return {"app_version": f.app_version, "minimum_app_version": f.min_app_version, "model": f.model}
    if code == "clock_skew":
        skew = None if f.terminal_clock is None or f.last_heartbeat_at is None else \
            round(f.terminal_clock - f.last_heartbeat_at, 1)
        return {"terminal_clock": iso(f.terminal_clock), "received_at": iso(f.last_heartbeat_at),
                "skew_s": skew, "threshold_s": f.clock_skew_s}
    if code in ("hardware_fault", "paper_out"):
        return {"printer": f.printer, "display": f.display, "card_reader": f.card_reader,
                "reported_at": iso(f.last_heartbeat_at)}
    if code == "weak_signal":
        return {"net_type": f.net_type, "rssi_dbm": f.rssi_dbm, "threshold_dbm": f.weak_signal_rssi_dbm}
    if code == "flapping":
        recent = [t for t in f.restarts if now - t <= f.flapping_window_s]
        return {"restarts_or_reconnects": [iso(t) for t in recent], "window_s": f.flapping_window_s,
                "threshold": f.flapping_events, "uptime_s": f.uptime_s}
    if code == "messages_rejected":
        return {"rejected_by_reason": dict(sorted(f.rejected.items())), "last_rejected_at": iso(f.last_rejected_at),
                "last_heartbeat_at": iso(f.last_heartbeat_at),
                "last_heartbeat_age_s": _age(now, f.last_heartbeat_at), "interval_s": f.interval_s}
    if code == "acquirer_feed_unknown":
        return {"acquirer": f.acquirer, "feed_last_message_at": None}
    if code == "activity_drop":
        return {"expected_transactions": None if f.activity_expected is None else round(f.activity_expected, 1),
                "seen_transactions": 0, "silent_since": iso(f.activity_since), "local_tz": f.activity_tz,
                "baseline": f.activity_state, "txn_count": f.txn_count}
    if code == "acquirer_volume_drop":
        since, expected, seen, window = f.volume_drop or (None, None, None, None)
        return {"acquirer": f.acquirer, "since": iso(since), "window_s": window,
                "expected_transactions": None if expected is None else round(expected),
                "recorded_transactions": seen}
    if code == "shutdown":
        return {"status": "shutdown", "shutdown_at": iso(f.status_at), "last_heartbeat_at": iso(f.last_heartbeat_at)}
    return {}


_EXTRA_CAUSES: Final = {f.name: f.cause for f in FINDINGS.values() if f.cause}


def _findings(f: Facts, now: float) -> list[Finding]:
    out: list[Finding] = []

    def add(code: str, severity: str, since: float | None, detail: str, cause: str) -> None:
        out.append(Finding(code, STEP_OF[code], severity, since, detail, cause, _evidence(code, f, now)))

    for cond, (since, severity, detail) in f.conditions.items():
        if cond == "upstream_missing" and f.feed_stale:
            continue  # cannot be judged while the acquirer publishes nothing
        if cond == "activity_drop" and f.activity_since is not None:
            since = f.activity_since  # the silence began at the last sale, not when it became improbable
        add(cond, severity, since, detail, probable_cause(cond, detail))
    if f.status == "shutdown" and "offline" not in f.conditions:
        add("shutdown", "info", f.status_at, "", _EXTRA_CAUSES["shutdown"])
    if f.feed_last_at is None:
        add("acquirer_feed_unknown", "warning", None, "", _EXTRA_CAUSES["acquirer_feed_unknown"])
    elif f.feed_stale:
        add("acquirer_maintenance", "critical", f.feed_last_at, "feed_stale", _EXTRA_CAUSES["acquirer_maintenance"])
    elif f.ledger is not None and f.ledger.unrecorded and "upstream_missing" not in f.conditions:
        add("unrecorded_transactions", "critical", f.ledger.oldest_unrecorded_at, "",
            _EXTRA_CAUSES["unrecorded_transactions"])
    if f.volume_drop is not None and not f.feed_stale:
        add("acquirer_volume_drop", "warning", f.volume_drop[0], "", _EXTRA_CAUSES["acquirer_volume_drop"])
    return out


def _rank(finding: Finding) -> tuple[int, int]:
    code = "paper_out" if finding.detail == "printer_paper_out" else finding.code
    severity = {"critical": 0, "warning": 1}.get(finding.severity, 2)
    return (RANK.index(code) if code in RANK else len(RANK), severity)


# ---- next steps and the merchant's message ---------------------------------------------------------------------
def _next_steps(code: str, f: Facts, day: str) -> list[str]:
    tid = f.terminal_id
    reconcile = f"Reconcile the day: `posfleet reconcile --terminal {tid} --day {day}`."
    if code == "offline":
        silent = f.conditions.get("offline", (0.0, "", ""))[2] != "last_will"
        first = ("Call the merchant: is the terminal switched on and charged (screen lit, charger, socket)? "
                 "Then check the shop's network (router, cable, Wi-Fi, SIM coverage) and restart both."
                 if silent else
                 "Call the merchant: the connection broke — check the shop's network (router, cable, Wi-Fi, SIM "
                 "coverage), restart the router and the terminal.")
        return [first,
                "If it does not come back after a restart, file a fault report with the payment institution "
                "(repair or replacement).",
                "Once it is online, check that its upload queue drains. " + reconcile]
    if code == "acquirer_maintenance":
        return [f"Check acquirer {f.acquirer}'s maintenance notice: its feed is silent since "
                f"{human(f.feed_last_at)}.",
                "Wait for the maintenance to end: the transactions appear when the feed resumes. Tell merchants "
                "not to repeat payments.",
                f"If the feed stays silent past the announced window, contact {f.acquirer}'s operations desk; "
                "afterwards " + reconcile[0].lower() + reconcile[1:]]
    if code == "upload_backlog":
        return [f"The terminal holds {f.queue_depth} transaction(s) it cannot upload (oldest from "
                f"{human(f.oldest_queued_ts)}): check its route to the acquirer's host (network, firewall, "
                "host certificate). Ask the merchant not to switch it off or reset it.",
                "Ask the acquirer whether its host refuses this terminal (terminal/merchant registration, keys).",
                "When the queue is empty: " + reconcile]
    if code in ("upstream_missing", "unrecorded_transactions"):
        return [reconcile + " It lists the transactions the acquirer has not recorded.",
                f"Send that list (terminal {tid}, merchant {f.merchant_id}, txn ids, times, amounts) to acquirer "
                f"{f.acquirer} and ask them to check this terminal's registration, permissions and routing.",
                "Ask the merchant's bank whether the funds for those transactions have settled."]
    if code == "merchant_mismatch":
        return [f"The terminal is set up with merchant {f.heartbeat_mid} but registered to "
                f"{f.registry_merchant_id}: correct the merchant id in the terminal (or the registry if it is "
                "the registry that is wrong).",
                f"Ask the acquirer to look for the missing transactions under merchant {f.heartbeat_mid}."]
    if code == "unregistered":
        return [f"Register terminal {tid} with the acquirer and add it to the registry: until then its "
                "transactions cannot be attributed to a merchant.",
                "Check whether the device was swapped: compare its id with the merchant's registered terminal."]
    if code == "outdated_software":
        return [f"Update the payment application from {f.app_version} to at least {f.min_app_version} "
                "(remote update, or a field visit).",
                "After the update: " + reconcile]
    if code == "clock_skew":
        return ["Correct the terminal's clock (time sync / settings) and restart it.",
                "Look for its transactions at the terminal's wrong time in the acquirer's records."]
    if code == "hardware_fault":
        if f.printer == "paper_out" and "fault" not in (f.display, f.card_reader, f.printer):
            return ["Ask the merchant to load printer paper; reprint missing receipts from the terminal's "
                    "transaction list."]
        return ["File a fault report with the payment institution: the terminal needs repair or replacement.",
                "Until then the merchant should use another terminal."]
    if code == "weak_signal":
        return ["Improve the connection: move the terminal or the router, prefer cable or Wi-Fi over cellular, "
                "or replace the SIM/antenna."]
    if code == "flapping":
        return ["Check the power supply (charger, socket, battery) and the network; replace the battery if "
                "reboots continue."]
    if code == "messages_rejected":
        reason = f.conditions.get("messages_rejected", (0.0, "", ""))[2]
        first = (f"The terminal is alive but the collector rejects its messages ({reason or 'see the counts'}; "
                 f"{sum(f.rejected.values())} rejected, the last at {human(f.last_rejected_at)}): its health cannot "
                 "be judged. The collector's log names the reason per message (never the content).")
        if reason == "card_data":
            fix = ("Treat it as a PCI incident: the terminal's telemetry appears to contain a card number. Ask the "
                   "vendor to fix the firmware or configuration; the rejected content was not stored.")
        elif reason == "counter_backwards":
            fix = ("Its transaction counters went backwards: the device was reset or replaced under the same id. "
                   "Confirm with the merchant, then reconcile before and after the reset: " + reconcile)
        else:
            fix = ("Compare the terminal's firmware and configuration with protocol v1 (docs/protocol.md) and ask the "
                   "vendor for a fix; payments themselves are not refused by this.")
        return [first, fix]
    if code == "acquirer_feed_unknown":
        return [f"Check that acquirer {f.acquirer}'s feed is configured and publishing."]
    if code == "activity_drop":
        expected = "" if f.activity_expected is None else f"about {f.activity_expected:.0f} expected, "
        return [f"The terminal looks healthy but has recorded no transaction since {human(f.activity_since)} "
                f"({expected}none seen). Call the merchant: are they open, and does a test payment go through?",
                "If the test payment fails without an error on the terminal, restart it and check its card reader "
                "and payment application; if the merchant now uses another device, note it in the registry.",
                reconcile]
    if code == "acquirer_volume_drop":
        return [f"Acquirer {f.acquirer}'s feed records far fewer transactions than usual for this hour: ask its "
                "operations desk whether its host declines or loses transactions.",
                "Tell merchants not to repeat declined payments; afterwards " + reconcile[0].lower() + reconcile[1:]]
    return []


_MESSAGES: Final = {
    **{c.name: c.merchant for c in CATALOGUE.values()},
    **{f.name: f.merchant for f in FINDINGS.values() if f.merchant is not None},
}


def _healthy_text(f: Facts, until: float | None) -> tuple[str, str, str]:
    if until is None:
        summary = "Nothing wrong found; no transaction from this terminal has been recorded by the acquirer yet."
        en = (f"We checked terminal {f.terminal_id}: it is working normally. No payment from it has reached the "
              "payment institution yet; if you took one, please tell us its time and amount.")
        zh = (f"我们已检查终端 {f.terminal_id}：工作正常。支付机构尚未收到该终端的交易；"
              "如您已收款，请告知交易时间和金额。")
    else:
        summary = f"Nothing wrong found; transactions reaching the acquirer up to {human(until)}."
        en = (f"We checked terminal {f.terminal_id}: it is working normally and its payments reach the payment "
              f"institution (latest recorded {human(until)}). If a payment is still missing, please tell us its "
              "time and amount.")
        zh = (f"我们已检查终端 {f.terminal_id}：工作正常，交易已到达支付机构（最近入账 {human(until)}）。"
              "如仍有交易查不到，请告知交易时间和金额。")
    if f.status == "shutdown":
        summary = summary.replace("Nothing wrong found;",
                                  f"Nothing wrong found: the terminal was switched off cleanly at "
                                  f"{human(f.status_at)};")
    return summary, en, zh


def _steps(f: Facts, findings: list[Finding], now: float) -> tuple[dict[str, Any], ...]:
    never = f.last_heartbeat_at is None
    as_of = None if never else iso(f.last_heartbeat_at)
    evidence: dict[str, dict[str, Any]] = {
        "network_power": {
            "status": f.status or ("unknown" if never else "online"), "last_heartbeat_at": as_of,
            "last_heartbeat_age_s": _age(now, f.last_heartbeat_at), "interval_s": f.interval_s,
            "net_type": f.net_type, "rssi_dbm": f.rssi_dbm, "power_source": f.power_source,
            "battery_pct": f.battery_pct, "uptime_s": f.uptime_s,
        },
        "hardware": {"printer": f.printer, "display": f.display, "card_reader": f.card_reader},
        "software": {"app_version": f.app_version, "minimum_app_version": f.min_app_version,
                     "terminal_clock": iso(f.terminal_clock)},
        "registration": {"registered": f.registry_merchant_id is not None,
                         "registered_merchant_id": f.registry_merchant_id, "heartbeat_merchant_id": f.heartbeat_mid},
        "local_records": {"txn_count": f.txn_count, "uploaded_count": f.uploaded_count,
                          "queue_depth": f.queue_depth, "oldest_queued_at": iso(f.oldest_queued_ts),
                          "activity_baseline": f.activity_state,
                          "expected_since_last_transaction": None if f.activity_expected is None
                          else round(f.activity_expected, 1),
                          "last_transaction_at": iso(f.activity_since)},
        "acquirer_records": {
            "last_recorded_at": iso(f.last_recorded_at), "recorded_txns": f.recorded_txns,
            "receipts": f.ledger.receipts if f.ledger else None,
            "unrecorded_past_grace": f.ledger.unrecorded if f.ledger else None,
            "pending_within_grace": f.ledger.pending if f.ledger else None, "grace_s": f.upstream_grace_s,
            "acquirer_volume_drop": _evidence("acquirer_volume_drop", f, now) if f.volume_drop else None,
        },
        "acquirer_host": {"acquirer": f.acquirer, "feed_last_message_at": iso(f.feed_last_at),
                          "feed_stale": f.feed_stale},
    }
    out = []
    for n, (step, title) in enumerate(STEPS, start=1):
        mine = [x for x in findings if x.step == step and x.severity != "info"]
        if any(x.severity == "critical" for x in mine):
            status = "problem"
        elif mine:
            status = "warning"
        elif never and step in ("hardware", "software", "local_records"):
            status = "unknown"  # the terminal never reported them
        else:
            status = "ok"
        out.append({"n": n, "step": step, "title": title, "status": status,
                    "findings": [x.code for x in findings if x.step == step],
                    "as_of": as_of if step in ("hardware", "software", "local_records") else iso(now),
                    "evidence": evidence[step]})
    return tuple(out)


def diagnose(f: Facts, now: float) -> Diagnosis:
    """Walk the checklist over the facts and name the primary cause."""
    findings = _findings(f, now)
    problems = sorted((x for x in findings if x.severity != "info"), key=_rank)
    notes = [x for x in findings if x.severity == "info"]
    led = f.ledger
    candidates = [t for t in (f.last_recorded_at, led.last_recorded_at if led else None) if t is not None]
    until = max(candidates) if candidates else None
    day = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")
    steps = _steps(f, findings, now)
    if not problems:
        summary, en, zh = _healthy_text(f, until)
        next_steps = ("Nothing to fix. If the merchant still misses a payment, ask for its time and amount and "
                      "look it up in the acquirer's records (the terminal's transaction list shows its id).",)
        return Diagnosis(f.terminal_id, f.merchant_id, f.acquirer, f.site, now, True, summary, None,
                         tuple(notes), steps, next_steps, {"en": en, "zh-CN": zh}, until)
    primary, others = problems[0], problems[1:]
    ordered: list[str] = []
    for finding in (primary, *others):
        for step in _next_steps(finding.code, f, day)[: None if finding is primary else 1]:
            if step not in ordered:
                ordered.append(step)
    if primary.code not in ("upstream_missing", "unrecorded_transactions", "acquirer_maintenance"):
        ordered.append("If transactions are still missing after the fix, contact the acquirer (payment "
                       "institution) with the terminal id, merchant id and the transactions' times and amounts.")
    msg_code = "paper_out" if primary.detail == "printer_paper_out" else primary.code
    en, zh = _MESSAGES[msg_code]
    since = human(primary.since)
    summary = (f"{primary.code.replace('_', ' ').capitalize()} since {since}: {primary.cause}"
               + (f" Also: {', '.join(x.code for x in others)}." if others else ""))
    return Diagnosis(
        f.terminal_id, f.merchant_id, f.acquirer, f.site, now, False, summary, primary, tuple(others) + tuple(notes),
        steps, tuple(ordered),
        {"en": en.format(tid=f.terminal_id, since=since), "zh-CN": zh.format(tid=f.terminal_id, since=since)}, until,
    )
