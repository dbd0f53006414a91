"""collector/ingest/pahofast.py against the paho it runs on, through a socket pair (no broker needed).

pahofast overrides and calls private parts of paho. These tests fence them: a paho release that renames or
reshapes any of them fails here, loudly, instead of corrupting the MQTT stream or losing acknowledgements.
"""

from __future__ import annotations

import collections
import inspect
import logging
import select
import socket
import struct
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from collector.ingest.pahofast import BufferedClient
from collector.ingest.source import ack_step


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
    assert callable(paho.time_func)
    assert list(inspect.signature(paho.Client._packet_queue).parameters)[:5] == [
        "self", "command", "packet", "mid", "qos",
    ]
    assert list(inspect.signature(paho.Client._sock_recv).parameters) == ["self", "bufsize"]
    assert list(inspect.signature(paho.Client._sock_send).parameters) == ["self", "buf"]
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="fence", manual_ack=True)
    assert isinstance(client._out_packet, collections.deque)
    assert client._sock is None
    # The fast PUBLISH path reads where paho is in a packet, the protocol, and keeps paho's keepalive clock.
    assert client._in_packet["command"] == 0
    assert client._protocol == paho.MQTTv311
    assert isinstance(client._last_bytes_received, float)
    assert hasattr(client._msgtime_mutex, "acquire")


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
    ("window", "step"), [(1, 1), (20, 1), (32, 2), (100, 6), (1000, 62), (2000, 64)],
)
def test_ack_step_keeps_a_small_window_full(window: int, step: int) -> None:
    assert ack_step(window) == step


# ---- the fast PUBLISH path (on_buffered_publish) against paho's own -----------------------------------------

Delivered = tuple[bytes, bytes, bool, int, int]  # topic bytes, payload, retain, mid, qos


def _packet(header: int, body: bytes) -> bytes:
    """A packet with its remaining length encoded (1-4 bytes)."""
    length, out = len(body), bytearray([header])
    while True:
        byte, length = length & 0x7F, length >> 7
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out + body)


def _publish_any(topic: bytes, payload: bytes, qos: int, retain: bool, dup: bool, mid: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    return _packet(0x30 | (dup << 3) | (qos << 1) | int(retain), body)


PINGRESP = b"\xd0\x00"

publishes = st.builds(
    _publish_any,
    topic=st.one_of(
        st.text(min_size=1, max_size=40).map(str.encode),
        st.just(b"pos/v1/T0000001/heartbeat"),
        st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)),  # paho's path, topic raises on access
    ),
    payload=st.one_of(st.binary(max_size=200), st.binary(min_size=16_384, max_size=16_400)),  # 1-3 length bytes
    qos=st.integers(0, 1),
    retain=st.booleans(),
    dup=st.booleans(),
    mid=st.integers(1, 65535),
)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _receive(stream: bytes, cuts: list[int], fast: bool) -> tuple[list[Delivered], list[str], float]:
    """Feed `stream` to a client in pieces ending at `cuts`; what it delivered, through which path, and paho's
    keepalive clock at the end."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="fast", protocol=paho.MQTTv311, manual_ack=True)
    client._sock = ours
    client._last_bytes_received = 0.0
    got: list[Delivered] = []
    paths: list[str] = []

    def on_message(_c: object, _u: object, m: paho.MQTTMessage) -> None:
        got.append((m._topic, bytes(m.payload), bool(m.retain), m.mid, m.qos))
        paths.append("paho")

    def on_buffered(topic: str, payload: bytes, retain: bool, mid: int, qos: int) -> None:
        got.append((topic.encode(), payload, retain, mid, qos))
        paths.append("fast")

    client.on_message = on_message
    if fast:
        client.on_buffered_publish = on_buffered
    try:
        start = 0
        for end in [*sorted(set(cuts)), len(stream)]:
            if end <= start:
                continue
            broker.sendall(stream[start:end])
            start = end
            for _ in range(3 + (end - start) // 1000):  # a piece may take more than one 64 KiB read
                assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
            while client.has_buffered():
                assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        for _ in range(len(stream) // 60_000 + 3):
            assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert _drain(broker) == b""  # manual_ack either way: nothing acknowledged by the client itself
        return got, paths, client._last_bytes_received
    finally:
        client._sock = None
        ours.close()
        broker.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    packets=st.lists(st.one_of(publishes, st.just(PINGRESP)), min_size=1, max_size=30),
    near=st.lists(st.tuples(st.integers(0, 29), st.integers(-6, 4)), max_size=6),
)
@example(  # whole in one read: the second and third take the fast path with 2 and 3 length bytes
    packets=[_publish_any(b"a", b"", 0, False, False, 0), _publish_any(b"b/c", b"y" * 200, 1, True, False, 7),
             _publish_any(b"d", b"z" * 20_000, 1, False, True, 8)],
    near=[],
)
def test_the_fast_path_delivers_what_paho_delivers(packets: list[bytes], near: list[tuple[int, int]]) -> None:
    """Random streams of PUBLISHes (QoS 0 and 1, retained or not, 1-3 length bytes, topics that are not UTF-8)
    and PINGRESPs, cut near packet boundaries (inside a length, a byte short of a packet's end): the same
    messages in the same order with and without the fast path."""
    stream = b"".join(packets)
    ends = [sum(map(len, packets[: k + 1])) for k in range(len(packets))]
    cuts = [c for k, delta in near if 0 < (c := ends[k % len(ends)] + delta) < len(stream)]
    by_paho, _, _ = _receive(stream, cuts, fast=False)
    by_fast, _, clock = _receive(stream, cuts, fast=True)
    assert by_fast == by_paho
    assert len(by_paho) == sum(1 for p in packets if p != PINGRESP)
    assert clock > 0.0  # every path keeps paho's keepalive clock going


def test_the_fast_path_takes_whole_publishes_and_leaves_the_rest_to_paho() -> None:
    """Whole QoS 0/1 PUBLISHes go the fast way; a topic that is not UTF-8 and the end of a partial packet go
    through paho; the keepalive clock moves when only the fast path ran."""
    good = [_publish_any(b"pos/v1/T%d/heartbeat" % i, b'{"seq":%d}' % i, 1, i == 2, False, i + 1) for i in range(5)]
    bad = _publish_any(b"\xff\xfe", b"x", 1, False, False, 99)
    stream = b"".join([*good[:3], bad, *good[3:]])
    got, paths, clock = _receive(stream, [len(stream) - 3], fast=True)
    assert [g[3] for g in got] == [1, 2, 3, 99, 4, 5]
    # The buffer is filled before anything parses it: the first packet of a read goes the fast way too. paho
    # finishes the packet the cut splits (it is inside it when the rest arrives).
    assert paths == ["fast", "fast", "fast", "paho", "fast", "paho"]
    assert clock > 0.0


def test_the_fast_path_stops_when_the_consumer_is_full(linked: tuple[BufferedClient, socket.socket]) -> None:
    """keep_reading() is asked before each buffered PUBLISH: a full queue stops the fast path too."""
    client, broker = linked
    got: list[int] = []
    client.on_message = lambda _c, _u, m: got.append(m.mid)
    client.on_buffered_publish = lambda _t, _p, _r, mid, _q: got.append(mid)
    client.keep_reading = lambda: len(got) < 10
    broker.sendall(b"".join(_publish(f"pos/v1/T{i}/heartbeat", b"{}", i + 1) for i in range(50)))
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == list(range(1, 11))
    assert client.has_buffered()
    client.keep_reading = lambda: True
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert got == list(range(1, 51))


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Both ends of a loopback TCP connection (a socket pair cannot be reset)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        ours = socket.create_connection(server.getsockname())
        broker, _ = server.accept()
    ours.setblocking(False)
    return ours, broker


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("end", ["closed", "reset"])
def test_the_end_of_a_connection_is_paho_s_to_report(end: str, fast: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The fast path reads the socket before paho does (`_prefetch`): a closed or reset connection met there must
    still reach paho's read, which reports it (the reset's cause in its log, as a TLS alert's) and ends the
    connection, exactly as without the fast path."""
    ours, broker = _tcp_pair()
    client = BufferedClient(CallbackAPIVersion.VERSION2, client_id="end", protocol=paho.MQTTv311, manual_ack=True)
    client._sock = ours
    client.enable_logger(logging.getLogger("paho-end"))
    got: list[int] = []
    client.on_message = lambda _c, _u, m: got.append(m.mid)
    if fast:
        client.on_buffered_publish = lambda _t, _p, _r, mid, _q: got.append(mid)
    try:
        broker.sendall(_publish("pos/v1/T1/heartbeat", b"{}", 1))
        _wait_readable(ours)
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS and got == [1]
        if end == "reset":
            broker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        broker.close()
        _wait_readable(ours)
        with caplog.at_level(logging.ERROR, "paho-end"):
            assert client.loop_read() == MQTTErrorCode.MQTT_ERR_CONN_LOST
        assert ("Connection reset" in caplog.text) == (end == "reset"), caplog.text
    finally:
        client._sock = None
        ours.close()


def _wait_readable(sock: socket.socket) -> None:
    assert select.select([sock], [], [], 10)[0], "nothing to read within 10 s"
