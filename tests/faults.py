"""Fault injection for the reliability matrix (docs/reliability.md): real sockets, real files, no mocks.

- `BlackholeProxy`: a TCP proxy that can stop forwarding both ways while keeping every socket open, the way a
  NAT box that lost its state or a dead cellular link looks to both ends (a half-open connection).
- `LineSink`: a stand-in for InfluxDB's /api/v2/write that can answer normally, slowly or never, and records
  every heartbeat `seq` the collector wrote: the collector's own account of what it applied, per terminal.
- `tmpfs` / `fill_disk`: a small filesystem that can be filled to the last byte and emptied again.
- `deploy_persistence` / `restart_mosquitto`: the tests' Mosquitto with the persistence the deploy/ config uses.
- Readers of the collector's process and /metrics: RSS, series count, one sample.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.core import ROOT, Process, free_port, start_mosquitto, terminal_views, wait_until

__all__ = [
    "BlackholeProxy",
    "ConditionWatch",
    "LineSink",
    "deploy_persistence",
    "fill_disk",
    "lost_and_extra",
    "metric_sample",
    "metric_sum",
    "publish_all",
    "restart_mosquitto",
    "rss_bytes",
    "series_count",
    "start_deploy_mosquitto",
    "tmpfs",
]


# -- a link that can go silent ---------------------------------------------------------------------------------


class BlackholeProxy:
    """TCP proxy 127.0.0.1:port -> target; `blackhole()` stops forwarding (sockets stay open), `restore()` resumes.

    While black-holed nothing is read or written on either side, so neither end sees an error, a FIN or a RST:
    only an application-level keepalive can tell. New connections are accepted and held the same way.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._flowing = threading.Event()
        self._flowing.set()
        self._after_pingresp = threading.Event()
        self.holed_at: float | None = None  # time.monotonic() of the last black-holing
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener.settimeout(0.2)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, name="blackhole-accept", daemon=True)]
        self._threads[0].start()

    def blackhole(self) -> None:
        """Stop forwarding in both directions now; keep every socket open."""
        self.holed_at = time.monotonic()
        self._flowing.clear()

    def blackhole_after_pingresp(self) -> None:
        """Black-hole right after the next MQTT PINGRESP reaches the client: the worst moment for a keepalive
        timer (the client just heard from the broker, so it waits a whole keepalive before asking again)."""
        self._after_pingresp.set()

    def restore(self) -> None:
        """Forward again (what was held in the kernel buffers goes through, as after a link comes back)."""
        self._flowing.set()

    @property
    def connections(self) -> int:
        """Client connections accepted so far."""
        with self._lock:
            return len(self._conns) // 2

    def close(self) -> None:
        """Stop the proxy and close every socket."""
        self._stop.set()
        self._flowing.set()
        self._listener.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> BlackholeProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()  # nothing listens behind us: refuse as the target itself would
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for src, dst, framer in ((client, upstream, None), (upstream, client, _PingrespFinder())):
                t = threading.Thread(target=self._pump, args=(src, dst, framer), name="blackhole-pump",
                                     daemon=True)
                t.start()

    def _pump(self, src: socket.socket, dst: socket.socket, framer: _PingrespFinder | None) -> None:
        sel = selectors.DefaultSelector()
        sel.register(src, selectors.EVENT_READ)
        held = b""  # bytes read but not forwarded when the hole opened mid-chunk
        try:
            while not self._stop.is_set():
                self._flowing.wait()
                if held:
                    dst.sendall(held)
                    held = b""
                if not sel.select(timeout=0.1):
                    continue
                if not self._flowing.is_set():
                    continue  # black-holed between select and recv: leave the bytes in the kernel
                data = src.recv(65536)
                if not data:
                    break
                end = framer.feed(data) if framer is not None else None
                if end is not None and self._after_pingresp.is_set():
                    self._after_pingresp.clear()
                    dst.sendall(data[:end])
                    held = data[end:]
                    self.blackhole()
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class _PingrespFinder:
    """Follows MQTT packet framing in the broker-to-client stream; `feed` returns the offset just after a PINGRESP."""

    def __init__(self) -> None:
        self.need = 0  # bytes of the current packet's body still to come
        self.header = bytearray()

    def feed(self, data: bytes) -> int | None:
        i, found = 0, None
        while i < len(data):
            if self.need:
                take = min(self.need, len(data) - i)
                i += take
                self.need -= take
                continue
            self.header.append(data[i])
            i += 1
            if len(self.header) >= 2 and not self.header[-1] & 0x80:
                length, shift = 0, 0
                for b in self.header[1:]:
                    length |= (b & 0x7F) << shift
                    shift += 7
                kind = self.header[0] >> 4
                self.header.clear()
                self.need = length
                if kind == 13 and length == 0 and found is None:
                    found = i
        return found


# -- an InfluxDB that is slow, hung, or fine -------------------------------------------------------------------

_HEARTBEAT = re.compile(rb"^heartbeat,(?:[^ ]*,)?terminal_id=([^, ]+)[^ ]* seq=(-?\d+)i", re.MULTILINE)


class LineSink:
    """A stand-in for InfluxDB's /api/v2/write on a free port: answers 204 after `delay_s`, or never (`hang`).

    Every heartbeat line it acknowledged is recorded (terminal -> Counter of seq), so a test can count what the
    collector applied and wrote, by sequence number. A request it never answers records nothing.
    """

    def __init__(self, port: int | None = None, delay_s: float = 0.0, hang: bool = False) -> None:
        self.delay_s = delay_s
        self.hang = hang
        self.requests = 0
        self.answered = 0
        self._seqs: dict[str, Counter[int]] = {}
        self._lock = threading.Lock()
        self._release = threading.Event()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink._lock:
                    sink.requests += 1
                if sink.hang:
                    sink._release.wait()  # never answers until the sink is closed
                    return
                if sink.delay_s:
                    time.sleep(sink.delay_s)
                sink._record(body)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port or free_port()), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="line-sink", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The `influx.url` to configure."""
        return f"http://127.0.0.1:{self.port}"

    def _record(self, body: bytes) -> None:
        with self._lock:
            self.answered += 1
            for tid, seq in _HEARTBEAT.findall(body):
                self._seqs.setdefault(tid.decode(), Counter())[int(seq)] += 1

    def heartbeat_seqs(self) -> dict[str, Counter[int]]:
        """terminal -> how many times each seq was written (acknowledged writes only)."""
        with self._lock:
            return {t: Counter(c) for t, c in self._seqs.items()}

    def close(self) -> None:
        """Stop serving, release hung requests, free the port."""
        self._release.set()
        self._server.shutdown()
        self._server.server_close()


def lost_and_extra(
    sent: dict[str, list[tuple[int, float]]], seen: dict[str, Counter[int]]
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Heartbeats sent (simulator's seq log) but never seen, and seen more than once, per terminal."""
    lost: dict[str, list[int]] = {}
    extra: dict[str, list[int]] = {}
    for tid, seqs in sent.items():
        want = Counter(s for s, _ in seqs)
        got = seen.get(tid, Counter())
        if missing := sorted((want - got).elements()):
            lost[tid] = missing
        if dup := sorted((got - want).elements()):
            extra[tid] = dup
    return lost, extra


# -- a disk that fills up --------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted at `path` (root only: otherwise the test is skipped, saying why)."""
    if os.geteuid() != 0:
        pytest.skip("disk-full tests mount a small tmpfs, which needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(directory: Path) -> Path:
    """Fill the filesystem holding `directory` to the last byte; delete the returned file to free it."""
    filler = directory / ".filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to fail at close
        for size in (len(chunk), 4096, 1):  # then the last partial blocks
            with contextlib.suppress(OSError):
                while True:
                    fh.write(chunk[:size])
    return filler


# -- Mosquitto as deployed -------------------------------------------------------------------------------------

_PERSISTENCE_KEYS = ("persistence", "autosave_interval", "autosave_on_changes", "max_queued_messages",
                     "max_inflight_messages")


def deploy_persistence() -> dict[str, str]:
    """The persistence and queue settings of deploy/mosquitto/mosquitto.conf (what production runs)."""
    out = {}
    for line in (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key in _PERSISTENCE_KEYS:
            out[key] = value.strip()
    return out


def _apply_deploy_persistence(broker: Process) -> None:
    """Rewrite the tests' config with the deploy values and make Mosquitto reload it (SIGHUP; all reloadable)."""
    conf = broker.workdir / "mosquitto.conf"
    deploy = deploy_persistence()
    kept = [line for line in conf.read_text().splitlines() if line.partition(" ")[0] not in deploy]
    conf.write_text("\n".join([*kept, *(f"{k} {v}" for k, v in deploy.items())]) + "\n")
    offset = broker.log.stat().st_size
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b"Reloading config" in broker.log.read_bytes()[offset:], 10, "mosquitto to reload its config")


def start_deploy_mosquitto() -> Process:
    """tests.harness.core.start_mosquitto, switched to deploy/'s persistence (autosave_interval 60), in a directory
    the broker can write: run as root, Mosquitto drops to its own user, which cannot enter pytest's 0700 temp
    dirs, so its database would never be saved. Remove `broker.workdir` when done."""
    workdir = Path(tempfile.mkdtemp(prefix="posfleet-broker-"))
    workdir.chmod(0o777)
    broker = start_mosquitto(workdir)
    _apply_deploy_persistence(broker)
    return broker


def restart_mosquitto(broker: Process, sig: int) -> Process:
    """Stop the broker with `sig` (SIGTERM saves its database, SIGKILL does not) and start it again, same port."""
    broker.stop(sig)
    again = start_mosquitto(broker.workdir, broker.port)
    _apply_deploy_persistence(again)
    return again


# -- reading the collector -------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text: str = r.read().decode()
    return text


def series_count(port: int) -> tuple[int, int]:
    """(number of series, bytes) of the collector's /metrics."""
    text = _metrics_text(port)
    return sum(1 for line in text.splitlines() if line and not line.startswith("#")), len(text.encode())


def metric_sample(port: int, name: str, **labels: str) -> float:
    """One sample of /metrics by name and exact labels; fails when the series is missing."""
    for family in text_string_to_metric_families(_metrics_text(port)):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


class ConditionWatch:
    """Polls the API in a thread and remembers every condition any of `tids` showed, for as long as it runs."""

    def __init__(self, port: int, tids: Iterable[str], step: float = 0.5) -> None:
        self.port, self.tids, self.step = port, set(tids), step
        self.seen: dict[str, set[str]] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="condition-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                for tid, view in terminal_views(self.port).items():
                    if tid in self.tids and view["conditions"]:
                        self.seen.setdefault(tid, set()).update(c["condition"] for c in view["conditions"])
                self.polls += 1
            self._stop.wait(self.step)

    def __enter__(self) -> ConditionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def metric_sum(port: int, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (e.g. every result of one kind)."""
    total = 0.0
    for family in text_string_to_metric_families(_metrics_text(port)):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- floods -----------------------------------------------------------------------------------------------------


def publish_all(broker_port: int, messages: Iterable[tuple[str, bytes]], qos: int = 1,
                pace_per_s: float | None = None) -> int:
    """Publish (topic, payload) pairs from one client, each PUBACKed by the broker before this returns (QoS 1),
    optionally paced to `pace_per_s`; returns how many were published."""
    window = 10_000  # paho's message ids are 16 bits: never have more than this outstanding
    room = threading.Semaphore(window)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-{os.getpid()}-{time.monotonic_ns()}",
                         protocol=paho.MQTTv311)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.on_publish = lambda *_args: room.release()
    client.connect("127.0.0.1", broker_port, keepalive=30)
    client.loop_start()
    n = 0
    started = time.monotonic()
    try:
        for topic, payload in messages:
            if not room.acquire(timeout=60):
                raise TimeoutError("the broker stopped acknowledging the flood")
            info = client.publish(topic, payload, qos=qos)
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                raise RuntimeError(f"publish refused by paho: {paho.error_string(info.rc)}")
            if qos == 0:
                room.release()
            n += 1
            if pace_per_s and n % 50 == 0:
                ahead = n / pace_per_s - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        for _ in range(window):
            if not room.acquire(timeout=60):
                raise TimeoutError("the broker stopped acknowledging the flood")
    finally:
        client.disconnect()
        client.loop_stop()
    return n
