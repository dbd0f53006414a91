"""A partition's state moving between collectors: the `nats:` config checks, the state object, and the Fleet's
adopt/release with a fake clock (adopted terminals get a full offline period, released ones leave every count)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from collector.cluster.keeper import decode_state, encode_state
from collector.cluster.partition import partition_of
from collector.config import Config, ConfigError, load_config
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.snapshot import SnapshotError
from collector.fleet.state import Fleet, HeartbeatResult, Terminal, Transition
from tests.unit.test_state import T0, beat

N = 4
CFG = msgspec.convert({"thresholds": {"offline_factor": 3}}, Config)
IDS = [f"T{i}" for i in range(40)]
REG = Registry({t: RegistryEntry.of(t, "M1", "acq", "A920", f"s{i % 3}", "r") for i, t in enumerate(IDS)})


def in_part(p: int) -> Callable[[str], bool]:
    return lambda tid: partition_of(tid, N) == p


def test_nats_section_checked_only_when_used_and_every_problem_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("nats: {servers: ['http://x']}\n")
    assert load_config(path).ingest.source == "mqtt"  # the simple deployment does not read it
    path.write_text(
        "ingest: {source: nats}\n"
        "nats: {servers: ['http://x'], stream: 'a.b', ownership: static, partitions: 4, fetch_batch: 500,\n"
        "       max_ack_pending: 600, token_file: /nonexistent/token, user: u}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for needle in ("nats.servers", "nats.stream", "nats.shard: static ownership needs a shard",
                   "nats.max_ack_pending", "exclude each other", "nats.token_file"):
        assert needle in text, needle


@pytest.mark.parametrize(("shard", "problem"), [("2/2", "need 0 <= i < K"), ("0/8", "at least as many partitions")])
def test_bad_shard(tmp_path: Path, shard: str, problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"ingest: {{source: nats}}\nnats: {{partitions: 4, shard: '{shard}'}}\n")
    with pytest.raises(ConfigError, match=problem):
        load_config(path)


def test_state_object_round_trip_and_damage() -> None:
    terminals = [Terminal("T1", seq=7, last_rx=T0), Terminal("T2")]
    seq, back = decode_state(encode_state(1234, terminals))
    assert seq == 1234 and back == terminals
    data = bytearray(encode_state(1234, terminals))
    data[-3] ^= 0xFF
    with pytest.raises(SnapshotError, match="checksum"):
        decode_state(bytes(data))
    with pytest.raises(SnapshotError):
        decode_state(b"\x01")


def test_only_owned_terminals_are_materialised() -> None:
    fleet = Fleet(CFG, started_at=T0, registry=REG, materialise=in_part(1))
    assert fleet.terminals and all(partition_of(t, N) == 1 for t in fleet.terminals)
    assert sum(fleet.counts[("acq", f"s{i}", "_known")] for i in range(3)) == len(fleet.terminals)


def test_adopt_then_release_moves_terminals_and_counts() -> None:
    owned = {1}
    fleet = Fleet(CFG, started_at=T0, registry=REG, materialise=lambda t: partition_of(t, N) in owned)
    before = len(fleet.terminals)
    # The previous owner's snapshot of partition 2: one terminal with an active condition and a known seq.
    tid = next(t for t in IDS if partition_of(t, N) == 2)
    snap = Terminal(tid, acquirer="acq", site="s0", seq=41, last_rx=T0, last_ts=T0, interval_s=30.0)
    owned.add(2)
    n = fleet.adopt([snap], in_part(2), T0 + 100)
    assert n == sum(1 for t in IDS if partition_of(t, N) == 2)
    assert fleet.terminals[tid].seq == 41  # the snapshot's state, not a fresh terminal
    assert len(fleet.terminals) == before + n
    assert sum(v for (a, _s, c), v in fleet.counts.items() if c == "_known") == len(fleet.terminals)
    # A replayed duplicate of the snapshot's newest heartbeat is a duplicate, the next one accepted.
    out: list[Transition] = []
    assert fleet.on_heartbeat(beat(tid, 41, interval_s=30), T0 + 101, out) is HeartbeatResult.DUPLICATE
    assert fleet.on_heartbeat(beat(tid, 42, interval_s=30), T0 + 102, out) is HeartbeatResult.ACCEPTED
    owned.discard(2)
    gone = fleet.release(in_part(2))
    assert {t.tid for t in gone} == {t for t in IDS if partition_of(t, N) == 2}
    assert len(fleet.terminals) == before and not fleet.adopted
    assert sum(v for (a, _s, c), v in fleet.counts.items() if c == "_known") == before


def test_adopted_terminals_get_a_full_offline_period_from_adoption() -> None:
    fleet = Fleet(CFG, started_at=T0, registry=REG, materialise=lambda _t: False)
    assert not fleet.terminals
    adopted_at = T0 + 1000  # long after start: without the grace, every never-heard terminal would be offline
    fleet.adopt([], in_part(3), adopted_at)
    period = 3 * CFG.thresholds.default_interval_s
    assert not fleet.tick(adopted_at + period - 1)
    raised = fleet.tick(adopted_at + period + 1)
    assert {tr.tid for tr in raised if tr.condition == "offline"} == {t for t in IDS if partition_of(t, N) == 3}


def test_adopted_terminal_heard_after_adoption_counts_its_own_silence_again() -> None:
    fleet = Fleet(CFG, started_at=T0, registry=REG, materialise=lambda _t: False)
    tid = next(t for t in IDS if partition_of(t, N) == 0)
    fleet.adopt([], in_part(0), T0 + 1000)
    out: list[Transition] = []
    fleet.on_heartbeat(beat(tid, 1, interval_s=5), T0 + 1001, out)
    fleet.tick(T0 + 1002)
    assert tid not in fleet.adopted
    raised = fleet.tick(T0 + 1001 + 3 * 5 + 1)  # its own interval (5 s), not the adoption's grace
    assert tid in {tr.tid for tr in raised if tr.condition == "offline"}
