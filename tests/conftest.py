"""Shared fixtures: real services on free loopback ports, each stopped after its test (tests/harness/)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.alerting import WebhookSink, start_alertmanager, write_alertmanager_config
from tests.harness.core import Process, start_mosquitto
from tests.harness.nats import NatsCluster
from tests.harness.tsdb import InfluxD, VictoriaMetrics


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Process]:
    """A real Mosquitto on a free loopback port, for one test."""
    broker = start_mosquitto(tmp_path / "mosquitto")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A three-node NATS JetStream cluster (MQTT gateway, 16 partitions, streams POSP and FEED with 3 replicas)."""
    with NatsCluster(tmp_path / "nats", partitions=16) as cluster:
        try:
            yield cluster
        finally:
            cluster.report()  # log paths and tails: pytest shows them when the test failed


@pytest.fixture(name="webhook_sink")
def webhook_sink_fixture() -> Iterator[WebhookSink]:
    """A webhook receiver for Alertmanager notifications."""
    sink = WebhookSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(name="alertmanager")
def alertmanager_fixture(tmp_path: Path, webhook_sink: WebhookSink) -> Iterator[Process]:
    """The shipped Alertmanager config, fast timers, notifying the webhook sink."""
    config = write_alertmanager_config(tmp_path / "am", webhook_sink.url)
    am = start_alertmanager(tmp_path / "am", config)
    try:
        yield am
    finally:
        am.stop()


@pytest.fixture
def victoria_metrics(tmp_path: Path) -> Iterator[VictoriaMetrics]:
    """A running VictoriaMetrics in a temp dir."""
    vm = VictoriaMetrics(tmp_path / "vm-data")
    vm.start()
    try:
        yield vm
    finally:
        vm.stop()


@pytest.fixture
def influxd(tmp_path: Path) -> Iterator[InfluxD]:
    """A running InfluxDB 1.6 in a temp dir with database `posfleet`."""
    db = InfluxD(tmp_path / "influxd")
    db.start()
    try:
        db.query("CREATE DATABASE posfleet")
        yield db
    finally:
        db.stop()
