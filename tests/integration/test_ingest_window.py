"""Acknowledgements slide: behind a broker window of 20 (Mosquitto's default), PUBACKs leave while a batch is
still being applied, so the broker keeps sending; and still never before a message is applied.

A real Mosquitto with `max_inflight_messages 20`, a backlog waiting in the collector's persistent session, and a
TCP tap between them that counts the PUBACKs the broker receives. No timing is asserted: the checks wait for a
count (tests.harness.core.wait_until) while the collector's loop is held inside the application of one message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client import CollectorRegistry

from collector.app import Collector
from collector.config import Config, MqttConfig
from collector.http.metrics import SelfMetrics
from collector.ingest.mqtt import Inbound, MqttIngest
from collector.ingest.source import ack_step
from tests.harness.core import Process, free_port, port_open, require_binary, wait_until

pytestmark = pytest.mark.integration
BACKLOG = 200
CHECK_AT = (100, 150, 190)


class PubackTap:
    """TCP proxy 127.0.0.1:port -> broker that counts the PUBACKs passing from the client to the broker."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.pubacks = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def count(self) -> int:
        """PUBACKs the broker has received so far."""
        with self._lock:
            return self.pubacks

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                broker = socket.create_connection(("127.0.0.1", self.target_port))
                self._socks += [client, broker]
                threading.Thread(target=self._pipe, args=(broker, client, False), daemon=True).start()
                threading.Thread(target=self._pipe, args=(client, broker, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)  # forwarded before counting: a counted PUBACK has reached the broker's socket
                if upstream:
                    buf = self._count(buf + data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _count(self, buf: bytes) -> bytes:
        """Walk whole MQTT packets (fixed header, remaining length); keep the incomplete tail."""
        while len(buf) >= 2:
            length, mult, i = 0, 1, 1
            while i < len(buf):
                length += (buf[i] & 0x7F) * mult
                mult *= 128
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                return buf
            if len(buf) < i + length:
                return buf
            if buf[0] >> 4 == 4:
                with self._lock:
                    self.pubacks += 1
            buf = buf[i + length:]
        return buf

    def close(self) -> None:
        """Close every socket."""
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def _mosquitto(tmp_path: Path, inflight: int) -> Iterator[Process]:
    binary = require_binary("mosquitto", "/usr/sbin/mosquitto")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages {inflight}\n"
                    "max_queued_messages 0\nlog_dest stderr\n")
    log = tmp_path / "mosquitto.log"
    broker = Process(subprocess.Popen([binary, "-c", str(conf)], stdout=log.open("ab"), stderr=subprocess.STDOUT),
                     port, tmp_path, log)
    try:
        wait_until(lambda: port_open(port), 10, "mosquitto to listen")
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def small_window(tmp_path: Path) -> Iterator[Process]:
    """Mosquitto with its default in-flight window (20 unacknowledged messages per client)."""
    yield from _mosquitto(tmp_path, 20)


@pytest.fixture
def no_window(tmp_path: Path) -> Iterator[Process]:
    """Mosquitto with no in-flight window: it sends a resumed session's whole backlog at once."""
    yield from _mosquitto(tmp_path, 0)


def publish_backlog(port: int) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="window-pub", protocol=paho.MQTTv311)
    client.connect("127.0.0.1", port)
    client.loop_start()
    infos = [
        client.publish(f"pos/v1/T{i:05d}/heartbeat", json.dumps({
            "tid": f"T{i:05d}", "ts": 1_764_510_000 + i, "seq": 1, "interval_s": 30, "txn_count": 0,
            "uploaded_count": 0, "queue_depth": 0, "oldest_queued_ts": None}), qos=1)
        for i in range(BACKLOG)
    ]
    for info in infos:
        info.wait_for_publish(20)
    client.disconnect()
    client.loop_stop()


async def test_acks_slide_behind_a_window_of_20(tmp_path: Path, small_window: Process) -> None:
    tap = PubackTap(small_window.port)
    cfg = msgspec.convert({
        "mqtt": {"url": f"mqtt://127.0.0.1:{tap.port}", "client_id": "posfleet-window"},
        "http": {"host": "127.0.0.1", "port": 0},
        "state": {"snapshot_path": str(tmp_path / "state.snapshot")},
    }, Config)
    try:
        async with Collector.load(cfg) as c:  # registers the persistent session, then leaves
            await asyncio.to_thread(wait_until, lambda: c.ingest is not None and c.ingest.subscribed, 10, "subscribed")
        await asyncio.to_thread(publish_backlog, small_window.port)
        before = tap.count()
        applied = 0
        seen_at: dict[int, int] = {}

        def hook(_msg: object, _rx: float, _t: object) -> None:
            nonlocal applied
            applied += 1
            # Held inside the application of one message: the acks of what was applied must already be out,
            # short of at most one group (collector.ingest.mqtt.ack_step: at most 64). Acking per batch, the broker had
            # only heard of the first batch here (Mosquitto resends the rest of a resumed session at once).
            if applied in CHECK_AT:
                want = applied - 1 - ack_step(BACKLOG)
                seen_at[applied] = wait_until(lambda: (n := tap.count() - before) >= want and n, 10,
                                              f"PUBACKs for {want} applied messages, message {applied} still applying")
            # ... and never more than what was applied: ack after apply.
            assert tap.count() - before <= applied - 1

        c = Collector.load(cfg)
        c.message_hooks.append(hook)  # before connecting: the backlog arrives as soon as the session resumes
        async with c:
            await asyncio.to_thread(wait_until, lambda: applied >= BACKLOG and tap.count() - before >= BACKLOG, 30,
                                    "the whole backlog applied and acknowledged")
        assert sorted(seen_at) == list(CHECK_AT)
    finally:
        tap.close()


async def test_a_full_queue_stops_reading_and_loses_nothing(tmp_path: Path, small_window: Process) -> None:
    """Backpressure without a network thread: a full queue pauses the socket reader (the broker holds the rest),
    taking a batch resumes it, and every message of the backlog arrives exactly once."""
    cfg = msgspec.convert({"url": f"mqtt://127.0.0.1:{small_window.port}", "client_id": "posfleet-full",
                           "queue_size": 10}, MqttConfig)
    loop = asyncio.get_running_loop()
    async with MqttIngest(cfg, SelfMetrics(CollectorRegistry()), loop) as ingest:  # the persistent session
        await asyncio.to_thread(wait_until, lambda: ingest.subscribed, 10, "subscribed")
    await asyncio.to_thread(publish_backlog, small_window.port)
    got: list[str] = []
    async with MqttIngest(cfg, SelfMetrics(CollectorRegistry()), loop) as ingest:
        await asyncio.to_thread(wait_until, lambda: ingest._paused, 10, "the reader paused on a full queue")
        held = len(ingest._queue)
        for _ in range(50):  # nothing more is read while paused, however often the loop turns
            await asyncio.sleep(0)
            assert ingest._paused and len(ingest._queue) == held
        while len(got) < BACKLOG:
            batch = await asyncio.wait_for(ingest.batches(max_batch=5), 10)
            got += [i.topic for i in batch]
            ingest.ack(batch)
    assert sorted(got) == sorted(f"pos/v1/T{i:05d}/heartbeat" for i in range(BACKLOG))


async def test_a_broker_that_ignores_the_window_cannot_overfill_the_queue(tmp_path: Path, no_window: Process) -> None:
    """The bound holds even when the broker sends far more than the queue takes in one read of the socket (no
    window, or Mosquitto 2.0 releasing ~19 messages per PUBACK): packets already read stay in the client's
    buffer, are parsed when the consumer makes room, and every message arrives exactly once."""
    capacity = 10
    cfg = msgspec.convert({"url": f"mqtt://127.0.0.1:{no_window.port}", "client_id": "posfleet-flood",
                           "queue_size": capacity}, MqttConfig)
    loop = asyncio.get_running_loop()
    async with MqttIngest(cfg, SelfMetrics(CollectorRegistry()), loop) as ingest:  # the persistent session
        await asyncio.to_thread(wait_until, lambda: ingest.subscribed, 10, "subscribed")
    await asyncio.to_thread(publish_backlog, no_window.port)
    got: list[str] = []
    most = 0
    async with MqttIngest(cfg, SelfMetrics(CollectorRegistry()), loop) as ingest:
        await asyncio.to_thread(wait_until, lambda: ingest._paused, 10, "the reader paused on a full queue")
        while len(got) < BACKLOG:
            most = max(most, len(ingest._queue))
            batch = await asyncio.wait_for(ingest.batches(max_batch=3), 10)
            got += [i.topic for i in batch]
            ingest.ack(batch)
    assert most <= capacity
    assert sorted(got) == sorted(f"pos/v1/T{i:05d}/heartbeat" for i in range(BACKLOG))


@pytest.fixture
def wide_window(tmp_path: Path) -> Iterator[Process]:
    """Mosquitto with the peer benchmark's window (1000 unacknowledged messages per client)."""
    yield from _mosquitto(tmp_path, 1000)


async def test_acks_fewer_than_a_group_go_out_together_and_on_their_own(tmp_path: Path, wide_window: Process) -> None:
    """Behind a wide window, acknowledgements short of a group are held (ACK_LINGER_S) to go out in one write with
    the next ones; with nothing more to come they still go out (the timer), and so do those held when the
    collector disconnects. The tap counts what the broker received; nothing is timed."""
    tap = PubackTap(wide_window.port)
    cfg = msgspec.convert({"url": f"mqtt://127.0.0.1:{tap.port}", "client_id": "posfleet-linger"}, MqttConfig)
    loop = asyncio.get_running_loop()
    try:
        async with MqttIngest(cfg, SelfMetrics(CollectorRegistry()), loop) as ingest:  # the persistent session
            await asyncio.to_thread(wait_until, lambda: ingest.subscribed, 10, "subscribed")
        await asyncio.to_thread(publish_backlog, wide_window.port)
        before = tap.count()
        got: list[Inbound] = []
        async with MqttIngest(cfg, SelfMetrics(CollectorRegistry()), loop) as ingest:
            while len(got) < BACKLOG:
                got += await asyncio.wait_for(ingest.batches(), 10)
            step = ack_step(ingest.window)
            assert step > 3, ingest.window  # the broker let the backlog through at once: a window of groups
            writes: list[int] = []
            send = ingest.client.ack_many
            ingest.client.ack_many = lambda mids: (writes.append(len(mids)), send(mids))[1]  # type: ignore[method-assign]
            for item in got[:3]:  # applied one at a time, fewer than a group: held, then written together
                ingest.ack([item])
            await asyncio.to_thread(wait_until, lambda: tap.count() - before >= 3, 10, "the held acks written")
            assert writes == [3] and tap.count() - before == 3
            ingest.ack(got[3:BACKLOG - 2])  # whole groups: at once
            assert writes == [3, BACKLOG - 5]
            ingest.ack(got[BACKLOG - 2:])  # held when the ingest closes: written before the DISCONNECT
        assert writes == [3, BACKLOG - 5, 2]
        await asyncio.to_thread(wait_until, lambda: tap.count() - before == BACKLOG, 10, "every message acknowledged")
    finally:
        tap.close()
