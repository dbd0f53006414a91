"""Support features wired into a collector: the transaction ledger, diagnosis, reconciliation and timeline API,
and the /support page.

`install(host)` only appends to the collector's hook lists and registers one metrics collector; the decisions
live in diagnose.py and reconcile.py, the bounded storage in ledger.py. Every endpoint filters by the token's
acquirers the same way `collector.http.routes.visible_terminal` does: a terminal the token may not see does not
exist.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from importlib import resources
from typing import Final, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as MetricsCollector

from collector.fleet.detect import CONDITIONS
from collector.fleet.hooks import MessageSink, TransitionSink
from collector.fleet.protocol import Message, TxnReceipt, UpstreamBatch
from collector.fleet.state import Fleet, Terminal, Transition
from collector.http.host import RouteHook
from collector.http.routes import COLLECTOR, json_error, json_response, principal_of, strict_dumps, visible_terminal
from collector.support.diagnose import LedgerFacts, diagnose, facts_from
from collector.support.ledger import Ledger, LedgerLimits, condition_intervals
from collector.support.reconcile import Completed, Recorded, Window, day_window, parse_time, reconcile

__all__ = ["LEDGER", "install", "ledger_facts"]

LEDGER: web.AppKey[Ledger] = web.AppKey("ledger")
STATIC: Final = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# No inline script, no third-party origin: a token sits in sessionStorage, so injected script must not run.
# A grace period longer than the ledger could ever hold (a year) is a typo, not a question.
MAX_GRACE_S: Final = 366 * 86_400.0
CSP: Final = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


class LedgerMetrics(MetricsCollector):
    """posfleet_ledger_* series, rendered fresh on every scrape."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def describe(self) -> Iterator[Metric]:
        """No static description (the registry must not call collect() at registration)."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Evictions by kind and reason, and current sizes."""
        ev = CounterMetricFamily("posfleet_ledger_evictions", "Ledger entries evicted, by kind and reason",
                                 labels=["kind", "reason"])
        for (kind, reason), n in sorted(self.ledger.evictions.items()):
            ev.add_metric([kind, reason], n)
        yield ev
        size = GaugeMetricFamily("posfleet_ledger_entries", "Entries held in the ledger", labels=["kind"])
        for kind, n in self.ledger.stats().items():
            size.add_metric([kind], n)
        yield size


class SupportHost(Protocol):
    """What `install` needs from the collector: the fleet, its hook lists and the Prometheus registry."""

    @property
    def fleet(self) -> Fleet: ...
    @property
    def message_hooks(self) -> list[MessageSink]: ...
    @property
    def transition_hooks(self) -> list[TransitionSink]: ...
    @property
    def route_hooks(self) -> list[RouteHook]: ...
    @property
    def prom_registry(self) -> CollectorRegistry: ...


def install(collector: SupportHost, limits: LedgerLimits | None = None) -> Ledger:
    """Attach the ledger, the support routes and the ledger metrics to a collector."""
    fleet = collector.fleet
    ledger = Ledger(limits or LedgerLimits(), known=lambda tid: tid in fleet.terminals)

    def on_message(msg: Message, rx: float, terminal: Terminal | None) -> None:
        if isinstance(msg, TxnReceipt):
            if terminal is not None:  # receipts from ids outside the fleet would be unbounded
                ledger.add_receipt(msg.tid, msg.txn_id, msg.ts, msg.amount_minor, msg.currency, msg.status, rx)
        elif isinstance(msg, UpstreamBatch):
            ledger.add_batch(msg, rx, fleet.owns)  # only the acquirer's own terminals: no foreign marks or evictions

    def on_transitions(out: list[Transition]) -> None:
        ledger.add_transitions(out)

    def routes(app: web.Application) -> None:
        app[LEDGER] = ledger
        r = app.router
        r.add_get("/api/v1/terminals/{terminal_id}/diagnosis", get_diagnosis)
        r.add_get("/api/v1/terminals/{terminal_id}/timeline", get_timeline)
        r.add_get("/api/v1/reconcile", get_reconcile)
        r.add_get("/api/v1/receipts", get_receipts)
        r.add_get("/api/v1/support/facets", get_facets)
        r.add_get("/support", get_page)
        r.add_get("/support/", get_page)
        r.add_get("/support/static/{name}", get_static)

    collector.message_hooks.append(on_message)
    collector.transition_hooks.append(on_transitions)
    collector.route_hooks.append(routes)
    collector.prom_registry.register(LedgerMetrics(ledger))
    return ledger


# ---- helpers --------------------------------------------------------------------------------------------------
def _completed(t: Terminal, ledger: Ledger, now: float) -> Iterator[Completed]:
    for txn_id, e in ledger.entries(t.tid, now):
        if e.received_at is not None and e.ts is not None:
            yield Completed(t.tid, txn_id, e.ts, e.received_at, e.amount_minor or 0, e.currency or "",
                            e.status or "", t.merchant, t.acquirer)


def _recorded(t: Terminal, ledger: Ledger, now: float) -> Iterator[Recorded]:
    for txn_id, e in ledger.entries(t.tid, now):
        if e.recorded_at is not None:
            yield Recorded(t.tid, txn_id, e.recorded_ts, e.recorded_at, t.merchant, t.acquirer)


def ledger_facts(t: Terminal, ledger: Ledger, grace_s: float, now: float) -> LedgerFacts:
    """Summary of the terminal's ledger for the diagnosis (the same rules as reconciliation)."""
    report = reconcile(_completed(t, ledger, now), _recorded(t, ledger, now),
                       Window(now - ledger.limits.max_age_s, now + 1), now, grace_s, max_items=10)
    missing = report.missing_at_acquirer
    recorded_at = [e.recorded_at for _i, e in ledger.entries(t.tid, now) if e.recorded_at is not None]
    oldest = now - max(float(x["age_s"]) for x in missing) if missing else None
    return LedgerFacts(
        receipts=report.totals.completed, recorded=len(recorded_at), unrecorded=report.totals.missing_at_acquirer,
        pending=report.totals.pending, oldest_unrecorded_at=oldest,
        unrecorded_sample=tuple(str(x["txn_id"]) for x in missing),
        last_recorded_at=max(recorded_at) if recorded_at else None,
    )


def _window(request: web.Request, now: float) -> Window:
    q = request.query
    try:
        if q.get("day"):
            return day_window(q["day"])
        start = parse_time(q["from"]) if q.get("from") else now - 86_400
        end = parse_time(q["to"]) if q.get("to") else now + 1
    except ValueError as err:
        raise json_error(web.HTTPBadRequest, "day must be YYYY-MM-DD; from/to Unix seconds or ISO 8601",
                         detail=str(err)) from None
    if end <= start:
        raise json_error(web.HTTPBadRequest, "to must be after from")
    return Window(start, end)


def _scope(request: web.Request) -> tuple[dict[str, str], list[Terminal]]:
    """Terminals selected by terminal_id | merchant_id | acquirer, among those the token may see."""
    fleet = request.app[COLLECTOR].fleet
    principal = principal_of(request)
    q = request.query
    given = {k: q[k] for k in ("terminal_id", "merchant_id", "acquirer") if q.get(k)}
    if len(given) > 1:
        raise json_error(web.HTTPBadRequest, "give at most one of terminal_id, merchant_id, acquirer")
    if "terminal_id" in given:
        t = fleet.terminals.get(given["terminal_id"])
        if t is None or not principal.can_read(t.acquirer):
            raise json_error(web.HTTPNotFound, "no such terminal")
        return given, [t]
    if "acquirer" in given:
        if not principal.can_read(given["acquirer"]):
            raise json_error(web.HTTPForbidden, "token may not read this acquirer")
        return given, [t for t in fleet.terminals.values() if t.acquirer == given["acquirer"]]
    if "merchant_id" in given:
        mid = given["merchant_id"]
        found = [t for t in fleet.terminals.values() if t.merchant == mid and principal.can_read(t.acquirer)]
        if not found:
            raise json_error(web.HTTPNotFound, "no such merchant")
        return given, found
    return given, [t for t in fleet.terminals.values() if principal.can_read(t.acquirer)]


def _limit(request: web.Request, default: int, maximum: int) -> int:
    try:
        return min(max(int(request.query.get("limit", str(default))), 1), maximum)
    except ValueError:
        raise json_error(web.HTTPBadRequest, "limit must be an integer") from None


# ---- handlers -------------------------------------------------------------------------------------------------
async def get_diagnosis(request: web.Request) -> web.Response:
    """The checklist walked for one terminal."""
    collector = request.app[COLLECTOR]
    t = visible_terminal(request)
    now = time.time()
    fleet, th = collector.fleet, collector.cfg.thresholds
    facts = facts_from(
        t, fleet.registry.get(t.tid), fleet.registry_loaded, fleet.feeds.get(t.acquirer), th,
        collector.cfg.software_policy, now, ledger_facts(t, request.app[LEDGER], th.upstream_grace_s, now),
        activity=fleet.activity_facts(t, now), volume_drop=fleet.volume_drop(t.acquirer),
    )
    return json_response(diagnose(facts, now).to_dict())


async def get_timeline(request: web.Request) -> web.Response:
    """Condition intervals of one terminal over the last `hours` (default 24)."""
    t = visible_terminal(request)
    ledger = request.app[LEDGER]
    try:
        hours = float(request.query.get("hours", "24"))
    except ValueError:
        raise json_error(web.HTTPBadRequest, "hours must be a number") from None
    if not math.isfinite(hours) or hours <= 0:
        raise json_error(web.HTTPBadRequest, "hours must be positive")
    now = time.time()
    hours = min(hours, ledger.limits.max_age_s / 3600)
    start = now - hours * 3600
    transitions = ledger.transitions(t.tid, now)
    active = {c: (a.since, a.severity, a.detail) for c, a in (t.conds or {}).items()}
    return json_response({
        "terminal_id": t.tid, "from": start, "to": now,
        "intervals": condition_intervals(transitions, active, start, now),
        "transitions": [{"condition": x.condition, "raised": x.raised, "at": x.at, "severity": x.severity,
                         "detail": x.detail} for x in transitions if x.at >= start],
    })


async def get_reconcile(request: web.Request) -> web.Response:
    """Completed-but-unrecorded transactions and the reverse, with ages and a per-merchant summary."""
    collector = request.app[COLLECTOR]
    ledger = request.app[LEDGER]
    now = time.time()
    window = _window(request, now)
    scope, terminals = _scope(request)
    grace = collector.cfg.thresholds.upstream_grace_s
    if request.query.get("grace_s"):
        try:
            grace = float(request.query["grace_s"])
        except ValueError:
            raise json_error(web.HTTPBadRequest, "grace_s must be a number") from None
        # nan would compare false with every age (nothing ever missing) and cannot be written as JSON.
        if not (math.isfinite(grace) and 0 <= grace <= MAX_GRACE_S):
            raise json_error(web.HTTPBadRequest, f"grace_s must be a number of seconds from 0 to {MAX_GRACE_S:.0f}")
    # Only terminals with ledger entries can contribute. The entries are copied on the loop (which owns the
    # ledger), yielding every few hundred terminals, and compared in a thread: a whole acquirer's day must not
    # stall MQTT ingest (about 1 s per 100,000 receipts).
    completed: list[Completed] = []
    recorded: list[Recorded] = []
    for n, t in enumerate(t for t in terminals if t.tid in ledger.txns):
        completed.extend(_completed(t, ledger, now))
        recorded.extend(_recorded(t, ledger, now))
        if n % 500 == 499:
            await asyncio.sleep(0)
    limit = _limit(request, 1000, 10_000)

    def compare() -> str:
        body = reconcile(completed, recorded, window, now, grace, limit).to_dict()
        body["scope"] = scope
        body["terminals"] = len(terminals)
        return strict_dumps(body)

    return web.Response(text=await asyncio.to_thread(compare), content_type="application/json")


async def get_receipts(request: web.Request) -> web.StreamResponse:
    """Receipts held in the ledger as JSON lines (the input of an offline `posfleet reconcile`)."""
    ledger = request.app[LEDGER]
    now = time.time()
    window = _window(request, now)
    _, terminals = _scope(request)
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    chunk: list[bytes] = []
    for t in terminals:
        if t.tid not in ledger.txns:
            continue
        for c in _completed(t, ledger, now):
            if c.at in window:
                chunk.append(strict_dumps({
                    "terminal_id": c.terminal_id, "merchant_id": c.merchant_id, "acquirer": c.acquirer,
                    "txn_id": c.txn_id, "ts": c.ts, "received_at": c.received_at,
                    "amount_minor": c.amount_minor, "currency": c.currency, "status": c.status,
                }, separators=(",", ":")).encode() + b"\n")
        if len(chunk) >= 512:
            await resp.write(b"".join(chunk))
            chunk = []
    if chunk:
        await resp.write(b"".join(chunk))
    await resp.write_eof()
    return resp


async def get_facets(request: web.Request) -> web.Response:
    """Acquirers, sites and per-condition counts the token may see (the support page's filters)."""
    fleet = request.app[COLLECTOR].fleet
    principal = principal_of(request)
    sites: dict[str, set[str]] = {}
    by_condition = dict.fromkeys(CONDITIONS, 0)
    # Counts are kept per (acquirer, site, condition): this is O(sites × conditions), not O(fleet).
    for (acq, site, cond), n in fleet.counts.items():
        if not principal.can_read(acq):
            continue
        if cond == "_known" and n > 0:
            sites.setdefault(acq, set()).add(site)
        elif cond in by_condition:
            by_condition[cond] += n
    return json_response({
        "acquirers": sorted(sites),
        "sites": {a: sorted(s) for a, s in sorted(sites.items())},
        "conditions": list(CONDITIONS),
        "problem_terminals_by_condition": by_condition,
    })


def _static_bytes(name: str) -> bytes:
    return (resources.files("collector.support") / "static" / name).read_bytes()


async def get_page(_request: web.Request) -> web.Response:
    """The support page (a shell without data: everything comes from the API with the user's token)."""
    return web.Response(body=_static_bytes("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


async def get_static(request: web.Request) -> web.Response:
    """The page's script and stylesheet (a fixed list: no path is built from the URL)."""
    name = request.match_info["name"]
    if name not in STATIC or name == "index.html":
        raise web.HTTPNotFound()
    return web.Response(body=_static_bytes(name), content_type=STATIC[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
