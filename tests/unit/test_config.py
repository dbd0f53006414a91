"""The configuration: strict keys, every problem reported at once, the shipped example valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.config import ConfigError, load_config

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
