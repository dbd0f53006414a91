"""Real Prometheus and InfluxDB 1.x for the dashboard tests: free loopback ports, readiness polling, stopped by PID.

A missing binary fails the test (never skips): these tests are the proof that every dashboard panel works.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.core import Process, free_port, http_get, require_binary, spawn, wait_until
from tests.harness.tsdb import InfluxD

__all__ = [
    "FakeGrafana",
    "Influx",
    "Prometheus",
    "V2WriteBridge",
    "start_influxd",
    "start_prometheus",
]


def http_post(url: str, body: bytes, content_type: str = "application/x-www-form-urlencoded") -> tuple[int, bytes]:
    """(status, body) of a POST."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _wait_ready(proc: Process, url: str, ok: Callable[[int], bool], timeout: float = 30.0) -> None:
    def ready() -> bool:
        proc.require_alive()
        return ok(http_get(url, timeout=2)[0])

    wait_until(ready, timeout, f"{proc.name} at {url}")


@dataclass
class Prometheus:
    """A running Prometheus and its HTTP API."""

    proc: Process
    url: str

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path> and return `data`, failing the test on an API error."""
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10)
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            pytest.fail(f"Prometheus {path} {params}: HTTP {status}: {doc.get('error', body[:300])}")
        return doc["data"]


@contextlib.contextmanager
def start_prometheus(
    workdir: Path, scrape_targets: dict[str, str], scrape_interval: str = "1s"
) -> Iterator[Prometheus]:
    """Prometheus scraping each `job -> host:port` every `scrape_interval`."""
    binary = require_binary("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    jobs = "\n".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']"
        for job, target in scrape_targets.items()
    )
    config = workdir / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {scrape_interval}\n  evaluation_interval: {scrape_interval}\n"
        f"scrape_configs:\n{jobs}\n",
        encoding="utf-8",
    )
    proc = spawn(
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        workdir,
        port,
        new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, f"{url}/-/ready", lambda s: s == 200)
        yield Prometheus(proc, url)
    finally:
        proc.stop()


@dataclass
class Influx:
    """A running InfluxDB 1.x with one database."""

    url: str
    database: str

    def write(self, lines: str, precision: str = "ns") -> None:
        """Write line protocol through the 1.x /write endpoint."""
        status, body = http_post(
            f"{self.url}/write?db={self.database}&precision={precision}", lines.encode(), "text/plain"
        )
        if status != 204:
            pytest.fail(f"InfluxDB write: HTTP {status}: {body[:300]!r}")

    def query(self, q: str) -> list[dict[str, Any]]:
        """Run InfluxQL; the list of series of the (single) statement. Fails the test on a query error."""
        status, body = http_post(f"{self.url}/query", urllib.parse.urlencode({"db": self.database, "q": q}).encode())
        doc = json.loads(body)
        results = doc.get("results", [])
        if status != 200 or not results or "error" in results[0] or "error" in doc:
            pytest.fail(f"InfluxQL failed: {q}\nHTTP {status}: {body[:500]!r}")
        series: list[dict[str, Any]] = results[0].get("series", [])
        return series


@contextlib.contextmanager
def start_influxd(workdir: Path, database: str = "posfleet") -> Iterator[Influx]:
    """InfluxDB 1.x (the Debian package's influxd, started by tests.harness.tsdb.InfluxD) with `database`."""
    server = InfluxD(workdir)
    server.start()
    try:
        status, body = http_post(
            f"{server.url}/query", urllib.parse.urlencode({"q": f'CREATE DATABASE "{database}"'}).encode()
        )
        if status != 200:
            pytest.fail(f"CREATE DATABASE: HTTP {status}: {body[:300]!r}")
        yield Influx(server.url, database)
    finally:
        server.stop()


class FakeGrafana:
    """Just enough of Grafana's HTTP API for `posfleet grafana push`: folders by uid, dashboard upserts.

    There is no Grafana binary on this machine; this records what the command sends so a test can check it.
    """

    def __init__(self) -> None:
        self.folders: dict[str, str] = {}
        self.folder_creations = 0
        self.dashboards: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """Base URL of the running server."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeGrafana:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                fake.auth.add(self.headers.get("Authorization", ""))
                uid = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/api/folders/") and uid in fake.folders:
                    self._reply(200, {"uid": uid, "title": fake.folders[uid]})
                else:
                    self._reply(404, {"message": "not found"})

            def do_POST(self) -> None:
                fake.auth.add(self.headers.get("Authorization", ""))
                doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/folders":
                    fake.folders[doc["uid"]] = doc["title"]
                    fake.folder_creations += 1
                    self._reply(200, {"uid": doc["uid"], "title": doc["title"]})
                elif self.path == "/api/dashboards/db":
                    fake.dashboards.append(doc)
                    self._reply(200, {"status": "success", "uid": doc["dashboard"]["uid"]})
                else:
                    self._reply(404, {"message": "not found"})

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()


class V2WriteBridge:
    """Accepts InfluxDB 2's write API (what the collector speaks) and forwards each batch, unchanged, to an
    InfluxDB 1.x `/write` (what this machine has: InfluxDB 1.6 predates `/api/v2/write`).

    Only the URL is translated; the line protocol the collector produced is stored as is, so InfluxQL queries
    run against exactly what a real deployment would hold.
    """

    def __init__(self, influx: Influx) -> None:
        self.influx = influx
        self.lines = 0
        self.errors: list[str] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """Base URL to configure as the collector's influx.url."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> V2WriteBridge:
        bridge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # /ping, /health
                self.send_response(204 if self.path.startswith("/ping") else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if url.path != "/api/v2/write":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                precision = urllib.parse.parse_qs(url.query).get("precision", ["ns"])[0]
                status, reply = http_post(
                    f"{bridge.influx.url}/write?db={bridge.influx.database}&precision={precision}", body, "text/plain"
                )
                if status == 204:
                    bridge.lines += body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
                else:
                    bridge.errors.append(f"{status}: {reply[:300]!r}")
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()
