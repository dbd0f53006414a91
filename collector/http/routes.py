"""HTTP API (aiohttp): health, readiness, /metrics, terminals and the upstream feed endpoint."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from collector.fleet.detect import CONDITIONS, probable_cause
from collector.fleet.protocol import DecodeError, check_id, decode_upstream
from collector.fleet.state import Terminal
from collector.http.auth import OPEN, Principal, load_metrics_token, token_matches
from collector.http.host import ApiHost
from collector.http.metrics import render_exposition_async

__all__ = ["build_app", "build_metrics_app", "json_response", "strict_dumps", "terminal_view"]

log = logging.getLogger(__name__)

COLLECTOR: web.AppKey[ApiHost] = web.AppKey("collector")
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)
METRICS_TOKEN: web.AppKey[str | None] = web.AppKey("metrics_token", str)

# Strict JSON only: NaN and Infinity are not JSON, browsers' JSON.parse rejects them. A value that slipped
# through validation fails loudly here (a logged 500) rather than handing clients a body they cannot read.
def strict_dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps refusing NaN and Infinity."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def json_response(data: Any, status: int = 200) -> web.Response:
    """A JSON response that is always valid JSON (no NaN/Infinity)."""
    return web.json_response(data, status=status, dumps=strict_dumps)


def terminal_view(t: Terminal, now: float) -> dict[str, Any]:
    """The API's JSON for one terminal: identity, last report, status and conditions with causes."""
    conds = t.conds or {}
    return {
        "terminal_id": t.tid,
        "merchant_id": t.merchant,
        "heartbeat_mid": t.mid,
        "acquirer": t.acquirer,
        "site": t.site,
        "model": t.model,
        "app_version": t.app_version,
        "os_version": t.os_version,
        "status": t.status or ("unknown" if t.last_rx is None else "online"),
        "last_heartbeat_received": t.last_rx,
        "last_heartbeat_age_s": None if t.last_rx is None else round(now - t.last_rx, 3),
        "terminal_clock": None if t.last_rx is None else t.last_ts,  # 0 is a clock reset to the epoch, shown
        "seq": t.seq if t.seq >= 0 else None,
        "interval_s": t.interval_s or None,
        "txn_count": t.txn_count,
        "uploaded_count": t.uploaded_count,
        "queue_depth": t.queue_depth,
        "oldest_queued_ts": t.oldest_queued_ts,
        "upstream_last_recorded": t.upstream_rx or None,
        "upstream_recorded_txns": t.upstream_txns,
        "net": {"type": t.net_type, "rssi_dbm": t.rssi_dbm},
        "power": {"source": t.power_source, "battery_pct": t.battery_pct},
        "hw": {"printer": t.printer, "display": t.display, "card_reader": t.card_reader},
        "conditions": [
            {
                "condition": c,
                "severity": a.severity,
                "detail": a.detail,
                "since": a.since,
                "probable_cause": probable_cause(c, a.detail),
            }
            for c, a in sorted(conds.items())
        ],
        # Messages the collector rejected (counts by reason only: rejected content is never kept).
        "rejected": dict(sorted((t.rejected or {}).items())),
        "last_rejected_received": t.rejected_rx,
    }


def principal_of(request: web.Request) -> Principal:
    """The principal the auth middleware attached to this API request."""
    return request[PRINCIPAL]


def json_error(cls: type[web.HTTPException], message: str, **extra: Any) -> web.HTTPException:
    """An HTTP error with a JSON body `{"error": message, ...}`."""
    return cls(text=strict_dumps({"error": message, **extra}), content_type="application/json")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """An unexpected error is logged with its traceback and answered as a JSON 500, never an HTML page."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error answering %s %s", request.method, request.path)
        raise json_error(web.HTTPInternalServerError, "internal error") from None


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Reads need a token when tokens are configured; the upstream POST always needs a write scope."""
    collector = request.app[COLLECTOR]
    path = request.path
    # The /support page's files hold no data (all it shows comes from /api/ with the user's token), and a
    # browser navigating to a page cannot send a bearer token.
    if not path.startswith("/api/"):
        return await handler(request)
    header = request.headers.get("Authorization")
    principal = collector.tokens.lookup(header)
    if principal is None:
        if header or collector.tokens.required or request.method == "POST":
            err = json_error(web.HTTPUnauthorized, "a valid bearer token is required")
            err.headers["WWW-Authenticate"] = 'Bearer realm="posfleet"'
            raise err
        principal = OPEN
    request[PRINCIPAL] = principal
    return await handler(request)


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: subscribed to the broker, the MQTT connection task alive and no supervised background task down."""
    problems = request.app[COLLECTOR].readiness_problems()
    return json_response(
        {"status": "ready" if not problems else "not ready", "problems": problems}, status=503 if problems else 200
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition (behind metrics.token_file's bearer token when one is configured)."""
    expected = request.app.get(METRICS_TOKEN)
    if expected is not None and not token_matches(expected, request.headers.get("Authorization")):
        err = json_error(web.HTTPUnauthorized, "/metrics needs the bearer token of metrics.token_file")
        err.headers["WWW-Authenticate"] = 'Bearer realm="posfleet-metrics"'
        raise err
    collector = request.app[COLLECTOR]
    # Copy (bounded by acquirers and problems), then format in chunks that yield to the loop: formatting thousands
    # of series in one go would stall ingest for the whole render.
    view = collector.fleet_collector.view()
    body = await render_exposition_async(collector.prom_registry, view)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_terminals(request: web.Request) -> web.Response:
    """Terminals filtered by condition, acquirer, site, merchant; problem terminals only unless all=1."""
    collector = request.app[COLLECTOR]
    fleet, now, principal = collector.fleet, time.time(), principal_of(request)
    q = request.query
    condition = q.get("condition")
    if condition is not None and condition not in CONDITIONS:
        raise json_error(web.HTTPBadRequest, "unknown condition", known=list(CONDITIONS))
    try:
        limit = min(max(int(q.get("limit", "100")), 1), 1000)
        offset = max(int(q.get("offset", "0")), 0)
    except ValueError:
        raise json_error(web.HTTPBadRequest, "limit and offset must be integers") from None
    pool = fleet.terminals.keys() if q.get("all") == "1" else fleet.problem
    acquirer, site, merchant = q.get("acquirer"), q.get("site"), q.get("merchant_id")
    matched = []
    for tid in sorted(pool):
        t = fleet.terminals[tid]
        if not principal.can_read(t.acquirer):
            continue
        if condition is not None and (t.conds is None or condition not in t.conds):
            continue
        if (acquirer and t.acquirer != acquirer) or (site and t.site != site) or (merchant and t.merchant != merchant):
            continue
        matched.append(t)
    page = matched[offset : offset + limit]
    return json_response(
        {"total": len(matched), "offset": offset, "limit": limit, "terminals": [terminal_view(t, now) for t in page]}
    )


async def list_sites(request: web.Request) -> web.Response:
    """Per-site counts (terminals, online, shutdown, by condition, mass offline) for every site the token may see.

    /metrics carries per-site series only for sites with a problem; this is where every site's figures are.
    `problem=1` lists only sites with a terminal in a condition; `acquirer` filters; paged by limit/offset.
    """
    fleet, principal, q = request.app[COLLECTOR].fleet, principal_of(request), request.query
    try:
        limit = min(max(int(q.get("limit", "100")), 1), 1000)
        offset = max(int(q.get("offset", "0")), 0)
    except ValueError:
        raise json_error(web.HTTPBadRequest, "limit and offset must be integers") from None
    acquirer = q.get("acquirer")
    counts = fleet.counts
    if q.get("problem") == "1":
        keys: set[tuple[str, str]] = set(fleet.problem_sites)
    else:
        keys = {(a, s) for (a, s, c), n in counts.items() if c == "_known" and n > 0}
    matched = sorted(k for k in keys if principal.can_read(k[0]) and (not acquirer or k[0] == acquirer))
    mass = {(a, s): since for scope, a, s, since in fleet.mass_offline() if scope == "site"}
    page = []
    for acq, site in matched[offset : offset + limit]:
        page.append({
            "acquirer": acq,
            "site": site,
            "terminals": counts.get((acq, site, "_known"), 0),
            "online": counts.get((acq, site, "_online"), 0),
            "shutdown": counts.get((acq, site, "_shutdown"), 0),
            "conditions": {c: n for c in CONDITIONS if (n := counts.get((acq, site, c), 0)) > 0},
            "mass_offline_since": mass.get((acq, site)),  # null unless the site is mass-offline
        })
    return json_response({"total": len(matched), "offset": offset, "limit": limit, "sites": page})


def visible_terminal(request: web.Request) -> Terminal:
    """The terminal named in the path, or 404 (also when the token may not see it: no existence leak)."""
    fleet = request.app[COLLECTOR].fleet
    t = fleet.terminals.get(request.match_info["terminal_id"])
    if t is None or not principal_of(request).can_read(t.acquirer):
        raise json_error(web.HTTPNotFound, "no such terminal")
    return t


async def get_terminal(request: web.Request) -> web.Response:
    """One terminal's state and conditions, and its activity baseline (which lists leave out: it is computed)."""
    t, now = visible_terminal(request), time.time()
    view = terminal_view(t, now)
    view["activity"] = request.app[COLLECTOR].fleet.activity_view(t, now)
    return json_response(view)


async def post_upstream(request: web.Request) -> web.Response:
    """The acquirer feed over HTTP: same body as the MQTT topic."""
    principal = principal_of(request)
    acquirer = request.match_info["acquirer_id"]
    if not principal.writes_upstream:
        raise json_error(web.HTTPForbidden, "token lacks write:upstream")
    if not principal.can_write_upstream(acquirer):
        # The name from the URL is not echoed: it is the sender's text and could be anything, a PAN included.
        raise json_error(web.HTTPForbidden, "token lacks write:upstream:<acquirer> for this acquirer")
    collector = request.app[COLLECTOR]
    try:
        check_id(acquirer, "acquirer")  # a card number in the URL is rejected and counted as card_data
    except DecodeError as err:
        collector.count_reject("upstream", err)
        raise json_error(web.HTTPBadRequest, "rejected", reason=err.reason, detail=err.detail) from None
    # Known acquirers only (the registry's when one is loaded): a feed for a name nobody configured is a typo or
    # a probe, and each new name would add a feed entry and series for ever.
    if not collector.fleet.feed_allowed(acquirer):
        collector.fleet.refused["feeds"] += 1  # counted like the same refusal of an MQTT feed
        raise json_error(web.HTTPNotFound, "unknown acquirer")
    body = await request.read()
    try:
        batch = decode_upstream(acquirer, body)
    except DecodeError as err:
        collector.count_reject("upstream", err)
        raise json_error(web.HTTPBadRequest, "rejected", reason=err.reason, detail=err.detail) from None
    result = collector.apply_upstream(batch, time.time())
    return json_response(
        {
            "accepted": len(batch.txns),
            "dropped": len(batch.dropped),  # transactions left out (card data, bad fields), counted by reason
            "matched_terminals": result.matched,
            "foreign_terminals": result.foreign,  # another acquirer's terminals: ignored
            "unknown_terminals": result.unknown,
        },
        status=202,
    )


def build_app(collector: ApiHost) -> web.Application:
    """The aiohttp application; routes only, the logic lives in the pipeline stages."""
    app = web.Application(middlewares=[error_middleware, auth_middleware], client_max_size=2 * 1024 * 1024)
    app[COLLECTOR] = collector
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if collector.cfg.metrics.port is None:  # else only on its own listener (build_metrics_app)
        app[METRICS_TOKEN] = load_metrics_token(collector.cfg.metrics.token_file)
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/terminals", list_terminals)
    app.router.add_get("/api/v1/terminals/{terminal_id}", get_terminal)
    app.router.add_get("/api/v1/sites", list_sites)
    app.router.add_post("/api/v1/upstream/{acquirer_id}/transactions", post_upstream)
    for extra in collector.route_hooks:
        extra(app)
    return app


def build_metrics_app(collector: ApiHost) -> web.Application:
    """/metrics alone, for its own listener (`metrics.port`): it names problem terminals of every acquirer."""
    app = web.Application(middlewares=[error_middleware], client_max_size=1024)
    app[COLLECTOR] = collector
    app[METRICS_TOKEN] = load_metrics_token(collector.cfg.metrics.token_file)
    app.router.add_get("/metrics", metrics)
    return app
