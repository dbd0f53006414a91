"""Heartbeat histories for the activity-baseline tests: a fleet learns weeks of a shop's sales in a moment."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from collector.fleet.protocol import Heartbeat
from collector.fleet.state import Fleet, Transition

# Transactions per hour at a UTC epoch time (a constant for a shop trading around the clock).
Rate = Callable[[float], float]


def heartbeat(tid: str, seq: int, count: int, ts: float, interval_s: float = 300.0, **over: Any) -> Heartbeat:
    """A healthy heartbeat of a registered terminal with `count` transactions so far."""
    body: dict[str, Any] = {
        "tid": tid, "ts": ts, "seq": seq, "interval_s": interval_s, "txn_count": count, "uploaded_count": count,
        "queue_depth": 0, "oldest_queued_ts": None, "mid": f"M-{tid}", "app_version": "3.1.0",
        "hw": {"printer": "ok", "display": "ok", "card_reader": "ok"}, "net": {"type": "wifi", "rssi_dbm": -60},
    }
    body.update(over)
    return msgspec.convert(body, Heartbeat)


def history(start: float, end: float, rate: Rate, step: float = 300.0) -> Iterator[tuple[float, int]]:
    """(receive time, txn_count) every `step` seconds from `start` to `end`, sales accumulating at `rate`."""
    t, acc = start, 0.0
    while t <= end:
        yield t, int(acc)
        acc += rate(t) * step / 3600.0
        t += step


class Feeder:
    """Drives one fleet's terminals through histories, remembering each terminal's seq and count."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.seq: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.out: list[Transition] = []

    def beat(self, tid: str, rx: float, count: int | None = None, **over: Any) -> None:
        """One heartbeat received at `rx`; `count` None repeats the last count (no sale)."""
        seq = self.seq.get(tid, -1) + 1
        self.seq[tid] = seq
        n = self.count.get(tid, 0) if count is None else count
        self.count[tid] = n
        self.fleet.on_heartbeat(heartbeat(tid, seq, n, rx, **over), rx, self.out)

    def learn(self, tid: str, start: float, end: float, rate: Rate, step: float = 300.0) -> None:
        """Heartbeats from `start` to `end` with sales at `rate` on top of the terminal's count so far."""
        base = self.count.get(tid, 0)
        for rx, n in history(start, end, rate, step):
            self.beat(tid, rx, base + n)
