"""Card data guard: a card number (Luhn-valid, with a real brand's prefix and length) in any field of any topic
(and of the HTTP upstream POST) is rejected and counted, and afterwards is found nowhere: collector log,
snapshot file, /metrics, API. In a feed batch only the transaction holding it is dropped. Ordinary numbers —
long floats, millisecond timestamps, snowflake txn ids — are not card data: a terminal that sends them stays
online and a feed made of them is applied whole."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from collector.fleet.protocol import is_card_number, luhn_ok
from collector.sim.simulator import Simulator, make_fleet
from tests.harness.core import Process, http_get, wait_until
from tests.integration.test_support_stack import TOKENS, all_heard, post, start_stack

pytestmark = pytest.mark.integration

NOW = round(time.time(), 3)


def pan(n: int, length: int = 16) -> str:
    """A distinct card number per case (Visa 13/16/19, Amex 15), so every case can be searched for on its own."""
    prefix = "37" if length == 15 else "4"
    body = f"{prefix}{n:0{length - len(prefix) - 1}d}"
    number = next(body + check for check in "0123456789" if luhn_ok(body + check))
    assert is_card_number(number)
    return number


SEPARATED = {"spaced": " ", "dashed": "-", "dotted": ".", "underscored": "_", "coloned": ":", "tabbed": "\t"}
SCRIPTS = {"fullwidth": str.maketrans("0123456789", "０１２３４５６７８９"),
           "arabic": str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")}


def grouped(number: str, sep: str) -> str:
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def heartbeat(tid: str) -> dict[str, Any]:
    return {"tid": tid, "ts": NOW, "seq": 10_000, "interval_s": 0.5, "txn_count": 10_000, "uploaded_count": 10_000,
            "queue_depth": 0, "oldest_queued_ts": None, "mid": "M00000", "model": "A920", "app_version": "3.4.1",
            "net": {"type": "wifi", "rssi_dbm": -50}, "hw": {"printer": "ok"}}


def receipt() -> dict[str, Any]:
    return {"txn_id": "X-1", "ts": NOW, "amount_minor": 100, "currency": "EUR", "status": "approved"}


def feed() -> dict[str, Any]:
    return {"ts": NOW, "txns": [{"tid": "T00000", "txn_id": "X-1", "ts": NOW}]}


def cases() -> list[tuple[str, str, bytes, str]]:
    """(where, topic or HTTP path, payload, the number) for every field of every message kind."""
    out: list[tuple[str, str, bytes, str]] = []
    n = 0

    def add(kind: str, topic: str, base: dict[str, Any], path: list[str | int], as_number: bool = False,
            fmt: str = "plain", length: int = 16) -> None:
        nonlocal n
        n += 1
        number = pan(n, length)
        value: Any = int(number) if as_number else {
            "plain": number, "escaped": number, "nested": {"a": [1, {"b": f"x {number}"}]},
            **{name: grouped(number, sep) for name, sep in SEPARATED.items()},
            **{name: number.translate(table) for name, table in SCRIPTS.items()},
            "embedded": f"card {number} ok",
        }[fmt]
        doc = json.loads(json.dumps(base))
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        payload = json.dumps(doc, ensure_ascii=False).encode()
        if fmt == "escaped":  # every digit as a JSON \u escape: only a decoder sees the number
            payload = payload.replace(number.encode(), "".join(f"\\u{ord(c):04x}" for c in number).encode())
        out.append((f"{kind}:{'.'.join(map(str, path))}:{fmt if not as_number else 'number'}", topic,
                    payload, number))

    hb = "pos/v1/T00000/heartbeat"
    for field in ("mid", "model", "app_version", "os_version", "note"):
        add("heartbeat", hb, heartbeat("T00000"), [field])
    add("heartbeat", hb, heartbeat("T00000"), ["tid"])
    add("heartbeat", hb, heartbeat("T00000"), ["net", "type"])
    add("heartbeat", hb, heartbeat("T00000"), ["hw", "printer"], fmt="spaced")
    add("heartbeat", hb, heartbeat("T00000"), ["txn_count"], as_number=True)
    add("heartbeat", hb, heartbeat("T00000"), ["seq"], as_number=True)
    add("heartbeat", hb, heartbeat("T00000"), ["mid"], fmt="dashed", length=13)
    add("heartbeat", hb, heartbeat("T00000"), ["model"], fmt="embedded", length=19)
    st = "pos/v1/T00002/status"
    for field in ("reason", "state", "note"):
        add("status", st, {"state": "online", "ts": NOW}, [field])
    add("status", st, {"state": "online", "ts": NOW}, ["reason"], fmt="spaced")
    tx = "pos/v1/T00000/txn"
    for field in ("txn_id", "currency", "status", "note"):
        add("txn", tx, receipt(), [field])
    add("txn", tx, receipt(), ["amount_minor"], as_number=True)
    add("txn", tx, receipt(), ["txn_id"], fmt="dashed")
    up = "acquirer/v1/acq-a/transactions"
    feed_paths: list[list[str | int]] = [["txns", 0, "tid"], ["txns", 0, "txn_id"], ["note"], ["txns", 0, "note"]]
    for path in feed_paths:
        add("upstream", up, feed(), path)
    add("upstream", up, feed(), ["txns", 0, "txn_id"], fmt="embedded", length=15)
    # Forms a byte scan missed: JSON escapes, other separators, other digit scripts, deep in unknown fields.
    add("heartbeat", hb, heartbeat("T00000"), ["note"], fmt="escaped")
    add("heartbeat", hb, heartbeat("T00000"), ["model"], fmt="fullwidth")
    add("heartbeat", hb, heartbeat("T00000"), ["app_version"], fmt="underscored")
    add("heartbeat", hb, heartbeat("T00000"), ["os_version"], fmt="coloned")
    add("heartbeat", hb, heartbeat("T00000"), ["note"], fmt="nested")
    add("status", st, {"state": "online", "ts": NOW}, ["reason"], fmt="tabbed")
    add("txn", tx, receipt(), ["txn_id"], fmt="dotted")
    add("txn", tx, receipt(), ["note"], fmt="arabic")
    add("txn", tx, receipt(), ["txn_id"], fmt="escaped")
    add("upstream", up, feed(), ["txns", 0, "txn_id"], fmt="fullwidth")
    add("upstream", up, feed(), ["txns", 0, "txn_id"], fmt="escaped")
    http = "HTTP /api/v1/upstream/acq-a/transactions"
    for path in feed_paths[:3]:
        add("http", http, feed(), path)
    add("http", http, feed(), ["txns", 0, "txn_id"], fmt="spaced")
    return out


def metric(port: int, name: str) -> float:
    _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def publish_all(port: int, messages: list[tuple[str, bytes]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"card-test-{time.time_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def everything_visible(port: int, tids: tuple[str, ...] = ("T00000", "T00002")) -> bytes:
    """Every place a number could end up that the API and /metrics expose."""
    paths = ["/metrics", "/api/v1/terminals?all=1&limit=1000", "/api/v1/support/facets", "/api/v1/reconcile",
             "/api/v1/receipts"]
    for tid in tids:
        paths += [f"/api/v1/terminals/{tid}", f"/api/v1/terminals/{tid}/diagnosis",
                  f"/api/v1/terminals/{tid}/timeline"]
    chunks = []
    for path in paths:
        status, body = http_get(f"http://127.0.0.1:{port}{path}", TOKENS["all"])
        assert status == 200, path
        chunks.append(body)
    return b"\n".join(chunks)


def found(number: str, haystack: bytes) -> bool:
    """The number in any of the forms it was sent in, raw or as JSON writes it (escaped)."""
    forms = {number, *(grouped(number, sep) for sep in [" ", "-", *SEPARATED.values()]),
             *(number.translate(table) for table in SCRIPTS.values())}
    encoded = {f.encode() for f in forms} | {json.dumps(f)[1:-1].encode() for f in forms}
    return any(f in haystack for f in encoded)


async def test_card_numbers_rejected_counted_and_found_nowhere(tmp_path: Path, mosquitto: Process) -> None:
    specs = make_fleet(4, ("acq-a", "acq-b"))
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 0.5, receipts=True)
    collector = start_stack(tmp_path, mosquitto.port, sim)
    port = collector.port
    all_cases = cases()
    mqtt_cases = [c for c in all_cases if not c[1].startswith("HTTP")]
    http_cases = [c for c in all_cases if c[1].startswith("HTTP")]
    assert {c[0].split(":")[0] for c in all_cases} == {"heartbeat", "status", "txn", "upstream", "http"}
    try:
        async with sim:
            await asyncio.to_thread(wait_until, lambda: all_heard(port, specs), 20, "every terminal heard")
            counter = 'posfleet_messages_rejected_total{reason="card_data"}'
            assert metric(port, counter) == 0
            accepted_before = metric(port, 'posfleet_messages_total{kind="txn",result="accepted"}')
            await asyncio.to_thread(publish_all, mosquitto.port, [(t, p) for _w, t, p, _n in mqtt_cases])
            for where, _t, payload, number in http_cases:
                code, body = post(port, "/api/v1/upstream/acq-a/transactions", payload, TOKENS["writer"])
                if ":txns." in where:  # only that transaction is dropped; the (now empty) batch is applied
                    assert code == 202, where
                else:  # card data in the envelope rejects the whole body
                    assert code == 400 and json.loads(body)["reason"] == "card_data", where
                assert not found(number, body)
            # Control: a 16-digit number that fails Luhn is not card data and passes.
            control = {**receipt(), "txn_id": "4111111111111112"}
            await asyncio.to_thread(publish_all, mosquitto.port, [("pos/v1/T00000/txn", json.dumps(control).encode())])
            # One count per rejected message and per dropped feed transaction. The per-transaction counts (the
            # ":txns." cases) depend on the collector counting UpstreamBatch.dropped (app.py, coordinator).
            await asyncio.to_thread(
                wait_until, lambda: metric(port, counter) == len(all_cases), 20, f"{len(all_cases)} rejections")
            await asyncio.to_thread(
                wait_until,
                lambda: metric(port, 'posfleet_messages_total{kind="txn",result="accepted"}') > accepted_before, 10,
                "control accepted")
            visible = everything_visible(port)
            assert found("4111111111111112", visible)  # the search does find a number that got through
            leaks = [where for where, _t, _p, number in all_cases if found(number, visible)]
            assert leaks == [], leaks
    finally:
        collector.stop()
    log = collector.log_text().encode()
    snapshots = sorted(tmp_path.glob("state.snapshot*"))
    assert snapshots
    stored = b"".join(p.read_bytes() for p in snapshots)
    for where, _t, _p, number in all_cases:
        assert not found(number, log), f"{where} in the log"
        # The snapshot is msgpack (after a header): a number may be stored as text or as a packed integer.
        assert not found(number, stored) and msgspec.msgpack.encode(int(number)) not in stored, \
            f"{where} in the snapshot"
    assert b"card_data" in log  # the rejections were logged, without the number


async def test_card_numbers_in_topic_ids_rejected(tmp_path: Path, mosquitto: Process) -> None:
    specs = make_fleet(2, ("acq-a",))
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 0.5, receipts=False)
    collector = start_stack(tmp_path, mosquitto.port, sim)
    port = collector.port
    numbers = [pan(900 + i) for i in range(4)]
    try:
        await asyncio.to_thread(publish_all, mosquitto.port, [
            (f"pos/v1/{numbers[0]}/status", b'{"state":"online"}'),
            (f"pos/v1/{numbers[1]}/txn", json.dumps(receipt()).encode()),
            (f"acquirer/v1/{numbers[2]}/transactions", b'{"ts":%f,"txns":[]}' % NOW),
        ])
        code, _ = post(port, f"/api/v1/upstream/{numbers[3]}/transactions", b'{"ts":%f,"txns":[]}' % NOW,
                       TOKENS["writer"])
        assert code == 400
        counter = 'posfleet_messages_rejected_total{reason="card_data"}'
        await asyncio.to_thread(wait_until, lambda: metric(port, counter) == 4, 10, "4 rejections")
    finally:
        collector.stop()


def terminal(port: int, tid: str) -> dict[str, Any]:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/terminals/{tid}", TOKENS["all"])
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def offline_raised_since(port: int, tid: str, since: float) -> list[dict[str, Any]]:
    status, body = http_get(f"http://127.0.0.1:{port}/api/v1/terminals/{tid}/timeline", TOKENS["all"])
    assert status == 200, body
    return [t for t in json.loads(body)["transitions"]
            if t["condition"] == "offline" and t["raised"] and t["at"] >= since]


async def test_terminal_sending_long_floats_stays_online(tmp_path: Path, mosquitto: Process) -> None:
    """`battery_pct: 8.285714285714285` is a battery computed from millivolts, not a card number."""
    specs = make_fleet(2, ("acq-a",))
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 0.5, receipts=False)  # registry only, not run
    collector = start_stack(tmp_path, mosquitto.port, sim)
    port = collector.port
    tid, count = "T00000", 16

    def beat(seq: int) -> tuple[str, bytes]:
        hb = {**heartbeat(tid), "ts": round(time.time(), 6), "seq": seq, "interval_s": 1,
              "power": {"source": "battery", "battery_pct": 8.285714285714285},
              "net": {"type": "cellular", "rssi_dbm": -83.33333333333333}, "uptime_s": 1234.5678901234567}
        return f"pos/v1/{tid}/heartbeat", json.dumps(hb).encode()

    def stream() -> None:
        # A terminal's own cadence, 4x faster than its interval, for longer than the offline window (3 x 1 s).
        for seq in range(1, count):
            publish_all(mosquitto.port, [beat(seq)])
            time.sleep(0.25)

    try:
        await asyncio.to_thread(publish_all, mosquitto.port, [beat(0)])
        await asyncio.to_thread(wait_until, lambda: terminal(port, tid)["seq"] == 0, 20, "first heartbeat accepted")
        first_rx = terminal(port, tid)["last_heartbeat_received"]
        await asyncio.to_thread(stream)
        await asyncio.to_thread(
            wait_until, lambda: terminal(port, tid)["seq"] == count - 1, 20, "every heartbeat accepted")
        view = terminal(port, tid)
        assert view["status"] == "online" and view["power"]["battery_pct"] == 8.285714285714285
        assert "offline" not in {c["condition"] for c in view["conditions"]}
        assert offline_raised_since(port, tid, first_rx) == []
        assert metric(port, 'posfleet_messages_rejected_total{reason="card_data"}') == 0
    finally:
        collector.stop()


async def test_feed_of_numeric_txn_ids_with_one_pan_applies_all_others(tmp_path: Path, mosquitto: Process) -> None:
    """Acquirers' txn ids are often ms timestamps or snowflakes; ~10% of those pass Luhn alone."""
    specs = make_fleet(2, ("acq-a",))
    sim = Simulator(f"mqtt://127.0.0.1:{mosquitto.port}", specs, 0.5, receipts=False)  # registry only, not run
    collector = start_stack(tmp_path, mosquitto.port, sim)
    port = collector.port
    tid, acquirer = specs[0].tid, specs[0].acquirer
    ids = [str(int(NOW * 1000) + i) for i in range(100)] + [str(1_234_567_890_123_456_789 + i) for i in range(100)]
    assert sum(luhn_ok(i) for i in ids) >= 10  # a Luhn-only guard would drop every batch below
    numbers = [pan(700), pan(701)]

    def batch(number: str, offset: int) -> bytes:
        txns = [{"tid": tid, "txn_id": i, "ts": NOW} for i in ids[offset : offset + 100]]
        txns.insert(37, {"tid": tid, "txn_id": number, "ts": NOW})
        return json.dumps({"ts": NOW, "txns": txns}).encode()

    counter = 'posfleet_messages_rejected_total{reason="card_data"}'
    try:
        await asyncio.to_thread(publish_all, mosquitto.port,
                                [(f"acquirer/v1/{acquirer}/transactions", batch(numbers[0], 0))])
        await asyncio.to_thread(
            wait_until, lambda: terminal(port, tid)["upstream_recorded_txns"] == 100, 20, "MQTT batch applied")
        code, body = post(port, f"/api/v1/upstream/{acquirer}/transactions", batch(numbers[1], 100),
                          TOKENS["writer"])
        assert code == 202 and not found(numbers[1], body)
        assert terminal(port, tid)["upstream_recorded_txns"] == 200
        accepted = 'posfleet_messages_total{kind="upstream",result="accepted"}'
        assert metric(port, accepted) == 2
        # Each dropped transaction counts once under its reason (needs app.py to count UpstreamBatch.dropped).
        await asyncio.to_thread(wait_until, lambda: metric(port, counter) == 2, 10, "2 dropped transactions counted")
        visible = everything_visible(port, (tid,))
        assert not any(found(n, visible) for n in numbers)
    finally:
        collector.stop()
    log = collector.log_text().encode()
    assert not any(found(n, log) for n in numbers)
