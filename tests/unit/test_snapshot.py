"""Snapshots: checksummed, two generations kept, a corrupt file set aside and the collector started anyway."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.app import Collector
from collector.config import Config
from collector.fleet.protocol import Heartbeat
from collector.fleet.registry import Registry, RegistryEntry
from collector.fleet.snapshot import (
    KEEP_CORRUPT,
    LEGACY_FORMAT,
    MAGIC,
    SnapshotError,
    Source,
    _Snapshot,
    corrupt_files,
    load_snapshot,
    save_snapshot,
)
from collector.fleet.state import Fleet, Terminal, Transition

T0 = 1_764_510_000.0
CFG = msgspec.convert({"software_policy": {"*": "3.0.0"}}, Config)
REG = Registry({f"T{i}": RegistryEntry.of(f"T{i}", f"M{i}", "acq", "A920", "s1", "r") for i in range(1, 4)})


def beat(tid: str, seq: int) -> Heartbeat:
    return msgspec.convert(
        {"tid": tid, "ts": T0 + seq, "seq": seq, "interval_s": 30, "txn_count": seq, "uploaded_count": seq,
         "queue_depth": 0, "oldest_queued_ts": None, "app_version": "3.1.0",
         "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}},
        Heartbeat,
    )


def fleet_with(seq: int) -> Fleet:
    """A fleet whose three terminals have all sent heartbeat `seq`: tells generations apart."""
    fleet = Fleet(CFG, started_at=T0, registry=REG)
    out: list[Transition] = []
    for tid in REG.entries:
        fleet.on_heartbeat(beat(tid, seq), T0 + seq, out)
    return fleet


def seqs(terminals: list[object]) -> set[int]:
    return {t.seq for t in terminals}  # type: ignore[attr-defined]


@pytest.fixture
def two_generations(tmp_path: Path) -> Path:
    """A snapshot written twice: seq 1 in `.prev`, seq 2 current."""
    path = tmp_path / "state.snapshot"
    save_snapshot(fleet_with(1), path)
    save_snapshot(fleet_with(2), path)
    return path


def test_round_trip_keeps_the_previous_generation(two_generations: Path) -> None:
    restored = load_snapshot(two_generations, T0)
    assert (restored.source, restored.set_aside) == (Source.CURRENT, ())
    assert seqs(restored.terminals) == {2} and len(restored.terminals) == 3
    assert two_generations.read_bytes().startswith(MAGIC)
    prev = load_snapshot(two_generations.with_name("state.snapshot.prev"), T0)
    assert seqs(prev.terminals) == {1}, "the generation before is kept as .prev"
    assert not two_generations.with_name("state.snapshot.tmp").exists()


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip(data: bytes) -> bytes:
    i = len(data) // 2 + 3
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: b"", "empty file"),
        (_truncate, "truncated: body is"),
        (lambda d: d[:5], "truncated header"),
        (lambda d: d[:20], "truncated header"),
        (_flip, "checksum mismatch"),
        (lambda d: b"\x00garbage that is not msgpack", "does not decode"),
        (lambda d: d[:8] + (99).to_bytes(4, "little") + d[12:], "format 99"),
    ],
    ids=["empty", "truncated", "magic-only", "header-cut", "bit-flip", "garbage", "future-format"],
)
def test_a_corrupt_snapshot_is_set_aside_and_the_previous_generation_used(
    two_generations: Path, damage: object, reason: str
) -> None:
    data = two_generations.read_bytes()
    two_generations.write_bytes(damage(data))  # type: ignore[operator]
    restored = load_snapshot(two_generations, T0 + 100)
    assert restored.source is Source.PREVIOUS
    assert seqs(restored.terminals) == {1}, "the previous generation's state"
    [bad] = restored.set_aside
    assert bad.original == two_generations and reason in bad.reason
    assert bad.moved_to == two_generations.with_name(f"state.snapshot.corrupt-{int(T0 + 100)}")
    assert bad.moved_to.read_bytes() == damage(data)  # type: ignore[operator]  # kept for a post-mortem
    assert not two_generations.exists()
    # The next save starts a new current file and keeps the good previous one.
    save_snapshot(fleet_with(3), two_generations)
    assert seqs(load_snapshot(two_generations.with_name("state.snapshot.prev"), T0).terminals) == {1}
    assert seqs(load_snapshot(two_generations, T0).terminals) == {3}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_single_bit_flip_or_truncation_is_detected(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    path = tmp_path_factory.mktemp("flip") / "s"
    save_snapshot(fleet_with(1), path)
    good = path.read_bytes()
    if data.draw(st.booleans(), "truncate"):
        bad = good[: data.draw(st.integers(0, len(good) - 1), "cut at")]
    else:
        i = data.draw(st.integers(0, len(good) - 1), "byte")
        bad = good[:i] + bytes([good[i] ^ (1 << data.draw(st.integers(0, 7), "bit"))]) + good[i + 1:]
    path.write_bytes(bad)
    restored = load_snapshot(path, T0)
    assert restored.source is Source.EMPTY and len(restored.set_aside) == 1


def test_both_generations_corrupt_start_empty(two_generations: Path) -> None:
    two_generations.write_bytes(b"")
    prev = two_generations.with_name("state.snapshot.prev")
    prev.write_bytes(_truncate(prev.read_bytes()))
    restored = load_snapshot(two_generations, T0)
    assert restored.source is Source.EMPTY and restored.terminals == [] and restored.feeds == []
    assert [s.original for s in restored.set_aside] == [two_generations, prev]
    assert len({s.moved_to for s in restored.set_aside}) == 2, "same second, distinct names"
    assert len(corrupt_files(two_generations)) == 2


def test_a_missing_current_file_falls_back_to_previous(two_generations: Path) -> None:
    """A crash between the two renames of a save leaves only `.prev`: it is complete and used."""
    two_generations.unlink()
    restored = load_snapshot(two_generations, T0)
    assert (restored.source, restored.set_aside, seqs(restored.terminals)) == (Source.PREVIOUS, (), {1})


def test_no_file_at_all_is_a_quiet_empty_start(tmp_path: Path) -> None:
    assert load_snapshot(tmp_path / "none", T0) == ([], [], Source.EMPTY, (), None)


def test_format_2_files_without_a_header_still_load(tmp_path: Path) -> None:
    fleet = fleet_with(4)
    legacy = msgspec.msgpack.encode(_Snapshot(LEGACY_FORMAT, list(fleet.terminals.values()), []))
    path = tmp_path / "old.snapshot"
    path.write_bytes(legacy)
    restored = load_snapshot(path, T0)
    assert restored.source is Source.CURRENT and seqs(restored.terminals) == {4}
    path.write_bytes(legacy[:-7])  # a truncated old file is caught by decoding
    restored = load_snapshot(path, T0)
    assert restored.source is Source.EMPTY and "does not decode" in restored.set_aside[0].reason


def test_format_2_files_written_before_later_terminal_fields_still_load(tmp_path: Path) -> None:
    """Terminal fields are appended at the end: an old file's shorter rows decode with the new fields' defaults."""
    fields = Terminal.__struct_fields__
    old_width = fields.index("streaks") + 1  # the last field when format 2 was current
    rows = [msgspec.to_builtins(t)[:old_width] for t in fleet_with(5).terminals.values()]
    path = tmp_path / "old.snapshot"
    path.write_bytes(msgspec.msgpack.encode({"format": LEGACY_FORMAT, "terminals": rows, "feeds": []}))
    restored = load_snapshot(path, T0)
    assert restored.source is Source.CURRENT and seqs(restored.terminals) == {5}
    fresh = Terminal("x")
    for t in restored.terminals:
        assert all(getattr(t, f) == getattr(fresh, f) for f in fields[old_width:])


def test_only_a_few_corrupt_files_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "s"
    for i in range(KEEP_CORRUPT + 3):
        path.write_bytes(b"junk")
        load_snapshot(path, T0 + i)
    kept = corrupt_files(path)
    assert [p.name for p in kept] == [f"s.corrupt-{int(T0) + i}" for i in range(3, KEEP_CORRUPT + 3)]


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB tmpfs (needs root), so writes fail with a real ENOSPC."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs for a real ENOSPC needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill(path: Path) -> None:
    """Write zeros until the file system is full."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_disk_full_keeps_the_old_snapshot_and_removes_the_tmp_file(tiny_disk: Path) -> None:
    path = tiny_disk / "state.snapshot"
    save_snapshot(fleet_with(1), path)
    filler = tiny_disk / "filler"
    fill(filler)
    with pytest.raises(SnapshotError, match="No space left on device"):
        save_snapshot(fleet_with(2), path)
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler", "state.snapshot"], "tmp file removed"
    restored = load_snapshot(path, T0)
    assert restored.source is Source.CURRENT and seqs(restored.terminals) == {1}, "the old snapshot is intact"
    filler.unlink()
    save_snapshot(fleet_with(2), path)  # space back: the next periodic snapshot succeeds
    assert seqs(load_snapshot(path, T0).terminals) == {2}


def test_disk_full_is_counted_by_the_collector(tiny_disk: Path) -> None:
    cfg = msgspec.convert({"state": {"snapshot_path": str(tiny_disk / "state.snapshot")}}, Config)
    collector = Collector.load(cfg, clock=lambda: T0)
    fill(tiny_disk / "filler")
    collector.fleet.on_heartbeat(beat("T9", 1), T0, [])
    assert collector.snapshot_now() is False
    assert collector.prom_registry.get_sample_value("posfleet_snapshot_failures_total") == 1
    assert not (tiny_disk / "state.snapshot.tmp").exists()


def test_the_collector_starts_from_the_previous_generation_and_says_so(
    two_generations: Path, caplog: pytest.LogCaptureFixture
) -> None:
    two_generations.write_bytes(_truncate(two_generations.read_bytes()))
    cfg = msgspec.convert({"state": {"snapshot_path": str(two_generations)}}, Config)
    with caplog.at_level(logging.INFO):
        collector = Collector.load(cfg, clock=lambda: T0 + 50)
    assert seqs(list(collector.fleet.terminals.values())) == {1}
    sample = collector.prom_registry.get_sample_value
    assert [sample("posfleet_snapshot_restore", {"source": s}) for s in ("current", "previous", "empty")] == [0, 1, 0]
    assert sample("posfleet_snapshot_corrupt_files") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("corrupt (truncated: body is" in m and f"corrupt-{int(T0 + 50)}" in m for m in errors), errors
    assert any("restoring state from the previous snapshot generation" in m for m in errors), errors
    # A person looked at the corrupt file and moved it away: the gauge (and the alert) go back to 0.
    inspected = two_generations.parent / "inspected"
    inspected.mkdir()
    for bad in corrupt_files(two_generations):
        bad.rename(inspected / bad.name)
    assert collector.snapshot_now()
    assert sample("posfleet_snapshot_corrupt_files") == 0


def test_a_clean_start_reports_the_current_generation(two_generations: Path) -> None:
    cfg = msgspec.convert({"state": {"snapshot_path": str(two_generations)}}, Config)
    sample = Collector.load(cfg, clock=lambda: T0).prom_registry.get_sample_value
    assert [sample("posfleet_snapshot_restore", {"source": s}) for s in ("current", "previous", "empty")] == [1, 0, 0]
    assert sample("posfleet_snapshot_corrupt_files") == 0


def test_crc_is_over_the_body(two_generations: Path) -> None:
    data = two_generations.read_bytes()
    assert int.from_bytes(data[20:24], "little") == zlib.crc32(data[24:])


def test_constructing_a_collector_reads_nothing(two_generations: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The default config's snapshot path is relative (var/state.snapshot): a Collector built in a directory that
    # holds one must not restore it (nor set a damaged one aside) unless asked to with Collector.load.
    monkeypatch.chdir(two_generations.parent)
    (two_generations.parent / "var").mkdir()
    default_path = two_generations.parent / "var" / "state.snapshot"
    default_path.write_bytes(_truncate(two_generations.read_bytes()))
    before = sorted(p.name for p in default_path.parent.iterdir())
    collector = Collector(Config(), clock=lambda: T0)
    assert collector.fleet.terminals == {} and collector.restored.source is Source.EMPTY
    assert sorted(p.name for p in default_path.parent.iterdir()) == before
    loaded = Collector.load(Config(), clock=lambda: T0)  # the explicit factory does read it
    assert loaded.restored.source is not Source.EMPTY or loaded.restored.set_aside


def test_streaks_written_as_a_map_by_earlier_versions_come_back_as_pairs(tmp_path: Path) -> None:
    """Before streaks became flat (condition, count) pairs, snapshots held them as a map: still read, converted."""
    rows = [msgspec.to_builtins(t) for t in fleet_with(2).terminals.values()]
    at = Terminal.__struct_fields__.index("streaks")
    for row in rows:
        row[at] = {"weak_signal": 2, "upload_backlog": 1}
    path = tmp_path / "maps.snapshot"
    path.write_bytes(msgspec.msgpack.encode({"format": LEGACY_FORMAT, "terminals": rows, "feeds": []}))
    restored = load_snapshot(path, T0)
    assert restored.source is Source.CURRENT
    assert {t.streaks for t in restored.terminals} == {("weak_signal", 2, "upload_backlog", 1)}
