"""Durable on-disk FIFO of line-protocol batches: framed segment files, bounded in bytes, crash-safe replay.

Layout of the spool directory:
  ``<id:016d>.seg``  append-only segment files; ids increase, the lowest id is the oldest data.
  ``cursor``         (segment id, offset) of the oldest record not yet acknowledged, replaced atomically.

A record is ``MAGIC | payload length u32 | points u32 | flags u8 | crc32 u32 | payload`` (little endian); the
CRC covers points, flags and payload. A crash mid-append leaves a torn tail that ``open()`` finds (short
header, short payload or CRC mismatch) and truncates, so the spool never replays garbage.

Not thread-safe: the writer calls every method from one dedicated thread, which keeps disk I/O off the
event loop and keeps operations ordered.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from collector.fleet.snapshot import fsync_dir

__all__ = ["AppendResult", "OpenReport", "Record", "Spool"]

log = logging.getLogger(__name__)

MAGIC = b"PSR1"
_HEADER = struct.Struct("<4sIIBI")
_CURSOR = struct.Struct("<QQI")
_FLAG_ZLIB = 1
_SUFFIX = ".seg"


@dataclass(frozen=True, slots=True)
class Record:
    """One spooled batch, as returned by `Spool.peek`."""

    segment: int
    offset: int
    end: int
    points: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append cost: points of older data dropped to make room, or of this batch if it cannot fit."""

    dropped_points: int
    stored: bool


@dataclass(frozen=True, slots=True)
class OpenReport:
    """What `Spool.open` found on disk."""

    points: int
    size_bytes: int
    corrupt_bytes: int
    corrupt_points: int


@dataclass(slots=True)
class _Segment:
    ident: int
    size: int
    points: int  # points not yet acknowledged


class Spool:
    """Bounded FIFO of batches on disk; oldest segments are dropped (and reported) when full."""

    def __init__(
        self, directory: Path, max_bytes: int, segment_bytes: int, fsync: bool = True, compress: bool = True
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.compress = compress
        self._segs: list[_Segment] = []
        self._head_offset = 0
        self._wfd: int | None = None
        self._wfd_ident = -1
        self.corrupt_points = 0  # points lost to records found corrupt during replay; the writer reads and resets
        self._rfile: tuple[int, int] | None = None  # (segment id, fd) of the open read handle

    # -- state ----------------------------------------------------------------------------------------

    @property
    def size_bytes(self) -> int:
        """Bytes the spool occupies on disk."""
        return sum(s.size for s in self._segs)

    @property
    def points(self) -> int:
        """Points waiting for replay."""
        return sum(s.points for s in self._segs)

    @property
    def empty(self) -> bool:
        """True when nothing waits for replay."""
        return self.points == 0

    # -- open / close ---------------------------------------------------------------------------------

    def open(self) -> OpenReport:
        """Scan the directory, cut torn or corrupt tails, position at the cursor; raises OSError."""
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        cursor_seg, cursor_off = self._read_cursor()
        idents = sorted(int(p.name[: -len(_SUFFIX)]) for p in self.directory.glob("*" + _SUFFIX)
                        if p.name[: -len(_SUFFIX)].isdigit())
        self._segs = []
        corrupt_bytes = corrupt_points = 0
        for ident in idents:
            path = self._path(ident)
            if ident < cursor_seg:
                path.unlink()  # fully acknowledged before a crash, deletion did not happen yet
                continue
            boundaries, good_end, bad_points = _scan(path)
            size = path.stat().st_size
            if good_end < size:
                corrupt_bytes += size - good_end
                corrupt_points += bad_points
                log.error("influx spool: %s has %d unreadable bytes at offset %d (torn write or corruption); "
                          "truncating", path, size - good_end, good_end)
                with open(path, "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
            start = 0
            if ident == cursor_seg:
                # a cursor that is not on a record boundary cannot be trusted: replay the whole segment
                start = cursor_off if cursor_off in boundaries else 0
            points = sum(p for off, p in boundaries.items() if off >= start)
            if good_end == 0:
                path.unlink()
                continue
            self._segs.append(_Segment(ident, good_end, points))
            if ident == cursor_seg:
                self._head_offset = start
        if self._segs and self._segs[0].ident != cursor_seg:
            self._head_offset = 0
        self._drop_consumed_head()
        return OpenReport(self.points, self.size_bytes, corrupt_bytes, corrupt_points)

    def close(self) -> None:
        """Close file handles; the on-disk state stays valid."""
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        self._close_reader()

    # -- append ---------------------------------------------------------------------------------------

    def append(self, payload: bytes, points: int) -> AppendResult:
        """Append one batch at the tail, dropping the oldest segments if over `max_bytes`; raises OSError."""
        flags = 0
        if self.compress:
            payload = zlib.compress(payload, 1)  # level 1: ~10x smaller for line protocol, cheap on CPU
            flags = _FLAG_ZLIB
        crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IB", points, flags)))
        frame = _HEADER.pack(MAGIC, len(payload), points, flags, crc) + payload
        if len(frame) > self.max_bytes:
            return AppendResult(points, stored=False)
        dropped = 0
        tail = self._segs[-1] if self._segs else None
        if tail is None or (tail.size > 0 and tail.size + len(frame) > self.segment_bytes):
            tail = self._new_segment()
        while self.size_bytes + len(frame) > self.max_bytes:
            if len(self._segs) == 1:
                # only the tail is left: start a fresh one so the old data can go as a whole segment
                tail = self._new_segment()
            dropped += self._drop_head()
        fd = self._writer(tail.ident)
        try:
            _write_all(fd, frame)
            if self.fsync:
                os.fsync(fd)
        except OSError:
            # undo a partial frame so the segment stays well-formed for later appends
            try:
                os.ftruncate(fd, tail.size)
            except OSError:
                self.close()
            raise
        tail.size += len(frame)
        tail.points += points
        return AppendResult(dropped, stored=True)

    # -- replay ---------------------------------------------------------------------------------------

    def peek(self) -> Record | None:
        """The oldest unacknowledged record, or None when empty."""
        self._drop_consumed_head()
        if not self._segs or self._segs[0].points == 0:
            return None
        seg = self._segs[0]
        fd = self._reader(seg.ident)
        header = os.pread(fd, _HEADER.size, self._head_offset)
        record = None
        if len(header) == _HEADER.size:
            magic, length, points, flags, crc = _HEADER.unpack(header)
            payload = os.pread(fd, length, self._head_offset + _HEADER.size)
            if magic == MAGIC and len(payload) == length and zlib.crc32(
                payload, zlib.crc32(struct.pack("<IB", points, flags))
            ) == crc:
                end = self._head_offset + _HEADER.size + length
                record = Record(seg.ident, self._head_offset, end, points, payload)
        if record is None:
            # changed on disk since open() checked it: the rest of this segment cannot be trusted
            log.error("influx spool: corrupt record at %s:%d; dropping the rest of the segment",
                      self._path(seg.ident), self._head_offset)
            self.corrupt_points += self._drop_head()
            return self.peek()
        if flags & _FLAG_ZLIB:
            return Record(record.segment, record.offset, record.end, record.points, zlib.decompress(payload))
        return record

    def ack(self, record: Record) -> None:
        """Mark `record` done: advance and persist the cursor, delete consumed segments."""
        if not self._segs or self._segs[0].ident != record.segment or self._head_offset != record.offset:
            return  # its segment was dropped to make room while the record was in flight
        seg = self._segs[0]
        seg.points -= record.points
        self._head_offset = record.end
        self._drop_consumed_head()
        if self._segs:
            self._write_cursor(self._segs[0].ident, self._head_offset)

    # -- internals ------------------------------------------------------------------------------------

    def _path(self, ident: int) -> Path:
        return self.directory / f"{ident:016d}{_SUFFIX}"

    def _new_segment(self) -> _Segment:
        ident = self._segs[-1].ident + 1 if self._segs else self._read_cursor()[0] + 1
        if self._wfd is not None:
            os.close(self._wfd)
            self._wfd = None
        fd = os.open(self._path(ident), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._wfd = fd
        self._wfd_ident = ident
        if self.fsync:
            fsync_dir(self.directory)  # the new name must survive a crash, not only its contents
        seg = _Segment(ident, 0, 0)
        self._segs.append(seg)
        if len(self._segs) == 1:
            self._head_offset = 0
        return seg

    def _writer(self, ident: int) -> int:
        if self._wfd is None or self._wfd_ident != ident:
            if self._wfd is not None:
                os.close(self._wfd)
            self._wfd = os.open(self._path(ident), os.O_WRONLY | os.O_APPEND)
            self._wfd_ident = ident
        return self._wfd

    def _reader(self, ident: int) -> int:
        if self._rfile is None or self._rfile[0] != ident:
            self._close_reader()
            self._rfile = (ident, os.open(self._path(ident), os.O_RDONLY))
        return self._rfile[1]

    def _close_reader(self) -> None:
        if self._rfile is not None:
            os.close(self._rfile[1])
            self._rfile = None

    def _drop_head(self) -> int:
        """Delete the oldest segment; returns its unacknowledged points."""
        seg = self._segs.pop(0)
        if self._rfile is not None and self._rfile[0] == seg.ident:
            self._close_reader()
        if self._wfd is not None and self._wfd_ident == seg.ident:
            os.close(self._wfd)
            self._wfd = None
        self._path(seg.ident).unlink(missing_ok=True)
        self._head_offset = 0
        if self._segs:
            self._write_cursor(self._segs[0].ident, 0)
        return seg.points

    def _drop_consumed_head(self) -> None:
        """Delete fully acknowledged segments (the tail too: the next append starts a new one)."""
        while self._segs and self._segs[0].points == 0 and self._head_offset >= self._segs[0].size:
            ident = self._segs[0].ident
            self._drop_head()
            if not self._segs:
                # remember where we were, so ids keep increasing and no old cursor points into new data
                self._write_cursor(ident + 1, 0)

    def _read_cursor(self) -> tuple[int, int]:
        try:
            raw = (self.directory / "cursor").read_bytes()
        except FileNotFoundError:
            return 0, 0
        if len(raw) != _CURSOR.size:
            return 0, 0
        seg, off, crc = _CURSOR.unpack(raw)
        if zlib.crc32(raw[:16]) != crc:
            return 0, 0
        return int(seg), int(off)

    def _write_cursor(self, seg: int, off: int) -> None:
        body = struct.pack("<QQ", seg, off)
        tmp = self.directory / "cursor.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, body + struct.pack("<I", zlib.crc32(body)))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / "cursor")
        if self.fsync:
            fsync_dir(self.directory)  # the rename itself must survive a power cut, or acked data is replayed


def _scan(path: Path) -> tuple[dict[int, int], int, int]:
    """Record boundaries {offset: points}, end of the last good record, points claimed past it."""
    boundaries: dict[int, int] = {}
    data = path.read_bytes()
    off = 0
    while off + _HEADER.size <= len(data):
        magic, length, points, flags, crc = _HEADER.unpack_from(data, off)
        start = off + _HEADER.size
        payload = data[start : start + length]
        if magic != MAGIC or len(payload) != length:
            break
        if zlib.crc32(payload, zlib.crc32(struct.pack("<IB", points, flags))) != crc:
            break
        boundaries[off] = points
        off = start + length
    bad_points = 0
    if off + _HEADER.size <= len(data):
        magic, _, points, _, _ = _HEADER.unpack_from(data, off)
        if magic == MAGIC:
            bad_points = points  # a torn record's header still says how many points were in it
    return boundaries, off, bad_points


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
