"""Fixtures of the integration tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.core import free_port
from tests.harness.stack import alive, script, stack_pids


@pytest.fixture
def ports() -> dict[str, int]:
    names = ["mqtt", "gateway", "collector", "prometheus", "alertmanager", "vm"]
    return {name: free_port() for name in names}


@pytest.fixture
def stack_prefix(tmp_path: Path) -> Iterator[Path]:
    """A prefix whose stack is always torn down, and whose processes are killed by PID if `down` failed."""
    prefix = tmp_path / "stack"
    prefix.mkdir()
    try:
        yield prefix
    finally:
        script(prefix, "down", timeout=120)
        for pid in stack_pids(prefix).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
