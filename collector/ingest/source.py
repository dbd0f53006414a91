"""The source interface: what the collector needs from any broker client (MQTT today, a second one next).

A source delivers raw messages stamped with their receive time and takes them back as acknowledged once the
collector has applied them (at-least-once: an unacknowledged message is redelivered after a restart). It knows
nothing of the protocol: decoding happens in collector.fleet.protocol, so a new source reuses it unchanged.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol, TypeVar

from prometheus_client import Counter, Gauge

__all__ = ["IngestMetrics", "Message", "Source", "ack_step", "take_batch"]

M = TypeVar("M", bound="Message")
T = TypeVar("T")


class Message(Protocol):
    """One raw message as a source hands it over."""

    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def retain(self) -> bool: ...
    @property
    def rx(self) -> float: ...


class Source(Protocol[M]):
    """A source of messages that can be acknowledged; `async with` connects it, exit disconnects cleanly."""

    @property
    def subscribed(self) -> bool:
        """Whether messages can arrive now (connected and subscribed)."""
        ...

    async def batches(self, max_batch: int = 2000) -> list[M]:
        """Wait for messages and take up to `max_batch` of them."""
        ...

    def ack_every(self, batch_size: int) -> int:
        """How many applied messages of a batch of `batch_size` to acknowledge at a time."""
        ...

    def ack(self, items: list[M]) -> None:
        """Acknowledge applied messages (a no-op for those that need none)."""
        ...

    def thread_alive(self) -> bool:
        """Whether the task driving the connection is still running."""
        ...


class IngestMetrics(Protocol):
    """The self-metrics a source updates (collector.http.metrics.SelfMetrics has them); typed here so ingest
    does not import the HTTP room."""

    mqtt_connected: Gauge
    mqtt_connects: Counter
    queue_depth: Gauge
    queue_capacity: Gauge


def ack_step(window: int) -> int:
    """How many applied messages to acknowledge at a time behind a broker that lets `window` unacknowledged
    messages be in flight.

    Behind a small window (Mosquitto's 20, EMQX's 32) every message is acknowledged as soon as it is applied,
    which keeps the window as full as "ack after apply" allows; behind a wide one, one PUBACK per 1/16 of the
    window (at most 64 messages, which also bounds what a crash makes the broker redeliver) keeps 15/16 of it open
    while saving a send() per message: at a steady 20,000 msg/s the batches are a few messages each, and one
    send() for each message took ~8 % of the collector's time (and as much again of the broker's).
    """
    return max(1, min(64, window // 16))


async def take_batch(queue: deque[T], ready: asyncio.Event, max_batch: int) -> list[T]:
    """Wait until `queue` holds something (`ready` is set by whoever appends), then take up to `max_batch` from
    its front: the consumer side every source shares. Always yields to the loop, so others run between two
    batches: once when messages are already waiting, else while it waits (a `sleep(0)` after every batch on top
    of that was one more pass of the loop per batch, ~2 % of the collector's time in a steady stream)."""
    if queue:
        await asyncio.sleep(0)
    while not queue:
        ready.clear()
        await ready.wait()
    return [queue.popleft() for _ in range(min(len(queue), max_batch))]
