"""/metrics text exposition with hostile label values: every value comes back exactly through a real parser."""

from __future__ import annotations

import subprocess

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collector.config import Config
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Active, Fleet, Terminal
from collector.http.metrics import FleetCollector, SelfMetrics, render_problem_series
from tests.harness.core import require_binary

T0 = 1_764_510_000.0
HOSTILE = [
    "T\n1",  # a raw newline used to end the sample line: the whole scrape failed to parse
    'T"2',
    "T\\3",
    "T\\",  # a trailing backslash would escape the closing quote
    'T\\"\n4',
    "T 5,x=y}",
    "T\r6",
    "Tü7\u2028",
]


def hostile_fleet() -> Fleet:
    """A fleet whose ids and registry values are all hostile, each terminal with an active condition."""
    entries, restored = {}, []
    for n, tid in enumerate(HOSTILE):
        entries[tid] = RegistryEntry.of(tid, f'M{n}"\\\n', f"acq,{n} =", "A920\n", f"site\\{n}\"", "r")
        restored.append(Terminal(tid, conds={"merchant_mismatch": Active(T0 + n, "warning", f'reports "M\\{n}"\n!')}))
    return Fleet(Config(), started_at=T0, registry=Registry(entries), restored=(restored, []))


def exposition(fleet: Fleet) -> str:
    """The /metrics body as collector.http.routes.metrics builds it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(fleet, SelfMetrics(registry), 5000, lambda: T0))
    return generate_latest(registry).decode() + render_problem_series(fleet, 5000)


def test_every_label_value_survives_the_text_format() -> None:
    fleet = hostile_fleet()
    families = {f.name: f for f in text_string_to_metric_families(exposition(fleet))}
    problem = families["posfleet_terminal_problem"].samples
    assert {s.labels["terminal_id"] for s in problem} == set(HOSTILE)
    for s in problem:
        n = HOSTILE.index(s.labels["terminal_id"])
        assert s.labels["merchant_id"] == f'M{n}"\\\n'
        assert s.labels["acquirer"] == f"acq,{n} ="
        assert s.labels["site"] == f"site\\{n}\""
        assert s.labels["model"] == ""  # the model comes from heartbeats, none yet
        assert s.labels["detail"] == f'reports "M\\{n}"\n!'
        assert s.value == 1
    since = {s.labels["terminal_id"]: s.value for s in families["posfleet_terminal_problem_since_seconds"].samples}
    assert since == {tid: T0 + n for n, tid in enumerate(HOSTILE)}
    known = {s.labels["acquirer"] for s in families["posfleet_fleet_terminals"].samples}
    assert known == {f"acq,{n} =" for n in range(len(HOSTILE))}


@pytest.mark.parametrize("tid", ["T00001", "T-9_x"])
def test_plain_ids_are_written_as_they_are(tid: str) -> None:
    fleet = Fleet(Config(), started_at=T0, registry=Registry({}),
                  restored=([Terminal(tid, conds={"offline": Active(T0, "critical", "silent")})], []))
    assert f'terminal_id="{tid}"' in render_problem_series(fleet, 10)


def test_prometheus_own_checker_accepts_the_hostile_exposition() -> None:
    """promtool (Prometheus' Go parser, stricter than the Python one) reads the same body without error."""
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=exposition(hostile_fleet()).encode(),
                            capture_output=True, timeout=30)
    # promtool exits 1 for lint hints (e.g. counter names) as well; only parse errors matter here.
    assert b"error while linting" not in result.stderr and b"parse" not in result.stderr.lower(), result.stderr
