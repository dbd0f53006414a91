"""collector/ingest/pahofast.py against the paho it runs on, through a socket pair (no broker needed).

pahofast overrides and calls private parts of paho. These tests fence them: a paho release that renames or
reshapes any of them fails here, loudly, instead of corrupting the MQTT stream or losing acknowledgements.
"""

from __future__ import annotations

import collections
import inspect
import socket
import struct
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from collector.ingest.mqtt import ack_step
from collector.ingest.pahofast import BufferedClient


@pytest.fixture
def linked() -> Iterator[tuple[BufferedClient, socket.socket]]:
    """A client whose socket is one end of a socket pair; the test plays the broker on the other end."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="fence", protocol=paho.MQTTv311,
                            manual_ack=True)
    client._sock = ours
    try:
        yield client, broker
    finally:
        client._sock = None
        ours.close()
        broker.close()


def _drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _publish(topic: str, payload: bytes, mid: int) -> bytes:
    """A QoS 1 PUBLISH packet as a broker sends it (MQTT 3.1.1)."""
    body = struct.pack("!H", len(topic)) + topic.encode() + struct.pack("!H", mid) + payload
    assert len(body) < 128  # one remaining-length byte keeps the builder simple
    return bytes([0x32, len(body)]) + body


def test_the_private_parts_pahofast_relies_on_are_there() -> None:
    """Names and signatures of paho internals used by pahofast: a changed paho must fail here first."""
    used = ("_sock_recv", "_sock_send", "_packet_write", "_packet_queue", "loop_read", "_call_socket_register_write")
    for name in used:
        assert callable(getattr(paho.Client, name, None)), f"paho.Client.{name} is gone: re-check pahofast"
    assert list(inspect.signature(paho.Client._packet_queue).parameters)[:5] == [
        "self", "command", "packet", "mid", "qos",
    ]
    assert list(inspect.signature(paho.Client._sock_recv).parameters) == ["self", "bufsize"]
    assert list(inspect.signature(paho.Client._sock_send).parameters) == ["self", "buf"]
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="fence", manual_ack=True)
    assert isinstance(client._out_packet, collections.deque)
    assert client._sock is None


def test_ack_many_writes_pubacks_at_once_from_the_calling_thread(linked: tuple[BufferedClient, socket.socket]) -> None:
    """With paho's network thread running, the acks still leave at once, without waking that thread."""
    client, broker = linked
    wake_r, wake_w = socket.socketpair()
    try:
        client._sockpairR, client._sockpairW = wake_r, wake_w
        client._thread = object()  # type: ignore[assignment]  # as under loop_start(): paho would only queue
        client.ack_many([1, 2, 65535])
        assert _drain(broker) == bytes.fromhex("40020001" "40020002" "4002ffff")
        assert not client._out_packet  # nothing left for paho's thread
        assert _drain(wake_r) == b""  # and it was not woken
    finally:
        client._thread = None
        client._sockpairR = client._sockpairW = None
        wake_r.close()
        wake_w.close()


def test_acks_never_interleave_with_a_partly_written_packet(linked: tuple[BufferedClient, socket.socket]) -> None:
    """A socket that cannot take everything: acks queue behind the pending packet, whole and in order."""
    client, broker = linked
    big = _publish("t", b"x" * 100, 7)
    written = b""
    # Fill the socket until paho has a partly written packet left in its queue.
    while not client._out_packet:
        client._packet_queue(0xC0, big, 0, 0)  # any non-PUBLISH command: paho only writes the bytes
        written += big
    client.ack_many([5, 6])
    assert len(client._out_packet) == 2  # the rest of the packet, then the acks
    received = b""
    while client._out_packet:
        received += _drain(broker)
        assert client.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
    received += _drain(broker)
    assert received == written + bytes.fromhex("40020005" "40020006")


def test_a_partial_ack_write_keeps_its_rest_first(linked: tuple[BufferedClient, socket.socket]) -> None:
    """When the socket takes only part of the acks, the rest goes out before any later packet."""
    client, broker = linked
    filler = b""
    ours = client._sock
    assert isinstance(ours, socket.socket)
    try:
        while True:
            filler_part = b"\xc0\x00" * 1024  # PINGREQs, whole packets
            n = ours.send(filler_part)
            filler += filler_part[:n]
            if n < len(filler_part):
                break
    except BlockingIOError:
        pass
    assert len(filler) % 2 == 0
    client.ack_many(list(range(1, 5001)))  # 20,000 bytes: some may fit, the rest must queue
    client._packet_queue(0xC0, b"\xc0\x00", 0, 0)  # a later packet
    received = b""
    for _ in range(10_000):
        received += _drain(broker)
        if not client._out_packet:
            break
        client.loop_write()
    received += _drain(broker)
    acks = b"".join(struct.pack("!BBH", 0x40, 2, mid) for mid in range(1, 5001))
    assert received == filler + acks + b"\xc0\x00"


def test_buffered_reads_hand_over_every_message_of_one_chunk(linked: tuple[BufferedClient, socket.socket]) -> None:
    """Many packets in one recv(): all are handled by one loop_read, with their message ids for the ack."""
    client, broker = linked
    got: list[tuple[str, bytes, int, int]] = []
    client.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload), m.mid, m.qos))
    broker.sendall(b"".join(_publish(f"pos/v1/T{i}/heartbeat", b'{"seq":%d}' % i, i + 1) for i in range(50)))
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == [(f"pos/v1/T{i}/heartbeat", b'{"seq":%d}' % i, i + 1, 1) for i in range(50)]
    assert _drain(broker) == b""  # manual_ack: nothing acknowledged before the application says so


def test_a_packet_split_across_reads_is_reassembled(linked: tuple[BufferedClient, socket.socket]) -> None:
    client, broker = linked
    got: list[int] = []
    client.on_message = lambda _c, _u, m: got.append(m.mid)
    packet = _publish("pos/v1/T1/heartbeat", b"{}", 9)
    broker.sendall(packet[:5])
    client.loop_read()
    assert got == []
    broker.sendall(packet[5:])
    client.loop_read()
    assert got == [9]


@pytest.mark.parametrize(
    ("batch", "step"), [(1, 1), (20, 1), (32, 2), (100, 6), (1000, 62), (2000, 64)],
)
def test_ack_step_keeps_a_small_window_full(batch: int, step: int) -> None:
    assert ack_step(batch) == step
