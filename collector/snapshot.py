"""Per-terminal state persisted across restarts: written atomically, read back on start."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import msgspec

from .state import Active, FeedState, Fleet, Terminal

__all__ = ["SnapshotError", "load_snapshot", "save_snapshot"]

log = logging.getLogger(__name__)
FORMAT = 2


class _Snapshot(msgspec.Struct):
    format: int
    terminals: list[Terminal]
    feeds: list[tuple[str, float, float, int]]


_DECODER = msgspec.msgpack.Decoder(_Snapshot)


class SnapshotError(RuntimeError):
    """The snapshot could not be written or read."""


def save_snapshot(fleet: Fleet, path: str | os.PathLike[str]) -> int:
    """Write the fleet's state to `path` atomically (tmp + fsync + rename); returns bytes written."""
    body = _Snapshot(
        FORMAT,
        list(fleet.terminals.values()),
        [(f.acquirer, f.last_rx, f.alive_since, f.txns) for f in fleet.feeds.values()],
    )
    data = msgspec.msgpack.encode(body)
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as err:
        raise SnapshotError(f"cannot write state snapshot {target}: {err.strerror}") from err
    return len(data)


_STR_FIELDS = (
    "acquirer", "site", "merchant", "mid", "model", "app_version", "os_version", "net_type", "power_source",
    "printer", "display", "card_reader", "status",
)


def _share_strings(t: Terminal) -> None:
    """Decoding gives every terminal its own copy of strings the fleet shares (ids, versions, states):
    intern them, or a restart would cost several hundred bytes per terminal more than a fresh start."""
    t.tid = sys.intern(t.tid)
    for name in _STR_FIELDS:
        value = getattr(t, name)
        if value:
            setattr(t, name, sys.intern(value))
    if t.conds:
        t.conds = {
            sys.intern(c): Active(a.since, sys.intern(a.severity), sys.intern(a.detail)) for c, a in t.conds.items()
        }


def load_snapshot(path: str | os.PathLike[str]) -> tuple[list[Terminal], list[FeedState]]:
    """Read a snapshot; a missing file is an empty state, a corrupt one is an error."""
    target = Path(path)
    if not target.exists():
        return [], []
    try:
        body = _DECODER.decode(target.read_bytes())
    except (OSError, msgspec.DecodeError) as err:
        raise SnapshotError(f"{target}: unreadable snapshot ({err}); move it away to start empty") from err
    if body.format != FORMAT:
        raise SnapshotError(f"{target}: snapshot format {body.format}, this version reads {FORMAT}")
    terminals = body.terminals
    for t in terminals:
        _share_strings(t)
    feeds = []
    for acquirer, last_rx, alive_since, txns in body.feeds:
        feed = FeedState(acquirer)
        feed.last_rx, feed.alive_since, feed.txns = last_rx, alive_since, txns
        feeds.append(feed)
    return terminals, feeds


