"""Connection failures are logged at once, then at most one line per period with the count left out."""

from __future__ import annotations

import logging

import pytest

from collector.ingest.mqtt import FailureLog, PahoLog


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_failure_logs_then_one_line_per_period(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    flog = FailureLog(logging.getLogger("t.mqtt"), "broker:8883", period_s=30, clock=clock)
    with caplog.at_level(logging.WARNING, logger="t.mqtt"):
        assert flog.failed("connect failed: %s", "refused")
        for _ in range(9):
            clock.now += 1
            assert not flog.failed("connect failed: %s", "refused")
        clock.now += 21  # 30 s after the first line
        assert flog.failed("connect failed: %s", "refused")
    assert [r.getMessage() for r in caplog.records] == [
        "connect failed: refused", "connect failed: refused (+9 more failures not logged)"]
    assert flog.failures == 11


def test_success_resets_so_the_next_failure_logs_at_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    flog = FailureLog(logging.getLogger("t.mqtt"), "b:1", period_s=30, clock=clock)
    flog.failed("x")
    flog.failed("x")
    assert flog.succeeded() == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t.mqtt"):
        assert flog.failed("again")
    assert [r.getMessage() for r in caplog.records] == ["again"]


def test_paho_error_lines_share_the_limit_and_are_silent_while_closing(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    flog = FailureLog(logging.getLogger("t.mqtt"), "b:1", period_s=30, clock=clock)
    paho = PahoLog(flog)  # what paho's enable_logger() calls: log(level, fmt, *args)
    with caplog.at_level(logging.DEBUG, logger="t.mqtt"):
        paho.log(logging.DEBUG, "Received PUBLISH (d%d, q%d)", 0, 1)  # debug lines are not failures
        paho.log(logging.ERROR, "failed to receive on socket: %s", "[SSL] certificate required")
        paho.log(logging.ERROR, "failed to receive on socket: again")
        flog.quiet = True
        clock.now += 60
        paho.log(logging.ERROR, "Client is not connected")
    assert [r.getMessage() for r in caplog.records] == [
        "MQTT b:1: failed to receive on socket: [SSL] certificate required"]
    assert flog.failures == 2
