"""`posfleet diagnose` and `posfleet reconcile`: thin clients of a running collector's API, or (reconcile) an
offline comparison of a settlement CSV with an export of receipts. The token comes from --token-file or the
POSFLEET_TOKEN environment variable, never from the command line (it would show in `ps` and shell history).

Exit codes: 0 nothing wrong / nothing unreconciled, 1 a problem / unreconciled transactions found, 2 error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from collector.support.reconcile import (
    Completed,
    Progress,
    Recorded,
    SettlementError,
    Window,
    day_window,
    parse_time,
    read_receipts,
    read_settlement,
    reconcile,
)

__all__ = ["register"]

DEFAULT_URL = "http://127.0.0.1:9108"


class CliError(Exception):
    """A failure to report on stderr with exit code 2."""


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as err:
            raise CliError(f"cannot read token file {args.token_file}: {err.strerror}") from None
        if not token:
            raise CliError(f"token file {args.token_file} is empty")
        return token
    return os.environ.get("POSFLEET_TOKEN") or None


def _get(args: argparse.Namespace, path: str, params: dict[str, str] | None = None) -> bytes:
    url = args.url.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    token = _token(args)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read()).get("error", "")
        except ValueError:
            message = ""
        hint = {401: " (no or wrong token: use --token-file or POSFLEET_TOKEN)",
                403: " (the token's scope does not cover this)", 404: ""}.get(err.code, "")
        raise CliError(f"{url.split('?')[0]}: HTTP {err.code} {message}{hint}".rstrip()) from None
    except (urllib.error.URLError, OSError) as err:
        raise CliError(f"cannot reach the collector at {args.url}: {getattr(err, 'reason', err)}") from None


def _seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, not negative (nan and inf would reach JSON and urllib)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more: {text!r}")
    return value


def _count(text: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("POSFLEET_URL", DEFAULT_URL),
                   help=f"collector API base URL (default $POSFLEET_URL or {DEFAULT_URL})")
    p.add_argument("--token-file", help="file holding the API token (else $POSFLEET_TOKEN)")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="HTTP timeout in seconds (default 30)")
    p.add_argument("--json", action="store_true", help="print the JSON answer instead of text")


# ---- diagnose -------------------------------------------------------------------------------------------------
def _fmt_evidence(ev: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in ev.items() if v is not None and v != [])


def _print_diagnosis(d: dict[str, Any], out: IO[str]) -> None:
    w = out.write
    w(f"Terminal {d['terminal_id']}  merchant {d['merchant_id'] or '-'}  acquirer {d['acquirer']}  "
      f"site {d['site']}  (as of {d['at']})\n\n")
    w(("OK: " if d["healthy"] else "PROBLEM: ") + d["summary"] + "\n")
    p = d["primary_cause"]
    if p:
        w(f"\nPrimary cause: {p['code']} ({p['severity']}, since {p['since']})\n  {p['cause']}\n")
        w(f"  evidence: {_fmt_evidence(p['evidence'])}\n")
    if d["other_findings"]:
        w("\nOther findings:\n")
        for f in d["other_findings"]:
            w(f"  - {f['code']} ({f['severity']}, since {f['since']}): {f['cause']}\n")
            w(f"    evidence: {_fmt_evidence(f['evidence'])}\n")
    w("\nChecklist:\n")
    for s in d["checklist"]:
        w(f"  {s['n']}. [{s['status'].upper():7}] {s['title']}: {_fmt_evidence(s['evidence'])}\n")
    w("\nNext steps:\n")
    for n, step in enumerate(d["next_steps"], start=1):
        w(f"  {n}. {step}\n")
    w("\nTell the merchant:\n")
    w(f"  EN: {d['merchant_message']['en']}\n")
    w(f"  中文: {d['merchant_message']['zh-CN']}\n")


def _diagnose(args: argparse.Namespace) -> int:
    try:
        body = _get(args, f"/api/v1/terminals/{urllib.parse.quote(args.terminal_id, safe='')}/diagnosis")
    except CliError as err:
        print(f"posfleet diagnose: {err}", file=sys.stderr)
        return 2
    d = json.loads(body)
    if args.json:
        sys.stdout.write(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    else:
        _print_diagnosis(d, sys.stdout)
    return 0 if d["healthy"] else 1


# ---- reconcile ------------------------------------------------------------------------------------------------
def _window_params(args: argparse.Namespace) -> dict[str, str]:
    params = {}
    if args.day:
        params["day"] = args.day
    if args.start:
        params["from"] = args.start
    if args.end:
        params["to"] = args.end
    return params


def _scope_params(args: argparse.Namespace) -> dict[str, str]:
    for key, value in (("terminal_id", args.terminal), ("merchant_id", args.merchant), ("acquirer", args.acquirer)):
        if value:
            return {key: value}
    return {}


def _offline(args: argparse.Namespace) -> dict[str, Any]:
    try:
        if args.day:
            window = day_window(args.day)
        else:
            now = time.time()
            window = Window(parse_time(args.start) if args.start else now - 86_400,
                            parse_time(args.end) if args.end else now + 1)
    except ValueError as err:
        raise CliError(f"bad --day/--from/--to: {err}") from None
    grace = args.grace
    if grace is None:
        from collector.config import ConfigError, load_config

        try:
            grace = load_config(args.config).thresholds.upstream_grace_s
        except ConfigError as err:
            raise CliError(str(err)) from None
    try:
        with open(args.receipts, "rb") as fh:
            completed = [c for c in read_receipts(fh) if _in_scope_completed(c, args)]
    except OSError as err:
        raise CliError(f"cannot read receipts {args.receipts}: {err.strerror}") from None
    merchant_of = {c.terminal_id: c.merchant_id for c in completed}
    acquirer_of = {c.terminal_id: c.acquirer for c in completed}
    show = args.progress or sys.stderr.isatty()
    try:
        size = os.path.getsize(args.settlement)
        progress = Progress(size) if show else None
        rows = read_settlement(args.settlement, progress, acquirer=args.acquirer or "")

        def recorded() -> Any:
            for r in rows:
                if args.terminal and r.terminal_id != args.terminal:
                    continue
                if args.merchant and (r.merchant_id or merchant_of.get(r.terminal_id)) != args.merchant:
                    continue
                if args.acquirer and (r.acquirer or acquirer_of.get(r.terminal_id)) != args.acquirer:
                    continue
                yield Recorded(r.terminal_id, r.txn_id, r.ts, r.recorded_at,
                               r.merchant_id or merchant_of.get(r.terminal_id, ""),
                               r.acquirer or acquirer_of.get(r.terminal_id, ""), r.amount_minor, r.currency)

        report = reconcile(completed, recorded(), window, time.time(), grace, args.limit)
    except OSError as err:
        raise CliError(f"cannot read settlement file {args.settlement}: {err.strerror}") from None
    except SettlementError as err:
        raise CliError(str(err)) from None
    body = report.to_dict()
    body["scope"] = _scope_params(args)
    return body


def _in_scope_completed(c: Completed, args: argparse.Namespace) -> bool:
    return not ((args.terminal and c.terminal_id != args.terminal)
                or (args.merchant and c.merchant_id != args.merchant)
                or (args.acquirer and c.acquirer != args.acquirer))


def _print_report(r: dict[str, Any], out: IO[str]) -> None:
    w = out.write
    scope = ", ".join(f"{k}={v}" for k, v in r.get("scope", {}).items()) or "everything visible"
    w(f"Reconciliation of {scope}, {r['window']['from']} .. {r['window']['to']} (grace {r['grace_s']:g} s)\n")
    for key, title in (("missing_at_acquirer", "Completed on the terminal, not recorded by the acquirer"),
                       ("unknown_to_terminal", "Recorded by the acquirer, not completed on a terminal")):
        items = r[key]
        total = r["totals"][key]
        w(f"\n{title}: {total}\n")
        for x in items:
            when = x.get("received_at") or x.get("ts") or x.get("recorded_at")
            amount = "" if x.get("amount_minor") is None else f"  {x['amount_minor']} {x.get('currency') or ''}"
            w(f"  {x['terminal_id']:<12} {x['txn_id']:<24} {when}  age {x['age_s']:>9.0f} s  "
              f"merchant {x['merchant_id'] or '-'}{amount}\n")
        if total > len(items):
            w(f"  ... {total - len(items)} more (raise --limit)\n")
    w(f"\nPending (within the grace period, not missing yet): {r['totals']['pending']}\n")
    w("\nPer merchant:\n")
    w(f"  {'merchant':<14}{'completed':>10}{'recorded':>10}{'matched':>10}{'pending':>9}{'missing':>9}"
      f"{'unknown':>9}  missing amount (minor units)\n")
    for mid, s in r["merchants"].items():
        amount = ", ".join(f"{v} {k}" for k, v in s["missing_amount_minor"].items()) or "-"
        w(f"  {mid or '-':<14}{s['completed']:>10}{s['recorded']:>10}{s['matched']:>10}{s['pending']:>9}"
          f"{s['missing_at_acquirer']:>9}{s['unknown_to_terminal']:>9}  {amount}\n")


def _reconcile(args: argparse.Namespace) -> int:
    try:
        if args.settlement or args.receipts:
            if not (args.settlement and args.receipts):
                raise CliError("offline mode needs both --settlement and --receipts")
            body = _offline(args)
        else:
            params = {**_scope_params(args), **_window_params(args), "limit": str(args.limit)}
            if args.export_receipts:
                data = _get(args, "/api/v1/receipts", {k: v for k, v in params.items() if k != "limit"})
                with open(args.export_receipts, "wb") as fh:
                    fh.write(data)
                n = data.count(b"\n")
                print(f"wrote {n} receipts to {args.export_receipts}", file=sys.stderr)
                return 0
            if args.grace is not None:
                params["grace_s"] = str(args.grace)
            body = json.loads(_get(args, "/api/v1/reconcile", params))
    except CliError as err:
        print(f"posfleet reconcile: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"posfleet reconcile: {err}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    else:
        _print_report(body, sys.stdout)
    unreconciled = body["totals"]["missing_at_acquirer"] + body["totals"]["unknown_to_terminal"]
    return 1 if unreconciled else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `diagnose` and `reconcile`."""
    # allow_abbrev=False: `--token SECRET` must not silently mean `--token-file SECRET`.
    p = sub.add_parser("diagnose", allow_abbrev=False,
                       help="why can't this terminal's transactions be found? (asks the collector)",
                       description="Walk the support checklist for one terminal: primary cause with evidence, other "
                       "findings, next steps, and a message for the merchant. Exit 0 healthy, 1 problem, 2 error.")
    p.add_argument("terminal_id")
    _add_client_args(p)
    p.set_defaults(handler=_diagnose)

    p = sub.add_parser("reconcile", allow_abbrev=False,
                       help="transactions completed but not recorded by the acquirer, and the reverse",
                       description="Against a running collector (default) or offline: --settlement CSV + "
                       "--receipts (JSON lines from --export-receipts). Exit 0 reconciled, 1 differences, 2 error.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--terminal", help="one terminal id")
    scope.add_argument("--merchant", help="one merchant id")
    scope.add_argument("--acquirer", help="one acquirer id")
    p.add_argument("--day", help="a UTC day YYYY-MM-DD (default: the last 24 hours)")
    p.add_argument("--from", dest="start", help="window start: Unix seconds or ISO 8601 (UTC when naive)")
    p.add_argument("--to", dest="end", help="window end (exclusive)")
    p.add_argument("--settlement", help="offline: the acquirer's settlement CSV (terminal_id, txn_id[, ts, ...])")
    p.add_argument("--receipts", help="offline: receipts as JSON lines (from --export-receipts)")
    p.add_argument("--export-receipts", metavar="FILE", help="save the collector's receipts to FILE and exit")
    p.add_argument("--grace", type=_seconds, help="grace period in seconds (default: thresholds.upstream_grace_s)")
    p.add_argument("--config", help="offline: collector config to take the grace period from")
    p.add_argument("--limit", type=_count, default=1000, help="list at most this many items per direction")
    p.add_argument("--progress", action="store_true", help="show a progress bar even when stderr is not a tty")
    _add_client_args(p)
    p.set_defaults(handler=_reconcile)
