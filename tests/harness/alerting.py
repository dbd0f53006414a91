"""Prometheus, Alertmanager and a webhook sink for alerting tests: free loopback ports, temp dirs, readiness
polled on /-/ready, stopped by PID. Configs are derived from deploy/ so the tests exercise the shipped files.

Fixtures `alertmanager` and `webhook_sink`: import `alertmanager_fixture, webhook_sink_fixture` into a test module.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from exporters.alerting import rules
from tests.harness.core import ROOT, Process, free_port, http_get, require_binary, spawn, wait_until

DEPLOY_PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DEPLOY_ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
PLACEHOLDER_WEBHOOK = "http://127.0.0.1:5001"


def promtool() -> str:
    """Path of promtool; fails the test when missing."""
    return require_binary("promtool", "/usr/bin/promtool")


def amtool() -> str:
    """Path of amtool; fails the test when missing."""
    return require_binary("amtool", "/usr/bin/amtool")


def _ready(port: int) -> bool:
    return http_get(f"http://127.0.0.1:{port}/-/ready", timeout=1.0)[0] == 200


def _start(argv: list[str], workdir: Path, port: int, what: str) -> Process:
    p = spawn(what, argv, workdir, port)
    try:
        wait_until(lambda: p.alive() and _ready(port), 30, f"{what} ready")
    except TimeoutError:
        p.stop()
        raise RuntimeError(f"{what} did not become ready:\n{p.log_text()[-4000:]}") from None
    return p


def start_alertmanager(workdir: Path, config: Path) -> Process:
    """A real Alertmanager on a free port, clustering off."""
    binary = require_binary("prometheus-alertmanager", "alertmanager", "/usr/bin/prometheus-alertmanager")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",  # no gossip port: one instance, nothing to collide with
    ]
    return _start(argv, workdir, port, "alertmanager")


def start_prometheus(workdir: Path, config: Path, time_scale: int = 30) -> Process:
    """A real Prometheus on a free port; its alert resend delay (1m) divided by time_scale like the rules."""
    binary = require_binary("prometheus", "/usr/bin/prometheus")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        # Alerts that fire before Alertmanager is discovered (up to 5 s) are only re-sent after this delay.
        f"--rules.alert.resend-delay={max(1, 60 // time_scale)}s",
    ]
    return _start(argv, workdir, port, "prometheus")


def write_prometheus_config(
    workdir: Path, collector_port: int, alertmanager_port: int, profile: str = "fast"
) -> Path:
    """deploy/prometheus/prometheus.yml with loopback targets and the profile's rules and intervals."""
    cfg = rules.load_alert_config()
    prof = cfg.profile(profile)
    workdir.mkdir(parents=True, exist_ok=True)
    rule_file = workdir / rules.rule_file_name(profile)
    rule_file.write_text(rules.render_rules(cfg, profile), encoding="utf-8")
    doc: dict[str, Any] = yaml.safe_load(DEPLOY_PROMETHEUS.read_text(encoding="utf-8"))
    doc["global"]["scrape_interval"] = rules.format_duration(prof.scrape_interval)
    doc["global"]["evaluation_interval"] = rules.format_duration(prof.evaluation_interval)
    doc["global"]["scrape_timeout"] = rules.format_duration(prof.scrape_interval)
    doc["rule_files"] = [str(rule_file)]
    doc["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    jobs["posfleet"]["static_configs"] = [{"targets": [f"127.0.0.1:{collector_port}"]}]
    doc["scrape_configs"] = [jobs["posfleet"]]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def write_alertmanager_config(workdir: Path, webhook_base: str, time_scale: int = 30) -> Path:
    """deploy/alertmanager/alertmanager.yml with webhooks to `webhook_base` and route timers divided by scale."""
    doc: dict[str, Any] = yaml.safe_load(DEPLOY_ALERTMANAGER.read_text(encoding="utf-8"))
    for receiver in doc["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = str(hook["url"]).replace(PLACEHOLDER_WEBHOOK, webhook_base.rstrip("/"))

    def scale(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval", "repeat_interval"):
            if key in route:
                seconds = rules.parse_duration(str(route[key]))
                route[key] = rules.format_duration(seconds and max(1, seconds // time_scale))
        for child in route.get("routes", []):
            scale(child)

    scale(doc["route"])
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


class WebhookSink:
    """Collects Alertmanager webhook notifications: (receiver, payload) in arrival order."""

    def __init__(self) -> None:
        self.port = free_port()
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with sink._lock:
                    sink.notifications.append((self.path.strip("/"), json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL; receivers post to <url>/<receiver>."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebhookSink:
        """Serve in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def alerts(self) -> list[tuple[str, str, dict[str, str]]]:
        """(receiver, status, labels) of every alert in every notification so far."""
        with self._lock:
            return [(r, a["status"], a["labels"]) for r, p in self.notifications for a in p["alerts"]]


def am_alerts(port: int) -> list[dict[str, Any]]:
    """Alertmanager's current (unresolved) alerts, including silenced and inhibited ones."""
    status, body = http_get(f"http://127.0.0.1:{port}/api/v2/alerts?silenced=true&inhibited=true&active=true")
    assert status == 200, body[:200]
    answer: list[dict[str, Any]] = json.loads(body)
    return answer
