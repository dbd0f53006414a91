"""Collector events as line protocol: escaping (checked against the official client), types, idempotency."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
from influxdb_client.client.write.point import Point as _Point

from collector.fleet.protocol import Heartbeat, Status, TxnReceipt, UpstreamBatch, UpstreamTxn, decode
from exporters.history.lines import (
    HistoryRecorder,
    condition_line,
    heartbeat_line,
    receipt_line,
    status_line,
    tag_set,
    to_ns,
    upstream_lines,
)

Point: Any = _Point  # the official client: our escaping oracle (untyped)
RX = 1_796_054_494.123456

FULL = {
    "tid": "T00042", "ts": 1796054490.5, "seq": 7, "interval_s": 30, "txn_count": 12, "uploaded_count": 11,
    "queue_depth": 1, "oldest_queued_ts": 1796054400, "mid": "M00010", "model": "A920",
    "app_version": '3.4.1 "beta"\\x', "os_version": "11", "uptime_s": 3600,
    "net": {"type": "cellular", "rssi_dbm": -97}, "power": {"source": "battery", "battery_pct": 41},
    "hw": {"printer": "paper_out", "display": "ok", "card_reader": "ok"},
}


def hb(**over: object) -> Heartbeat:
    msg = decode("pos/v1/T00042/heartbeat", json.dumps({**FULL, **over}).encode())
    assert isinstance(msg, Heartbeat)
    return msg


def split(line: str) -> tuple[str, dict[str, str], int]:
    """(measurement+tags, fields as raw text, timestamp) for lines whose string fields hold no ', ' or ' '."""
    head, rest = line.split(" ", 1)
    fields, ts = rest.rsplit(" ", 1)
    parsed = {}
    for part in fields.split(","):
        key, value = part.split("=", 1)
        parsed[key] = value
    return head, parsed, int(ts)


@pytest.mark.parametrize("value", [
    "plain", "with space", "a,b", "k=v", "tab\there", "new\nline", "trailing\\", "ünïcode", "quote\"s",
])
def test_tag_escaping_matches_official_client(value: str) -> None:
    ours = f"m{tag_set('T1', value, 'acq', 'A920')} f=1i 1"
    theirs = (Point("m").tag("acquirer", "acq").tag("merchant_id", value).tag("model", "A920")
              .tag("terminal_id", "T1").field("f", 1).time(1).to_line_protocol())
    assert ours == theirs


def test_empty_tags_are_left_out_and_keys_sorted() -> None:
    assert tag_set("T1") == ",terminal_id=T1"
    assert tag_set("T1", "", "acq", "") == ",acquirer=acq,terminal_id=T1"
    assert tag_set("T1", "M1", "acq", "P400") == ",acquirer=acq,merchant_id=M1,model=P400,terminal_id=T1"


def test_heartbeat_line_types_and_timestamp() -> None:
    tags = tag_set("T00042", "M00010", "acq-a", "A920")
    line = heartbeat_line(hb(**{"app_version": "3.4.1"}), RX, tags)
    head, fields, ts = split(line)
    assert head == "heartbeat" + tags
    assert ts == 1_796_054_494_123_456_000  # receive time, not the terminal's clock
    assert fields == {
        "seq": "7i", "interval_s": "30.0", "txn_count": "12i", "uploaded_count": "11i", "queue_depth": "1i",
        "terminal_ts": "1796054490.5", "oldest_queued_ts": "1796054400.0", "uptime_s": "3600.0",
        "mid": '"M00010"', "app_version": '"3.4.1"', "os_version": '"11"', "net_type": '"cellular"',
        "rssi_dbm": "-97.0", "power_source": '"battery"', "battery_pct": "41.0", "printer": '"paper_out"',
        "display": '"ok"', "card_reader": '"ok"',
    }


def test_heartbeat_string_fields_match_official_client() -> None:
    msg = hb()
    line = heartbeat_line(msg, RX, ",terminal_id=T00042")
    expected = Point("x").field("app_version", msg.app_version).to_line_protocol().split(" ", 1)[1]
    assert expected in line


def test_minimal_heartbeat_leaves_out_what_was_not_reported() -> None:
    msg = decode("pos/v1/T1/heartbeat", json.dumps({
        "tid": "T1", "ts": 1796054490, "seq": 0, "interval_s": 30.5, "txn_count": 0, "uploaded_count": 0,
        "queue_depth": 0, "oldest_queued_ts": None,
    }).encode())
    assert isinstance(msg, Heartbeat)
    _, fields, _ = split(heartbeat_line(msg, RX, tag_set("T1")))
    assert set(fields) == {"seq", "interval_s", "txn_count", "uploaded_count", "queue_depth", "terminal_ts"}
    assert fields["terminal_ts"] == "1796054490.0"  # a float, always, so the field type never conflicts


def test_same_event_gives_the_same_point() -> None:
    msg, tags = hb(), tag_set("T00042")
    assert heartbeat_line(msg, RX, tags) == heartbeat_line(msg, RX, tags)
    assert to_ns(RX) == to_ns(float(repr(RX)))


def test_status_line() -> None:
    st = Status(state="offline", ts=1796054400.0, reason="connection lost", tid="T1")
    assert status_line(st, RX, ",terminal_id=T1") == (
        'status,terminal_id=T1 state="offline",reason="connection lost",terminal_ts=1796054400.0 '
        "1796054494123456000"
    )
    bare = status_line(Status(state="online", tid="T1"), RX, ",terminal_id=T1")
    assert bare == 'status,terminal_id=T1 state="online" 1796054494123456000'


def test_transaction_ids_are_fields_never_tags() -> None:
    receipt = TxnReceipt(txn_id="TX-1", ts=1796054400.0, amount_minor=1250, currency="EUR", status="approved",
                         tid="T1")
    lines = [receipt_line(receipt, RX, tag_set("T1"))]
    batch = UpstreamBatch(ts=1796054490.0, acquirer="acq-a", txns=[
        UpstreamTxn(tid="T1", txn_id="TX-1", ts=1796054400.0), UpstreamTxn(tid="T1", txn_id="TX-2", ts=1796054401.0),
        UpstreamTxn(tid="T2", txn_id="TX-3", ts=1796054402.0),
    ])
    lines += upstream_lines(batch, RX, lambda tid: tag_set(tid, acquirer="acq-a"))
    for line in lines:
        head = line.split(" ", 1)[0]
        assert "txn_id" not in head and "TX-" not in head
    assert lines[0] == ('txn,terminal_id=T1 txn_id="TX-1",status="approved",amount_minor=1250i,currency="EUR",'
                        "terminal_ts=1796054400.0 1796054494123456000")


def test_upstream_transactions_of_one_terminal_do_not_merge() -> None:
    batch = UpstreamBatch(ts=1796054490.0, acquirer="acq-a", txns=[
        UpstreamTxn(tid="T1", txn_id=f"TX-{i}", ts=1796054400.0 + i) for i in range(5)
    ])
    lines = upstream_lines(batch, RX, lambda tid: tag_set(tid))
    points = [line.split(" ")[0] + " " + line.rsplit(" ", 1)[1] for line in lines if line.startswith("upstream_txn")]
    assert len(set(points)) == 5  # distinct series+timestamp: five points, not one overwritten four times
    assert lines[-1] == "upstream_batch,acquirer=acq-a txns=5i,feed_ts=1796054490.0 1796054494123456000"


@dataclass(frozen=True)
class Tr:
    tid: str
    condition: str
    raised: bool
    at: float
    severity: str
    detail: str


def test_condition_line() -> None:
    line = condition_line(Tr("T1", "hardware_fault", True, RX, "warning", "printer_paper_out"), tag_set("T1"))
    assert line == ('condition,terminal_id=T1,condition=hardware_fault active=true,severity="warning",'
                    'detail="printer_paper_out" 1796054494123456000')


@dataclass
class Term:
    merchant: str
    mid: str | None
    acquirer: str
    model: str | None


def test_recorder_uses_registry_tags_and_never_raises_on_unknown_terminals() -> None:
    out: list[str] = []
    terms = {"T00042": Term("M00010", "M00010", "acq-a", "A920")}
    rec = HistoryRecorder(out.append, terms.get)
    rec.on_message(hb(), RX, terms["T00042"])
    rec.on_message(Status(state="online", tid="T9"), RX, None)
    rec.on_transitions([Tr("T00042", "offline", False, RX, "critical", "")])
    assert out[0].startswith("heartbeat,acquirer=acq-a,merchant_id=M00010,model=A920,terminal_id=T00042 ")
    assert out[1].startswith("status,terminal_id=T9 ")
    assert out[2].startswith("condition,acquirer=acq-a,merchant_id=M00010,model=A920,terminal_id=T00042,"
                             "condition=offline active=false")


def test_feed_records_are_tagged_with_the_acquirer_that_recorded_them() -> None:
    """A transaction in acquirer B's feed of a terminal registered with acquirer A is B's record: tagged acq-b and
    without A's merchant, so A's recorded volume (dashboards, reconciliation) never counts it."""
    out: list[str] = []
    terms = {"T1": Term("M00010", "M00010", "acq-a", "A920")}
    rec = HistoryRecorder(out.append, terms.get)
    for acquirer in ("acq-a", "acq-b"):
        rec.on_message(UpstreamBatch(ts=1796054490.0, acquirer=acquirer, txns=[
            UpstreamTxn(tid="T1", txn_id="TX-1", ts=1796054400.0),
            UpstreamTxn(tid="T7", txn_id="TX-2", ts=1796054401.0),
        ]), RX, None)
    heads = [line.split(" ", 1)[0] for line in out if line.startswith("upstream_txn")]
    assert heads == [
        "upstream_txn,acquirer=acq-a,merchant_id=M00010,model=A920,terminal_id=T1",
        "upstream_txn,acquirer=acq-a,terminal_id=T7",
        "upstream_txn,acquirer=acq-b,terminal_id=T1",
        "upstream_txn,acquirer=acq-b,terminal_id=T7",
    ]


@pytest.mark.parametrize(("mid", "written"), [("M1\n", '"M1 "'), ('M"1', '"M\\"1"'), ("M1\\", '"M1\\\\"')])
def test_merchant_id_field_is_escaped_even_though_ids_are_plain(mid: str, written: str) -> None:
    line = heartbeat_line(msgspec.structs.replace(hb(), mid=mid), RX, tag_set("T00042"))
    assert "\n" not in line
    assert split(line)[1]["mid"] == written
