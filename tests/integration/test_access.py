"""Access control on every API endpoint and the support page: no token -> 401, a token for another acquirer ->
403/404 or nothing of the other acquirer in lists, a valid token -> the data; upstream ingestion needs the write
scope; tokens come from the file and from the environment."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from collector.app import Collector
from collector.config import Config, HttpConfig, RegistryConfig, StateConfig
from collector.http.routes import build_app
from collector.sim.simulator import Simulator, make_fleet
from tests.harness.core import Process, http_get, wait_until
from tests.integration.test_support_stack import ENV_TOKEN, TOKENS, all_heard, get_json, post, start_stack

pytestmark = pytest.mark.integration

A_TID, B_TID, MERCHANT = "T00000", "T00001", "M00000"  # M00000 has terminals at both acquirers
UPSTREAM = "/api/v1/upstream/acq-a/transactions"

# Every GET endpoint, in the form the router knows it, with a request for acquirer A's data.
A_SPECIFIC = {
    "/api/v1/terminals/{terminal_id}": f"/api/v1/terminals/{A_TID}",
    "/api/v1/terminals/{terminal_id}/diagnosis": f"/api/v1/terminals/{A_TID}/diagnosis",
    "/api/v1/terminals/{terminal_id}/timeline": f"/api/v1/terminals/{A_TID}/timeline",
}
SCOPED = {  # query-scoped endpoints: terminal -> 404, acquirer -> 403 for a token without that acquirer
    "/api/v1/reconcile": "/api/v1/reconcile",
    "/api/v1/receipts": "/api/v1/receipts",
}
LISTS = {
    "/api/v1/terminals": "/api/v1/terminals?all=1&limit=1000",
    "/api/v1/support/facets": "/api/v1/support/facets",
    "/api/v1/sites": "/api/v1/sites?limit=1000",
}
PAGE = {"/support", "/support/", "/support/static/{name}"}
PUBLIC = {"/healthz", "/readyz", "/metrics"}  # no terminal data behind a token by design (Prometheus scrapes)


def test_every_route_is_covered() -> None:
    """A new endpoint must be added to this file's tables."""
    collector = Collector(Config())  # nothing starts: only the routes are read
    app = build_app(collector)
    routes = {r.resource.canonical for r in app.router.routes() if r.resource is not None}
    covered = set(A_SPECIFIC) | set(SCOPED) | set(LISTS) | PAGE | PUBLIC | {
        "/api/v1/upstream/{acquirer_id}/transactions"}
    assert routes == covered, routes ^ covered


def lines(body: bytes) -> list[dict[str, object]]:
    return [json.loads(x) for x in body.splitlines() if x.strip()]


async def test_tokens_scope_every_endpoint_and_the_page(tmp_path: Path, mosquitto: Process) -> None:
    specs = make_fleet(8, ("acq-a", "acq-b"))
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 0.5, receipts=True)
    sim.drop_every_nth = 3  # something unreconciled on both acquirers
    collector = start_stack(tmp_path, mosquitto.port, sim, thresholds={"upstream_grace_s": 1})
    port = collector.port
    a_tids = {s.tid for s in specs if s.acquirer == "acq-a"}
    b_tids = {s.tid for s in specs if s.acquirer == "acq-b"}

    def status(path: str, token: str | None) -> int:
        return http_get(f"http://127.0.0.1:{port}{path}", token)[0]

    try:
        async with sim:
            await asyncio.to_thread(wait_until, lambda: all_heard(port, specs), 20, "every terminal heard")
            await asyncio.to_thread(
                wait_until, lambda: get_json(port, "/api/v1/reconcile")["totals"]["missing_at_acquirer"] >= 4, 20,
                "unreconciled transactions on both acquirers")
            every_get = [*A_SPECIFIC.values(), *SCOPED.values(), *LISTS.values(),
                         f"/api/v1/reconcile?terminal_id={A_TID}", "/api/v1/receipts?acquirer=acq-a"]
            # 1. No token, or a wrong one: 401 everywhere under /api/, including the write endpoint.
            for path in every_get:
                assert status(path, None) == 401, path
                assert status(path, "not-a-valid-token-at-all") == 401, path
            assert post(port, UPSTREAM, b'{"ts":1800000000,"txns":[]}', None)[0] == 401

            # 2. Acquirer B's token: A's terminal does not exist, A's acquirer is forbidden.
            b = TOKENS["b"]
            for path in A_SPECIFIC.values():
                assert status(path, b) == 404, path
            for path in SCOPED.values():
                assert status(f"{path}?terminal_id={A_TID}", b) == 404, path
                assert status(f"{path}?acquirer=acq-a", b) == 403, path
                assert status(f"{path}?merchant_id=NOBODY", b) == 404, path
            listed = {t["terminal_id"] for t in get_json(port, LISTS["/api/v1/terminals"], b)["terminals"]}
            assert listed == b_tids
            assert get_json(port, "/api/v1/terminals?all=1&acquirer=acq-a", b)["total"] == 0
            facets = get_json(port, LISTS["/api/v1/support/facets"], b)
            assert facets["acquirers"] == ["acq-b"] and set(facets["sites"]) == {"acq-b"}
            sites = get_json(port, LISTS["/api/v1/sites"], b)["sites"]
            assert sites and {s["acquirer"] for s in sites} == {"acq-b"}
            for path in ("/api/v1/reconcile", f"/api/v1/reconcile?merchant_id={MERCHANT}"):
                r = get_json(port, path, b)
                items = r["missing_at_acquirer"] + r["pending"]
                assert items and {x["terminal_id"] for x in items} <= b_tids, path
            _, body = http_get(f"http://127.0.0.1:{port}/api/v1/receipts?merchant_id={MERCHANT}", b)
            assert lines(body) and {x["terminal_id"] for x in lines(body)} <= b_tids
            assert not any(tid.encode() in body for tid in a_tids)
            assert post(port, UPSTREAM, b'{"ts":1800000000,"txns":[]}', b)[0] == 403  # read scope cannot write

            # 3. Valid tokens (file and environment) see A's data on every endpoint.
            for token in (TOKENS["a"], ENV_TOKEN, TOKENS["all"]):
                for path in every_get:
                    assert status(path, token) == 200, (path, token[:8])
                d = get_json(port, f"/api/v1/terminals/{A_TID}/diagnosis", token)
                assert d["terminal_id"] == A_TID
            a_list = {t["terminal_id"] for t in get_json(port, LISTS["/api/v1/terminals"], TOKENS["a"])["terminals"]}
            assert a_list == a_tids
            both = {t["terminal_id"] for t in get_json(port, LISTS["/api/v1/terminals"], TOKENS["ab"])["terminals"]}
            assert both == a_tids | b_tids

            # 4. The write scope is separate: it ingests, it reads nothing.
            writer = TOKENS["writer"]
            assert post(port, UPSTREAM, b'{"ts":1800000000,"txns":[]}', writer)[0] == 202
            assert status(f"/api/v1/terminals/{A_TID}/diagnosis", writer) == 404
            assert get_json(port, LISTS["/api/v1/terminals"], writer)["total"] == 0
            assert status("/api/v1/reconcile?acquirer=acq-a", writer) == 403

            # 5. The page: its files are served to anyone and hold no data; all data needs the token.
            for path in ("/support", "/support/", "/support/static/app.js", "/support/static/style.css"):
                code, page = http_get(f"http://127.0.0.1:{port}{path}")
                assert code == 200, path
                assert not any(tid.encode() in page for tid in a_tids | b_tids)
            for path in ("/support/static/index.htm", "/support/static/..%2Fapi.py", "/support/static/x"):
                assert status(path, None) == 404, path
    finally:
        collector.stop()
    log = collector.log_text()
    assert "Traceback" not in log
    assert not any(token in log for token in (*TOKENS.values(), ENV_TOKEN))  # tokens are never logged


WRITE_ALL, WRITE_A, READ_ALL = "tok-write-all-0123456789", "tok-write-acq-a-0123456789", "tok-read-all-0123456789"


async def test_upstream_scopes_per_acquirer_and_any_case_bearer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`write:upstream:<acquirer>` posts that acquirer's feed only; `write:upstream` any known acquirer; an
    acquirer nobody configured is 404; the bearer scheme is accepted in any case (RFC 7235)."""
    from aiohttp.test_utils import TestClient, TestServer

    monkeypatch.delenv("POSFLEET_API_TOKENS", raising=False)
    registry = tmp_path / "terminals.csv"
    registry.write_text("terminal_id,merchant_id,acquirer,model,site,region\n"
                        f"{A_TID},M1,acq-a,A920,s0,r\n{B_TID},M1,acq-b,A920,s0,r\n")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{WRITE_ALL} write:upstream\n{WRITE_A} write:upstream:acq-a\n{READ_ALL} read:*\n")
    cfg = Config(registry=RegistryConfig(path=str(registry)), http=HttpConfig(tokens_file=str(tokens)),
                 state=StateConfig(snapshot_path=None))
    body = json.dumps({"ts": 1_800_000_000, "txns": [{"tid": A_TID, "txn_id": "x1", "ts": 1_800_000_000}]})

    collector = Collector.load(cfg)
    async with TestClient(TestServer(build_app(collector))) as client:
        async def post_as(token: str, acquirer: str, scheme: str = "Bearer") -> tuple[int, dict[str, object]]:
            resp = await client.post(f"/api/v1/upstream/{acquirer}/transactions", data=body,
                                     headers={"Authorization": f"{scheme} {token}"})
            return resp.status, await resp.json()

        assert (await post_as(WRITE_A, "acq-a"))[0] == 202
        assert (await post_as(WRITE_A, "acq-a", scheme="bearer"))[0] == 202
        status, err = await post_as(WRITE_A, "acq-b")
        assert (status, err) == (403, {"error": "token lacks write:upstream:<acquirer> for this acquirer"})
        assert (await post_as(WRITE_A, "acq-zzz"))[0] == 403  # a scoped token learns nothing of other names
        assert (await post_as(WRITE_ALL, "acq-b"))[0] == 202
        refused = collector.fleet.refused["feeds"]
        assert await post_as(WRITE_ALL, "acq-zzz") == (404, {"error": "unknown acquirer"})
        assert collector.fleet.refused["feeds"] == refused + 1  # every drop is counted
        # A card number in the URL is rejected as card data (and counted) before anything else looks at it.
        status, err = await post_as(WRITE_ALL, "4111111111111111")
        assert (status, err["reason"]) == (400, "card_data") and "4111111111111111" not in json.dumps(err)
        assert "4111111111111111" not in json.dumps(await post_as(WRITE_A, "4111111111111111"))
        status, err = await post_as(READ_ALL, "acq-a")
        assert (status, err) == (403, {"error": "token lacks write:upstream"})
        for scheme in ("bearer", "BEARER", "Bearer"):
            resp = await client.get("/api/v1/terminals?all=1", headers={"Authorization": f"{scheme} {READ_ALL}"})
            assert resp.status == 200, scheme
            assert (await resp.json())["total"] == 2
        resp = await client.get("/api/v1/terminals", headers={"Authorization": f"Basic {READ_ALL}"})
        assert resp.status == 401
