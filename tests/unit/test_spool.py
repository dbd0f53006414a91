"""The disk spool: FIFO order, crash-safe cursor, torn tails, corruption, byte bound, unwritable directories."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporters.history.spool import Spool


def make(tmp_path: Path, max_bytes: int = 1 << 20, segment_bytes: int = 4096, compress: bool = True) -> Spool:
    spool = Spool(tmp_path / "spool", max_bytes, segment_bytes, fsync=True, compress=compress)
    spool.open()
    return spool


def batch(i: int, n: int = 10) -> bytes:
    return "\n".join(f"m,t=T{i} seq={j}i {i * 1000 + j}" for j in range(n)).encode()


def drain(spool: Spool) -> list[bytes]:
    out = []
    while (rec := spool.peek()) is not None:
        out.append(rec.payload)
        spool.ack(rec)
    return out


def segments(spool: Spool) -> list[Path]:
    return sorted(spool.directory.glob("*.seg"))


@pytest.mark.parametrize("compress", [True, False])
def test_fifo_across_segments_and_cleanup(tmp_path: Path, compress: bool) -> None:
    spool = make(tmp_path, segment_bytes=600, compress=compress)
    payloads = [batch(i) for i in range(30)]
    for p in payloads:
        assert spool.append(p, 10).stored
    assert len(segments(spool)) > 2
    assert spool.points == 300
    assert drain(spool) == payloads
    assert spool.empty and spool.points == 0
    assert segments(spool) == []  # acknowledged data leaves the disk


def test_peek_does_not_consume(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(batch(1), 10)
    first = spool.peek()
    second = spool.peek()
    assert first is not None and second is not None and first.payload == second.payload


def test_reopen_replays_only_unacknowledged(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=600)
    payloads = [batch(i) for i in range(12)]
    for p in payloads:
        spool.append(p, 10)
    for _ in range(5):
        rec = spool.peek()
        assert rec is not None
        spool.ack(rec)
    spool.close()  # like a crash: nothing else is written at close

    again = Spool(spool.directory, 1 << 20, 600)
    report = again.open()
    assert report.points == 70 and report.corrupt_bytes == 0
    assert drain(again) == payloads[5:]


def test_appends_after_reopen_keep_order(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(batch(1), 10)
    spool.close()
    again = Spool(spool.directory, 1 << 20, 4096)
    again.open()
    again.append(batch(2), 10)
    assert drain(again) == [batch(1), batch(2)]


@pytest.mark.parametrize("cut", [1, 5, 17, 30])
def test_torn_tail_is_cut_and_spool_stays_usable(tmp_path: Path, cut: int) -> None:
    spool = make(tmp_path, compress=False)
    for i in range(3):
        spool.append(batch(i), 10)
    spool.close()
    seg = segments(spool)[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - cut)  # a crash in the middle of the last append

    again = Spool(spool.directory, 1 << 20, 4096, compress=False)
    report = again.open()
    assert report.corrupt_bytes > 0
    assert report.points == 20
    again.append(batch(9), 10)
    assert drain(again) == [batch(0), batch(1), batch(9)]


def test_garbage_tail_is_cut(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(batch(0), 10)
    spool.close()
    with open(segments(spool)[-1], "ab") as f:
        f.write(garbage := b"\x00garbage that is not a record")
    again = Spool(spool.directory, 1 << 20, 4096)
    assert again.open().corrupt_bytes == len(garbage)
    assert drain(again) == [batch(0)]


def test_corrupt_record_drops_rest_of_its_segment_only(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=600, compress=False)
    payloads = [batch(i) for i in range(9)]
    for p in payloads:
        spool.append(p, 10)
    spool.close()
    first = segments(spool)[0]
    data = bytearray(first.read_bytes())
    data[-5] ^= 0xFF  # flip a bit in the last record of the first segment
    first.write_bytes(bytes(data))

    again = Spool(spool.directory, 1 << 20, 600, compress=False)
    report = again.open()
    assert report.corrupt_points == 10
    out = drain(again)
    assert len(out) == len(payloads) - 1
    assert out == [p for p in payloads if p in out] and set(out) < set(payloads)


def test_corruption_found_at_replay_is_counted(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=600, compress=False)
    for i in range(6):
        spool.append(batch(i), 10)
    first = segments(spool)[0]
    n_first = sum(1 for p in [batch(i) for i in range(6)] if p in first.read_bytes())
    data = bytearray(first.read_bytes())
    data[30] ^= 0xFF  # after open() checked it: bit rot under a running writer
    first.write_bytes(bytes(data))
    out = drain(spool)
    assert spool.corrupt_points == 10 * n_first
    assert out == [batch(i) for i in range(n_first, 6)]


def test_full_spool_drops_oldest_segments_and_counts(tmp_path: Path) -> None:
    spool = make(tmp_path, max_bytes=3000, segment_bytes=700, compress=False)
    dropped = 0
    for i in range(40):
        result = spool.append(batch(i), 10)
        assert result.stored
        dropped += result.dropped_points
        assert spool.size_bytes <= 3000
    out = drain(spool)
    assert dropped > 0
    assert dropped + 10 * len(out) == 400  # every point is either replayable or counted as dropped
    assert out == [batch(i) for i in range(40 - len(out), 40)]  # the newest survive, in order


def test_batch_larger_than_spool_is_refused(tmp_path: Path) -> None:
    spool = make(tmp_path, max_bytes=200, segment_bytes=200, compress=False)
    result = spool.append(b"x" * 500, 7)
    assert not result.stored and result.dropped_points == 7
    assert spool.empty


def test_ack_of_dropped_record_is_ignored(tmp_path: Path) -> None:
    spool = make(tmp_path, max_bytes=1500, segment_bytes=500, compress=False)
    spool.append(batch(0), 10)
    in_flight = spool.peek()
    assert in_flight is not None
    for i in range(1, 10):
        spool.append(batch(i), 10)  # pushes the in-flight record's segment out
    spool.ack(in_flight)
    out = drain(spool)
    assert batch(0) not in out and out == sorted(out, key=lambda p: [batch(i) for i in range(10)].index(p))


def test_cursor_into_deleted_segment(tmp_path: Path) -> None:
    spool = make(tmp_path, segment_bytes=600)
    for i in range(8):
        spool.append(batch(i), 10)
    spool.close()
    # a crash after the first segment was deleted but before the cursor moved on
    first = segments(spool)[0]
    first.unlink()
    again = Spool(spool.directory, 1 << 20, 600)
    again.open()
    assert len(drain(again)) > 0


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[list[Path]]:
    """Paths made immutable with chattr +i (read-only even for root); always made mutable again."""
    assert shutil.which("chattr"), "chattr (e2fsprogs) is needed to make a directory read-only for root"
    paths: list[Path] = []
    yield paths
    for p in paths:
        subprocess.run(["chattr", "-i", str(p)], check=False)


def test_read_only_directory_raises_and_recovers(tmp_path: Path, immutable: list[Path]) -> None:
    spool = make(tmp_path)
    spool.append(batch(0), 10)
    targets = [spool.directory, *segments(spool)]
    subprocess.run(["chattr", "+i", *map(str, targets)], check=True)
    immutable.extend(targets)
    with pytest.raises(OSError):
        spool.append(batch(1), 10)
    subprocess.run(["chattr", "-i", *map(str, targets)], check=True)
    assert spool.append(batch(2), 10).stored
    assert drain(spool) == [batch(0), batch(2)]  # the failed append left no partial record behind


def test_open_fails_loudly_on_unusable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        Spool(blocker / "spool", 1 << 20, 4096).open()


def test_files_are_private(tmp_path: Path) -> None:
    spool = make(tmp_path)
    spool.append(batch(0), 10)
    assert all(os.stat(p).st_mode & 0o077 == 0 for p in segments(spool))
