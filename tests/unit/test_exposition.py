"""/metrics text exposition with hostile label values: every value comes back exactly through a real parser."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collector.config import Config
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.state import Active, Fleet, Terminal
from collector.http.metrics import (
    FleetCollector,
    SelfMetrics,
    SparseLines,
    render_problem_series,
    render_sparse,
    take_view,
)
from tests.harness.core import require_binary
from tests.unit.test_state import beat

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


# ---- text kept between scrapes (collector.http.metrics.SparseLines) ------------------------------------------


class Scrapes:
    """A fleet scraped again and again through one SparseLines, as FleetCollector does."""

    def __init__(self, registry: Registry) -> None:
        self.fleet = Fleet(Config(), started_at=T0, registry=registry)
        self.kept = SparseLines()
        self.seq = 0

    def beat(self, tid: str, times: int = 1, **over: Any) -> None:
        over = {"mid": "M1", "model": "A920", **over}
        for _ in range(times):
            self.seq += 1
            self.fleet.on_heartbeat(beat(tid, self.seq, T0 + self.seq, **over), T0 + self.seq, [])

    def scrape(self) -> str:
        kept = render_sparse(take_view(self.fleet, 5000, T0 + self.seq, self.kept)).decode()
        assert kept == render_sparse(take_view(self.fleet, 5000, T0 + self.seq)).decode(), "the kept text is stale"
        assert self.kept.terminals() == self.fleet.problem, "every problem terminal's text is kept"
        return kept


def test_a_condition_whose_detail_changes_is_shown_with_the_new_detail() -> None:
    s = Scrapes(Registry({"T1": RegistryEntry.of("T1", "M1", "acq", "A920", "s1", "r")}))
    s.beat("T1", 5, hw={"printer": "paper_out", "display": "ok", "card_reader": "ok"})
    assert 'detail="printer_paper_out"' in s.scrape()
    s.beat("T1", hw={"printer": "fault", "display": "ok", "card_reader": "ok"})
    assert 'detail="printer_fault"' in s.scrape()
    s.beat("T1", 3, hw={"printer": "fault", "display": "fault", "card_reader": "ok"}, net={"rssi_dbm": -120})
    assert 'condition="weak_signal"' in s.scrape()  # a second condition
    s.beat("T1", 3, hw={"printer": "fault", "display": "fault", "card_reader": "ok"}, net={"rssi_dbm": -60})
    assert 'condition="weak_signal"' not in s.scrape()  # ... and cleared while the first stays


def test_an_unregistered_terminal_that_changes_merchant_or_model_is_shown_with_the_new_labels() -> None:
    s = Scrapes(Registry({"T1": RegistryEntry.of("T1", "M1", "acq", "A920", "s1", "r")}))
    s.beat("X1", 2, mid="M5", model="A920")
    assert 'terminal_id="X1",merchant_id="M5",acquirer="unknown",site="unknown",model="A920"' in s.scrape()
    s.beat("X1", mid="M6", model="A920")
    assert 'merchant_id="M6"' in s.scrape()
    s.beat("X1", mid="M6", model="P400")
    assert 'model="P400",condition="unregistered"' in s.scrape()


def test_a_registry_reload_that_moves_terminals_between_problem_sites_is_shown() -> None:
    before = Registry({tid: RegistryEntry.of(tid, "M1", "acq", "A920", site, "r")
                       for tid, site in (("T1", "s1"), ("T2", "s1"), ("T3", "s2"))})
    after = Registry({tid: RegistryEntry.of(tid, "M1", "acq", "A920", site, "r")
                      for tid, site in (("T1", "s1"), ("T2", "s2"), ("T3", "s2"))})
    s = Scrapes(before)
    for tid in ("T1", "T2", "T3"):
        s.beat(tid, 5, hw={"printer": "fault", "display": "ok", "card_reader": "ok"})
    assert 'posfleet_site_terminals{acquirer="acq",site="s1"} 2' in s.scrape()
    s.fleet.set_registry(after)
    text = s.scrape()
    assert 'posfleet_site_terminals{acquirer="acq",site="s1"} 1' in text
    assert 'terminal_id="T2",merchant_id="M1",acquirer="acq",site="s2"' in text
