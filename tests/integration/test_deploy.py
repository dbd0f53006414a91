"""Deployment artefacts: the compose file validates against the Compose specification, the systemd unit
verifies, and deploy/single-host.sh brings the whole stack up on this machine (free ports, temp prefix),
enforces the per-terminal ACL, reports status and tears everything down.

The Dockerfile is not built here (no Docker engine on this machine); docs/deploy.md says how to build it.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness.core import http_get, require_binary, wait_until
from tests.harness.stack import alive, port_args, script, stack_pids

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "single-host.sh"
COMPOSE = DEPLOY / "docker-compose.yml"


# ------------------------------------------------------------------------------------------------ compose


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    """The compose-spec JSON schema vendored by check-jsonschema (a PyPI package)."""
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )


def interpolate(text: str) -> str:
    """`${VAR:-default}` -> default, as docker compose does with VAR unset (the parser below does not)."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), text)


def compose_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text()))
    return doc


def test_compose_file_validates_against_the_compose_spec() -> None:
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    # A second, independent implementation: the compose_spec Rust parser rejects unknown keys and bad values.
    from compose_spec import PyOptions

    parsed = PyOptions(apply_merge=True).from_yaml(interpolate(COMPOSE.read_text()))
    parsed.validate()
    assert set(parsed.service_names()) == {
        "mosquitto",
        "influxdb",
        "collector",
        "prometheus",
        "alertmanager",
        "grafana",
        "simulator",
        # profile "nats" (deploy/nats/, docs/scale.md)
        "nats-1",
        "nats-2",
        "nats-3",
        "nats-streams",
        "collector-nats-1",
        "collector-nats-2",
    }


def test_the_validators_reject_a_broken_compose_file(tmp_path: Path) -> None:
    from compose_spec import PyOptions

    doc = compose_doc()
    doc["services"]["collector"]["restart"] = "sometimes"
    doc["services"]["grafana"]["portz"] = ["3000:3000"]
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(doc))
    assert check_jsonschema(broken).returncode == 1
    with pytest.raises(ValueError):
        PyOptions(apply_merge=True).from_yaml(broken.read_text())


def test_compose_references_resolve() -> None:
    """Everything the compose file points at exists (secrets excepted: the operator creates those)."""
    doc = compose_doc()
    services = doc["services"]
    named_volumes = set(doc["volumes"])
    secrets = set(doc["secrets"])
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source} not declared"
        for secret in svc.get("secrets", []):
            assert secret in secrets, f"{name}: secret {secret} not declared"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name}: depends on unknown {dep}"
        if "build" in svc:
            assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("./secrets/"), "secret files live in deploy/secrets (not committed)"
    assert services["simulator"]["profiles"] == ["simulator"]
    # The simple deployment stays as it was: the scale-out services start only with `--profile nats`.
    assert all(services[n]["profiles"] == ["nats"] for n in services if "nats" in n)
    assert "../alert_rules:/etc/prometheus/rules:ro" in services["prometheus"]["volumes"]
    # Prometheus' config (deploy/prometheus/) loads the rules from where compose mounts them.
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/rules/posfleet.rules.yml"]
    assert (ROOT / "alert_rules/posfleet.rules.yml").is_file()
    # Terminals reach the terminal listener only; the gateway listener stays inside the compose network.
    assert services["mosquitto"]["ports"] == ["1883:1883"]
    assert "--mqtt-url=mqtt://mosquitto:1884" in services["simulator"]["command"]


def test_compose_collector_config_is_valid(tmp_path: Path) -> None:
    """The collector config inlined in the compose file loads with the collector's own loader."""
    from collector.config import load_config

    doc = compose_doc()
    content = doc["configs"]["collector_yaml"]["content"]
    mount = next(v for v in doc["services"]["collector"]["volumes"] if v.endswith(":/etc/posfleet/terminals.csv:ro"))
    registry = DEPLOY / mount.split(":", 1)[0]
    # The loader checks that secret files are readable: stand-ins replace the container's secret mounts.
    secrets = {"/run/secrets/influxdb_token": "influx-token", "/run/secrets/collector_mqtt_password": "mqtt-pass"}
    for mount_path, name in secrets.items():
        assert mount_path in content
        (tmp_path / name).write_text("stand-in secret\n")
        content = content.replace(mount_path, str(tmp_path / name))
    path = tmp_path / "collector.yaml"
    path.write_text(content.replace("/etc/posfleet/terminals.csv", str(registry)))
    cfg = load_config(path)
    assert cfg.mqtt.url == "mqtt://mosquitto:1883"
    assert cfg.http.host == "0.0.0.0"
    assert cfg.influx.enabled and cfg.influx.url == "http://influxdb:8086"
    assert cfg.influx.token_file == str(tmp_path / "influx-token")
    assert cfg.mqtt.password_file == str(tmp_path / "mqtt-pass")


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    unit = tmp_path / "posfleet-collector.service"
    # Same unit, pointed at this checkout's Python so that the ExecStart binary exists here.
    text = (DEPLOY / "systemd/posfleet-collector.service").read_text()
    assert "ExecStart=/opt/posfleet/venv/bin/posfleet run" in text
    unit.write_text(text.replace("/opt/posfleet/venv/bin/posfleet", f"{sys.executable} -m collector.cli"))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


# -------------------------------------------------------------------------------------------- single host


def metric(port: int, name: str) -> float | None:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def heartbeat(tid: str, seq: int) -> str:
    return json.dumps(
        {
            "tid": tid,
            "ts": time.time(),
            "seq": seq,
            "interval_s": 30,
            "txn_count": 0,
            "uploaded_count": 0,
            "queue_depth": 0,
            "oldest_queued_ts": None,
            "mid": "M1",
            "model": "A920",
            "app_version": "3.4.1",
        }
    )


def publish(port: int, user: str | None, password: str | None, topic: str, payload: str) -> int:
    pub = require_binary("mosquitto_pub")
    auth = ["-u", user, "-P", password or ""] if user else []
    return subprocess.run(
        [pub, "-h", "127.0.0.1", "-p", str(port), *auth, "-q", "1", "-t", topic, "-m", payload],
        capture_output=True,
        timeout=10,
    ).returncode


def test_single_host_stack_up_status_down(stack_prefix: Path, ports: dict[str, int], tmp_path: Path) -> None:
    for binary in ("mosquitto", "mosquitto_passwd", "victoria-metrics", "prometheus", "prometheus-alertmanager"):
        require_binary(binary)
    # An operator's terminal credential and registry, present before `up`: the script must keep them.
    secrets = stack_prefix / "secrets"
    secrets.mkdir(mode=0o700)
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(secrets / "mosquitto_passwd"), "T00001", "t1-pass"], check=True)
    registry = tmp_path / "terminals.csv"
    registry.write_text("terminal_id,merchant_id,acquirer,model,site,region\nT00001,M1,acq-a,A920,acq-a-site0,acq\n")

    up = script(stack_prefix, *port_args(ports), "--registry", str(registry), "up")
    assert up.returncode == 0, up.stdout + up.stderr
    pids = stack_pids(stack_prefix)
    assert set(pids) == {"mosquitto", "victoria-metrics", "alertmanager", "collector", "prometheus"}
    status = script(stack_prefix, "status")
    assert status.returncode == 0, status.stdout
    assert status.stdout.count(": up (pid") == 5

    # Prometheus scrapes the collector, loads posfleet's alert rules and talks to Alertmanager.
    prom = f"http://127.0.0.1:{ports['prometheus']}"

    def posfleet_target_up() -> bool:
        targets = json.loads(http_get(f"{prom}/api/v1/targets")[1])["data"]["activeTargets"]
        return any(t["labels"]["job"] == "posfleet" and t["health"] == "up" for t in targets)

    wait_until(posfleet_target_up, 30, "Prometheus to scrape the collector")
    rules = json.loads(http_get(f"{prom}/api/v1/rules")[1])["data"]["groups"]
    assert rules, "no alert rules loaded from alert_rules/"
    wait_until(
        lambda: bool(json.loads(http_get(f"{prom}/api/v1/alertmanagers")[1])["data"]["activeAlertmanagers"]),
        30,
        "Prometheus to discover Alertmanager",
    )
    assert http_get(f"http://127.0.0.1:{ports['vm']}/health")[0] == 200

    # Mosquitto: the collector is connected with its generated credential; a terminal may publish only
    # under its own id and only on the terminal listener; the simulator's credential works on the gateway
    # listener for any terminal; wrong passwords and anonymous clients are refused.
    collector = ports["collector"]
    assert metric(collector, "posfleet_mqtt_connected") == 1
    accepted = 'posfleet_messages_total{kind="heartbeat",result="accepted"}'
    assert metric(collector, accepted) == 0
    mqtt, gateway = ports["mqtt"], ports["gateway"]
    simulator_password = (secrets / "simulator_mqtt_password").read_text().strip()
    assert publish(mqtt, "T00001", "t1-pass", "pos/v1/T00002/heartbeat", heartbeat("T00002", 1)) == 0
    assert publish(mqtt, "T00001", "wrong", "pos/v1/T00001/heartbeat", heartbeat("T00001", 1)) != 0
    assert publish(mqtt, None, None, "pos/v1/T00001/heartbeat", heartbeat("T00001", 1)) != 0
    assert publish(gateway, "T00001", "t1-pass", "pos/v1/T00001/heartbeat", heartbeat("T00001", 1)) == 0
    assert publish(mqtt, "T00001", "t1-pass", "pos/v1/T00001/heartbeat", heartbeat("T00001", 1)) == 0
    assert (
        publish(gateway, "posfleet-simulator", simulator_password, "pos/v1/T00003/heartbeat", heartbeat("T00003", 1))
        == 0
    )
    wait_until(lambda: metric(collector, accepted) == 2, 10, "the two permitted heartbeats")
    # The forged and misrouted heartbeats (sent first, same broker) never reached the collector.
    terminals = json.loads(http_get(f"http://127.0.0.1:{collector}/api/v1/terminals?all=1")[1])["terminals"]
    by_id = {t["terminal_id"]: t for t in terminals}
    assert set(by_id) == {"T00001", "T00003"}
    assert by_id["T00001"]["acquirer"] == "acq-a", "the --registry file was not used"

    # History reaches VictoriaMetrics (the line-protocol server) through the collector's InfluxDB writer.
    vm = f"http://127.0.0.1:{ports['vm']}"

    def history_stored() -> bool:
        # /api/v1/export reads raw samples (queries hide the last 30 s by VictoriaMetrics' latency offset).
        match = urllib.parse.urlencode({"match[]": '{__name__="heartbeat_seq",terminal_id="T00001"}'})
        lines = http_get(f"{vm}/api/v1/export?{match}")[1].decode().splitlines()
        return any(json.loads(line)["metric"].get("acquirer") == "acq-a" for line in lines)

    wait_until(history_stored, 20, "heartbeat history in VictoriaMetrics")

    down = script(stack_prefix, "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [name for name, pid in pids.items() if alive(pid)]
    assert not list((stack_prefix / "run").glob("*.pid"))
    after = script(stack_prefix, "status")
    assert after.returncode == 3 and after.stdout.count("not running") == 5
    # Down twice is harmless.
    assert script(stack_prefix, "down").returncode == 0


def test_single_host_up_fails_cleanly_on_a_busy_port(stack_prefix: Path, ports: dict[str, int]) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports["prometheus"]))
        squatter.listen()
        up = script(stack_prefix, *port_args(ports), "up")
    assert up.returncode == 1
    assert f"port {ports['prometheus']} is already in use" in up.stderr
    # Everything started before the failure was stopped again.
    assert not [name for name, pid in stack_pids(stack_prefix).items() if alive(pid)]
    assert script(stack_prefix, "status").returncode == 3


def test_single_host_usage_errors(tmp_path: Path) -> None:
    assert script(tmp_path, "sideways").returncode == 1
    assert script(tmp_path).returncode == 2
