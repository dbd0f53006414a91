"""The API across partitioned collectors: any collector answers for any terminal, and lists cover the whole fleet.

    client -> collector A  GET /api/v1/terminals/T      (T's partition p is not A's)
              A -> NATS request posfleet.api.p.<p> -> owner B (subscribed while it holds p)
              B -> its own API on loopback (same path, same bearer token) -> reply {status, body} -> A -> client
    (also .../diagnosis, .../timeline, and /api/v1/reconcile and /api/v1/receipts with ?terminal_id=)

    client -> collector A  GET /api/v1/terminals?...    (a list; also /api/v1/sites, /api/v1/reconcile without
                                                          terminal_id, /api/v1/support/facets)
              A -> NATS posfleet.api.members (every collector) -> each answers its own list with the partitions
              it holds -> A merges (sorted by terminal id, totals summed), names every live member (KV `m.*`) that
              did not answer in time and every partition no answer covered.

Decisions:
- The owner answers through its own HTTP handlers (loopback, header `X-Posfleet-Forwarded`): one implementation
  of every route and of the token checks; the forwarding collector checked the token too (its auth middleware
  runs first), and the owner checks it again (every collector reads the same tokens file).
- A partition that no collector holds has no subscriber: NATS answers "no responders" at once, and the API says
  503 with the partition, never a wrong 404 "no such terminal". An owner that does not answer within
  FORWARD_TIMEOUT_S is a 503 as well, saying so.
- A collector that lost a partition but has not unsubscribed yet stays silent for it (the new owner answers).
- /api/v1/receipts (a stream) is not merged: without terminal_id it is a 400 naming the two ways that work.
- A member answering 404 for a list's scope ("no such merchant") has nothing of it; all 404 is the 404.
- Replies are zlib-compressed JSON and must fit NATS' max_payload; a larger one is an error naming the member.
- Merged lists page up to MAX_MERGED terminals (offset + limit): every member must send its first offset + limit
  to merge exactly; a deeper page is a 400 asking for a narrower filter.

Pure parts (`merge_terminals`, `merge_sites`, `uncovered`) are unit-tested; the rest is I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from typing import Any, Final, Protocol
from urllib.parse import urlencode

import aiohttp
import nats.errors
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import CollectorRegistry, Counter

from collector.cluster.fleetwide import FleetWide
from collector.cluster.keeper import Keeper
from collector.cluster.partition import partition_of
from collector.config import Config

__all__ = [
    "FORWARDED",
    "Forwarder",
    "MemberAnswer",
    "kv_members",
    "merge_sites",
    "merge_terminals",
    "uncovered",
]

log = logging.getLogger(__name__)

FORWARDED: Final = "X-Posfleet-Forwarded"
ANSWERED_BY: Final = "X-Posfleet-Answered-By"
SUBJECT: Final = "posfleet.api"
FORWARD_TIMEOUT_S: Final = 3.0  # one terminal from its owner
GATHER_TIMEOUT_S: Final = 5.0  # every member's list
SYNC_S: Final = 0.5  # subscriptions follow the held partitions this fast
MAX_MERGED: Final = 1000  # offset + limit of a merged terminal list
MAX_SITE_PAGES: Final = 20  # a member's sites, 1000 per page
MAX_PATH: Final = 4096
# Routes answered by the owner of the terminal's partition, and lists merged across collectors.
ONE_TERMINAL: Final = frozenset({
    "/api/v1/terminals/{terminal_id}", "/api/v1/terminals/{terminal_id}/diagnosis",
    "/api/v1/terminals/{terminal_id}/timeline",
})
LISTS: Final = frozenset({"/api/v1/terminals", "/api/v1/sites", "/api/v1/reconcile", "/api/v1/support/facets"})
CONTENT_TYPES: Final = frozenset({"application/json", "application/x-ndjson"})
# Routes scoped by a `terminal_id` query parameter: answered by that terminal's owner.
BY_TERMINAL: Final = frozenset({"/api/v1/reconcile", "/api/v1/receipts"})


class ForwardHost(Protocol):
    """What forwarding needs from the collector."""

    @property
    def cfg(self) -> Config: ...
    @property
    def partitions(self) -> set[int]: ...
    @property
    def instance(self) -> str: ...
    @property
    def http_port(self) -> int | None: ...
    @property
    def route_hooks(self) -> list[Callable[[web.Application], None]]: ...
    @property
    def fleetwide(self) -> FleetWide | None: ...
    @property
    def prom_registry(self) -> CollectorRegistry: ...


class MemberAnswer:
    """One collector's answer to a list request: its HTTP status and body, the partitions it holds, and when it
    is the fleet leader its fleet-wide mass-offline sites ((acquirer, site) -> since)."""

    __slots__ = ("body", "instance", "mass", "partitions", "status")

    def __init__(self, instance: str, status: int, body: Any, partitions: Iterable[int],
                 mass: dict[tuple[str, str], float] | None = None) -> None:
        self.instance, self.status, self.body, self.partitions = instance, status, body, frozenset(partitions)
        self.mass = mass


# ---- pure decisions --------------------------------------------------------------------------------------------
def uncovered(answers: Sequence[MemberAnswer], n: int) -> list[int]:
    """Partitions that no answering member holds (their terminals are missing from a merged list)."""
    held: set[int] = set()
    for a in answers:
        held |= a.partitions
    return [p for p in range(n) if p not in held]


def merge_terminals(bodies: Sequence[dict[str, Any]], offset: int, limit: int) -> dict[str, Any]:
    """Members' terminal lists (each sorted by id, its first offset + limit) -> one page of the whole fleet."""
    rows = sorted((t for b in bodies for t in b["terminals"]), key=lambda t: str(t["terminal_id"]))
    return {"total": sum(int(b["total"]) for b in bodies), "offset": offset, "limit": limit,
            "terminals": rows[offset : offset + limit]}


def merge_sites(bodies: Sequence[dict[str, Any]], offset: int, limit: int,
                mass: Mapping[tuple[str, str], float] | None = None) -> dict[str, Any]:
    """Members' complete site lists -> one page: a site spread over collectors has its counts summed; its
    mass_offline_since is the fleet leader's judgement when given (`mass`), else the earliest any member reports
    (each judged its own part)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for b in bodies:
        for s in b["sites"]:
            key = (str(s["acquirer"]), str(s["site"]))
            m = merged.get(key)
            if m is None:
                merged[key] = {**s, "conditions": dict(s["conditions"])}
                continue
            for f in ("terminals", "online", "shutdown"):
                m[f] += s[f]
            for c, k in s["conditions"].items():
                m["conditions"][c] = m["conditions"].get(c, 0) + k
            since = [x for x in (m["mass_offline_since"], s["mass_offline_since"]) if x is not None]
            m["mass_offline_since"] = min(since) if since else None
    keys = sorted(merged)
    if mass is not None:
        for k, m in merged.items():
            m["mass_offline_since"] = mass.get(k)
    return {"total": len(keys), "offset": offset, "limit": limit,
            "sites": [merged[k] for k in keys[offset : offset + limit]]}


def kv_members(keeper: Keeper) -> Callable[[], Awaitable[set[str]]]:
    """The live members (`m.<instance>` keys, expired after a lease TTL without renewal) of the keeper's bucket."""

    async def read() -> set[str]:
        kv = keeper.kv
        if kv is None:
            return set()
        prefix = f"$KV.{keeper.cfg.lease_bucket}."
        info = await keeper.js.stream_info(f"KV_{keeper.cfg.lease_bucket}", subjects_filter=f"{prefix}m.>")
        keys = [s[len(prefix):] for s in (info.state.subjects or {})]
        entries = await asyncio.gather(*(kv.get(k) for k in keys), return_exceptions=True)
        return {k[2:] for k, e in zip(keys, entries, strict=True) if not isinstance(e, BaseException)}

    return read


def _sum_summary(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k == "missing_amount_minor":
                amounts = out.setdefault(k, {})
                for cur, n in v.items():
                    amounts[cur] = amounts.get(cur, 0) + n
            else:
                out[k] = out.get(k, 0) + v
    if "missing_amount_minor" in out:
        out["missing_amount_minor"] = dict(sorted(out["missing_amount_minor"].items()))
    return out


def merge_reconcile(bodies: Sequence[dict[str, Any]], limit: int) -> dict[str, Any]:
    """Members' reconciliation reports (each over its own terminals) -> one: totals and per-merchant summaries
    summed (a merchant's terminals may sit with several collectors), the item lists joined up to `limit`."""
    first = bodies[0]
    out: dict[str, Any] = {k: first[k] for k in ("window", "now", "grace_s", "scope") if k in first}
    truncated = any(bool(b.get("truncated")) for b in bodies)
    for key in ("missing_at_acquirer", "unknown_to_terminal", "pending"):
        items = [x for b in bodies for x in b[key]]
        truncated |= len(items) > limit
        out[key] = items[:limit]
    out["truncated"] = truncated
    out["recorded_rows"] = sum(int(b.get("recorded_rows", 0)) for b in bodies)
    out["terminals"] = sum(int(b.get("terminals", 0)) for b in bodies)
    out["totals"] = _sum_summary([b["totals"] for b in bodies])
    merchants: dict[str, list[dict[str, Any]]] = {}
    for b in bodies:
        for m, summary in b["merchants"].items():
            merchants.setdefault(m, []).append(summary)
    out["merchants"] = {m: _sum_summary(parts) for m, parts in sorted(merchants.items())}
    return out


def merge_facets(bodies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Members' support-page facets -> one: acquirers and sites joined, problem counts summed."""
    sites: dict[str, set[str]] = {}
    by_condition: dict[str, int] = {}
    for b in bodies:
        for a, ss in b["sites"].items():
            sites.setdefault(a, set()).update(ss)
        for c, n in b["problem_terminals_by_condition"].items():
            by_condition[c] = by_condition.get(c, 0) + n
    return {"acquirers": sorted(sites), "sites": {a: sorted(ss) for a, ss in sorted(sites.items())},
            "conditions": bodies[0]["conditions"], "problem_terminals_by_condition": by_condition}


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _int(q: Any, name: str, default: int) -> int:
    try:
        return int(q.get(name, str(default)))
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "limit and offset must be integers"}),
                                 content_type="application/json") from None


# ---- I/O ------------------------------------------------------------------------------------------------------
class Forwarder:
    """Answers for the held partitions over NATS, forwards the others' terminals, merges lists.

    `async with Forwarder(host, nc, live_members):` after NATS is connected and before the HTTP app is built
    (its middleware is installed through `host.route_hooks`); `run()` is the supervised subscription sync.
    """

    def __init__(self, host: ForwardHost, nc: Client,
                 live_members: Callable[[], Awaitable[set[str]]] | None = None) -> None:
        self.host, self.nc, self.live_members = host, nc, live_members
        self.n = host.cfg.nats.partitions
        self.subs: dict[int, Subscription] = {}
        self.member_sub: Subscription | None = None
        self.session: aiohttp.ClientSession | None = None
        # Every request that could not be answered completely is counted by why (nothing is dropped silently).
        self.requests = Counter("posfleet_cluster_api_requests", "API requests answered with other collectors, by kind "
                                "(terminal: forwarded to its owner; list: merged) and result",
                                ["kind", "result"], registry=host.prom_registry)
        for kind, result in (("terminal", "answered"), ("terminal", "no_owner"), ("terminal", "timeout"),
                             ("terminal", "error"), ("list", "complete"), ("list", "incomplete")):
            self.requests.labels(kind, result)
        host.route_hooks.append(self.install)

    async def __aenter__(self) -> Forwarder:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S))
        self.member_sub = await self.nc.subscribe(f"{SUBJECT}.members", cb=self._answer_member)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in [*self.subs.values(), *([self.member_sub] if self.member_sub else [])]:
            with suppress(nats.errors.Error):
                await sub.unsubscribe()
        self.subs.clear()
        if self.session is not None:
            await self.session.close()

    def install(self, app: web.Application) -> None:
        """Route hook: the forwarding middleware (after the auth middleware: the token is checked here first)."""
        app.middlewares.append(self.middleware)

    async def run(self) -> None:
        """Keep one subscription per held partition (supervised by the app)."""
        while True:
            await self.sync()
            await asyncio.sleep(SYNC_S)

    async def sync(self) -> None:
        """Subscribe to the partitions held now, unsubscribe from those given up."""
        held = set(self.host.partitions)
        for p in sorted(held - set(self.subs)):
            self.subs[p] = await self.nc.subscribe(f"{SUBJECT}.p.{p}", cb=self._answer_partition)
        for p in sorted(set(self.subs) - held):
            await self.subs.pop(p).unsubscribe()

    # ---- the owner's side -------------------------------------------------------------------------------------
    async def _local(self, path: str, auth: str | None) -> tuple[int, bytes, str]:
        """GET `path` from this collector's own API (loopback), as the forwarded request."""
        assert self.session is not None
        host = self.host.cfg.http.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
        headers = {FORWARDED: "1", **({"Authorization": auth} if auth else {})}
        url = f"http://{host if ':' not in host else f'[{host}]'}:{self.host.http_port}{path}"
        async with self.session.get(url, headers=headers) as resp:
            return resp.status, await resp.read(), resp.content_type

    def _request_of(self, msg: Msg) -> tuple[str, str | None] | None:
        try:
            req = json.loads(msg.data)
            path, auth = req["path"], req.get("auth")
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(path, str) or len(path) > MAX_PATH or not path.startswith("/api/v1/"):
            return None
        return path, auth if isinstance(auth, str) else None

    async def _reply(self, msg: Msg, answer: dict[str, Any]) -> None:
        data = zlib.compress(json.dumps(answer).encode())
        if len(data) > self.nc.max_payload:
            data = zlib.compress(json.dumps({"instance": self.host.instance, "status": 507,
                                             "error": "answer larger than NATS max_payload"}).encode())
        await msg.respond(data)

    async def _answer_partition(self, msg: Msg) -> None:
        p = int(msg.subject.rsplit(".", 1)[-1])
        req = self._request_of(msg)
        if req is None or p not in self.host.partitions or not msg.reply:
            return  # given up meanwhile: the new owner answers
        try:
            status, body, ctype = await self._local(*req)
        except (aiohttp.ClientError, TimeoutError) as err:
            log.warning("forwarded request for partition %d failed locally: %s", p, err or type(err).__name__)
            return
        await self._reply(msg, {"instance": self.host.instance, "status": status, "body": body.decode(),
                                "content_type": ctype})

    async def _answer_member(self, msg: Msg) -> None:
        req = self._request_of(msg)
        if req is None or not msg.reply:
            return
        path, auth = req
        held = sorted(self.host.partitions)  # before the answer: a partition taken meanwhile is not claimed
        try:
            if path.startswith("/api/v1/sites"):  # every page: sites are merged by key
                status, body = await self._all_sites(path, auth)
            else:
                status, raw, _ = await self._local(path, auth)
                body = json.loads(raw) if status == 200 else raw.decode()
        except (aiohttp.ClientError, TimeoutError, ValueError) as err:
            log.warning("list request failed locally: %s", err or type(err).__name__)
            return
        answer = {"instance": self.host.instance, "status": status, "body": body, "partitions": held}
        fw = self.host.fleetwide
        if fw is not None and fw.leader:
            answer["mass"] = [[a, site, since] for scope, a, site, since in fw.exported()[0] if scope == "site"]
        await self._reply(msg, answer)

    async def _all_sites(self, path: str, auth: str | None) -> tuple[int, Any]:
        base = path + ("&" if "?" in path else "?")
        sites: list[Any] = []
        for page in range(MAX_SITE_PAGES):
            status, raw, _ = await self._local(f"{base}limit=1000&offset={page * 1000}", auth)
            if status != 200:
                return status, raw.decode()
            body = json.loads(raw)
            sites.extend(body["sites"])
            if len(sites) >= body["total"]:
                return 200, {"total": len(sites), "sites": sites}
        return 507, f"more than {MAX_SITE_PAGES * 1000} sites on {self.host.instance}"

    # ---- the asking side --------------------------------------------------------------------------------------
    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Forward one terminal's routes to its partition's owner; merge lists; everything else is local."""
        route = request.match_info.route.resource
        pattern = route.canonical if route is not None else None
        if request.method != "GET" or request.headers.get(FORWARDED) or pattern is None:
            return await handler(request)
        if pattern in ONE_TERMINAL:
            p = partition_of(request.match_info["terminal_id"], self.n)
            if p in self.host.partitions:
                return await handler(request)
            return await self.forward(p, request.path_qs, request.headers.get("Authorization"))
        if pattern in BY_TERMINAL and request.query.get("terminal_id"):
            p = partition_of(request.query["terminal_id"], self.n)
            if p in self.host.partitions:
                return await handler(request)
            return await self.forward(p, request.path_qs, request.headers.get("Authorization"))
        if pattern == "/api/v1/receipts" and request.query.get("local") != "1":
            return _error(400, "receipts are not merged across partitioned collectors: ask with terminal_id=, or "
                               "ask every collector with local=1 (GET /api/v1/terminals names them in `collectors`)")
        if pattern in LISTS:  # local=1: this collector's own part (what it holds)
            return await handler(request) if request.query.get("local") == "1" else await self.gather(request, pattern)
        return await handler(request)

    async def forward(self, p: int, path: str, auth: str | None) -> web.Response:
        """The owner's answer for partition `p`, or a 503 saying why there is none."""
        payload = json.dumps({"path": path, "auth": auth}).encode()
        try:
            msg = await self.nc.request(f"{SUBJECT}.p.{p}", payload, timeout=FORWARD_TIMEOUT_S)
        except nats.errors.NoRespondersError:
            self.requests.labels("terminal", "no_owner").inc()
            return _error(503, "the terminal's partition is held by no running collector", partition=p)
        except (nats.errors.TimeoutError, TimeoutError):
            self.requests.labels("terminal", "timeout").inc()
            return _error(503, f"the owner of the terminal's partition did not answer within {FORWARD_TIMEOUT_S:g} s",
                          partition=p)
        except nats.errors.Error as err:
            self.requests.labels("terminal", "error").inc()
            return _error(503, "cannot reach NATS to ask the terminal's owner", partition=p,
                          detail=type(err).__name__)
        try:
            answer = json.loads(zlib.decompress(msg.data))
        except (ValueError, zlib.error):
            answer = {"error": "malformed answer"}
        if "body" not in answer:
            self.requests.labels("terminal", "error").inc()
            return _error(502, str(answer.get("error", "bad answer")), partition=p, collector=answer.get("instance"))
        self.requests.labels("terminal", "answered").inc()
        return web.Response(text=answer["body"], status=int(answer["status"]),
                            content_type=ctype if (ctype := answer.get("content_type")) in CONTENT_TYPES
                            else "application/json",
                            headers={ANSWERED_BY: str(answer["instance"])})

    async def ask_members(self, path: str, auth: str | None) -> tuple[list[MemberAnswer], dict[str, str]]:
        """Every collector's answer to `path` within GATHER_TIMEOUT_S; stops early once every live member (KV)
        answered and the answers cover every partition. Returns the answers and the members that failed
        (instance -> why)."""
        live: set[str] = set()
        if self.live_members is not None:
            with suppress(nats.errors.Error, TimeoutError):
                live = await asyncio.wait_for(self.live_members(), FORWARD_TIMEOUT_S)
        answers: list[MemberAnswer] = []
        failed: dict[str, str] = {}
        done = asyncio.Event()
        inbox = self.nc.new_inbox()

        async def collect(msg: Msg) -> None:
            try:
                a = json.loads(zlib.decompress(msg.data))
                instance = str(a["instance"])
                if "body" not in a:
                    failed[instance] = str(a.get("error", "bad answer"))
                else:
                    mass = {(str(x), str(y)): float(z) for x, y, z in a["mass"]} if "mass" in a else None
                    answers.append(MemberAnswer(instance, int(a["status"]), a["body"], a.get("partitions", ()),
                                                mass))
            except (ValueError, KeyError, TypeError, zlib.error):
                log.warning("malformed answer to a list request ignored")
                return
            heard = {x.instance for x in answers} | set(failed)
            if live <= heard and not uncovered(answers, self.n):
                done.set()

        sub = await self.nc.subscribe(inbox, cb=collect)
        try:
            await self.nc.publish(f"{SUBJECT}.members", json.dumps({"path": path, "auth": auth}).encode(),
                                  reply=inbox)
            with suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), GATHER_TIMEOUT_S)
        finally:
            with suppress(nats.errors.Error):
                await sub.unsubscribe()
        heard = {x.instance for x in answers} | set(failed)
        for m in sorted(live - heard):
            failed[m] = f"no answer within {GATHER_TIMEOUT_S:g} s"
        return answers, failed

    async def gather(self, request: web.Request, pattern: str) -> web.Response:
        """A list over every collector: each member's part, merged; who did not answer is named."""
        q = request.query
        offset, limit = max(_int(q, "offset", 0), 0), min(max(_int(q, "limit", 100), 1), 1000)
        rest = urlencode([(k, v) for k, v in q.items() if k not in ("offset", "limit", "local")])
        if pattern == "/api/v1/terminals":
            if offset + limit > MAX_MERGED:
                return _error(400, f"a list merged across collectors pages up to offset + limit = {MAX_MERGED}: "
                                   "narrow it (acquirer, site, condition, merchant_id)")
            path = f"{pattern}?{rest}{'&' if rest else ''}offset=0&limit={offset + limit}"
        elif pattern == "/api/v1/sites":
            path = f"{pattern}?{rest}"
        else:
            path = f"{pattern}?{urlencode([(k, v) for k, v in q.items() if k != 'local'])}"
        started = time.monotonic()
        answers, failed = await self.ask_members(path, request.headers.get("Authorization"))
        ok = [a for a in answers if a.status == 200]
        for a in answers:
            if a.status != 200:
                if not ok and a.status < 500:  # the same refusal everywhere (bad filter, token): say it as is
                    return web.Response(text=json.dumps(a.body) if not isinstance(a.body, str) else a.body,
                                        status=a.status, content_type="application/json")
                if a.status == 404:
                    ok.append(a)  # nothing of that scope with this member (e.g. "no such merchant" there)
                    continue
                failed[a.instance] = f"answered {a.status}"
        bodies = [a.body for a in ok if a.status == 200]
        if not bodies and pattern not in ("/api/v1/terminals", "/api/v1/sites"):
            return _error(503, "no collector answered", missing_collectors=dict(sorted(failed.items())))
        leader = next((a for a in ok if a.mass is not None), None)
        if pattern == "/api/v1/terminals":
            merged = merge_terminals(bodies, offset, limit)
        elif pattern == "/api/v1/reconcile":
            merged = merge_reconcile(bodies, min(max(_int(q, "limit", 1000), 1), 10_000))
        elif pattern == "/api/v1/support/facets":
            merged = merge_facets(bodies)
        else:
            merged = merge_sites(bodies, offset, limit, leader.mass if leader else None)
            merged["mass_offline_judged_by"] = leader.instance if leader else None
        merged["collectors"] = sorted(a.instance for a in ok)
        merged["missing_collectors"] = dict(sorted(failed.items()))
        merged["unheld_partitions"] = uncovered(ok, self.n)
        merged["complete"] = not failed and not merged["unheld_partitions"]
        merged["gather_s"] = round(time.monotonic() - started, 3)
        self.requests.labels("list", "complete" if merged["complete"] else "incomplete").inc()
        return web.json_response(merged)
