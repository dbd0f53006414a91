"""A paho client that reads the socket in 64 KiB chunks instead of 3-4 small recv() calls per packet.

paho 2.x reads each packet as recv(1) for the command, recv(1) per remaining-length byte and recv(n) for the
body, after one select() per packet: four system calls per heartbeat. Buffering cuts the receive path of a
backlog drain roughly in half (bench/bench_ingest.py, docs/performance.md). Only private methods of paho are
overridden (`_sock_recv`, and `loop_read` to keep reading while bytes are buffered); the dependency is pinned
below the next minor version and tests/integration exercise it against a real Mosquitto.
"""

from __future__ import annotations

import struct
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode

__all__ = ["BufferedClient"]

_CHUNK = 65536
_PUBACK = struct.Struct("!BBH")


class BufferedClient(paho.Client):
    """paho.Client with a user-space receive buffer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:  # a new connection: bytes of the old one are meaningless
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(_CHUNK)  # raises BlockingIOError when nothing is there
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        chunk = self._rbuf[self._rpos : end]
        self._rpos += len(chunk)
        return chunk

    def _buffered(self) -> bool:
        return self._rsock is self._sock and self._rpos < len(self._rbuf)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read packets while whole or partial packets sit in the buffer (select() cannot see them)."""
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._buffered():
            rc = super().loop_read(1)
        return rc

    def ack_many(self, mids: list[int]) -> None:
        """Acknowledge many QoS 1 messages (MQTT 3.1.1) with one queued write and one wake-up of the loop.

        paho's `ack()` queues one PUBACK and wakes its thread per message (a system call each, and one send()
        each); PUBACKs are independent 4-byte packets, so they can travel in one buffer.
        """
        if not mids:
            return
        body = b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids)
        self._packet_queue(0x40, body, 0, 0)
