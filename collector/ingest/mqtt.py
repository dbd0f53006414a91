"""MQTT ingest: paho driven by the asyncio loop itself, handing raw messages to the consumer through a bounded queue.

- Persistent session (fixed client id, clean_session=False) and QoS 1, so the broker keeps our messages while
  we restart; subscriptions are (re)made in on_connect and the granted QoS is checked.
- `manual_ack=True`: a message is acknowledged only after the loop has applied it to the state, so a crash
  between receive and processing makes the broker redeliver instead of losing it.
- Acknowledgements slide: they go out in small groups as messages are applied (`ack_step`), not once per batch.
  A broker lets only a window of unacknowledged messages be in flight (Mosquitto 20 by default, EMQX 32):
  acking a whole batch at its end left that window empty while the batch was applied. The group size follows
  the widest window the broker has used on the connection (the most messages queued here at once). What is
  left of a group at the end of a batch waits up to ACK_LINGER_S to go out with the next group: a steady stream
  comes in batches of a few messages, and one send() per batch was ~9 % of the collector's time at 20k msg/s.
- No network thread: the socket is read by a loop reader callback, keepalive runs on a loop timer, and only
  the blocking connect (TCP, TLS handshake) goes to a worker thread. With paho's own thread, every round trip
  of a small window cost two thread wake-ups and a wait for the GIL (up to the 5 ms switch interval) while the
  loop applied messages; on two shared cores that, not the work, set the throughput (docs/performance.md).
- Backpressure: when the queue is full the reader is paused, so the broker holds the rest (not our memory);
  it resumes as soon as the consumer takes a batch.
- A broker that cannot be reached is retried with backoff for ever, and said so: every failed attempt (refused,
  TLS handshake, certificate, bad credentials) is logged with its cause, at most one line per 30 s with the
  number of attempts left out, so a collector that never connects is never silent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlparse

import msgspec
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from collector.config import MqttConfig
from collector.ingest.pahofast import BufferedClient
from collector.ingest.source import IngestMetrics, ack_step, take_batch

__all__ = ["ACK_LINGER_S", "FailureLog", "Inbound", "MqttIngest", "PahoLog"]

log = logging.getLogger(__name__)

# How long applied messages (fewer than a group) may wait to be acknowledged with the next group. Far below a
# reconnect (mqtt.reconnect_min_s >= 1 s), so a held acknowledgement never reaches the next connection; a window
# wide enough for groups (ack_step > 1, 32+ messages) barely notices the few it keeps meanwhile.
ACK_LINGER_S: Final = 0.005


class FailureLog:
    """Connection failures as log lines: the first at once, then at most one per period with the number left
    out since. Called from paho's thread; time is injectable."""

    def __init__(self, logger: logging.Logger, where: str = "", period_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.where, self.period, self.clock = logger, where, period_s, clock
        self.failures = 0  # since the last successful connection
        self.quiet = False  # set while closing: paho's complaints about a disconnect we asked for are noise
        self._last: float | None = None
        self._suppressed = 0
        self._lock = threading.Lock()

    def failed(self, msg: str, *args: object) -> bool:
        """Count a failure; log it unless one was logged within the period. Returns whether it logged."""
        with self._lock:
            self.failures += 1
            now = self.clock()
            if self._last is not None and now - self._last < self.period:
                self._suppressed += 1
                return False
            self._last, n, self._suppressed = now, self._suppressed, 0
        self.logger.warning(msg + (f" (+{n} more failures not logged)" if n else ""), *args)
        return True

    def succeeded(self) -> int:
        """A connection worked: the next failure logs at once. Returns the failures before it."""
        with self._lock:
            n, self.failures, self._last, self._suppressed = self.failures, 0, None, 0
        return n


class PahoLog(logging.Logger):
    """paho's log sink (`enable_logger`): its warnings and errors, such as "failed to receive on socket: [SSL:
    ...] certificate required", become rate-limited failure lines. paho logs every packet at DEBUG; here that
    costs one call and a comparison (~0.2 µs measured), half of a real Logger's disabled-level check."""

    def __init__(self, failures: FailureLog) -> None:
        super().__init__(__name__ + ".paho")
        self.failures = failures

    def log(self, level: int, msg: object, *args: object, **_kwargs: Any) -> None:
        """Count and (rate limited) log paho's warnings and errors; drop the rest."""
        if level >= logging.WARNING and not self.failures.quiet:
            self.failures.failed("MQTT %s: %s", self.failures.where, str(msg) % args if args else msg)


class _Client(BufferedClient):
    """Remembers why the last connection attempt failed: paho's on_connect_fail is not told."""

    connect_error: BaseException | None = None

    def reconnect(self) -> MQTTErrorCode:
        """paho's reconnect, keeping the error (refused, DNS, TLS handshake, certificate) for the log."""
        try:
            return super().reconnect()
        except OSError as err:
            self.connect_error = err
            raise


class Inbound(msgspec.Struct, frozen=True, gc=False):
    """One message as paho handed it over, stamped with its receive time (a Struct: built in C, ~0.2 µs where a
    frozen dataclass takes ~2 µs per message; scalars only, so untracked by the GC)."""

    topic: str
    payload: bytes
    retain: bool
    mid: int
    qos: int
    rx: float


def _ignore(*_args: object) -> None:
    """A paho callback that does nothing."""


class MqttIngest:
    """Owns the paho client and drives it from the loop; `async with` connects, exit disconnects cleanly."""

    def __init__(self, cfg: MqttConfig, metrics: IngestMetrics, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.loop = loop
        self.capacity = cfg.queue_size
        self._queue: collections.deque[Inbound] = collections.deque()
        self._read_at = 0.0  # wall-clock time of the current socket read: the receive time of its messages
        self._ready = asyncio.Event()
        self._closing = False
        self.subscribed = False
        self._connected = False  # the broker accepted this connection (CONNACK success)
        self._accepted = False  # ... at some point since the last reconnect attempt (resets the backoff)
        self._fd = -1  # the socket's file descriptor while the loop watches it
        self._paused = False  # reading stopped: the queue is full
        # The most messages queued here at once on this connection: a lower bound of the broker's in-flight window
        # (everything queued is unacknowledged), which sets how many applied messages are acknowledged together.
        self.window = 0
        self._held: list[int] = []  # packet ids of applied messages waiting to be acknowledged with the next group
        self._ack_timer: asyncio.TimerHandle | None = None
        self._last_in = 0.0  # monotonic time the socket last had something to read (messages, PINGRESP)
        # How often keepalive and the silence check run: fine enough that a dead link is dropped within
        # 1.5 x keepalive (the check sees silence at most one tick late).
        self._tick = min(1.0, cfg.keepalive_s / 10)
        self._writing = False
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_message = 0.0
        url = urlparse(cfg.url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if url.scheme == "mqtts" else 1883)
        self._failures = FailureLog(log, f"{self.host}:{self.port}")
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=False,
            protocol=paho.MQTTv311,  # v3.1.1 parses ~1.7x faster than v5 in paho (FIELD-NOTES)
            manual_ack=True,
        )
        if url.scheme == "mqtts":
            tls = cfg.tls
            # Without mqtt.tls: the system's CAs, no client certificate. Hostname checking stays on either way.
            client.tls_set(ca_certs=tls.ca_file if tls else None, certfile=tls.cert_file if tls else None,
                           keyfile=tls.key_file if tls else None)
        password = os.environ.get("POSFLEET_MQTT_PASSWORD")
        if cfg.password_file:
            with open(cfg.password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        if cfg.username:
            client.username_pw_set(cfg.username, password)
        client.max_queued_messages_set(0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe  # type: ignore[assignment]
        client.on_message = self._on_message
        client.on_buffered_publish = self._on_publish
        # A broker that sends beyond its in-flight window (Mosquitto 2.0 with max_queued_messages 0 releases ~19
        # messages per PUBACK) must not grow the queue past its bound within one read of the socket.
        client.keep_reading = self._has_room
        client.enable_logger(PahoLog(self._failures))
        self.client = client
        self.topics = [
            (f"{cfg.topic_prefix}/+/heartbeat", 1),
            (f"{cfg.topic_prefix}/+/status", 1),
            (f"{cfg.topic_prefix}/+/txn", 1),
            (f"{cfg.upstream_prefix}/+/transactions", 1),
        ]
        metrics.queue_capacity.set(self.capacity)
        metrics.mqtt_connected.set(0)

    # ---- paho callbacks (on the loop, inside loop_read / loop_misc) -------------------------------------
    def _on_connect(self, client: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            self._failures.failed("MQTT connect to %s:%s refused by the broker: %s; retrying with backoff",
                                  self.host, self.port, reason)
            return
        self._connected = self._accepted = True
        failed = self._failures.succeeded()
        log.info("MQTT connected to %s:%s%s; subscribing", self.host, self.port,
                 f" after {failed} failed attempts" if failed else "")
        self.metrics.mqtt_connects.inc()
        # Always subscribe: a persistent session may have been lost with the broker's state (paho #375).
        client.subscribe(self.topics)

    def _on_connect_fail(self, err: BaseException | None) -> None:
        self._failures.failed("MQTT connect to %s:%s failed: %s; retrying with backoff (at most %ss apart)",
                              self.host, self.port, err or "unknown error", self.cfg.reconnect_max_s)

    def _on_subscribe(self, _c: paho.Client, _u: object, _mid: int, codes: list[object], _p: object) -> None:
        failed = [t for (t, _q), rc in zip(self.topics, codes, strict=False) if getattr(rc, "is_failure", False)]
        if failed:
            log.error("MQTT subscription refused for %s", ", ".join(failed))
            return
        self.subscribed = True
        self.metrics.mqtt_connected.set(1)

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        self.subscribed = False
        self.metrics.mqtt_connected.set(0)
        self._held = []  # this connection's packet ids: the broker sends those messages again on the next one
        was_connected, self._connected = self._connected, False
        if self._closing:
            log.info("MQTT disconnected from %s:%s", self.host, self.port)
        elif was_connected:
            log.warning("MQTT connection to %s:%s lost (%s); reconnecting with backoff", self.host, self.port, reason)
        else:  # closed before the broker accepted us (TLS alert, refused): a failed attempt, rate limited
            self._failures.failed("MQTT connection to %s:%s closed before it was accepted (%s); retrying with backoff",
                                  self.host, self.port, reason)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._on_publish(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid, msg.qos)

    def _on_publish(self, topic: str, payload: bytes, retain: bool, mid: int, qos: int) -> None:
        """A message, from paho's `on_message` or parsed straight off the read buffer (pahofast)."""
        rx = self._read_at
        self.last_message = rx
        self._queue.append(Inbound(topic, payload, retain, mid, qos, rx))
        self._ready.set()

    # ---- the socket on the loop --------------------------------------------------------------------------
    def _watch(self) -> None:
        """Start reading the socket paho has just connected."""
        sock = self.client.socket()
        if sock is None:
            return
        self._fd = sock.fileno()
        self._paused = False
        self.window = 0  # a new connection, perhaps to another broker: its window is learnt again
        self._last_in = time.monotonic()
        self.loop.add_reader(self._fd, self._readable)
        self._after_io()

    def _unwatch(self) -> None:
        if self._fd >= 0:
            # paho may have closed the socket already: the selector then forgets the descriptor and says EBADF.
            with contextlib.suppress(OSError):
                self.loop.remove_reader(self._fd)
            with contextlib.suppress(OSError):
                self.loop.remove_writer(self._fd)
            self._fd, self._writing = -1, False

    def _after_io(self) -> None:
        """After paho ran: notice a closed connection, write what is pending, pause when the queue is full."""
        sock = self.client.socket()
        if sock is None or sock.fileno() != self._fd:
            self._unwatch()
            self._lost.set()
            return
        want = self.client.want_write()
        if want and not self._writing:
            self.loop.add_writer(self._fd, self._writable)
        elif not want and self._writing:
            self.loop.remove_writer(self._fd)
        self._writing = want
        if len(self._queue) >= self.capacity and not self._paused:
            # Stop reading: the broker buffers the rest. The consumer resumes us when it takes a batch.
            self._paused = True
            self.loop.remove_reader(self._fd)

    def _readable(self) -> None:
        self._last_in = time.monotonic()
        # One receive time per socket read, shared by the messages it carries (a read takes well under a
        # millisecond): one float object for all of them, so each terminal's last_rx is not a float of its own
        # (32 B per terminal, ~3 MB per 100,000).
        self._read_at = time.time()
        self.client.loop_read()
        self._after_io()

    def _writable(self) -> None:
        self.client.loop_write()
        self._after_io()

    def _has_room(self) -> bool:
        return len(self._queue) < self.capacity

    def _resume(self) -> None:
        if self._paused and self._fd >= 0 and len(self._queue) < self.capacity:
            self._paused = False
            self._last_in = time.monotonic()  # we stopped reading, not the broker: its silence starts now
            self.loop.add_reader(self._fd, self._readable)
            if self.client.has_buffered():  # read before the pause, not yet parsed: epoll will not say so
                self.loop.call_soon(self._read_buffered)

    def _read_buffered(self) -> None:
        if self._fd >= 0 and not self._paused:
            self._readable()

    async def _run(self) -> None:
        """Connect, keep the connection alive, reconnect with backoff: the loop paho's own thread used to run."""
        client = self.client
        delay = self.cfg.reconnect_min_s
        tick = self._tick
        while not self._closing:
            client.connect_error = None
            # While a callback is set paho queues packets instead of writing them in the calling thread: the
            # CONNECT then goes out from the loop, after anything the broker already said (a TLS alert naming a
            # missing client certificate would otherwise be lost to the reset our write provokes).
            # Left set if we are cancelled meanwhile: a connect still running in its thread then never sends its
            # CONNECT, so it cannot take the session over from whoever uses the client id next.
            client.on_socket_register_write = _ignore
            try:
                # The blocking part (TCP connect, TLS handshake) off the loop; nothing else touches the client
                # meanwhile: the consumer does not ack while disconnected and no reader is registered.
                await asyncio.to_thread(client.reconnect)
            except (OSError, ValueError) as err:
                client.on_socket_register_write = None
                self._on_connect_fail(err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.reconnect_max_s)
                continue
            client.on_socket_register_write = None
            self._lost.clear()
            self._watch()
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), tick)
                if not self._lost.is_set():
                    client.loop_misc()  # keepalive: PINGREQ, and a broker that stopped answering is dropped
                    self._after_io()
                    self._check_silence()
            if self._accepted:  # the broker took this connection: a new outage starts from the shortest wait
                self._accepted, delay = False, self.cfg.reconnect_min_s
            if not self._closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.cfg.reconnect_max_s)

    def _check_silence(self) -> None:
        """A half-open link (a NAT or firewall dropped it without a reset) is dropped within 1.5 x keepalive.

        paho alone takes up to 2 x keepalive: it sends its PINGREQ a keepalive after the last exchange and waits
        another keepalive for the PINGRESP. The broker answers a PINGREQ at once, so nothing to read for 1.5 x
        keepalive (while we were reading) means the link is dead: shut the socket down and let paho see a lost
        connection; the session is persistent, so nothing unacknowledged is lost.
        """
        silent = time.monotonic() - self._last_in
        # Two ticks early: one for the check's own granularity, one for a loop busy applying a batch.
        if self._paused or self._fd < 0 or silent <= 1.5 * self.cfg.keepalive_s - 2 * self._tick:
            return
        sock = self.client.socket()
        if not isinstance(sock, socket.socket):  # ssl.SSLSocket is one too; a websocket wrapper is not
            return
        log.warning("MQTT broker %s:%s silent for %.1f s (1.5 x keepalive): the link is dead; reconnecting",
                    self.host, self.port, silent)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        self._readable()  # paho reads the end of the stream and handles the lost connection

    # ---- consumer side -----------------------------------------------------------------------------------
    async def batches(self, max_batch: int = 2000) -> list[Inbound]:
        """Wait for messages and take up to `max_batch` of them."""
        queue = self._queue
        batch = await take_batch(queue, self._ready, max_batch)
        if len(batch) + len(queue) > self.window:
            self.window = len(batch) + len(queue)
        self._resume()
        self.metrics.queue_depth.set(len(queue))
        return batch

    def ack_every(self, _batch_size: int) -> int:
        """How many applied messages to acknowledge at a time (`ack_step` of the widest window seen)."""
        return ack_step(self.window)

    def ack(self, items: list[Inbound]) -> None:
        """Acknowledge processed QoS 1 messages to the broker: in one write with those held, once they make a group
        (`ack_every`); fewer are held for the next group, at most ACK_LINGER_S. None while disconnected: the
        broker redelivers those, and nothing may precede the CONNECT of the next connection."""
        if not self._connected:
            return
        held = self._held
        held.extend([i.mid for i in items if i.qos == 1])
        if len(held) >= ack_step(self.window):
            self._send_acks()
        elif held and self._ack_timer is None:
            self._ack_timer = self.loop.call_later(ACK_LINGER_S, self._linger_over)

    def _linger_over(self) -> None:
        self._ack_timer = None
        self._send_acks()

    def _send_acks(self) -> None:
        mids, self._held = self._held, []
        if mids and self._connected:
            self.client.ack_many(mids)
            self._after_io()  # a write that would block waits for the socket; a failed one closed it

    def thread_alive(self) -> bool:
        """Independent liveness: the task driving the connection is running (it must never end while open)."""
        return self._task is not None and not self._task.done()

    async def __aenter__(self) -> MqttIngest:
        self.client.connect_async(self.host, self.port, keepalive=self.cfg.keepalive_s)
        self._task = asyncio.create_task(self._run(), name="mqtt")
        self._task.add_done_callback(self._ended)
        return self

    def _ended(self, task: asyncio.Task[None]) -> None:
        # The collector stays up but not ready (thread_alive): say why, with the traceback, once.
        if not task.cancelled() and task.exception() is not None:
            log.error("MQTT connection task died; ingest stopped", exc_info=task.exception())

    async def __aexit__(self, *exc: object) -> None:
        self._closing = True
        self._failures.quiet = True
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        if self._fd >= 0:
            self._send_acks()  # applied: the broker must not send them again after a restart
            self.client.disconnect()  # written at once; paho closes the socket after the DISCONNECT
            self._after_io()
        self._unwatch()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.metrics.mqtt_connected.set(0)
