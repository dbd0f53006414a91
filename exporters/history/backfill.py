"""`posfleet baseline learn`: activity baselines backfilled from the heartbeat history, so a new deployment does not
wait a week before `activity_drop` is evaluated.

The history is what the collector wrote (exporters.history.lines): one `heartbeat` point per *accepted* heartbeat,
stamped with its receive time, with the cumulative `txn_count`. Replaying those points per terminal in time order
through the same `Activity.observe` the collector calls gives the same baseline as live learning did: the model's
rounding is dithered by (hour, bucket) only, never by the slot or the order terminals are visited in. (Receive
times are stored to the microsecond; a live receive time with more digits can, rarely, round one update
differently.)

Read in time windows, so memory is bounded by one window, not by the history: with InfluxQL (`InfluxSource`,
`/query`: InfluxDB 1.x, and 2.x through its v1 compatibility API) or from VictoriaMetrics (`ExportSource`,
`/api/v1/export` of `heartbeat_txn_count`, what it makes of the `heartbeat` points; its timestamps are
milliseconds). The result is written into the state snapshot, which the collector
reads at start: run this while the collector is stopped, or it overwrites the snapshot at its next save.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from collector.fleet.state import Fleet

__all__ = ["ExportSource", "HistoryError", "HistorySource", "InfluxSource", "LearnResult", "learn_baselines"]

Progress = Callable[[str], None]


class HistoryError(RuntimeError):
    """The history could not be read; the message says where and why."""


@dataclass(frozen=True, slots=True)
class InfluxSource:
    """Where the heartbeat history is: an InfluxQL endpoint, database and retention policy."""

    url: str
    database: str
    retention_policy: str = ""
    token: str | None = None
    timeout_s: float = 60.0

    @classmethod
    def from_bucket(cls, url: str, bucket: str, token: str | None, timeout_s: float = 60.0) -> InfluxSource:
        """From the writer's `influx.bucket` ("database" or "database/retention_policy")."""
        db, _, rp = bucket.partition("/")
        return cls(url.rstrip("/"), db, rp, token, timeout_s)

    def query(self, q: str) -> list[dict[str, Any]]:
        """Run one InfluxQL statement; the series of its result (nanosecond epoch times)."""
        params = {"db": self.database, "q": q, "epoch": "ns"}
        if self.retention_policy:
            params["rp"] = self.retention_policy
        req = urllib.request.Request(
            f"{self.url}/query", data=urllib.parse.urlencode(params).encode(), method="POST",
            headers={"Authorization": f"Token {self.token}"} if self.token else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            text = err.read()[:300].decode(errors="replace")
            raise HistoryError(f"InfluxDB at {self.url} answered HTTP {err.code}: {text}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise HistoryError(f"cannot reach InfluxDB at {self.url}: {reason}") from None
        except ValueError as err:
            raise HistoryError(f"InfluxDB at {self.url} sent something that is not JSON: {err}") from None
        results = body.get("results") or [{}]
        if "error" in body or "error" in results[0]:
            raise HistoryError(f"InfluxDB at {self.url}: {body.get('error') or results[0]['error']}")
        series: list[dict[str, Any]] = results[0].get("series") or []
        return series

    def heartbeats(self, start_ns: int, end_ns: int) -> Iterator[tuple[str, list[list[int]]]]:
        """(terminal_id, [[time_ns, txn_count], ...] in time order) for the heartbeats received in [start, end)."""
        q = (
            f'SELECT "txn_count" FROM "heartbeat" WHERE time >= {start_ns} AND time < {end_ns} '
            'GROUP BY "terminal_id"'
        )
        for s in self.query(q):
            tid = (s.get("tags") or {}).get("terminal_id", "")
            yield tid, [row for row in s.get("values") or [] if row[1] is not None]


@dataclass(frozen=True, slots=True)
class ExportSource:
    """VictoriaMetrics: the `heartbeat` points it ingested as the series `heartbeat_txn_count{terminal_id=...}`."""

    url: str
    token: str | None = None
    timeout_s: float = 60.0

    def heartbeats(self, start_ns: int, end_ns: int) -> Iterator[tuple[str, list[list[int]]]]:
        """(terminal_id, [[time_ns, txn_count], ...] in time order) for the heartbeats received in [start, end)."""
        start_ms, end_ms = -(-start_ns // 1_000_000), -(-end_ns // 1_000_000)  # [start, end) in whole ms
        query = urllib.parse.urlencode({
            "match[]": '{__name__="heartbeat_txn_count"}', "start": f"{start_ms / 1000:.3f}",
            "end": f"{(end_ms - 1) / 1000:.3f}",
        })
        req = urllib.request.Request(
            f"{self.url.rstrip('/')}/api/v1/export?{query}",
            headers={"Authorization": f"Bearer {self.token}"} if self.token else {},
        )
        by_tid: dict[str, dict[int, int]] = {}
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                for line in resp:
                    if not line.strip():
                        continue
                    series = json.loads(line)
                    tid = series["metric"].get("terminal_id", "")
                    points = by_tid.setdefault(tid, {})
                    for ms, value in zip(series["timestamps"], series["values"], strict=True):
                        if start_ms <= ms < end_ms and value is not None:
                            points[int(ms) * 1_000_000] = int(value)  # one point per time (a replay is no copy)
        except urllib.error.HTTPError as err:
            text = err.read()[:300].decode(errors="replace")
            raise HistoryError(f"VictoriaMetrics at {self.url} answered HTTP {err.code}: {text}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise HistoryError(f"cannot reach VictoriaMetrics at {self.url}: {reason}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise HistoryError(f"VictoriaMetrics at {self.url} sent an export this cannot read: {err!r}") from None
        for tid, points in by_tid.items():
            yield tid, [[ns, points[ns]] for ns in sorted(points)]


class HistorySource(Protocol):
    """Where heartbeats are read from."""

    def heartbeats(self, start_ns: int, end_ns: int) -> Iterator[tuple[str, list[list[int]]]]: ...


@dataclass
class LearnResult:
    """What a backfill read and learned."""

    heartbeats: int = 0
    terminals: int = 0
    unknown_terminals: int = 0  # ids in the history that are neither in the registry nor in the snapshot
    backwards: int = 0  # points whose counter went back (the collector did not learn from those either)
    evaluated: int = 0  # terminals whose baseline is now complete enough to be judged
    learned: set[str] = field(default_factory=set)


def learn_baselines(
    fleet: Fleet, source: HistorySource, start: float, end: float, window_s: float = 6 * 3600.0,
    progress: Progress | None = None,
) -> LearnResult:
    """Replay the heartbeats received in [start, end) through the fleet's baselines, window by window.

    Each terminal found in the history starts from an empty baseline (what it had before is replaced), so the
    result is what live learning over the same heartbeats gives."""
    if not fleet.activity.enabled:
        raise HistoryError("activity baselines are switched off (activity.enabled: false)")
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    activity, result = fleet.activity, LearnResult()
    prev: dict[str, tuple[float, int]] = {}
    unknown: set[str] = set()
    windows = max(1, math.ceil((end - start) / window_s))
    for n in range(windows):
        a, b = start + n * window_s, min(end, start + (n + 1) * window_s)
        points = 0
        for tid, rows in source.heartbeats(round(a * 1e9), round(b * 1e9)):
            t = fleet.terminals.get(tid)
            if t is None:
                if len(unknown) < 100_000:  # a bound on what a history of garbage ids can cost
                    unknown.add(tid)
                continue
            slot = activity.slot_for(t.tid)  # the fleet's own id string, not the reply's copy
            if tid not in result.learned:
                result.learned.add(tid)
                activity.store.clear(slot)
            tz, _ = fleet.activity_zone(t)
            for ns, count in rows:
                rx = ns / 1e9
                last = prev.get(tid)
                if last is not None and count < last[1]:
                    result.backwards += 1  # rejected live as counter_backwards: never learned from
                    continue
                activity.observe(slot, tz, last[0] if last else None, last[1] if last else 0, rx, int(count))
                prev[tid] = (rx, int(count))
                points += 1
        result.heartbeats += points
        say(f"baseline learn: window {n + 1}/{windows} ({_iso(a)} to {_iso(b)}): {points} heartbeats, "
            f"{len(result.learned)} terminals so far")
    result.terminals = len(result.learned)
    result.unknown_terminals = len(unknown)
    result.evaluated = sum(1 for tid in result.learned if activity.store.evaluated(activity.slot_of(tid)))
    return result


def _iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")
