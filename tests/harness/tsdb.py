"""Real time-series servers for tests and benches: VictoriaMetrics and InfluxDB 1.6 on free loopback ports.

Each server runs in its own temp directory, is polled until it answers, and is stopped by its PID. A missing
binary makes the test fail (never skip): a test that cannot run has not passed.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness.core import Process, free_port, spawn, wait_until

__all__ = [
    "InfluxD",
    "VictoriaMetrics",
    "free_port",
]

VM_BIN = os.environ.get("POSFLEET_VM_BIN", "/usr/bin/victoria-metrics")
INFLUXD_BIN = os.environ.get("POSFLEET_INFLUXD_BIN", "/usr/bin/influxd")


def _binary(path: str) -> str:
    found = shutil.which(path)
    if found is None:
        pytest.fail(f"required binary {path} is not installed", pytrace=False)
    return found


def _http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= int(r.status) < 300
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class VictoriaMetrics:
    """A VictoriaMetrics process; InfluxDB line protocol in at /api/v2/write, samples out at /api/v1/export."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    proc: Process | None = None

    @property
    def url(self) -> str:
        """Base URL, also the `url` for the InfluxDB writer."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start (or restart, same data and port) and wait until /health answers."""
        assert self.proc is None or not self.proc.alive(), "already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(
            "victoria-metrics",
            [_binary(VM_BIN), f"-httpListenAddr=127.0.0.1:{self.port}", f"-storageDataPath={self.data_dir}",
             "-retentionPeriod=100y", "-search.latencyOffset=0s", "-loggerLevel=WARN"],
            self.data_dir.parent, self.port, log=self.data_dir.parent / f"{self.data_dir.name}.log",
        )
        wait_until(self._alive_and_healthy, timeout, "victoria-metrics /health")

    def _alive_and_healthy(self) -> bool:
        assert self.proc is not None
        self.proc.require_alive()
        return _http_ok(self.url + "/health")

    def stop(self) -> None:
        """SIGTERM by PID (VictoriaMetrics flushes on SIGTERM), SIGKILL if it hangs."""
        if self.proc is not None:
            self.proc.stop(timeout=20)

    def export(self, match: str) -> list[dict[str, Any]]:
        """Every raw sample of the series matching `match` (duplicates included: nothing is deduplicated)."""
        urllib.request.urlopen(self.url + "/internal/force_flush", timeout=10).read()
        query = urllib.parse.urlencode({"match[]": match, "start": "0"})
        with urllib.request.urlopen(f"{self.url}/api/v1/export?{query}", timeout=60) as r:
            body = r.read().decode()
        return [json.loads(line) for line in body.splitlines() if line.strip()]


@dataclass
class InfluxD:
    """An InfluxDB 1.6 process (v1 /write and /query with InfluxQL; it has no /api/v2/write)."""

    base_dir: Path
    port: int = field(default_factory=free_port)
    proc: Process | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Write a loopback-only config into the temp dir, start, wait until /ping answers."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        conf = self.base_dir / "influxd.conf"
        conf.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{free_port()}"
[meta]
  dir = "{self.base_dir}/meta"
[data]
  dir = "{self.base_dir}/data"
  wal-dir = "{self.base_dir}/wal"
  query-log-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
""",
            encoding="utf-8",
        )
        self.proc = spawn("influxd", [_binary(INFLUXD_BIN), "run", "-config", str(conf)], self.base_dir, self.port)

        def ready() -> bool:
            assert self.proc is not None
            self.proc.require_alive()
            return _http_ok(self.url + "/ping")

        wait_until(ready, timeout, "influxd /ping")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it hangs."""
        if self.proc is not None:
            self.proc.stop(timeout=20)

    def query(self, q: str, db: str = "posfleet") -> dict[str, Any]:
        """Run InfluxQL, return the decoded JSON answer (nanosecond epoch timestamps)."""
        data = urllib.parse.urlencode({"q": q, "db": db, "epoch": "ns"}).encode()
        with urllib.request.urlopen(self.url + "/query", data=data, timeout=30) as r:
            result: dict[str, Any] = json.loads(r.read())
        return result

    def write_v1(self, body: str, db: str = "posfleet", rp: str = "") -> None:
        """Write line protocol through the v1 API (nanosecond timestamps)."""
        query = urllib.parse.urlencode({"db": db, "precision": "ns", **({"rp": rp} if rp else {})})
        req = urllib.request.Request(f"{self.url}/write?{query}", data=body.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 204, r.status
