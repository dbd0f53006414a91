"""Bad query parameters get a 400 with a JSON error, never a 500 or a body with NaN, through the real HTTP API
(aiohttp on a loopback port, the collector's own app; no broker needed for these routes)."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from collector.app import Collector
from collector.config import Config
from collector.http.routes import build_app

TID = "T00000"


def strict_json(body: str) -> Any:
    """Parse as browsers do: NaN, Infinity and -Infinity are not JSON."""
    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(body, parse_constant=refuse)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    registry = tmp_path / "terminals.csv"
    registry.write_text(f"terminal_id,merchant_id,acquirer,model,site,region\n{TID},M00000,acq-a,A920,s0,r\n")
    cfg = msgspec.convert({"registry": {"path": str(registry)}, "state": {"snapshot_path": None}}, Config)
    collector = Collector.load(cfg)
    async with TestClient(TestServer(build_app(collector))) as c:
        yield c


BAD = [
    "/api/v1/reconcile?day=9999-12-31",  # was a 500 with a traceback (the day after does not exist)
    "/api/v1/receipts?day=9999-12-31",
    "/api/v1/reconcile?day=0001-01-01",
    "/api/v1/reconcile?day=2026-13-01",
    "/api/v1/reconcile?day=yesterday",
    "/api/v1/reconcile?from=1e300",  # was a 500: the window's ISO form cannot be written
    "/api/v1/reconcile?from=-1e300",
    "/api/v1/reconcile?from=nan",
    "/api/v1/reconcile?to=inf",
    "/api/v1/reconcile?from=9999-12-31T23:00-05:00",
    "/api/v1/receipts?to=1e300",
    "/api/v1/reconcile?from=2000&to=1000",
    "/api/v1/reconcile?grace_s=nan",  # was a 200 whose body held NaN
    "/api/v1/reconcile?grace_s=inf",
    "/api/v1/reconcile?grace_s=-inf",
    "/api/v1/reconcile?grace_s=1e308",
    "/api/v1/reconcile?grace_s=-1",
    "/api/v1/reconcile?grace_s=soon",
    "/api/v1/reconcile?limit=1e3",
    "/api/v1/reconcile?limit=" + "9" * 5000,
    f"/api/v1/terminals/{TID}/timeline?hours=nan",
    f"/api/v1/terminals/{TID}/timeline?hours=-inf",
    f"/api/v1/terminals/{TID}/timeline?hours=-1",
    f"/api/v1/terminals/{TID}/timeline?hours=x",
    "/api/v1/terminals?limit=nan",
    "/api/v1/terminals?offset=1.5",
    "/api/v1/terminals?condition=nope",
]


@pytest.mark.parametrize("path", BAD)
async def test_bad_parameters_are_400_with_a_json_error(
    client: TestClient[web.Request, web.Application], path: str
) -> None:
    resp = await client.get(path)
    body = await resp.text()
    assert resp.status == 400, (path, resp.status, body[:300])
    assert resp.content_type == "application/json"
    assert isinstance(strict_json(body)["error"], str)


GOOD = [
    "/api/v1/reconcile?day=9999-12-30",
    "/api/v1/reconcile?day=1970-01-01",
    "/api/v1/reconcile?from=0&to=253402214400",
    "/api/v1/reconcile?from=2026-01-01T00:00:00Z&to=2026-01-02",
    "/api/v1/reconcile?grace_s=0",
    "/api/v1/reconcile?grace_s=31536000",
    "/api/v1/reconcile?limit=99999999999999999999",
    f"/api/v1/terminals/{TID}/timeline?hours=1e308",
    f"/api/v1/terminals/{TID}/diagnosis",
    f"/api/v1/terminals/{TID}",
    "/api/v1/terminals?all=1&limit=99999999999999999999&offset=99999999999999999999",
    "/api/v1/support/facets",
]


@pytest.mark.parametrize("path", GOOD)
async def test_edge_values_that_mean_something_are_answered(
    client: TestClient[web.Request, web.Application], path: str
) -> None:
    resp = await client.get(path)
    body = await resp.text()
    assert resp.status == 200, (path, resp.status, body[:300])
    strict_json(body)


async def test_receipts_lines_are_strict_json(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/api/v1/receipts?day=9999-12-30")
    assert resp.status == 200
    for line in (await resp.text()).splitlines():
        strict_json(line)


async def test_a_nan_that_slips_through_is_a_json_500_not_invalid_json(tmp_path: Path) -> None:
    """Defence in depth: every JSON response refuses NaN, and an unexpected error is a logged JSON 500."""
    collector = Collector(msgspec.convert({"state": {"snapshot_path": None}}, Config))

    async def nan(_request: web.Request) -> web.Response:
        from collector.http.routes import json_response

        return json_response({"x": math.nan})

    async def boom(_request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    def routes(app: web.Application) -> None:
        app.router.add_get("/api/v1/test-nan", nan)
        app.router.add_get("/api/v1/test-boom", boom)

    collector.route_hooks.append(routes)
    async with TestClient(TestServer(build_app(collector))) as c:
        for path in ("/api/v1/test-nan", "/api/v1/test-boom"):
            resp = await c.get(path)
            assert resp.status == 500
            assert strict_json(await resp.text()) == {"error": "internal error"}
