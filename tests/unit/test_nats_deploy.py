"""deploy/nats/ says what the collectors and the harness say: one definition of each fact, checked here."""

from __future__ import annotations

import json
import re
from pathlib import Path

from collector.cluster.streams import stream_configs
from collector.config import NatsConfig

NATS = Path(__file__).resolve().parents[2] / "deploy" / "nats"


def test_stream_files_are_the_collectors_definition() -> None:
    shipped = {json.loads(f.read_text())["name"]: json.loads(f.read_text()) for f in NATS.glob("streams/*.json")}
    defined = {c.name: c.as_dict() for c in stream_configs(NatsConfig(replicas=3))}
    assert shipped == defined


def test_mapping_partition_count_is_the_collectors_default() -> None:
    text = (NATS / "mappings.conf").read_text()
    found = re.findall(r'"pos\.v1\.\*\.\*":\s*"(\w+)\.\{\{partition\((\d+),1\)\}\}\.\{\{wildcard\(1\)\}\}\.'
                       r'\{\{wildcard\(2\)\}\}"', text)
    assert found == [(NatsConfig().subject_prefix, str(NatsConfig().partitions))]


def test_every_variable_the_configs_read_is_in_the_env_example_and_compose() -> None:
    used = set()
    for conf in NATS.glob("*.conf"):
        text = "\n".join(line.split("#", 1)[0] for line in conf.read_text().splitlines())
        used |= set(re.findall(r"\$([A-Z][A-Z0-9_]+)", text))
    assert {"NATS_SERVER_NAME", "NATS_ROUTES", "POSFLEET_NATS_TERMINAL_PASSWORD"} <= used
    example = {line.split("=", 1)[0] for line in (NATS / "nats.env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used == example
    compose = (NATS.parent / "docker-compose.yml").read_text()
    for i in (1, 2, 3):
        block = compose.split(f"  nats-{i}:\n", 1)[1].split("\n\n", 1)[0]
        assert {v for v in used if f"      {v}:" in block} == used, f"nats-{i} misses a variable"
