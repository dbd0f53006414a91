"""Helpers shared by the support, access, card-data and browser integration tests (no tests here): a real
Mosquitto (the `mosquitto` fixture), a real collector process with API tokens, and the simulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from collector.sim.simulator import Simulator, TerminalSpec
from tests.harness.core import ROOT, Process, free_port, http_get, start_collector, write_collector_config

TOKENS = {
    "all": "tok-all-0123456789abcdef",
    "a": "tok-acq-a-0123456789abcdef",
    "b": "tok-acq-b-0123456789abcdef",
    "ab": "tok-acq-ab-0123456789abcdef",
    "writer": "tok-writer-0123456789abcdef",
}
ENV_TOKEN = "tok-env-acq-a-0123456789abcdef"  # read:acq-a, from POSFLEET_API_TOKENS instead of the file


def start_stack(tmp_path: Path, mqtt_port: int, sim: Simulator, **overrides: Any) -> Process:
    """Registry from the simulator, a tokens file, and the collector process on a free port."""
    sim.write_registry(tmp_path / "terminals.csv")
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(
        f"# test tokens\n{TOKENS['all']} read:*\n{TOKENS['a']} read:acq-a\n{TOKENS['b']} read:acq-b\n"
        f"{TOKENS['ab']} read:acq-a,read:acq-b\n{TOKENS['writer']} write:upstream\n"
    )
    http_port = free_port()
    config = write_collector_config(tmp_path, mqtt_port, http_port, http={"tokens_file": str(tokens_file)},
                                    **overrides)
    return start_collector(tmp_path, config, http_port, env={"POSFLEET_API_TOKENS": f"{ENV_TOKEN} read:acq-a"})


def get_json(port: int, path: str, token: str | None = TOKENS["all"]) -> Any:
    """GET requiring 200."""
    status, body = http_get(f"http://127.0.0.1:{port}{path}", token)
    if status != 200:
        raise AssertionError(f"GET {path} -> {status}: {body[:300]!r}")
    return json.loads(body)


def post(port: int, path: str, body: bytes, token: str | None) -> tuple[int, bytes]:
    """POST returning (status, body) for any status."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def run_cli(*args: str, token: str | None = None, token_file: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`posfleet ARGS` as a subprocess; the token only through a file or the environment."""
    env = {k: v for k, v in os.environ.items() if k != "POSFLEET_TOKEN"}
    if token is not None:
        env["POSFLEET_TOKEN"] = token
    cmd = [sys.executable, "-m", "collector.cli", *args]
    if token_file is not None:
        cmd += ["--token-file", str(token_file)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def all_heard(port: int, specs: list[TerminalSpec]) -> bool:
    """True once every terminal has sent a heartbeat."""
    page = get_json(port, "/api/v1/terminals?all=1&limit=1000")
    heard = {t["terminal_id"] for t in page["terminals"] if t["last_heartbeat_received"]}
    return heard >= {s.tid for s in specs}
