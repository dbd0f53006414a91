"""`posfleet rules` (render/check the Prometheus alert rules) and `posfleet maintenance` (Alertmanager silences).

Argument parsing and wiring only: the rules come from exporters.alerting.rules, the silences from
exporters.alerting.alertmanager.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from exporters.alerting import alertmanager as am
from exporters.alerting import rules

__all__ = ["register"]

DEFAULT_ALERTMANAGER: str = "http://127.0.0.1:9093"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this module's subcommands."""
    p_rules = sub.add_parser("rules", help="render or check the Prometheus alert rules")
    rules_sub = p_rules.add_subparsers(dest="rules_command", required=True, metavar="ACTION")
    render = rules_sub.add_parser("render", help="write the rule file of a profile")
    render.add_argument("--profile", default="default", help="default (committed) or fast (tests, demos)")
    render.add_argument(
        "--out", help="directory to write to, or - for stdout (default: alert_rules/ for the default profile, "
        "stdout otherwise)"
    )
    render.add_argument("--config", default=str(rules.DEFAULT_CONFIG_PATH), help="thresholds and selectors")
    render.set_defaults(handler=_rules_render)
    check = rules_sub.add_parser("check", help="exit 1 with a diff when the committed rules drift from the config")
    check.add_argument("--config", default=str(rules.DEFAULT_CONFIG_PATH), help="thresholds and selectors")
    check.add_argument("--rules", default=str(rules.DEFAULT_RULES_PATH), help="committed default-profile file")
    check.add_argument("--runbooks", type=Path, default=rules.RUNBOOKS_DIR, help="folder of <AlertName>.md runbooks")
    check.set_defaults(handler=_rules_check)

    p_maint = sub.add_parser("maintenance", help="maintenance windows as Alertmanager silences")
    maint_sub = p_maint.add_subparsers(dest="maintenance_command", required=True, metavar="ACTION")
    url_help = "Alertmanager base URL (default $POSFLEET_ALERTMANAGER_URL or " + DEFAULT_ALERTMANAGER + ")"
    start = maint_sub.add_parser("start", help="silence an acquirer, a merchant or terminals for a while")
    what = start.add_mutually_exclusive_group(required=True)
    what.add_argument("--acquirer", help="every alert of this acquirer (or, with --kind host, its host's)")
    what.add_argument("--merchant", help="every alert of this merchant's terminals")
    what.add_argument(
        "--terminal", action="append", dest="terminals", metavar="ID", help="a terminal id (repeatable)"
    )
    start.add_argument(
        "--kind", choices=("all", "host"), default="all",
        help="all: every alert of the scope; host: announced acquirer host maintenance (mutes upstream-missing "
        "and feed-stale only, never terminal faults)",
    )
    start.add_argument("--reason", required=True, help="why (becomes the silence's comment)")
    start.add_argument("--author", default=None, help="who (default $USER)")
    until = start.add_mutually_exclusive_group(required=True)
    until.add_argument("--until", help="end time, ISO 8601 (e.g. 2026-12-01T06:00+01:00; no zone = local time)")
    until.add_argument("--duration", help="length, e.g. 90m, 2h, 1h30m")
    start.add_argument("--alertmanager", default=None, help=url_help)
    start.set_defaults(handler=_maintenance_start)
    lst = maint_sub.add_parser("list", help="list maintenance windows")
    lst.add_argument("--all", action="store_true", help="also expired ones and silences not made by posfleet")
    lst.add_argument("--alertmanager", default=None, help=url_help)
    lst.set_defaults(handler=_maintenance_list)
    end = maint_sub.add_parser("end", help="end maintenance windows now")
    end.add_argument("ids", nargs="+", metavar="ID", help="silence id as printed by start/list")
    end.add_argument("--alertmanager", default=None, help=url_help)
    end.set_defaults(handler=_maintenance_end)


# ---------------------------------------------------------------------------------------------------------------
# rules


def _rules_render(args: argparse.Namespace) -> int:
    try:
        cfg = rules.load_alert_config(args.config)
        text = rules.render_rules(cfg, args.profile)
    except rules.AlertConfigError as err:
        print(f"posfleet rules render: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else (
        str(rules.DEFAULT_RULES_PATH.parent) if args.profile == "default" else "-"
    )
    if out == "-":
        sys.stdout.write(text)
        return 0
    target = Path(out) / rules.rule_file_name(args.profile)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


def _rules_check(args: argparse.Namespace) -> int:
    try:
        cfg = rules.load_alert_config(args.config)
        expected = rules.render_rules(cfg, "default")
    except rules.AlertConfigError as err:
        print(f"posfleet rules check: {err}", file=sys.stderr)
        return 2
    path = Path(args.rules)
    try:
        actual = path.read_text(encoding="utf-8")
    except OSError as err:
        print(f"posfleet rules check: cannot read {path}: {err.strerror}", file=sys.stderr)
        return 1
    status = 0
    if actual != expected:
        sys.stdout.writelines(
            difflib.unified_diff(
                actual.splitlines(keepends=True), expected.splitlines(keepends=True),
                f"{path} (committed)", f"{path} (rendered from {args.config})",
            )
        )
        print(f"\n{path} drifted from its config: run `posfleet rules render` and commit the result.",
              file=sys.stderr)
        status = 1
    missing = [n for n in rules.ALERT_NAMES if not (args.runbooks / f"{n}.md").is_file()]
    if missing:
        print(f"posfleet rules check: no runbook {args.runbooks}/<name>.md for: {', '.join(missing)}",
              file=sys.stderr)
        status = 1
    if status == 0:
        print(f"{path} is up to date ({len(rules.ALERT_NAMES)} alerts, every one with a runbook)")
    return status


# ---------------------------------------------------------------------------------------------------------------
# maintenance


def _client(args: argparse.Namespace) -> am.AlertmanagerClient:
    url = args.alertmanager or os.environ.get("POSFLEET_ALERTMANAGER_URL") or DEFAULT_ALERTMANAGER
    return am.AlertmanagerClient(url)


def parse_until(text: str, now: datetime) -> datetime:
    """ISO 8601 end time; without a zone it is local time. ValueError when unparsable or in the past."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--until {text!r} is not an ISO 8601 time like 2026-12-01T06:00+01:00") from None
    when = when.astimezone() if when.tzinfo is None else when
    if when <= now:
        raise ValueError(f"--until {text!r} is in the past")
    return when


def window_end(until: str | None, duration: str | None, now: datetime) -> datetime:
    """End of the window from --until or --duration."""
    if until is not None:
        return parse_until(until, now)
    seconds = rules.parse_duration(duration or "")
    if seconds <= 0:
        raise ValueError("--duration must be positive")
    return now + timedelta(seconds=seconds)


def _maintenance_start(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    author = args.author or os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    try:
        scope = am.Scope(args.acquirer, args.merchant, tuple(args.terminals or ()))
        spec = am.maintenance_silence(
            scope,
            cast(am.Kind, args.kind),
            starts_at=now,
            ends_at=window_end(args.until, args.duration, now),
            author=author,
            reason=args.reason,
        )
    except ValueError as err:
        print(f"posfleet maintenance start: {err}", file=sys.stderr)
        return 2
    try:
        silence_id = _client(args).create_silence(spec)
    except am.AlertmanagerError as err:
        print(f"posfleet maintenance start: {err}", file=sys.stderr)
        return 1
    matchers = ", ".join(str(m) for m in spec.matchers)
    print(f"{silence_id}\tuntil {spec.to_api()['endsAt']}\t{{{matchers}}}")
    return 0


def _maintenance_list(args: argparse.Namespace) -> int:
    try:
        silences = _client(args).list_silences()
    except am.AlertmanagerError as err:
        print(f"posfleet maintenance list: {err}", file=sys.stderr)
        return 1
    shown = [s for s in silences if args.all or (s.is_maintenance and s.state in ("active", "pending"))]
    shown.sort(key=lambda s: (s.ends_at, s.id))
    if not shown:
        print("no maintenance windows")
        return 0
    print("ID\tSTATE\tENDS\tBY\tMATCHERS\tREASON")
    for s in shown:
        matchers = ", ".join(str(m) for m in s.matchers)
        print(f"{s.id}\t{s.state}\t{s.ends_at}\t{s.created_by}\t{{{matchers}}}\t{s.comment}")
    return 0


def _maintenance_end(args: argparse.Namespace) -> int:
    client = _client(args)
    status = 0
    for silence_id in args.ids:
        try:
            client.expire_silence(silence_id)
        except am.AlertmanagerError as err:
            print(f"posfleet maintenance end: {silence_id}: {err}", file=sys.stderr)
            status = 1
        else:
            print(f"ended {silence_id}")
    return status
