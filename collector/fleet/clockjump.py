"""Steps of the host's wall clock, told from the monotonic clock, and the fleet rebased after one.

Receive times are wall-clock (`time.time()`): they are shown to people and stored. When the host clock steps
(a VM resumed, NTP correcting a large offset, an operator setting the date), silence measured on it is wrong:
a step forward by an hour makes every terminal look silent for an hour (a false offline storm), a step back
leaves receive times in the future so no terminal can go offline until the clock catches up. The monotonic clock
does not step, so the difference of the two clocks' advance is the jump.
"""

from __future__ import annotations

from collector.fleet.state import Fleet

__all__ = ["ClockWatch", "rebase_after_jump"]


class ClockWatch:
    """Compares successive (wall, monotonic) readings; `check` returns the jump beyond the tolerance."""

    def __init__(self, wall: float, mono: float, tolerance_s: float) -> None:
        self.wall, self.mono, self.tolerance = wall, mono, tolerance_s

    def check(self, wall: float, mono: float) -> float:
        """Seconds the wall clock stepped since the last reading (positive: forward), 0.0 within tolerance."""
        jump = (wall - self.wall) - (mono - self.mono)
        self.wall, self.mono = wall, mono
        return jump if abs(jump) > self.tolerance else 0.0


def rebase_after_jump(fleet: Fleet, now: float, jump: float) -> None:
    """Make the fleet's receive times consistent with the stepped clock.

    Terminals get a full offline period from now, as after a restart (silence is measured from
    max(last_rx, started_at)), and no receive time stays in the future. Feed and upload times, which have no
    such floor, move with the clock on a forward step (their silence is what the monotonic clock measured) and
    are clamped to now on a backward one.
    """
    # What is left of a grace that was pending (started_at ahead, after the collector heard its broker again)
    # moves with the clock; otherwise silence is measured from now.
    fleet.started_at = max(now, fleet.started_at + jump)
    for t in fleet.terminals.values():
        if t.last_rx is not None and t.last_rx > now:
            t.last_rx = now
        if t.pending_upload_since is not None:
            t.pending_upload_since = _moved(t.pending_upload_since, now, jump)
    for feed in fleet.feeds.values():
        if feed.last_rx:  # 0.0 is "never heard": stays never
            feed.last_rx = _moved(feed.last_rx, now, jump)
        if feed.alive_since:
            feed.alive_since = _moved(feed.alive_since, now, jump)


def _moved(at: float, now: float, jump: float) -> float:
    return min(at + jump, now) if jump > 0 else min(at, now)
