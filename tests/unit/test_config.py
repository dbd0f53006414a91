"""The configuration: strict keys, every problem reported at once, the shipped example valid."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from collector.config import ConfigError, config_warnings, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_the_shipped_example_load() -> None:
    assert load_config(None).thresholds.offline_factor == 3
    cfg = load_config(ROOT / "deploy" / "collector.example.yaml")
    assert cfg.software_policy["A920"] == "3.2.0"


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("thresholds:\n  offline_factr: 3\n")
    with pytest.raises(ConfigError, match="offline_factr"):
        load_config(path)


def test_every_semantic_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POSFLEET_INFLUX_TOKEN", raising=False)  # the environment would win over the file
    path = tmp_path / "c.yaml"
    path.write_text(
        "mqtt: {url: 'http://broker', password_file: /nonexistent/password}\n"
        "registry: {path: /nonexistent.csv}\n"
        "software_policy: {A920: banana}\n"
        "influx: {enabled: true, token_file: /nonexistent/token}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for needle in ("mqtt.url", "mqtt.password_file", "registry.path", "software_policy.A920", "influx.token_file"):
        assert needle in text


def test_every_structural_problem_is_reported_at_once(tmp_path: Path) -> None:
    # msgspec stops at the first problem; the loader checks field by field and names every one.
    path = tmp_path / "c.yaml"
    path.write_text(
        "mqtt: {url: 'mqtt://b', keepalive_s: -3, bogus: 1, tls: {ca_fle: x}}\n"
        "thresholds: {offline_factr: 3, offline_factor: -1}\n"
        "http: {port: abc}\n"
        "influx: {batch_size: 0}\n"
        "extra_top: 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for needle in ("extra_top: unknown key", "mqtt.bogus: unknown key", "mqtt.keepalive_s", "mqtt.tls.ca_fle",
                   "http.port", "thresholds.offline_factr: unknown key", "thresholds.offline_factor",
                   "influx: batch_size must be > 0"):
        assert needle in text, (needle, text)


def test_bad_values_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("thresholds: {offline_factor: -1}\n")
    with pytest.raises(ConfigError, match="offline_factor"):
        load_config(path)
    path.write_text("mqtt: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_metrics_listener_options(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    assert load_config(None).metrics.port is None  # default: /metrics stays on the API listener
    path.write_text("http: {port: 9108}\nmetrics: {host: 10.0.0.5, port: 9109}\n")
    cfg = load_config(path)
    assert (cfg.metrics.host, cfg.metrics.port) == ("10.0.0.5", 9109)
    path.write_text("metrics: {host: 10.0.0.5}\n")
    with pytest.raises(ConfigError, match=r"metrics\.host: needs metrics\.port"):
        load_config(path)
    path.write_text("http: {host: 127.0.0.1, port: 9108}\nmetrics: {port: 9108}\n")
    with pytest.raises(ConfigError, match=r"metrics\.port: must differ"):
        load_config(path)
    path.write_text("metrics: {port: 70000}\n")
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        load_config(path)


def test_mqtt_tls_files_are_checked_at_load(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for f in (ca, cert, key):
        f.write_text("-----BEGIN-----\n")
    path = tmp_path / "c.yaml"
    path.write_text(
        f"mqtt: {{url: 'mqtts://broker:8883', tls: {{ca_file: {ca}, cert_file: {cert}, key_file: {key}}}}}\n")
    tls = load_config(path).mqtt.tls
    assert tls is not None and tls.ca_file == str(ca)
    path.write_text(f"mqtt: {{url: 'mqtts://broker:8883', tls: {{ca_file: {ca}}}}}\n")
    assert load_config(path).mqtt.tls is not None  # a private CA alone (no client certificate) is fine
    path.write_text(
        f"mqtt: {{url: 'mqtt://broker:1883', tls: {{ca_file: {tmp_path}/missing.pem, cert_file: {cert}}}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for needle in ("needs an mqtts:// url", "cert_file and key_file go together", "mqtt.tls.ca_file: no such file"):
        assert needle in text, text
    path.write_text("mqtt: {url: 'mqtts://b', tls: {ca_fle: x}}\n")
    with pytest.raises(ConfigError, match="ca_fle"):
        load_config(path)


@pytest.mark.parametrize(("url", "warned"), [
    ("mqtt://broker.example:1883", True), ("mqtt://10.1.2.3", True), ("mqtts://broker.example", False),
    ("mqtt://127.0.0.1:1883", False), ("mqtt://localhost", False), ("mqtt://[::1]:1883", False),
])
def test_a_password_over_plain_mqtt_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, url: str, warned: bool
) -> None:
    monkeypatch.delenv("POSFLEET_MQTT_PASSWORD", raising=False)
    secret = tmp_path / "password"
    secret.write_text("s3cret-value\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"mqtt: {{url: '{url}', username: collector, password_file: {secret}}}\n")
    with caplog.at_level(logging.WARNING, logger="collector.config"):
        cfg = load_config(path)
    assert bool(config_warnings(cfg)) is warned
    assert ("clear text" in caplog.text) is warned
    assert "s3cret" not in caplog.text
    # a username without any password sends nothing secret
    path.write_text(f"mqtt: {{url: '{url}', username: collector}}\n")
    assert config_warnings(load_config(path), env={}) == []
    assert bool(config_warnings(load_config(path), env={"POSFLEET_MQTT_PASSWORD": "x"})) is warned


def test_check_config_says_so(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-value\n")
    path = tmp_path / "c.yaml"
    path.write_text(f"mqtt: {{url: 'mqtt://broker.example', username: c, password_file: {secret}}}\n")
    result = subprocess.run([sys.executable, "-m", "collector.cli", "check-config", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "clear text" in result.stderr


def test_metrics_token_file_is_checked_at_load(tmp_path: Path) -> None:
    path, token = tmp_path / "c.yaml", tmp_path / "token"
    token.write_text("metrics-token-0123456789\n")
    path.write_text(f"metrics: {{token_file: {token}}}\n")
    assert load_config(path).metrics.token_file == str(token)
    token.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_config(path)
    path.write_text(f"metrics: {{token_file: {tmp_path}/missing}}\n")
    with pytest.raises(ConfigError, match=r"metrics\.token_file: cannot read"):
        load_config(path)
