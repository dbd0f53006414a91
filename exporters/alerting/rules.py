"""Prometheus alert rules over the collector's metrics, generated from alert_rules/config.yaml.

Pure functions: `load_alert_config` parses and validates the source, `render_rules` turns it and a profile into
the text of a rule file. Nothing here touches the network; `posfleet rules` (exporters.alerting.cli) wires it.

Every alert expression tolerates missed scrapes: per-terminal alerts compare the timestamp of a problem series'
last sample with that of `posfleet_up` from the same target (`_held_problem`), so a failed scrape neither resets
a pending `for` nor resolves a firing alert, while a condition that clears at a successful scrape resolves at
once. Gauges are read with `last_over_time(...[hold])` for the same reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import yaml

from collector.fleet.conditions import CATALOGUE
from exporters.artifacts import artifact_dir

__all__ = [
    "ALERT_NAMES",
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_RULES_PATH",
    "RULES_DIR",
    "RUNBOOKS_DIR",
    "AlertConfig",
    "AlertConfigError",
    "Profile",
    "Thresholds",
    "format_duration",
    "latency_budget",
    "load_alert_config",
    "parse_alert_config",
    "parse_duration",
    "render_rules",
    "rule_file_name",
]


RULES_DIR: Final = artifact_dir(__file__, "alert_rules", "shipped")
DEFAULT_CONFIG_PATH: Final = RULES_DIR / "config.yaml"
DEFAULT_RULES_PATH: Final = RULES_DIR / "posfleet.rules.yml"
RUNBOOKS_DIR: Final = artifact_dir(__file__, "docs/runbooks", "runbooks")

Severity = Literal["critical", "warning", "none"]


class AlertConfigError(ValueError):
    """The alert configuration is invalid; the message lists every problem."""


# ---------------------------------------------------------------------------------------------------------------
# Durations


_DURATION_RE: Final = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> int:
    """'1h2m3s' -> 3723 (whole seconds, as Prometheus writes them)."""
    m = _DURATION_RE.match(text.strip())
    if not m or not text.strip() or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h30m")
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def format_duration(seconds: int) -> str:
    """3723 -> '1h2m3s'; 0 -> '0s'."""
    if seconds <= 0:
        return "0s"
    h, rest = divmod(seconds, 3600)
    mi, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (mi, "m"), (s, "s")) if v)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class Profile:
    """How fast one rendering of the rules runs: intervals and the divisor applied to every duration."""

    name: str
    scrape_interval: int
    evaluation_interval: int
    time_scale: int

    def scale(self, seconds: int) -> int:
        """A duration of the config in this profile: divided by time_scale, never below 1s (0 stays 0)."""
        if seconds == 0:
            return 0
        return max(1, round(seconds / self.time_scale))


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Non-`for` thresholds; durations in seconds of the default profile."""

    reject_ratio: float
    reject_min_per_second: float
    ingest_silence: int
    ingest_queue_fill: float
    snapshot_max_age: int


@dataclass(frozen=True, slots=True)
class AlertConfig:
    """alert_rules/config.yaml, validated."""

    collector_selector: str
    target_labels: tuple[str, ...]
    runbook_url: str
    profiles: Mapping[str, Profile]
    hold: int
    rate_window: int
    thresholds: Thresholds
    for_: Mapping[str, int]

    def profile(self, name: str) -> Profile:
        """The named profile, or AlertConfigError."""
        try:
            return self.profiles[name]
        except KeyError:
            raise AlertConfigError(f"no profile {name!r}; have {', '.join(sorted(self.profiles))}") from None


_MATCHER: Final = r'\s*\w+\s*(?:=|!=|=~|!~)\s*"[^"]*"\s*'
_SELECTOR_RE: Final = re.compile(rf"{_MATCHER}(?:,{_MATCHER})*")
_TOP_KEYS: Final = {"selectors", "runbook_url", "profiles", "hold", "rate_window", "thresholds", "for"}
_SELECTOR_KEYS: Final = {"collector", "target_labels"}
_PROFILE_KEYS: Final = {"scrape_interval", "evaluation_interval", "time_scale"}
_THRESHOLD_DURATIONS: Final = {"ingest_silence", "snapshot_max_age"}
_THRESHOLD_KEYS: Final = {
    "reject_ratio",
    "reject_min_per_second",
    "ingest_queue_fill",
    *_THRESHOLD_DURATIONS,
}


class _Problems:
    """Collects every problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")

    def mapping(self, raw: object, where: str, allowed: set[str] | None) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.add(where, "must be a mapping")
            return {}
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if allowed is not None and key not in allowed:
                self.add(f"{where}.{key}", "unknown key")
            else:
                out[str(key)] = value
        if allowed is not None:
            for key in sorted(allowed - set(out)):
                self.add(f"{where}.{key}", "missing")
        return out

    def duration(self, raw: object, where: str) -> int:
        try:
            return parse_duration(str(raw))
        except ValueError as err:
            self.add(where, str(err))
            return 0

    def number(self, raw: object, where: str, lo: float, hi: float) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not lo <= raw <= hi:
            self.add(where, f"must be a number in [{lo}, {hi}], got {raw!r}")
            return lo
        return float(raw)

    def strings(self, raw: object, where: str) -> tuple[str, ...]:
        if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
            self.add(where, "must be a list of non-empty strings")
            return ()
        return tuple(raw)


def parse_alert_config(raw: object) -> AlertConfig:
    """Validate the parsed YAML; AlertConfigError lists every problem."""
    p = _Problems()
    top = p.mapping(raw, "config", _TOP_KEYS)
    sel = p.mapping(top.get("selectors", {}), "selectors", _SELECTOR_KEYS)
    collector = sel.get("collector", "")
    if not isinstance(collector, str) or not _SELECTOR_RE.fullmatch(collector):
        p.add("selectors.collector", f'must be label matchers like job="posfleet", got {collector!r}')
    profiles: dict[str, Profile] = {}
    for name, body in p.mapping(top.get("profiles", {}), "profiles", None).items():
        prof = p.mapping(body, f"profiles.{name}", _PROFILE_KEYS)
        scale = prof.get("time_scale", 1)
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            p.add(f"profiles.{name}.time_scale", f"must be an integer >= 1, got {scale!r}")
            scale = 1
        profiles[name] = Profile(
            name,
            p.duration(prof.get("scrape_interval", "1s"), f"profiles.{name}.scrape_interval") or 1,
            p.duration(prof.get("evaluation_interval", "1s"), f"profiles.{name}.evaluation_interval") or 1,
            scale,
        )
    if "default" not in profiles:
        p.add("profiles.default", "missing")
    th = p.mapping(top.get("thresholds", {}), "thresholds", _THRESHOLD_KEYS)
    thresholds = Thresholds(
        reject_ratio=p.number(th.get("reject_ratio", 0.01), "thresholds.reject_ratio", 0, 1),
        reject_min_per_second=p.number(
            th.get("reject_min_per_second", 0), "thresholds.reject_min_per_second", 0, 1e6
        ),
        ingest_silence=p.duration(th.get("ingest_silence", "5m"), "thresholds.ingest_silence"),
        ingest_queue_fill=p.number(th.get("ingest_queue_fill", 0.8), "thresholds.ingest_queue_fill", 0.01, 1),
        snapshot_max_age=p.duration(th.get("snapshot_max_age", "5m"), "thresholds.snapshot_max_age"),
    )
    for_raw = p.mapping(top.get("for", {}), "for", set(ALERT_NAMES))
    runbook = top.get("runbook_url", "")
    if not isinstance(runbook, str) or "{alertname}" not in runbook:
        p.add("runbook_url", "must be a string containing {alertname}")
    cfg = AlertConfig(
        collector_selector=str(collector).strip(),
        target_labels=p.strings(sel.get("target_labels", []), "selectors.target_labels"),
        runbook_url=str(runbook),
        profiles=profiles,
        hold=p.duration(top.get("hold", "5m"), "hold"),
        rate_window=p.duration(top.get("rate_window", "5m"), "rate_window"),
        thresholds=thresholds,
        for_={name: p.duration(v, f"for.{name}") for name, v in for_raw.items()},
    )
    if not p.items:
        for profile in profiles.values():
            for problem in _timing_problems(cfg, profile):
                p.add(f"profile {profile.name}", problem)
    if p.items:
        raise AlertConfigError("; ".join(p.items))
    return cfg


def _timing_problems(cfg: AlertConfig, prof: Profile) -> list[str]:
    """Relations between durations that the alert model depends on."""
    s = prof.scale
    problems = []
    if s(cfg.for_["PosFleetMassOffline"]) >= s(cfg.for_["PosTerminalOffline"]):
        problems.append(
            "for.PosFleetMassOffline must be shorter than for.PosTerminalOffline, or per-terminal offline "
            "alerts notify before the mass-offline alert can inhibit them"
        )
    if s(cfg.for_["PosCollectorDown"]) + prof.evaluation_interval >= s(cfg.hold):
        problems.append(
            "for.PosCollectorDown plus one evaluation must be shorter than hold, or per-terminal alerts "
            "resolve for lack of data before the collector-down alert inhibits them"
        )
    if s(cfg.hold) < 2 * prof.scrape_interval:
        problems.append("hold must cover at least two scrape intervals to ride out one missed scrape")
    if s(cfg.rate_window) < 4 * prof.scrape_interval:
        problems.append("rate_window must cover at least four scrape intervals")
    return problems


def load_alert_config(path: str | Path = DEFAULT_CONFIG_PATH) -> AlertConfig:
    """Read and validate alert_rules/config.yaml."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise AlertConfigError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise AlertConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return parse_alert_config(raw)
    except AlertConfigError as err:
        raise AlertConfigError(f"{path}: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# The catalog


@dataclass(frozen=True, slots=True)
class TerminalAlert:
    """One alert over `posfleet_terminal_problem{condition=...}`."""

    name: str
    condition: str
    severity: Severity
    summary: str
    what: str  # completes "Terminal X (merchant, acquirer, site, model) ..."
    cause: str  # probable cause when the detail says nothing more specific
    causes: tuple[tuple[str, str], ...] = ()  # (detail, probable cause)
    severity_matcher: str = ""  # extra matcher on the series' own severity label


# One rule per alert of each condition in the catalogue, in its order.
TERMINAL_ALERTS: Final = tuple(
    TerminalAlert(a.name, c.name, a.severity, a.summary, a.what, a.cause, a.causes, a.severity_matcher)
    for c in CATALOGUE.values()
    for a in c.alerts
)

_OTHER_ALERTS: Final = (
    "PosUpstreamFeedStale",
    "PosAcquirerVolumeDrop",
    "PosFleetMassOffline",
    "PosCollectorDown",
    "PosCollectorMqttDisconnected",
    "PosCollectorIngestStalled",
    "PosCollectorRejectingMessages",
    "PosCollectorCardDataRejected",
    "PosCollectorIngestQueueSaturated",
    "PosCollectorSnapshotFailing",
    "PosCollectorProblemSeriesCapped",
    "PosCollectorRegistryReloadFailing",
    "PosCollectorSnapshotCorrupt",
    "PosCollectorTaskRestarting",
    "PosWatchdog",
)

ALERT_NAMES: Final = tuple(dict.fromkeys([a.name for a in TERMINAL_ALERTS] + list(_OTHER_ALERTS)))
TERMINAL_LABELS: Final = ("terminal_id", "merchant_id", "acquirer", "site", "model")


# ---------------------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True, slots=True)
class _Ctx:
    cfg: AlertConfig
    prof: Profile

    def d(self, seconds: int) -> str:
        return format_duration(self.prof.scale(seconds))

    @property
    def sel(self) -> str:
        return self.cfg.collector_selector

    @property
    def on(self) -> str:
        return ", ".join(self.cfg.target_labels)

    def held(self, metric: str, matchers: str = "") -> str:
        """Last value seen within hold: survives a failed scrape (stale markers are not in range vectors)."""
        extra = f", {matchers}" if matchers else ""
        return f"last_over_time({metric}{{{self.sel}{extra}}}[{self.d(self.cfg.hold)}])"


def _rule(
    ctx: _Ctx, name: str, expr: str, severity: Severity, summary: str, description: str, cause: str,
    extra_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    labels: dict[str, str] = {"severity": severity}
    labels.update(extra_labels or {})
    return {
        "alert": name,
        "expr": expr.strip() + "\n" if "\n" in expr.strip() else expr.strip(),
        "for": ctx.d(ctx.cfg.for_[name]),
        "labels": labels,
        "annotations": {
            "summary": summary,
            "description": description,
            "probable_cause": cause,
            "runbook_url": ctx.cfg.runbook_url.replace("{alertname}", name),
        },
    }


def _held_problem(ctx: _Ctx, matchers: str) -> str:
    """Problem series present at the target's last successful scrape (within hold), by terminal."""
    return _held_sparse(ctx, "posfleet_terminal_problem", matchers, ", ".join(TERMINAL_LABELS))


def _held_sparse(ctx: _Ctx, metric: str, matchers: str, by: str) -> str:
    """Series of a sparse family (present only while something is wrong) that were present at the target's last
    successful scrape (within hold): a failed scrape keeps them, a scrape without them ends them at once."""
    window = f"[{ctx.d(ctx.cfg.hold)}:{format_duration(ctx.prof.scrape_interval)}]"
    return (
        f"max by ({by}) (\n"
        f"  last_over_time(timestamp({metric}{{{ctx.sel}, {matchers}}}){window})\n"
        f"  == on ({ctx.on}) group_left ()\n"
        f"  last_over_time(timestamp(posfleet_up{{{ctx.sel}}}){window})\n"
        f")"
    )


def _held_current(ctx: _Ctx, metric: str, by: str) -> str:
    """The last value (within hold) of a dense family, from the targets that still exported it at their last
    successful scrape: a failed scrape keeps it, a collector that stopped exporting it (partitioned collectors:
    the fleet leader changed, collector/cluster/fleetwide.py) no longer counts while it is up, so the new
    exporter's value is the answer at once."""
    window = f"[{ctx.d(ctx.cfg.hold)}:{format_duration(ctx.prof.scrape_interval)}]"
    return (
        f"max by ({by}) (\n"
        f"  {ctx.held(metric)}\n"
        f"  and on ({ctx.on}, {by}) (\n"
        f"    last_over_time(timestamp({metric}{{{ctx.sel}}}){window})\n"
        f"    == on ({ctx.on}) group_left ()\n"
        f"    last_over_time(timestamp(posfleet_up{{{ctx.sel}}}){window})\n"
        f"  )\n"
        f")"
    )


def _terminal_rule(ctx: _Ctx, a: TerminalAlert) -> dict[str, Any]:
    matchers = f'condition="{a.condition}"' + (f", {a.severity_matcher}" if a.severity_matcher else "")
    # The detail is not part of the alert's identity (it may change while the condition stays active); it is
    # looked up for the text, from the last known sample so a failed scrape does not blank it.
    series = f'posfleet_terminal_problem{{{ctx.sel}, condition="{a.condition}", terminal_id=%[1]q}}'
    lookup = (
        '{{ $detail := "" }}{{ with printf `'
        + f"{series} or last_over_time({series}[{ctx.d(ctx.cfg.hold)}])"
        + '` $labels.terminal_id | query }}{{ $detail = (. | first | label "detail") }}{{ end }}'
    )
    who = (
        "Terminal {{ $labels.terminal_id }} (merchant {{ $labels.merchant_id }}, acquirer {{ $labels.acquirer }}, "
        "site {{ $labels.site }}, model {{ $labels.model }}) "
    )
    if a.causes:
        branches = "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq $detail "{detail}" }}}}{text}'
            for i, (detail, text) in enumerate(a.causes)
        )
        cause = f"{lookup}{branches}{{{{ else }}}}{a.cause}{{{{ end }}}}"
    else:
        cause = a.cause
    description = (lookup if "$detail" in a.what else "") + who + a.what
    return _rule(ctx, a.name, _held_problem(ctx, matchers), a.severity, a.summary, description, cause)


def _fleet_rules(ctx: _Ctx) -> list[dict[str, Any]]:
    rules = [
        _rule(
            ctx, "PosUpstreamFeedStale",
            f"{_held_current(ctx, 'posfleet_acquirer_feed_stale', 'acquirer')} == 1",
            "critical",
            "Acquirer transaction feed is silent.",
            "The collector has received nothing from the transaction feed of acquirer {{ $labels.acquirer }} for "
            "longer than its feed_stale_s threshold. Whether this acquirer records its terminals' payments cannot "
            "be checked meanwhile (upstream-missing alerts are suspended for it).",
            "Announced host maintenance or an outage at the acquirer, or the feed connection between the "
            "acquirer and the broker is broken (credentials, certificate, network).",
        ),
        # The collector decides it against the acquirer's learned baseline (collector.fleet.activity); the rule
        # adds `for` and the hold across failed scrapes.
        _rule(
            ctx, "PosAcquirerVolumeDrop",
            f"max by (acquirer) ({ctx.held('posfleet_acquirer_volume_drop')}) == 1",
            "warning",
            "Acquirer records far fewer transactions than usual.",
            "The transaction feed of acquirer {{ $labels.acquirer }} still arrives but has recorded far fewer of "
            "its terminals' transactions over the last 10-30 minutes than its learned baseline expects for this "
            "hour (posfleet_acquirer_volume_usual_per_hour). Its host may be declining or losing transactions.",
            "The acquirer's host is failing (declines, lost or delayed transactions) before its feed stops, a "
            "regional outage or an unannounced public holiday.",
        ),
    ]
    # The collector decides a mass outage itself (share, minimum and hysteresis in its thresholds.mass_offline_*)
    # and exports it as a sparse series; the rule only adds `for` and the hold across failed scrapes.
    for scope, by in (("site", "acquirer, site"), ("acquirer", "acquirer")):
        where = "site {{ $labels.site }} of acquirer {{ $labels.acquirer }}" if scope == "site" else (
            "acquirer {{ $labels.acquirer }}"
        )
        rules.append(_rule(
            ctx, "PosFleetMassOffline",
            _held_sparse(ctx, "posfleet_fleet_mass_offline", f'scope="{scope}"', by),
            "critical",
            f"Many POS terminals of one {scope} are offline together.",
            f"At least the collector's mass_offline_share of the terminals of {where} that should be online are "
            "offline at once (GET /api/v1/sites has the counts). One shared cause (power, network, broker or "
            "acquirer) rather than many terminal faults; the per-terminal offline alerts it covers are inhibited.",
            "A power cut or network outage at the site, the shop's internet uplink or mobile operator down, or "
            "the terminals cannot reach the MQTT broker (DNS, firewall, broker certificate).",
            {"scope": scope},
        ))
    return rules


def _collector_rules(ctx: _Ctx) -> list[dict[str, Any]]:
    cfg, th, sel, on = ctx.cfg, ctx.cfg.thresholds, ctx.sel, ctx.on
    w = ctx.d(cfg.rate_window)
    ignore = 'reason!~"duplicate|stale|card_data"'
    rejected = f"sum by ({on}, reason) (rate(posfleet_messages_rejected_total{{{sel}, {ignore}}}[{w}]))"
    expected_online = (
        f"(sum by ({on}) ({ctx.held('posfleet_fleet_terminals')})"
        f" - sum by ({on}) ({ctx.held('posfleet_fleet_shutdown_terminals')})) > 0"
    )
    return [
        _rule(
            ctx, "PosCollectorDown",
            f'up{{{sel}}} == 0 or absent(up{{{sel}}})',
            "critical",
            "posfleet collector cannot be scraped.",
            "Prometheus cannot scrape the posfleet collector{{ with $labels.instance }} {{ . }}{{ else }}: it has "
            "no such target{{ end }}. Nothing about the terminals is known meanwhile; per-terminal alerts are "
            "inhibited.",
            "The collector process is down or restarting (crash, OOM, failed deploy), its host is down, or the "
            "scrape is blocked (network, firewall, wrong address in the scrape config).",
        ),
        _rule(
            ctx, "PosCollectorMqttDisconnected",
            f"{ctx.held('posfleet_mqtt_connected')} == 0",
            "critical",
            "posfleet collector is not connected to the MQTT broker.",
            "The collector {{ $labels.instance }} is not connected and subscribed to the MQTT broker. No "
            "heartbeat is received, so terminal states are frozen; per-terminal alerts are inhibited.",
            "The broker is down or restarting, the network between collector and broker is broken, or the broker "
            "refuses the collector (credentials, certificate, client id taken by another process).",
        ),
        _rule(
            ctx, "PosCollectorIngestStalled",
            f"(time() - {ctx.held('posfleet_mqtt_last_message_seconds')}) > {ctx.prof.scale(th.ingest_silence)}\n"
            f"and on ({on}) {ctx.held('posfleet_mqtt_connected')} == 1\n"
            f"and on ({on}) {expected_online}",
            "critical",
            "posfleet collector is connected but receives no messages.",
            "The collector {{ $labels.instance }} reports an MQTT connection but has received no message for "
            "{{ $value | humanizeDuration }} while terminals should be online. It is deaf: every terminal will "
            "look offline; per-terminal alerts are inhibited.",
            "The MQTT client's connection task ended or its subscription was lost after a reconnect, or terminals "
            "publish to a different broker or topic prefix than the collector subscribes to.",
        ),
        _rule(
            ctx, "PosCollectorRejectingMessages",
            f"(\n  {rejected}\n  / on ({on}) group_left ()\n"
            f"  sum by ({on}) (rate(posfleet_messages_total{{{sel}}}[{w}]))\n) > {th.reject_ratio:g}\n"
            f"and\n{rejected} > {th.reject_min_per_second:g}",
            "warning",
            "posfleet collector rejects many messages.",
            "{{ $value | humanizePercentage }} of the messages reaching collector {{ $labels.instance }} are "
            "rejected as {{ $labels.reason }}. The terminals sending them look silent and will turn offline.",
            "A firmware or payment-app update changed the message format, a misconfigured batch of terminals "
            "uses wrong ids or topics, or something other than a terminal publishes on the terminal topics.",
        ),
        _rule(
            ctx, "PosCollectorCardDataRejected",
            f'sum by ({on}) (increase(posfleet_messages_rejected_total{{{sel}, reason="card_data"}}[{w}])) > 0',
            "critical",
            "A terminal message carried what looks like card data.",
            "The collector {{ $labels.instance }} rejected messages containing what looks like a card number "
            "(PAN) in the last {w}. The payload was dropped and never logged, but card data left a terminal in "
            "telemetry: this is a PCI DSS incident to investigate.".replace("{w}", w),
            "A payment-app or firmware bug, or a debug build, writes card data into status messages.",
        ),
        _rule(
            ctx, "PosCollectorIngestQueueSaturated",
            f"{ctx.held('posfleet_ingest_queue_depth')}\n/ {ctx.held('posfleet_ingest_queue_capacity')}\n"
            f"> {th.ingest_queue_fill:g}",
            "warning",
            "posfleet collector cannot keep up with incoming messages.",
            "The ingest queue of collector {{ $labels.instance }} is {{ $value | humanizePercentage }} full. "
            "When it fills, the broker holds and then drops messages and terminals look offline.",
            "A message burst (mass reconnect after an outage), a fleet larger than one collector handles, or the "
            "collector starved of CPU.",
        ),
        _rule(
            ctx, "PosCollectorSnapshotFailing",
            f"{ctx.held('posfleet_snapshot_age_seconds')} > {ctx.prof.scale(th.snapshot_max_age)}",
            "warning",
            "posfleet collector cannot save its state.",
            "The collector {{ $labels.instance }} has not written a state snapshot for "
            "{{ $value | humanizeDuration }}. A restart now loses terminal state since then.",
            "The snapshot directory is full, read-only or missing permissions, or snapshots are disabled "
            "(state.snapshot_path unset).",
        ),
        _rule(
            ctx, "PosCollectorProblemSeriesCapped",
            f"{ctx.held('posfleet_terminal_problem_series_dropped')} > 0",
            "warning",
            "Some per-terminal problems are not exported (series cap reached).",
            "The collector {{ $labels.instance }} left {{ $value }} problem series out of its metrics because of "
            "metrics.max_problem_series. Per-terminal alerts for those terminals are missing.",
            "A fleet-wide incident put more terminals into problem conditions than the cap, or the cap is too low "
            "for this fleet.",
        ),
        _rule(
            ctx, "PosCollectorRegistryReloadFailing",
            f'sum by ({on}) (increase(posfleet_registry_reloads_total{{{sel}, result="error"}}[{w}])) > 0',
            "warning",
            "posfleet collector cannot reload the terminal registry.",
            "The collector {{ $labels.instance }} failed to reload the terminal registry. It keeps using the last "
            "good registry: terminals added since are reported as unregistered.",
            "The registry file has a syntax error, a duplicate terminal id or bad encoding, or is unreadable.",
        ),
        _rule(
            ctx, "PosCollectorSnapshotCorrupt",
            f"{ctx.held('posfleet_snapshot_corrupt_files')} > 0",
            "warning",
            "posfleet collector found a corrupt state snapshot and started without it.",
            "The collector {{ $labels.instance }} set {{ $value }} corrupt state snapshot file(s) aside "
            "(<snapshot path>.corrupt-*) and restored from the previous snapshot generation or an empty state "
            "(see posfleet_snapshot_restore). Terminal state since then was lost: a wave of offline alerts for "
            "terminals that are merely quiet is possible in the next minutes.",
            "The disk or file system corrupted the file (full disk or power loss during a write on storage that "
            "ignores fsync, a failing disk), or something else wrote to the snapshot path.",
        ),
        _rule(
            ctx, "PosCollectorTaskRestarting",
            f'sum by ({on}, task) (increase(posfleet_task_restarts_total{{{sel}}}[{w}])) > 0',
            "warning",
            "A background task of the posfleet collector died and was restarted.",
            "The background task {{ $labels.task }} of collector {{ $labels.instance }} died with an exception "
            "and was restarted in the last {w}. While it is down its work stops (tick: offline detection; "
            "consume: all messages; snapshot: state saving; registry: registry reloads) and /readyz says not "
            "ready. If it keeps dying the collector exits and PosCollectorDown takes over.".replace("{w}", w),
            "A bug in the collector hit by unusual data or state (the traceback is in the collector's log), or "
            "a resource it needs failing (disk, memory).",
        ),
    ]


def _watchdog(ctx: _Ctx) -> dict[str, Any]:
    return _rule(
        ctx, "PosWatchdog", "vector(1)", "none",
        "Alerting pipeline is alive (dead man's switch).",
        "Always firing. It proves Prometheus evaluates posfleet's rules and Alertmanager delivers them; the "
        "external dead man's switch pages when this alert stops arriving.",
        "If this stops arriving: Prometheus or Alertmanager is down, or the route to the dead man's switch is "
        "broken.",
    )


def build_groups(cfg: AlertConfig, profile: str = "default") -> list[dict[str, Any]]:
    """The rule groups of a profile as plain data."""
    ctx = _Ctx(cfg, cfg.profile(profile))
    interval = format_duration(ctx.prof.evaluation_interval)
    return [
        {"name": "posfleet-terminals", "interval": interval,
         "rules": [_terminal_rule(ctx, a) for a in TERMINAL_ALERTS]},
        {"name": "posfleet-fleet", "interval": interval, "rules": _fleet_rules(ctx)},
        {"name": "posfleet-collector", "interval": interval, "rules": _collector_rules(ctx)},
        {"name": "posfleet-meta", "interval": interval, "rules": [_watchdog(ctx)]},
    ]


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so expressions stay readable in the committed file."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def rule_file_name(profile: str) -> str:
    """posfleet.rules.yml for the default profile, posfleet-<profile>.rules.yml otherwise."""
    return "posfleet.rules.yml" if profile == "default" else f"posfleet-{profile}.rules.yml"


def render_rules(cfg: AlertConfig, profile: str = "default") -> str:
    """The text of the rule file for a profile."""
    header = (
        f"# GENERATED by `posfleet rules render --profile {profile}` from alert_rules/config.yaml. Do not edit:\n"
        "# change the config (or exporters/alerting/rules.py) and re-render; CI fails when this file drifts.\n"
        if profile == "default"
        else f"# GENERATED by `posfleet rules render --profile {profile}` from alert_rules/config.yaml, for tests "
        "and demos: every duration divided by the profile's time_scale. Not for production.\n"
    )
    body = yaml.dump(
        {"groups": build_groups(cfg, profile)}, Dumper=_Dumper, sort_keys=False, width=1_000_000, allow_unicode=True
    )
    return header + str(body)


def latency_budget(cfg: AlertConfig, profile: str = "default") -> dict[str, int]:
    """Worst case seconds from a condition showing in /metrics to the alert firing in Alertmanager, per alert."""
    prof = cfg.profile(profile)
    per_terminal = {a.name for a in TERMINAL_ALERTS}
    # A condition appears in /metrics, waits up to one scrape, then up to one evaluation to go pending, then
    # `for` rounded up to whole evaluations; Prometheus sends firing alerts right after the evaluation.
    # Per-terminal rules read a subquery whose steps are aligned to the clock, not to the evaluation: up to one
    # more step (= scrape interval) before a new sample is seen.
    out: dict[str, int] = {}
    for name in ALERT_NAMES:
        f = prof.scale(cfg.for_[name])
        evals = -(-f // prof.evaluation_interval) * prof.evaluation_interval
        step = prof.scrape_interval if name in per_terminal else 0
        out[name] = prof.scrape_interval + prof.evaluation_interval + step + evals
    return out
