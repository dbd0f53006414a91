"""`metrics.port`: /metrics only on its own listener (404 on the API's), nothing but /metrics on that one."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.harness.alerting import start_prometheus
from tests.harness.core import (
    Process,
    free_port,
    http_get,
    running,
    start_collector,
    wait_until,
    write_collector_config,
)

pytestmark = pytest.mark.integration


def test_metrics_on_its_own_listener_only(tmp_path: Path, mosquitto: Process) -> None:
    (tmp_path / "terminals.csv").write_text(
        "terminal_id,merchant_id,acquirer,model,site,region\nT00001,M1,acq-a,A920,s0,r\n")
    http_port, metrics_port = free_port(), free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port,
                                    metrics={"host": "127.0.0.1", "port": metrics_port})
    with running(start_collector(tmp_path, config, http_port)) as collector:
        status, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert status == 200
        assert b"posfleet_up 1.0" in body and b"# TYPE posfleet_terminal_problem gauge" in body
        assert b'posfleet_fleet_terminals{acquirer="acq-a"} 1.0' in body

        status, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
        assert status == 404 and b"posfleet_" not in body
        assert http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200  # the API listener is unchanged
        assert http_get(f"http://127.0.0.1:{http_port}/api/v1/terminals?all=1")[0] == 200
        for path in ("/api/v1/terminals?all=1", "/healthz", "/support", "/api/v1/reconcile"):
            assert http_get(f"http://127.0.0.1:{metrics_port}{path}")[0] == 404, path
    log = collector.log_text()
    assert f"/metrics only on http://127.0.0.1:{metrics_port}" in log
    assert "Traceback" not in log


def test_default_keeps_metrics_on_the_api_listener(tmp_path: Path, mosquitto: Process) -> None:
    (tmp_path / "terminals.csv").write_text("terminal_id,merchant_id,acquirer,model,site,region\n")
    http_port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port)
    with running(start_collector(tmp_path, config, http_port)) as collector:
        status, body = http_get(f"http://127.0.0.1:{http_port}/metrics")
        assert status == 200 and b"posfleet_up 1.0" in body
    assert f"HTTP API and /metrics on http://127.0.0.1:{http_port}" in collector.log_text()


def test_metrics_token_and_a_real_prometheus_scraping_with_it(tmp_path: Path, mosquitto: Process) -> None:
    """metrics.token_file: /metrics answers 401 without the token; Prometheus' `authorization.credentials_file`
    scrapes it; the bearer scheme is accepted in any case."""
    (tmp_path / "terminals.csv").write_text("terminal_id,merchant_id,acquirer,model,site,region\n")
    token = "metrics-token-0123456789abcdef"
    token_file = tmp_path / "metrics-token"
    token_file.write_text(token + "\n")
    http_port, metrics_port = free_port(), free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port,
                                    metrics={"port": metrics_port, "token_file": str(token_file)})
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{
            "job_name": "posfleet", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            "authorization": {"credentials_file": str(token_file)},
        }],
    }))
    with running(start_collector(tmp_path, config, http_port)):
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        status, body = http_get(url)
        assert status == 401 and b"posfleet_" not in body
        assert http_get(url, "not-the-token-at-all-0000")[0] == 401
        assert http_get(url, token)[0] == 200
        req = urllib.request.Request(url, headers={"Authorization": f"bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200 and b"posfleet_up 1.0" in resp.read()
        with running(start_prometheus(prom_dir, prom_dir / "prometheus.yml")) as prom:
            def health() -> str:
                _status, body = http_get(f"http://127.0.0.1:{prom.port}/api/v1/targets")
                targets = json.loads(body)["data"]["activeTargets"]
                return str(targets[0]["health"]) if targets and targets[0]["health"] != "unknown" else ""

            assert wait_until(health, 30, "Prometheus' first scrape") == "up"
