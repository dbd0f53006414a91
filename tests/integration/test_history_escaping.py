"""Line protocol with hostile values, written to a real InfluxDB 1.6 and read back: no line breaks, no value
leaks into another, every value stored as written (line breaks in tags become a visible `\\n`)."""

from __future__ import annotations

import msgspec
import pytest

from collector.fleet.protocol import Heartbeat, Status, TxnReceipt, UpstreamBatch, UpstreamTxn
from exporters.history.lines import condition_line, heartbeat_line, receipt_line, status_line, tag_set, upstream_lines
from tests.harness.tsdb import InfluxD

pytestmark = pytest.mark.integration

RX = 1_796_054_494.0
HOSTILE = [
    "plain", "with space", "a,b", "k=v", "a\\b", "x\\,y", "q\\ r", "e\\=f", 'quo"te', "new\nline", "cr\rx",
    "tab\tx", "ünïcode ✓", "\u2028sep", "trailing\\", " lead", "m,t=x f=1 1",
]


def stored_tag(value: str) -> str:
    """What InfluxDB keeps for a tag value we wrote: line breaks and tabs stay visible escapes; a trailing
    backslash cannot be written in a tag at all (it would escape the separator), so it becomes a space."""
    out = value.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return out[:-1] + " " if out.endswith("\\") else out


def stored_field(value: str) -> str:
    """What InfluxDB keeps for a string field value: line breaks become spaces, all else is kept."""
    return value.replace("\n", " ").replace("\r", " ")


@pytest.mark.parametrize("n", range(len(HOSTILE)))
def test_hostile_values_round_trip_through_influxdb(influxd: InfluxD, n: int) -> None:
    value = HOSTILE[n]
    tags = tag_set(f"T{n}{value}", value, f"acq{value}", value)
    hb = msgspec.convert({"tid": "T00001", "ts": RX, "seq": 1, "interval_s": 30, "txn_count": 0,
                          "uploaded_count": 0, "queue_depth": 0, "oldest_queued_ts": None}, Heartbeat)
    # Values the decoder would refuse still must not break a line (a wrong pattern once let a newline through).
    hb = msgspec.structs.replace(hb, mid=value, app_version=value, os_version=value)
    receipt = msgspec.structs.replace(
        msgspec.convert({"txn_id": "x", "ts": RX, "amount_minor": 5, "currency": "EUR", "status": "approved"},
                        TxnReceipt), txn_id=value)
    status = msgspec.convert({"state": "offline", "reason": "x"}, Status)
    status = msgspec.structs.replace(status, reason=value)
    batch = UpstreamBatch(RX, [UpstreamTxn("T00001", value, RX)], acquirer=f"acq{value}")

    class Tr:
        tid, condition, raised, at, severity, detail = "T00001", "offline", True, RX, "critical", value

    lines = [
        heartbeat_line(hb, RX, tags), status_line(status, RX, tags), receipt_line(receipt, RX, tags),
        condition_line(Tr(), tags), *upstream_lines(batch, RX, lambda _tid: tags),
    ]
    assert not any("\n" in line or "\r" in line for line in lines)
    influxd.write_v1("\n".join(lines))  # one body: a value that ended a line would fail or split the write

    def rows(measurement: str) -> list[dict[str, object]]:
        series = influxd.query(f'SELECT * FROM "{measurement}"')["results"][0]["series"]
        assert len(series) == 1, series
        return [dict(zip(series[0]["columns"], v, strict=True)) for v in series[0]["values"]]

    want_tags = {"terminal_id": stored_tag(f"T{n}{value}"), "merchant_id": stored_tag(value),
                 "acquirer": stored_tag(f"acq{value}"), "model": stored_tag(value)}
    for measurement, fields in (
        ("heartbeat", {"mid": value, "app_version": value, "os_version": value, "seq": 1}),
        ("status", {"reason": value, "state": "offline"}),
        ("txn", {"txn_id": value, "amount_minor": 5, "currency": "EUR"}),
        ("condition", {"detail": value, "severity": "critical", "active": True}),
        ("upstream_txn", {"txn_id": value}),
    ):
        (row,) = rows(measurement)
        for key, want in {**want_tags, **fields}.items():
            expected = stored_field(want) if isinstance(want, str) and key not in want_tags else want
            assert row[key] == expected, (measurement, key, row[key])
    (batch_row,) = rows("upstream_batch")
    assert batch_row["acquirer"] == stored_tag(f"acq{value}") and batch_row["txns"] == 1
