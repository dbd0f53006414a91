"""Real services for tests: started on free loopback ports in temp dirs, stopped by PID, readiness polled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def require_binary(name: str, *fallbacks: str) -> str:
    """Path of a binary; fails (not skips) the test when missing: CI installs them."""
    for candidate in (name, *fallbacks, f"/usr/sbin/{name}"):
        path = shutil.which(candidate) or (candidate if os.path.exists(candidate) else None)
        if path:
            return path
    raise RuntimeError(f"{name} not found: install it (see .ci/run)")


def wait_until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition", step: float = 0.05) -> Any:
    """Poll `check` until it returns a truthy value; raise with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_err: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as err:  # the service may not be up yet
            last_err = err
        time.sleep(step)
    detail = f" (last error: {last_err})" if last_err else ""
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")


async def wait_until_async(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
                           step: float = 0.25) -> Any:
    """`wait_until` from a coroutine: `check` (often blocking HTTP) runs in a thread, the loop keeps running."""
    return await asyncio.to_thread(wait_until, check, timeout, what, step)


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET returning (status, body) for any status."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def http_json(url: str, token: str | None = None) -> Any:
    """GET and parse JSON, requiring 200."""
    status, body = http_get(url, token)
    if status != 200:
        raise AssertionError(f"GET {url} -> {status}: {body[:200]!r}")
    return json.loads(body)


def terminal_views(port: int) -> dict[str, dict[str, Any]]:
    """Every terminal this collector holds, its API view (paged; `local=1`: partitioned collectors would otherwise
    merge every collector's list)."""
    out: dict[str, dict[str, Any]] = {}
    offset = 0
    while True:
        page = http_json(f"http://127.0.0.1:{port}/api/v1/terminals?all=1&local=1&limit=1000&offset={offset}")
        for t in page["terminals"]:
            out[t["terminal_id"]] = t
        offset += page["limit"]
        if offset >= page["total"]:
            return out


@dataclass
class Process:
    """A started service process, its port (0 when it has none of its own) and its log file."""

    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    log: Path
    extra: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process (by its PID) and wait for it; SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_text(self) -> str:
        """What the process wrote so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        """Last lines of the log, for failure messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def require_alive(self) -> None:
        """Fail the test at once (not at a wait's deadline) when the process has exited."""
        if not self.alive():
            pytest.fail(f"{self.name or self.proc.args} exited with {self.proc.returncode}:\n{self.log_tail()}")


def spawn(name: str, argv: list[str], workdir: Path, port: int = 0, log: Path | None = None,
          new_session: bool = False) -> Process:
    """Start `argv` in `workdir` with stdout and stderr appended to `log` (default <workdir>/<name>.log)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = log or workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(argv, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=new_session)
    return Process(popen, port, workdir, log, name=name)


def start_mosquitto(workdir: Path, port: int | None = None) -> Process:
    """A real Mosquitto with persistence, on a free port."""
    binary = require_binary("mosquitto", "/usr/sbin/mosquitto")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        "allow_anonymous true\n"
        "persistence true\n"
        f"persistence_location {workdir}/\n"
        "autosave_interval 1\n"
        # The collector acks after processing: let more than 20 messages be in flight to it.
        "max_inflight_messages 1000\n"
        "max_queued_messages 1000000\n"
        "log_dest stderr\n"
        # As root Mosquitto drops to the `mosquitto` user, which cannot write pytest's temporary directories: every
        # persistence save would fail and broker-restart tests would not test persistence at all.
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    log = workdir / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log.open("ab"), stderr=subprocess.STDOUT)
    p = Process(proc, port, workdir, log)
    try:
        wait_until(lambda: port_open(port), 10, "mosquitto to listen")
    except TimeoutError:
        p.stop()
        raise RuntimeError(f"mosquitto did not start:\n{p.log_text()}") from None
    return p


def write_collector_config(workdir: Path, mqtt_port: int, http_port: int, **overrides: Any) -> Path:
    """A collector config for tests: fast thresholds (seconds), registry and snapshot in workdir."""
    cfg: dict[str, Any] = {
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}", "client_id": f"posfleet-test-{http_port}"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "registry": {"path": str(workdir / "terminals.csv"), "reload_interval_s": 0.5},
        "state": {"snapshot_path": str(workdir / "state.snapshot"), "snapshot_interval_s": 2, "eval_interval_s": 0.2},
        "thresholds": {
            "offline_factor": 3,
            "default_interval_s": 1,
            "backlog_queue_depth": 5,
            "backlog_oldest_age_s": 4,
            "upstream_grace_s": 4,
            "feed_stale_s": 4,
            "clock_skew_s": 300,
            "flapping_window_s": 60,
        },
        "software_policy": {"*": "3.0.0"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = workdir / "collector.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_collector(workdir: Path, config: Path, http_port: int, env: dict[str, str] | None = None) -> Process:
    """The collector as a real process (`posfleet run`), ready when /healthz answers."""
    log = workdir / "collector.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector.cli", "run", "--config", str(config)],
        cwd=ROOT,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    p = Process(proc, http_port, workdir, log)
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{http_port}/readyz")[0] == 200, 20, "collector ready")
    except TimeoutError:
        p.stop()
        raise RuntimeError(f"collector did not become ready:\n{p.log_text()}") from None
    return p


@contextlib.contextmanager
def running(p: Process) -> Iterator[Process]:
    """Stop the process when the block ends."""
    try:
        yield p
    finally:
        p.stop()
