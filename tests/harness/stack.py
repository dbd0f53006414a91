"""deploy/single-host.sh driven from tests: run it, read its PIDs, the port arguments for a free-port stack."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.harness.core import ROOT

SCRIPT = ROOT / "deploy" / "single-host.sh"


def script(prefix: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run deploy/single-host.sh with a prefix and arguments."""
    return subprocess.run(
        ["bash", str(SCRIPT), "--prefix", str(prefix), *args], capture_output=True, text=True, timeout=timeout
    )


def stack_pids(prefix: Path) -> dict[str, int]:
    """The PIDs the script recorded, by service."""
    return {p.stem: int(p.read_text()) for p in (prefix / "run").glob("*.pid")}


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; it is reaped by init, not by us.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def port_args(ports: dict[str, int]) -> list[str]:
    """The script's arguments for a stack on the given free ports."""
    return [
        "--bind",
        "127.0.0.1",
        "--mqtt-bind",
        "127.0.0.1",
        "--mqtt-port",
        str(ports["mqtt"]),
        "--mqtt-gateway-port",
        str(ports["gateway"]),
        "--collector-port",
        str(ports["collector"]),
        "--prometheus-port",
        str(ports["prometheus"]),
        "--alertmanager-port",
        str(ports["alertmanager"]),
        "--vm-port",
        str(ports["vm"]),
        "--scrape-interval",
        "1s",
        "--timeout",
        "60",
    ]
