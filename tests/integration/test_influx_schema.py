"""docs/storage.md against a real InfluxDB (1.6): the history lines are accepted with consistent field types, and
every InfluxQL statement in the doc runs and answers "what happened to T00042 between 14:00 and 15:00"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from collector.fleet.protocol import Heartbeat, Status, TxnReceipt, UpstreamBatch, UpstreamTxn
from exporters.history.influx import InfluxConfig, InfluxWriter
from exporters.history.lines import (
    condition_line,
    heartbeat_line,
    receipt_line,
    status_line,
    tag_set,
    to_ns,
    upstream_lines,
)
from tests.harness.tsdb import InfluxD

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[2] / "docs" / "storage.md"
TID = "T00042"


def at(hhmmss: str) -> float:
    return datetime.fromisoformat(f"2026-11-30T{hhmmss}+00:00").timestamp()


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S")


@dataclass(frozen=True)
class Tr:
    tid: str
    condition: str
    raised: bool
    at: float
    severity: str
    detail: str


def heartbeat(tid: str, seq: int, t: float) -> Heartbeat:
    return msgspec.convert({
        "tid": tid, "ts": t - 0.4, "seq": seq, "interval_s": 30, "txn_count": seq, "uploaded_count": seq,
        "queue_depth": 3 if at("14:30:00") <= t < at("14:35:00") else 0, "oldest_queued_ts": None, "mid": "M00010",
        "model": "A920", "app_version": "3.4.1", "os_version": "11", "uptime_s": 100.0 + seq,
        "net": {"type": "wifi", "rssi_dbm": -70 - (seq % 5)}, "power": {"source": "mains", "battery_pct": 100},
        "hw": {"printer": "paper_out", "display": "ok", "card_reader": "ok"},
    }, Heartbeat)


def history() -> list[str]:
    """13:50-15:10 of T00042 (and a neighbour): heartbeats every 30 s with 3 lost around 14:21, an outage
    14:21-14:23 announced by a last will, a reboot at 14:40, a paper-out since 13:50, two transactions."""
    tags = tag_set(TID, "M00010", "acq-a", "A920")
    other = tag_set("T00043", "M00010", "acq-a", "A920")
    lines = []
    seq = 0
    t = at("13:50:00")
    while t < at("15:10:00"):
        if t == at("14:40:00"):
            seq = 0  # reboot
        if not at("14:21:00") <= t < at("14:23:00"):
            lines.append(heartbeat_line(heartbeat(TID, seq, t), t + 0.25, tags))
        lines.append(heartbeat_line(heartbeat("T00043", seq, t), t + 0.5, other))
        seq += 1
        t += 30
    lines += [
        condition_line(Tr(TID, "hardware_fault", True, at("13:50:31"), "warning", "printer_paper_out"), tags),
        condition_line(Tr(TID, "offline", True, at("14:21:05"), "critical", "last_will"), tags),
        condition_line(Tr(TID, "offline", False, at("14:23:00.5"), "critical", "last_will"), tags),
        status_line(Status(state="offline", reason="connection_lost", tid=TID), at("14:21:05"), tags),
        status_line(Status(state="online", ts=at("14:22:59"), tid=TID), at("14:23:00"), tags),
        receipt_line(TxnReceipt(txn_id="TX-1", ts=at("14:10:00"), amount_minor=1250, currency="EUR",
                                status="approved", tid=TID), at("14:10:01"), tags),
        receipt_line(TxnReceipt(txn_id="TX-2", ts=at("14:50:00"), amount_minor=990, currency="EUR",
                                status="approved", tid=TID), at("14:50:01"), tags),
    ]
    recorded = [UpstreamTxn(tid=TID, txn_id="TX-1", ts=at("14:10:00"))]
    batch = UpstreamBatch(ts=at("14:15:00"), acquirer="acq-a", txns=recorded)
    lines += upstream_lines(batch, at("14:15:02"), lambda tid: tags)
    return lines


def statements() -> list[str]:
    """Every InfluxQL statement of the doc's ```sql blocks, in order."""
    blocks = re.findall(r"```sql\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def run(db: InfluxD, q: str) -> list[dict[str, Any]]:
    answer = db.query(q)
    result = answer["results"][0]
    assert "error" not in result, f"{q}\n-> {result['error']}"
    series: list[dict[str, Any]] = result.get("series", [])
    return series


def rows(series: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(series["columns"], v, strict=True)) for v in series["values"]]


def the(q_part: str) -> str:
    found = [s for s in statements() if q_part in s]
    assert len(found) == 1, f"expected one statement with {q_part!r} in docs/storage.md, found {len(found)}"
    return found[0]


def test_doc_queries_answer_what_happened(influxd: InfluxD) -> None:
    influxd.write_v1("\n".join(history()))
    queries = [s for s in statements() if not s.startswith("CREATE") and " INTO " not in s]
    assert len(queries) >= 9
    for q in queries:
        run(influxd, q)  # every statement parses and runs on a real server

    timeline = {s["name"]: rows(s) for s in run(influxd, the('FROM "heartbeat", "status"'))}
    assert set(timeline) == {"heartbeat", "status", "condition", "txn", "upstream_txn"}
    assert len(timeline["heartbeat"]) == 120 - 4  # 14:00-15:00 every 30 s, minus the 4 lost
    assert all(r["terminal_id"] == TID for r in timeline["heartbeat"])

    changes = {s["tags"]["condition"]: rows(s) for s in run(influxd, the('SELECT "active", "severity"'))}
    assert [(iso(r["time"]), r["active"]) for r in changes["offline"]] == [("14:21:05", True), ("14:23:00", False)]
    assert "hardware_fault" not in changes  # raised before the hour

    before = {s["tags"]["condition"]: rows(s)[0] for s in run(influxd, the('LAST("active")'))}
    assert before["hardware_fault"]["active"] is True and before["hardware_fault"]["detail"] == "printer_paper_out"

    gaps = rows(run(influxd, the('ELAPSED("seq", 1s)'))[0])
    assert [(iso(r["time"]), r["gap_s"]) for r in gaps] == [("14:23:00", 150)]

    steps = rows(run(influxd, the('DIFFERENCE("seq")'))[0])
    assert [(iso(r["time"]), r["step"]) for r in steps] == [("14:23:00", 5), ("14:40:00", -99)]

    status = rows(run(influxd, the('"state", "reason"'))[0])
    assert [(r["state"], r["reason"]) for r in status] == [("offline", "connection_lost"), ("online", None)]

    summary = rows(run(influxd, the("GROUP BY time(5m) fill(0)"))[0])
    assert len(summary) == 12
    assert [r["heartbeats"] for r in summary][4] == 6  # 14:20-14:25: 10 expected, 4 lost
    assert summary[6]["max_queue_depth"] == 3  # the backlog at 14:30

    txns = rows(run(influxd, the('"status", "amount_minor"'))[0])
    recorded = rows(run(influxd, the('FROM "upstream_txn"'))[0])
    assert {r["txn_id"] for r in txns} - {r["txn_id"] for r in recorded} == {"TX-2"}

    local = rows(run(influxd, the("tz('Europe/Berlin')"))[0])
    assert len(local) == 116 and local[0]["time"] == to_ns(at("14:00:00.25"))


def test_doc_retention_and_downsampling_statements(influxd: InfluxD) -> None:
    ddl = [s for s in statements() if s.startswith("CREATE")]
    assert any("CONTINUOUS QUERY" in s for s in ddl)
    for s in ddl:
        run(influxd, s)
    cqs = run(influxd, "SHOW CONTINUOUS QUERIES")
    assert any(v[0] == "heartbeat_5m" for s in cqs for v in s.get("values", []))

    influxd.write_v1("\n".join(history()), rp="raw_30d")
    # the continuous query's body, run once over the test hour as a backfill
    cq = the("CREATE CONTINUOUS QUERY")
    body = cq[cq.index("BEGIN ") + 6 : cq.rindex(" END")]
    body = body.replace(" GROUP BY", " WHERE time >= '2026-11-30T14:00:00Z' AND time < '2026-11-30T15:00:00Z' GROUP BY")
    run(influxd, body)
    rolled = run(influxd, f'SELECT * FROM "posfleet"."rollup_2y"."heartbeat_5m" WHERE "terminal_id" = \'{TID}\'')
    assert len(rows(rolled[0])) == 12 and rows(rolled[0])[4]["heartbeats"] == 6

    copy = the('INTO "posfleet"."events_13mo"')
    copy = copy.replace("now() - 2d", "'2026-11-29T00:00:00Z'")  # the test data is from 2026-11-30
    for _ in range(2):  # twice: the copy is idempotent
        run(influxd, copy)
    copied = rows(run(influxd, 'SELECT COUNT("active") FROM "posfleet"."events_13mo"."condition"')[0])
    assert copied[0]["count"] == 3


async def test_writer_against_a_server_without_the_v2_api(influxd: InfluxD, tmp_path: Path) -> None:
    """InfluxDB 1.6 has no /api/v2/write (1.8+ has): the writer counts the 404s and does not retry forever."""
    reg = CollectorRegistry()
    cfg = InfluxConfig(enabled=True, url=influxd.url, bucket="posfleet", batch_size=10)
    async with InfluxWriter(cfg, reg, tmp_path / "spool") as w:
        for line in history()[:25]:
            w.write(line)
        assert await w.flush(10)
    assert reg.get_sample_value("posfleet_influx_responses_total", {"code": "404"}) == 3
    assert reg.get_sample_value("posfleet_influx_dropped_total", {"reason": "rejected_4xx"}) == 25
    assert reg.get_sample_value("posfleet_influx_up") == 1
