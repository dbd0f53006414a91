"""A restored snapshot shares what the fleet repeats (strings, intervals, signal, zeros) and loses nothing.

Per-terminal memory after a restart is measured by bench/bench_memory.py; these tests pin the mechanisms it
relies on, without timing or RSS readings: one object per repeated value, and every field restored exactly.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import msgspec
import pytest

from collector.fleet.snapshot import FORMAT, MAGIC, Source, _Snapshot, load_snapshot, save_snapshot
from collector.fleet.state import Active, Fleet, Terminal
from tests.unit.test_snapshot import CFG, T0

_HEADER = struct.Struct("<8sIQI")


def terminal(i: int) -> Terminal:
    """A terminal as a fleet holds it after heartbeats: values built fresh, as a decoder would."""
    return Terminal(
        tid=f"T{i:07d}", acquirer="acq-" + "a", site=f"S{i // 50:06d}", merchant=f"M{i // 20:06d}",
        mid=f"M{i // 20:06d}", model="A" + "920", app_version="4.2." + "1", os_version="1" + "1",
        interval_s=float(30 + i % 2), last_rx=T0 + i, last_ts=T0 + i / 3, seq=1_000_000 + i,
        uptime_s=86_400.5 + i, txn_count=40_000 + i, uploaded_count=40_000 + i, net_type="cell" + "ular",
        rssi_dbm=float(-60 - i % 3), power_source="batt" + "ery", battery_pct=(i % 3) / 10,
        printer="o" + "k", display="o" + "k", card_reader="o" + "k", status="onl" + "ine",
        conds={"hardware_fault": Active(T0, "warn" + "ing", "printer: paper_" + "out")} if i % 2 else None,
        streaks=("weak_sig" + "nal", 2) if i % 3 == 0 else None,
        rejected={"card_" + "data": 1} if i % 4 == 0 else None, rejected_last="card_" + "data" if i % 4 == 0 else "",
    )


def write(path: Path, terminals: list[Terminal]) -> None:
    """A snapshot file of these terminals, as save_snapshot writes it."""
    body = msgspec.msgpack.encode(_Snapshot(FORMAT, terminals, [("acq-a", T0, T0, 3)]))
    path.write_bytes(_HEADER.pack(MAGIC, FORMAT, len(body), zlib.crc32(body)) + body)


def test_every_field_comes_back_exactly(tmp_path: Path) -> None:
    originals = [terminal(i) for i in range(40)]
    write(tmp_path / "s", originals)
    restored = load_snapshot(tmp_path / "s", T0)
    assert restored.source is Source.CURRENT
    assert restored.terminals == originals
    assert [(f.acquirer, f.last_rx, f.alive_since, f.txns) for f in restored.feeds] == [("acq-a", T0, T0, 3)]


def test_the_previous_heartbeat_clock_is_not_restored(tmp_path: Path) -> None:
    """prev_ts (a redelivery of the heartbeat before the newest is a duplicate) would be a float of its own per
    terminal after a restart; it is dropped there, and everything else comes back."""
    originals = [terminal(i) for i in range(4)]
    for t in originals:
        t.prev_ts = t.last_ts - 30
    write(tmp_path / "s", originals)
    restored = load_snapshot(tmp_path / "s", T0).terminals
    assert [t.prev_ts for t in restored] == [None] * 4
    for t in originals:
        t.prev_ts = None
    assert restored == originals


def test_repeated_values_are_one_object_each(tmp_path: Path) -> None:
    write(tmp_path / "s", [terminal(i) for i in range(40)])
    ts = load_snapshot(tmp_path / "s", T0).terminals

    def distinct(name: str) -> int:
        return len({id(getattr(t, name)) for t in ts})

    for name in ("acquirer", "model", "app_version", "os_version", "net_type", "power_source", "printer", "status"):
        assert distinct(name) == 1, name
    assert distinct("merchant") == 2 and distinct("site") == 1
    assert distinct("interval_s") == 2  # 30.0 and 31.0
    assert distinct("rssi_dbm") == 3 and distinct("battery_pct") == 3
    assert distinct("status_rx") == 1 and distinct("upstream_rx") == 1  # zeros: never set
    assert distinct("rejected_last") == 2  # "" and "card_data"
    assert len({id(t.streaks[0]) for t in ts if t.streaks}) == 1
    assert len({id(k) for t in ts if t.rejected for k in t.rejected}) == 1
    details = {id(a.detail) for t in ts if t.conds for a in t.conds.values()}
    assert len(details) == 1
    assert all(t.uploaded_count is t.txn_count for t in ts)  # equal counters: one int object
    # What is each terminal's own stays its own: no sharing can merge two terminals' clocks.
    assert distinct("last_rx") == 40 and distinct("uptime_s") == 40


def test_a_fleet_restarted_from_its_snapshot_is_the_same_fleet(tmp_path: Path) -> None:
    from collector.fleet.registry import Registry, RegistryEntry

    reg = Registry({
        f"T{i:07d}": RegistryEntry.of(f"T{i:07d}", f"M{i // 20:06d}", "acq-a", "A920", f"S{i // 50:06d}", "r")
        for i in range(40)
    })
    write(tmp_path / "s", [terminal(i) for i in range(40)])
    restored = load_snapshot(tmp_path / "s", T0)
    fleet = Fleet(CFG, started_at=T0, registry=reg, restored=restored.state)
    save_snapshot(fleet, tmp_path / "again")
    again = load_snapshot(tmp_path / "again", T0)
    assert again.terminals == restored.terminals


def test_restored_ids_are_the_registrys_own_strings(tmp_path: Path) -> None:
    """One string per terminal id, shared by the registry and the restored state, without the intern table."""
    from collector.fleet.registry import Registry, RegistryEntry

    ids = ["".join(("T", f"{i:07d}")) for i in range(40)]  # built at run time: not interned by the compiler
    reg = Registry({tid: RegistryEntry.of(tid, "M1", "acq-a", "A920", "S1", "r") for tid in ids[:30]})
    write(tmp_path / "s", [terminal(i) for i in range(40)])
    ts = load_snapshot(tmp_path / "s", T0, reg).terminals
    assert [t.tid for t in ts] == ids
    assert all(t.tid is reg.entries[t.tid].terminal_id for t in ts[:30])
    assert all(t.tid not in reg.entries for t in ts[30:])  # unregistered ids keep their own string
    fleet = Fleet(CFG, started_at=T0, registry=reg, restored=(ts, []))
    assert all(next(k for k in fleet.terminals if k == tid) is reg.entries[tid].terminal_id for tid in ids[:3])


@pytest.mark.parametrize("garbage", [b"\xc1", msgspec.msgpack.encode(["T1", 5])])
def test_one_bad_terminal_inside_a_good_checksum_sets_the_file_aside(tmp_path: Path, garbage: bytes) -> None:
    """Terminals are decoded one by one after the checksum: a bad one still fails the whole file, never half."""
    good = msgspec.msgpack.encode(terminal(1))
    body = msgspec.msgpack.encode(_Snapshot(FORMAT, [], []))
    # Splice a list of two terminals (one good, one bad) into the body's terminals field.
    body = body.replace(b"\x90", b"\x92" + good + garbage, 1)
    path = tmp_path / "s"
    path.write_bytes(_HEADER.pack(MAGIC, FORMAT, len(body), zlib.crc32(body)) + body)
    restored = load_snapshot(path, T0)
    assert restored.source is Source.EMPTY and restored.terminals == []
    assert len(restored.set_aside) == 1 and "does not decode" in restored.set_aside[0].reason
