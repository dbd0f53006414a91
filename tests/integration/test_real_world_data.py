"""Payloads shaped like real terminals' and acquirers', through a real Mosquitto and a real collector process.

Each test here is a defect seen through a broker (issue 9): a terminal paged for what the collector rejected, a
broken terminal clock freezing its state, one acquirer's feed clearing another's alarms, a hostile id breaking
the whole /metrics scrape, and sender-chosen topics growing the collector's maps. Every test also checks that
the terminals it did not break raised nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from tests.faults import ConditionWatch, metric_sample
from tests.harness.core import (
    Process,
    free_port,
    http_get,
    http_json,
    start_collector,
    wait_until,
    write_collector_config,
)

pytestmark = pytest.mark.integration

INTERVAL = 0.5
REGISTRY = [  # terminal_id, merchant_id, acquirer, model, site, region
    ("T-REJ", "M1", "acq-a", "A920", "S1", "north"),
    ("T-CLK", "M1", "acq-a", "A920", "S1", "north"),
    ("T-UPL", "M2", "acq-a", "A920", "S2", "north"),
    ("T-OK", "M2", "acq-b", "A920", "S3", "south"),
]


def heartbeat(tid: str, seq: int, ts: float, **changes: Any) -> dict[str, Any]:
    """A healthy heartbeat; `changes` override fields."""
    hb: dict[str, Any] = {
        "tid": tid, "ts": ts, "seq": seq, "interval_s": INTERVAL, "txn_count": 7, "uploaded_count": 7,
        "queue_depth": 0, "oldest_queued_ts": None, "mid": "M1" if tid in ("T-REJ", "T-CLK") else "M2",
        "model": "A920", "app_version": "3.4.1", "net": {"type": "wifi", "rssi_dbm": -50},
        "power": {"source": "mains", "battery_pct": 100}, "hw": {"printer": "ok"},
    }
    hb.update(changes)
    return hb


class Publisher:
    """A paho publisher (QoS 1) and a background loop that keeps terminals heartbeating until stopped."""

    def __init__(self, port: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{port}-{time.monotonic_ns()}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.seq: dict[str, int] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def send(self, topic: str, doc: Any) -> None:
        """Publish one message and wait for the broker's PUBACK."""
        body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        self.client.publish(topic, body, qos=1).wait_for_publish(10)

    def beat(self, tid: str, **changes: Any) -> int:
        """One heartbeat of `tid` with its next seq; returns the seq."""
        seq = self.seq[tid] = self.seq.get(tid, 0) + 1
        ts = changes.pop("ts", time.time())
        self.send(f"pos/v1/{tid}/heartbeat", heartbeat(tid, seq, ts, **changes))
        return seq

    def every_interval(self, action: Any) -> None:
        """Run `action()` every heartbeat interval in the background until close()."""

        def loop() -> None:
            while not self._stop.wait(INTERVAL):
                action()

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        """Stop the background loops and disconnect."""
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def stack(tmp_path: Path, mosquitto: Process, **overrides: Any) -> Iterator[tuple[int, Publisher]]:
    """A registry, a collector process and a publisher."""
    (tmp_path / "terminals.csv").write_text(
        "terminal_id,merchant_id,acquirer,model,site,region\n" + "".join(",".join(r) + "\n" for r in REGISTRY)
    )
    http_port = free_port()
    config = write_collector_config(tmp_path, mosquitto.port, http_port, **overrides)
    collector = start_collector(tmp_path, config, http_port)
    pub = Publisher(mosquitto.port)
    try:
        yield http_port, pub
    finally:
        pub.close()
        collector.stop()


def view(port: int, tid: str) -> dict[str, Any]:
    """One terminal's API view."""
    doc: dict[str, Any] = http_json(f"http://127.0.0.1:{port}/api/v1/terminals/{tid}")
    return doc


def conditions(port: int, tid: str) -> dict[str, dict[str, Any]]:
    """The terminal's active conditions by name."""
    return {c["condition"]: c for c in view(port, tid)["conditions"]}


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser (a parse error fails the test)."""
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_rejected_heartbeats_are_messages_rejected_not_offline(tmp_path: Path, mosquitto: Process) -> None:
    """A terminal whose every heartbeat is rejected (here a wrong type) is shown as `messages_rejected`
    (warning) with its reject counts, never paged `offline`; its first good heartbeat clears it."""
    with stack(tmp_path, mosquitto) as (port, pub):
        pub.every_interval(lambda: pub.beat("T-OK"))
        wait_until(lambda: view(port, "T-OK")["last_heartbeat_received"] is not None, 20, "T-OK heard")
        with ConditionWatch(port, ["T-REJ", "T-OK"], step=0.1) as watch:
            # A firmware that sends the interval as a string: every heartbeat is rejected as bad_type.
            pub.every_interval(lambda: pub.beat("T-REJ", interval_s="thirty"))
            found = wait_until(lambda: conditions(port, "T-REJ").get("messages_rejected"), 30, "messages_rejected")
            assert found["severity"] == "warning"
            assert found["detail"] == "bad_type"
            rejected = view(port, "T-REJ")["rejected"]
            assert rejected.get("bad_type", 0) >= 3, rejected
            assert metric_sample(port, "posfleet_messages_rejected_total", reason="bad_type") >= rejected["bad_type"]
        assert "offline" not in watch.seen.get("T-REJ", set()), watch.seen
        assert "T-OK" not in watch.seen, watch.seen
        # The merchant's terminal is fixed: one good heartbeat (hysteresis does not apply to time conditions).
        pub.close()
        fixed = Publisher(mosquitto.port)
        try:
            fixed.seq["T-REJ"] = 10_000
            for _ in range(2):
                fixed.beat("T-REJ")
            wait_until(lambda: "messages_rejected" not in conditions(port, "T-REJ"), 20, "messages_rejected cleared")
        finally:
            fixed.close()


@pytest.mark.parametrize(
    ("first_ts", "detail"),
    [(time.time() + 40 * 365 * 86_400, "ahead"), (time.time() + 86_400, "ahead"), (0.0, "behind")],
    ids=["decades-ahead", "one-day-ahead", "epoch"],
)
def test_broken_terminal_clock_is_clock_skew_and_never_freezes(
    tmp_path: Path, mosquitto: Process, first_ts: float, detail: str
) -> None:
    """A terminal whose RTC died (ts decades ahead, a day ahead, or reset to 1970) and is then fixed by NTP:
    every heartbeat is applied (its seq follows), `clock_skew` says which way while it lasts, and the terminal is
    never raised offline — before the fix one future heartbeat made every later one "stale"."""
    with stack(tmp_path, mosquitto) as (port, pub):
        with ConditionWatch(port, ["T-CLK"], step=0.1) as watch:
            for _ in range(3):  # hysteresis: two in a row raise
                pub.beat("T-CLK", ts=first_ts)
            found = wait_until(lambda: conditions(port, "T-CLK").get("clock_skew"), 20, "clock_skew raised")
            assert found["detail"] == detail
            # NTP fixed the clock: normal heartbeats from now on.
            pub.every_interval(lambda: pub.beat("T-CLK"))
            wait_until(lambda: "clock_skew" not in conditions(port, "T-CLK"), 20, "clock_skew cleared")
            # The state follows the heartbeats: the API's seq is the publisher's (not frozen at the future one).
            wait_until(lambda: view(port, "T-CLK")["seq"] >= pub.seq["T-CLK"] - 2, 20, "seq follows")
            # Keep it heartbeating for longer than its offline period (3 intervals) and check it never went offline.
            target = pub.seq["T-CLK"] + 8
            wait_until(lambda: view(port, "T-CLK")["seq"] >= target, 30, "eight more heartbeats applied")
        assert "offline" not in watch.seen.get("T-CLK", set()), watch.seen
        assert metric_sample(port, "posfleet_messages_total", kind="heartbeat", result="stale") == 0


def test_feed_of_another_acquirer_does_not_clear_upstream_missing(tmp_path: Path, mosquitto: Process) -> None:
    """T-UPL (acquirer acq-a) says the host acknowledged its uploads, acq-a's live feed never records them:
    `upstream_missing`. A batch from acq-b naming T-UPL must not clear it; acq-a's own record does."""
    with stack(tmp_path, mosquitto) as (port, pub):
        def feed(acquirer: str, tids: list[str]) -> None:
            now = time.time()
            txns = [{"tid": tid, "txn_id": f"{acquirer}-{tid}-{now}", "ts": now} for tid in tids]
            pub.send(f"acquirer/v1/{acquirer}/transactions", {"ts": now, "txns": txns})

        pub.every_interval(lambda: feed("acq-a", []))  # acq-a's feed is alive but records nothing of T-UPL
        pub.every_interval(lambda: feed("acq-b", []))
        uploads = iter(range(1, 1_000_000))

        def upload() -> None:
            n = next(uploads)
            pub.beat("T-UPL", txn_count=n, uploaded_count=n)

        pub.every_interval(upload)
        pub.every_interval(lambda: pub.beat("T-OK"))
        wait_until(lambda: "upstream_missing" in conditions(port, "T-UPL"), 40, "upstream_missing raised")
        before = metric_sample(port, "posfleet_feed_records_total", result="foreign")
        feed("acq-b", ["T-UPL"])
        wait_until(lambda: metric_sample(port, "posfleet_feed_records_total", result="foreign") > before, 20,
                   "the foreign record counted")
        assert "upstream_missing" in conditions(port, "T-UPL")
        assert view(port, "T-UPL")["upstream_recorded_txns"] == 0
        feed("acq-a", ["T-UPL"])
        wait_until(lambda: view(port, "T-UPL")["upstream_recorded_txns"] >= 1, 20, "acq-a's own record applied")
        assert "upstream_missing" not in conditions(port, "T-UPL")
        assert conditions(port, "T-OK") == {}


def test_hostile_ids_and_topics_keep_metrics_parseable_and_bounded(tmp_path: Path, mosquitto: Process) -> None:
    """An id ending in a newline is refused (a full match, not `$`), so /metrics still parses; feed topics for
    acquirers nobody registered are refused and counted, adding no feed and no series."""
    with stack(tmp_path, mosquitto) as (port, pub):
        pub.every_interval(lambda: pub.beat("T-OK"))
        wait_until(lambda: view(port, "T-OK")["last_heartbeat_received"] is not None, 20, "T-OK heard")
        bad_id_before = metric_sample(port, "posfleet_messages_rejected_total", reason="bad_id")
        # Mosquitto itself refuses control characters in topic names (it drops the connection), so the newline
        # arrives in the payload's id: a full match refuses it (`$` alone accepted a trailing newline).
        pub.send("pos/v1/T-NL/heartbeat", heartbeat("T-NL\n", 1, time.time()))
        def rejected(reason: str) -> float:
            return metric_sample(port, "posfleet_messages_rejected_total", reason=reason)

        wait_until(lambda: rejected("bad_id") >= bad_id_before + 1, 20, "newline id rejected")
        n = 2_000
        for i in range(n):
            pub.client.publish(f"acquirer/v1/x{i}/transactions", json.dumps({"ts": time.time(), "txns": []}), qos=1)
        pub.send("acquirer/v1/x-last/transactions", {"ts": time.time(), "txns": []})
        wait_until(lambda: rejected("unknown_acquirer") >= n + 1, 60, "unknown acquirers refused")
        samples = metrics(port)  # parses: the newline never reached the exposition
        assert not any(dict(labels).get("acquirer", "").startswith("x") for _name, labels in samples), \
            "a feed of an unregistered acquirer created series"
        assert not any("T-NL" in value for _name, labels in samples for _k, value in labels)
        assert metric_sample(port, "posfleet_bound_refused_total", bound="feeds") >= n + 1
        assert conditions(port, "T-OK") == {}
