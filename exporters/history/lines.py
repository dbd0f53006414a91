"""Collector events as InfluxDB line protocol: pure functions, one line per point (schema: docs/storage.md).

Timestamps are the collector's receive time in nanoseconds (liveness and ordering never trust a terminal's
clock); the terminal's own time is the field `terminal_ts`. Tags are only the bounded identity of a terminal
(terminal_id, merchant_id, acquirer, model) and, for transitions, the condition name: a transaction id is
always a field, never a tag, because every tag value creates an index entry forever.

Because a point is identified by measurement + tags + timestamp, and the timestamp is fixed when the line is
built, sending a line twice (a replay after an outage) overwrites the first copy instead of duplicating it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, Protocol

from collector.fleet.protocol import Heartbeat, Message, Status, TxnReceipt, UpstreamBatch

__all__ = [
    "HistoryRecorder",
    "condition_line",
    "heartbeat_line",
    "receipt_line",
    "status_line",
    "tag_set",
    "to_ns",
    "upstream_lines",
]

# Tag values: comma, equals and space are escaped with a backslash; line breaks and tabs become the visible
# two-character `\n`, `\r`, `\t`, so no value can end a line. A backslash itself is NOT doubled: InfluxDB (1.x
# and 2.x) unescapes only `\,` `\=` `\ ` in tags and would store `\\` as two backslashes; written as is, it reads
# back unchanged (checked against a real influxd in tests/integration/test_history_escaping.py).
_TAG_ESCAPE = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\r": r"\r", "\t": r"\t"})
# String field values: double quote and backslash are escaped (both are unescaped by InfluxDB); a line break
# would end the line, so it becomes a space.
_STR_ESCAPE = str.maketrans({'"': r"\"", "\\": "\\\\", "\n": " ", "\r": " "})


class TransitionLike(Protocol):
    """What `condition_line` needs from a collector.fleet.state.Transition."""

    @property
    def tid(self) -> str: ...
    @property
    def condition(self) -> str: ...
    @property
    def raised(self) -> bool: ...
    @property
    def at(self) -> float: ...
    @property
    def severity(self) -> str: ...
    @property
    def detail(self) -> str: ...


def to_ns(t: float) -> int:
    """Unix seconds as integer nanoseconds, rounded to the microsecond so the same float always maps the same."""
    return round(t * 1_000_000) * 1000


def _tag_value(value: str) -> str:
    out = value.translate(_TAG_ESCAPE)
    # a trailing backslash would escape the separator after it (the official client's rule)
    return out + " " if out.endswith("\\") else out


@lru_cache(maxsize=262_144)  # one entry per terminal: tags are escaped once, not per heartbeat
def tag_set(terminal_id: str, merchant_id: str = "", acquirer: str = "", model: str = "") -> str:
    """The escaped tag part of a line, keys sorted as InfluxDB prefers; empty values are left out."""
    parts = [f",{key}={_tag_value(value)}" for key, value in (
        ("acquirer", acquirer), ("merchant_id", merchant_id), ("model", model), ("terminal_id", terminal_id)
    ) if value]
    return "".join(parts)


def _field(key: str, value: object) -> str:
    """`key=value` with the line-protocol type of value; "" for None or non-finite floats."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return f",{key}={'true' if value else 'false'}"
    if isinstance(value, int):
        return f",{key}={value}i"
    if isinstance(value, float):
        return f",{key}={value!r}" if math.isfinite(value) else ""
    return f',{key}="{str(value).translate(_STR_ESCAPE)}"'


def _line(measurement: str, tags: str, fields: Iterable[str], ts_ns: int) -> str:
    body = "".join(fields)
    return f"{measurement}{tags} {body[1:]} {ts_ns}"


def _esc(value: str) -> str:
    return value.translate(_STR_ESCAPE) if ('"' in value or "\\" in value or "\n" in value or "\r" in value) else value


def heartbeat_line(hb: Heartbeat, rx: float, tags: str) -> str:
    """Measurement `heartbeat`: every reported value; `seq` lets users spot lost heartbeats."""
    # Written out by hand (not via _field): this runs for every heartbeat, ~3x faster than the generic path.
    # Floats stay floats even when firmware sends whole numbers: a field's type is fixed by its first write.
    out = [
        f"heartbeat{tags} seq={hb.seq}i,interval_s={float(hb.interval_s)!r},txn_count={hb.txn_count}i"
        f",uploaded_count={hb.uploaded_count}i,queue_depth={hb.queue_depth}i,terminal_ts={float(hb.ts)!r}"
    ]
    if hb.oldest_queued_ts is not None:
        out.append(f",oldest_queued_ts={float(hb.oldest_queued_ts)!r}")
    if hb.uptime_s is not None:
        out.append(f",uptime_s={float(hb.uptime_s)!r}")
    if hb.mid is not None:
        # Escaped although ids are [A-Za-z0-9_-]: one id pattern that let a newline through would otherwise
        # split the line and fail the whole batch it was written in.
        out.append(f',mid="{_esc(hb.mid)}"')
    if hb.app_version is not None:
        out.append(f',app_version="{_esc(hb.app_version)}"')
    if hb.os_version is not None:
        out.append(f',os_version="{_esc(hb.os_version)}"')
    net, power, hw = hb.net, hb.power, hb.hw
    # enums below (net type, power source, hardware states) are fixed words: nothing to escape
    if net is not None:
        if net.type is not None:
            out.append(f',net_type="{net.type}"')
        if net.rssi_dbm is not None:
            out.append(f",rssi_dbm={float(net.rssi_dbm)!r}")
    if power is not None:
        if power.source is not None:
            out.append(f',power_source="{power.source}"')
        if power.battery_pct is not None:
            out.append(f",battery_pct={float(power.battery_pct)!r}")
    if hw is not None:
        if hw.printer is not None:
            out.append(f',printer="{hw.printer}"')
        if hw.display is not None:
            out.append(f',display="{hw.display}"')
        if hw.card_reader is not None:
            out.append(f',card_reader="{hw.card_reader}"')
    out.append(f" {to_ns(rx)}")
    return "".join(out)


def status_line(st: Status, rx: float, tags: str) -> str:
    """Measurement `status`: online/offline announcements, including last wills (reason tells which)."""
    return _line("status", tags, (
        _field("state", st.state), _field("reason", st.reason),
        _field("terminal_ts", None if st.ts is None else float(st.ts)),
    ), to_ns(rx))


def receipt_line(txn: TxnReceipt, rx: float, tags: str) -> str:
    """Measurement `txn`: a transaction the terminal says it completed (id and amount; never card data)."""
    return _line("txn", tags, (
        _field("txn_id", txn.txn_id), _field("status", txn.status), _field("amount_minor", txn.amount_minor),
        _field("currency", txn.currency), _field("terminal_ts", float(txn.ts)),
    ), to_ns(rx))


def upstream_lines(batch: UpstreamBatch, rx: float, tags_of: Callable[[str], str]) -> list[str]:
    """Measurement `upstream_txn` per recorded transaction and one `upstream_batch` point per feed message."""
    # Transactions of one batch share a receive time; adding the index (in ns) keeps two of the same terminal
    # from being merged into one point, and stays the same on a replay.
    base = to_ns(rx)
    lines = [
        _line("upstream_txn", tags_of(t.tid), (
            _field("txn_id", t.txn_id), _field("terminal_ts", float(t.ts)), _field("feed_ts", float(batch.ts)),
        ), base + i)
        for i, t in enumerate(batch.txns)
    ]
    lines.append(_line("upstream_batch", tag_set("", acquirer=batch.acquirer), (
        _field("txns", len(batch.txns)), _field("feed_ts", float(batch.ts)),
    ), base))
    return lines


def condition_line(tr: TransitionLike, tags: str) -> str:
    """Measurement `condition`: a condition raised (active=true) or cleared, at the collector's clock."""
    return _line("condition", tags + f",condition={_tag_value(tr.condition)}", (
        _field("active", tr.raised), _field("severity", tr.severity), _field("detail", tr.detail),
    ), to_ns(tr.at))


class HistoryRecorder:
    """Adapter from the collector's hooks to a line sink (`InfluxWriter.write`); never raises into them."""

    def __init__(self, write: Callable[[str], None], lookup: Callable[[str], Any]) -> None:
        self._write = write
        self._lookup = lookup  # tid -> collector.fleet.state.Terminal (or None): registry-derived tags

    def tags(self, tid: str, terminal: Any = None) -> str:
        """Tag set of a terminal from its state (registry merchant/acquirer/model), or just its id."""
        t = terminal if terminal is not None else self._lookup(tid)
        if t is None:
            return tag_set(tid)
        return tag_set(tid, t.merchant or t.mid or "", t.acquirer or "", t.model or "")

    def feed_tags(self, tid: str, acquirer: str) -> str:
        """Tag set of a transaction in `acquirer`'s feed: always that acquirer, the one that recorded it; the
        terminal's merchant and model only when the terminal is that acquirer's. A record in another acquirer's
        feed (a terminal registered with the wrong acquirer, a reused id) is never counted as its registered
        acquirer's volume."""
        t = self._lookup(tid)
        if t is None or t.acquirer != acquirer:
            return tag_set(tid, acquirer=acquirer)
        return self.tags(tid, t)

    def on_message(self, msg: Message, rx: float, terminal: Any) -> None:
        """`Collector.message_hooks` entry: one accepted message."""
        if isinstance(msg, Heartbeat):
            self._write(heartbeat_line(msg, rx, self.tags(msg.tid, terminal)))
        elif isinstance(msg, Status):
            self._write(status_line(msg, rx, self.tags(msg.tid, terminal)))
        elif isinstance(msg, TxnReceipt):
            self._write(receipt_line(msg, rx, self.tags(msg.tid, terminal)))
        elif isinstance(msg, UpstreamBatch):
            acquirer = msg.acquirer
            for line in upstream_lines(msg, rx, lambda tid: self.feed_tags(tid, acquirer)):
                self._write(line)

    def on_transitions(self, transitions: list[Any]) -> None:
        """`Collector.transition_hooks` entry: conditions raised or cleared."""
        for tr in transitions:
            self._write(condition_line(tr, self.tags(tr.tid)))
