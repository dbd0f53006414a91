"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Process, start_mosquitto


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Process]:
    """A real Mosquitto on a free loopback port, for one test."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()
