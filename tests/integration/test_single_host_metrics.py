"""`deploy/single-host.sh --metrics-port`: the collector serves /metrics only there and Prometheus scrapes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.core import free_port, http_get, require_binary, wait_until
from tests.harness.stack import port_args, script

pytestmark = pytest.mark.integration


def test_single_host_metrics_listener(stack_prefix: Path, ports: dict[str, int]) -> None:
    for binary in ("mosquitto", "mosquitto_passwd", "victoria-metrics", "prometheus", "prometheus-alertmanager"):
        require_binary(binary)
    metrics_port = free_port()
    up = script(stack_prefix, *port_args(ports), "--metrics-port", str(metrics_port), "up")
    assert up.returncode == 0, up.stdout + up.stderr
    config = (stack_prefix / "etc/collector.yaml").read_text()
    assert f"metrics:\n  host: 127.0.0.1\n  port: {metrics_port}\n" in config
    assert f"METRICS_PORT={metrics_port}" in (stack_prefix / "stack.env").read_text()

    assert http_get(f"http://127.0.0.1:{ports['collector']}/metrics")[0] == 404
    status, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert status == 200 and b"posfleet_up 1.0" in body
    prom = f"http://127.0.0.1:{ports['prometheus']}"

    def posfleet_target() -> dict[str, object] | None:
        targets = json.loads(http_get(f"{prom}/api/v1/targets")[1])["data"]["activeTargets"]
        return next((t for t in targets if t["labels"]["job"] == "posfleet" and t["health"] == "up"), None)

    target = wait_until(posfleet_target, 30, "Prometheus to scrape the metrics listener")
    assert target["scrapeUrl"] == f"http://127.0.0.1:{metrics_port}/metrics"
    assert script(stack_prefix, "status").returncode == 0
