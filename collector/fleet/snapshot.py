"""Per-terminal state persisted across restarts: checksummed, written atomically, two generations kept.

A snapshot file is a fixed header (magic, format number, body length, CRC-32 of the body) followed by the
msgpack body. Writing goes to `<path>.tmp` (fsync), the current file is hard-linked as `<path>.prev`, the tmp
file is renamed over `<path>` and the directory is fsynced: `<path>` always exists and is complete, and the
generation before it is kept.

Reading never stops the collector from starting: a corrupt, truncated or empty file is moved aside as
`<path>.corrupt-<unix time>` (a few kept for a post-mortem), then the previous generation is tried, then an empty
state. Losing state is bad (a false `offline` wave is possible); not monitoring at all is worse. Files of the
format before the header (2) are still read, verified by decoding them.
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import msgspec

from collector.fleet.activity import ActivitySnapshot
from collector.fleet.registry import EMPTY, Registry
from collector.fleet.state import Active, FeedState, Fleet, Terminal, share_float, streak_pairs

__all__ = [
    "FORMAT",
    "KEEP_CORRUPT",
    "Restored",
    "SetAside",
    "SnapshotError",
    "Source",
    "corrupt_files",
    "decode_terminals",
    "encode_terminals",
    "fsync_dir",
    "load_snapshot",
    "save_snapshot",
]

log = logging.getLogger(__name__)
FORMAT = 3
LEGACY_FORMAT = 2  # no header: the body alone, verified only by decoding it
MAGIC = b"\x89PFSNAP\n"  # a high byte and a newline: a text-mode copy or a wrong file is told at once
_HEADER = struct.Struct("<8sIQI")  # magic, format, body length, crc32(body)
KEEP_CORRUPT = 3  # corrupt files kept for a post-mortem; older ones are deleted so a loop cannot fill the disk


class _Snapshot(msgspec.Struct):
    format: int
    terminals: list[Terminal]
    feeds: list[tuple[str, float, float, int]]
    activity: ActivitySnapshot | None = None  # absent in snapshots written before the baselines existed


class _Lazy(msgspec.Struct):
    """The same bytes as `_Snapshot`, each terminal left encoded: decoded one at a time by `_restore`."""

    format: int
    terminals: list[msgspec.Raw]
    feeds: list[tuple[str, float, float, int]]
    # Decoded on its own (`_activity`): a baseline buffer that does not decode costs the baselines, not the state.
    activity: msgspec.Raw = msgspec.Raw()  # empty: none in the file


_DECODER = msgspec.msgpack.Decoder(_Lazy)
_TERMINAL = msgspec.msgpack.Decoder(Terminal)
_ACTIVITY = msgspec.msgpack.Decoder(ActivitySnapshot)


class SnapshotError(RuntimeError):
    """The snapshot could not be written."""


class Source(enum.Enum):
    """Which generation the state was restored from."""

    CURRENT = "current"
    PREVIOUS = "previous"
    EMPTY = "empty"


class SetAside(NamedTuple):
    """A snapshot file that failed verification and was moved out of the way."""

    original: Path
    moved_to: Path | None  # None when even moving it failed (it stays where it was)
    reason: str


class Restored(NamedTuple):
    """What `load_snapshot` found: the state (first two fields, as `Fleet(restored=...)` takes them) and how."""

    terminals: list[Terminal]
    feeds: list[FeedState]
    source: Source = Source.EMPTY
    set_aside: tuple[SetAside, ...] = ()
    # Activity baselines (`Fleet(baselines=...)`); None: none in the file (written before they existed).
    activity: ActivitySnapshot | None = None

    @property
    def state(self) -> tuple[list[Terminal], list[FeedState]]:
        """The restored terminals and feeds."""
        return self.terminals, self.feeds


def _prev(target: Path) -> Path:
    return target.with_name(target.name + ".prev")


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` survive a power cut (the snapshot's and the history spool's)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(fleet: Fleet) -> bytes:
    """The fleet's state as the bytes of a snapshot file (header + body)."""
    return encode_terminals(
        list(fleet.terminals.values()),
        [(f.acquirer, f.last_rx, f.alive_since, f.txns) for f in fleet.feeds.values()],
        fleet.activity.snapshot(fleet.terminals) if fleet.activity.enabled else None,
    )


def encode_terminals(terminals: list[Terminal], feeds: list[tuple[str, float, float, int]] | None = None,
                     activity: ActivitySnapshot | None = None) -> bytes:
    """Terminals (the fleet's, or one partition's for collector/cluster) in the snapshot file's format."""
    body = msgspec.msgpack.encode(_Snapshot(FORMAT, terminals, feeds or [], activity))
    return _HEADER.pack(MAGIC, FORMAT, len(body), zlib.crc32(body)) + body


def decode_terminals(data: bytes, registry: Registry = EMPTY) -> list[Terminal]:
    """The terminals of `encode_terminals` bytes, verified (header, length, checksum); SnapshotError if bad."""
    try:
        return _verify(data, registry)[0]
    except _Corrupt as err:
        raise SnapshotError(f"corrupt partition state: {err}") from None


def _keep_previous(target: Path) -> None:
    """Make the current file `.prev` while it stays in place: a hard link, renamed over the old `.prev`."""
    link = target.with_name(target.name + ".prev.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(target, link)
    except OSError:
        # No hard links on this file system: rename instead. A crash before the next rename then leaves no
        # current file but a complete `.prev`, which load uses.
        os.replace(target, _prev(target))
        return
    os.replace(link, _prev(target))


def save_snapshot(fleet: Fleet, path: str | os.PathLike[str]) -> int:
    """Write the fleet's state to `path` atomically, keeping the previous file as `.prev`; returns bytes written."""
    data = _encode(fleet)
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            _keep_previous(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        # Disk full or read-only: the half-written tmp file must not eat the space the next try needs.
        tmp.unlink(missing_ok=True)
        raise SnapshotError(f"cannot write state snapshot {target}: {err.strerror or err}") from err
    return len(data)


_STR_FIELDS = (
    "acquirer", "site", "merchant", "mid", "model", "app_version", "os_version", "net_type", "power_source",
    "printer", "display", "card_reader", "status", "rejected_last",
)
# Floats that repeat across the fleet (intervals, signal, battery) or are mostly zero (times never set).
_FLOAT_FIELDS = ("interval_s", "rssi_dbm", "battery_pct", "status_rx", "upstream_rx")


def _share_values(t: Terminal, registry: Registry) -> None:
    """Decoding gives every terminal its own copy of strings and floats the fleet shares (ids, versions, states,
    intervals, zeros): replace them by one shared object each, or a restart costs far more than a fresh start.

    The terminal id becomes the registry's own string object (one per id, not interned: the interpreter's table
    of interned strings would cost ~31 B more per terminal at 1,000,000)."""
    entry = registry.entries.get(t.tid)
    if entry is not None:
        t.tid = entry.terminal_id
    for name in _STR_FIELDS:
        value = getattr(t, name)
        if value:
            setattr(t, name, sys.intern(value))
    for name in _FLOAT_FIELDS:
        number = getattr(t, name)
        if number is not None:
            setattr(t, name, share_float(number))
    if t.uploaded_count == t.txn_count:  # everything uploaded, the usual case: one int object for both
        t.uploaded_count = t.txn_count
    # Not kept across a restart: a float per terminal (~32 B, 5 % of a restored terminal) for one narrow case, a
    # redelivery of the heartbeat before the newest arriving after the restart; that one then counts as a reboot.
    t.prev_ts = None
    if t.conds:
        t.conds = {
            sys.intern(c): Active(a.since, sys.intern(a.severity), sys.intern(a.detail)) for c, a in t.conds.items()
        }
    if t.streaks:
        t.streaks = tuple(sys.intern(x) if isinstance(x, str) else x for x in streak_pairs(t.streaks) or ())
    if t.rejected:
        t.rejected = {sys.intern(c): n for c, n in t.rejected.items()}


class _Corrupt(Exception):
    """A snapshot file failed verification; the message is the reason."""


_Body = tuple[list[Terminal], list[FeedState], ActivitySnapshot | None]


def _decode_body(body: bytes, expected_format: int, registry: Registry) -> _Body:
    try:
        snap = _DECODER.decode(body)
    except msgspec.DecodeError as err:
        raise _Corrupt(f"does not decode ({err})") from None
    if snap.format != expected_format:
        raise _Corrupt(f"body says format {snap.format}, expected {expected_format}")
    return _restore(snap, registry)


def _verify(data: bytes, registry: Registry = EMPTY) -> _Body:
    """Decode the bytes of a snapshot file after checking header, length and checksum; raises on any fault."""
    if not data:
        raise _Corrupt("empty file")
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise _Corrupt(f"truncated header ({len(data)} bytes)")
        return _decode_body(data, LEGACY_FORMAT, registry)  # the format before the header, or garbage
    if len(data) < _HEADER.size:
        raise _Corrupt(f"truncated header ({len(data)} of {_HEADER.size} bytes)")
    _magic, fmt, length, crc = _HEADER.unpack_from(data)
    if fmt != FORMAT:
        raise _Corrupt(f"format {fmt}, this version reads {FORMAT} and {LEGACY_FORMAT}")
    body = data[_HEADER.size:]
    if len(body) != length:
        raise _Corrupt(f"truncated: body is {len(body)} of {length} bytes")
    if zlib.crc32(body) != crc:
        raise _Corrupt("checksum mismatch")
    return _decode_body(body, FORMAT, registry)


def _set_aside(path: Path, reason: str, now: float) -> SetAside:
    """Move a bad file to `<path>.corrupt-<unix time>` and prune the oldest beyond KEEP_CORRUPT."""
    target = Path(path)
    base = target.name.removesuffix(".prev")
    stamp = int(now)
    moved = target.with_name(f"{base}.corrupt-{stamp}")
    n = 1
    while moved.exists():  # the current and the previous generation can both go bad in the same second
        moved = target.with_name(f"{base}.corrupt-{stamp}.{n}")
        n += 1
    try:
        os.replace(target, moved)
    except OSError as err:
        return SetAside(target, None, f"{reason}; could not move it aside: {err.strerror or err}")
    for old in corrupt_files(target.with_name(base))[:-KEEP_CORRUPT]:
        old.unlink(missing_ok=True)
    return SetAside(target, moved, reason)


def corrupt_files(path: str | os.PathLike[str]) -> list[Path]:
    """The corrupt snapshot files set aside next to `path`, oldest first."""
    target = Path(path)
    try:
        found = list(target.parent.glob(f"{target.name}.corrupt-*"))
    except OSError:
        return []

    def age(p: Path) -> tuple[int, int]:
        stamp, _, n = p.name.rsplit(".corrupt-", 1)[1].partition(".")
        return (int(stamp) if stamp.isdigit() else 0, int(n) if n.isdigit() else 0)

    return sorted(found, key=age)


def _restore(snap: _Lazy, registry: Registry) -> _Body:
    """Decode the terminals one at a time, each shared at once: the copies it drops are freed before the next
    terminal is decoded, which then reuses their memory. Decoding all first and sharing after left a hole per
    dropped string across the whole heap (~1 KB per terminal of RSS after a restart, bench/bench_memory.py)."""
    decode = _TERMINAL.decode
    terminals = []
    try:
        for raw in snap.terminals:
            t = decode(raw)
            _share_values(t, registry)
            terminals.append(t)
    except msgspec.DecodeError as err:
        raise _Corrupt(f"terminal {len(terminals)} does not decode ({err})") from None
    snap.terminals.clear()
    feeds = []
    for acquirer, last_rx, alive_since, txns in snap.feeds:
        feed = FeedState(acquirer)
        feed.last_rx, feed.alive_since, feed.txns = last_rx, alive_since, txns
        feeds.append(feed)
    return terminals, feeds, _activity(snap.activity)


def _activity(raw: msgspec.Raw) -> ActivitySnapshot | None:
    """The baselines; ones that do not decode become an unusable record the fleet counts and starts without."""
    if not len(raw) or bytes(raw) == b"\xc0":  # absent, or nil (activity baselines switched off)
        return None
    try:
        return _ACTIVITY.decode(raw)
    except msgspec.DecodeError as err:
        log.error("activity baselines in the snapshot do not decode (%s)", err)
        return ActivitySnapshot(0, memoryview(b""), memoryview(b""))


def load_snapshot(
    path: str | os.PathLike[str], now: float | None = None, registry: Registry = EMPTY
) -> Restored:
    """Read the newest good generation (current, then `.prev`, else empty); bad files are moved aside.

    `now` (unix time) names the moved files. Never raises for a bad file: the result says what happened.
    Terminals share their id string with `registry` (pass the one the Fleet will use).
    """
    target = Path(path)
    now = time.time() if now is None else now
    aside: list[SetAside] = []
    for candidate, source in ((target, Source.CURRENT), (_prev(target), Source.PREVIOUS)):
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as err:
            aside.append(_set_aside(candidate, f"unreadable ({err.strerror or err})", now))
            continue
        try:
            terminals, feeds, activity = _verify(data, registry)
        except _Corrupt as err:
            aside.append(_set_aside(candidate, str(err), now))
            continue
        return Restored(terminals, feeds, source, tuple(aside), activity)
    return Restored([], [], Source.EMPTY, tuple(aside))
