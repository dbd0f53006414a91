"""A paho client that reads the socket in 64 KiB chunks and writes acknowledgements from the caller's thread.

- paho 2.x reads each packet as recv(1) for the command, recv(1) per remaining-length byte and recv(n) for the
  body, after one select() per packet: four system calls per heartbeat. Buffering cuts the receive path of a
  backlog drain roughly in half (bench/bench_ingest.py, docs/performance.md).
- paho's `ack()` queues one PUBACK per message and, under paho's own thread, wakes that thread through a socket
  pair; the thread then needs the GIL, which the loop holds while it applies messages (up to the 5 ms switch
  interval): behind a broker window of 20 (Mosquitto's default) or 32 (EMQX's) that wait was a stall per
  window. `ack_many` writes a group of PUBACKs straight to the socket from the calling thread instead, under a
  lock that paho's own writes take too, so bytes of two packets never interleave whichever thread writes
  (collector/ingest/mqtt.py drives paho from the loop; the lock keeps this client safe under `loop_start()` as well).
- Bytes already read off the socket (our buffer, or a TLS record decrypted and pending) are invisible to
  select()/epoll: `loop_read` keeps reading while there are any, unless `keep_reading()` says stop (the
  consumer's queue is full); the caller then reads them when it resumes (`has_buffered()`).
- paho handles each packet through a generic path (a dict of read state, struct formats built per packet, an
  MQTTMessage, a debug log call, the topic matcher): ~15 µs of Python per heartbeat, as much as all of our own
  processing. With `on_buffered_publish` set, the whole MQTT 3.1.1 PUBLISH packets of QoS 0 and 1 lying in the
  buffer are parsed here by slicing and handed to it; anything else (other packets, QoS 2, a topic that is not
  UTF-8, a malformed or partial packet) goes through paho exactly as before. The socket is read into the
  buffer before anything parses it (`_prefetch`), so the first packet of a read takes the fast path too; an error
  or the end of the stream met there is handed on to paho's read, which reports it. tests/unit/test_pahofast.py
  holds the two paths to the same messages on random packet streams cut near packet boundaries.

Only private parts of paho are used (`_sock_recv`, `_sock_send`, `_packet_write`, `_packet_queue`, `_out_packet`,
`_sock`, `_in_packet`, `_protocol`, `_last_bytes_received` under `_msgtime_mutex`, and `loop_read` to keep reading
while bytes are buffered); the dependency is pinned below the next minor version and tests/unit/test_pahofast.py
fails loudly when they change.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion

__all__ = ["BufferedClient", "OnPublish"]

_CHUNK = 65536
_PUBACK = struct.Struct("!BBH")


def _always() -> bool:
    return True


# on_buffered_publish(topic, payload, retain, mid, qos): a PUBLISH parsed off the buffer (mid is 0 at QoS 0).
OnPublish = Callable[[str, bytes, bool, int, int], None]


class BufferedClient(paho.Client):
    """paho.Client with a user-space receive buffer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None
        self._eof = False  # the socket said end of stream while _prefetch read it
        self._error: OSError | None = None  # ... or failed
        # Taken by every write to the socket (paho's thread and ack_many): reentrant, because paho's
        # _packet_queue writes in the caller's thread when no network thread runs.
        self._wlock = threading.RLock()
        # Asked before each further buffered packet: False stops reading (the consumer's queue is full). The bytes
        # left in the buffer wait for the next loop_read; `has_buffered()` tells the caller they are there.
        self.keep_reading: Callable[[], bool] = _always
        # Set: whole QoS 0/1 PUBLISH packets in the buffer go here, not through paho's per-packet path.
        self.on_buffered_publish: OnPublish | None = None

    def _this_connection(self) -> None:
        if self._rsock is not self._sock:  # a new connection: bytes of the old one are meaningless
            self._rbuf, self._rpos, self._rsock, self._eof, self._error = b"", 0, self._sock, False, None
            self._no_delay()

    def _sock_recv(self, bufsize: int) -> bytes:
        self._this_connection()
        if self._rpos >= len(self._rbuf):
            if self._error is not None:  # met by _prefetch
                err, self._error = self._error, None
                raise err
            if self._eof:  # seen by _prefetch: paho's read ends the connection
                return b""
            data = super()._sock_recv(_CHUNK)  # raises BlockingIOError when nothing is there
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos : end]
        self._rpos += len(chunk)
        return chunk

    def _no_delay(self) -> None:
        """Send small packets at once (TCP_NODELAY): with Nagle's algorithm a second group of PUBACKs waits for the
        broker's TCP acknowledgement of the first, which the broker delays (up to 40 ms on Linux) when it has no
        data to send back, and it has none until it gets our PUBACKs."""
        # Not TCP (a websocket wrapper, a Unix socket): nothing to tune.
        with contextlib.suppress(OSError, AttributeError):
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]

    def _buffered(self) -> bool:
        """Bytes we hold that select()/epoll cannot see: in our buffer, or decrypted and waiting in the TLS layer."""
        if self._rsock is not self._sock:
            return False
        if self._rpos < len(self._rbuf):
            return True
        pending = getattr(self._sock, "pending", None)  # ssl.SSLSocket: a record already read off the socket
        return pending is not None and pending() > 0

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read packets while whole or partial packets sit in the buffer (select() cannot see them)."""
        keep_reading = self.keep_reading
        fresh = self._prefetch()
        if self._publishes():
            if not keep_reading():
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # the fast path filled the consumer: the rest waits
            if fresh and not self._buffered():
                # All of this read taken: paho's read would only meet an empty socket (one more recv()). The
                # loop's selector is level-triggered: whatever arrives next wakes it again.
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._more(keep_reading):
            self._publishes()
            if not self._more(keep_reading):
                break
            rc = super().loop_read(1)  # a packet the fast path left to paho, or the rest of a partial one
        return rc

    def _more(self, keep_reading: Callable[[], bool]) -> bool:
        """Whether to go on reading: bytes are held here and the consumer has room."""
        return self._sock is not None and self._buffered() and keep_reading()

    def _prefetch(self) -> bool:
        """Read the socket into an empty buffer before anything parses it, so the first packet of each read takes
        the fast path too: left to paho, it went through paho's own (~15 µs), and a steady stream wakes the loop
        for a few messages at a time. Nothing there, an error or the end of the stream is left to paho's read.
        Whether it read something."""
        if self.on_buffered_publish is None or self._sock is None or self._in_packet["command"]:
            return False
        self._this_connection()
        if self._rpos < len(self._rbuf) or self._eof or self._error is not None:
            return False
        try:
            data = super()._sock_recv(_CHUNK)
        except BlockingIOError:  # nothing yet
            return False
        except OSError as err:  # paho's own read raises it again and reports it (a TLS alert names its cause)
            self._error = err
            return False
        if not data:
            self._eof = True
            return False
        self._rbuf, self._rpos = data, 0
        return True

    def _publishes(self) -> bool:
        """Hand every whole MQTT 3.1.1 QoS 0/1 PUBLISH at the head of the buffer to `on_buffered_publish`, asking
        `keep_reading()` before each; stop at the first packet paho must see (see the module's docstring).
        Whether any was handed over."""
        on_publish = self.on_buffered_publish
        if (
            on_publish is None
            or self._in_packet["command"]  # paho is inside a packet: the buffer starts in the middle of it
            or self._protocol == MQTTProtocolVersion.MQTTv5
            or self._rsock is not self._sock
        ):
            return False
        buf, pos = self._rbuf, self._rpos
        end = len(buf)
        keep_reading = self.keep_reading
        start = pos
        while pos + 4 <= end:
            header = buf[pos]
            qos = (header >> 1) & 3
            if header >> 4 != 3 or qos > 1:
                break
            # Remaining length: 1-4 bytes, 7 bits each, least significant first.
            i, length, shift = pos + 1, 0, 0
            while True:
                byte = buf[i] if i < end else 0x80
                i += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80 or shift > 21 or i > end:
                    break
            stop = i + length
            if byte >= 0x80 or stop > end:
                break  # partial (or a malformed length): paho reads it
            topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1]) if length >= 2 else stop + 1
            body = topic_end + 2 if qos else topic_end
            if topic_end == i + 2 or body > stop:
                break  # an empty topic or a packet shorter than its own fields: paho says it is malformed
            try:
                topic = buf[i + 2 : topic_end].decode()
            except UnicodeDecodeError:
                break  # paho hands it over with a topic that raises on access, and logs it
            if not keep_reading():
                break
            pos = self._rpos = stop
            mid = (buf[topic_end] << 8) | buf[topic_end + 1] if qos else 0
            on_publish(topic, buf[body:stop], bool(header & 1), mid, qos)
        if pos == start:
            return False
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return True

    def has_buffered(self) -> bool:
        """Whether packets (or parts) were read off the socket and wait here, where select()/epoll cannot see them."""
        return self._sock is not None and self._buffered()

    def _packet_write(self) -> MQTTErrorCode:
        with self._wlock:
            return super()._packet_write()

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge many QoS 1 messages (MQTT 3.1.1) in one write from the calling thread.

        PUBACKs are independent 4-byte packets, so they travel in one buffer. When nothing else waits to be
        written, they are sent at once (one send(), no thread wake-up); otherwise, or for what the socket did
        not take, they queue behind paho's pending packets exactly like paho's own `ack()`.
        """
        if not mids:
            return
        body = b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids)
        with self._wlock:
            if not self._out_packet and self._sock is not None:
                try:
                    sent = self._sock_send(body)
                except OSError:  # would block, or the connection is going down (paho's thread sees to that)
                    sent = 0
                if sent >= len(body):
                    return
                body = body[sent:]  # a partial write: the rest must go next, before any other packet
            self._packet_queue(0x40, body, 0, 0)
