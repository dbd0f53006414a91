"""Prometheus exposition: a custom collector over the fleet state plus self-metrics, on an injected registry.

The fleet side is rendered fresh on every scrape from incrementally kept counts and the set of problem
terminals (capped), so its cost does not grow with the fleet. See docs/metrics.md for the interface.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .protocol import REJECT_REASONS
from .state import BOUNDS, Fleet

__all__ = ["FleetCollector", "SelfMetrics"]

KINDS = ("heartbeat", "status", "upstream", "txn", "other")
RESULTS = ("accepted", "rejected", "duplicate", "stale")
# Reasons the collector adds beyond the decoder's: a full unknown-terminal bound, a bug, a feed nobody configured.
EXTRA_REASONS = ("unknown_terminal_overflow", "internal_error", "unknown_acquirer")
FEED_RECORD_RESULTS = ("matched", "foreign", "unknown")
SNAPSHOT_SOURCES = ("current", "previous", "empty")
TASKS = ("consume", "tick", "snapshot", "registry")  # the supervised background tasks (collector/app.py)
PROBLEM_LABELS = ["terminal_id", "merchant_id", "acquirer", "site", "model", "condition", "severity", "detail"]


class SelfMetrics:
    """The collector's own health, every label value pre-initialised to 0."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.mqtt_connected = Gauge(
            "posfleet_mqtt_connected", "1 when connected to the broker and subscribed", registry=registry
        )
        self.mqtt_connects = Counter(
            "posfleet_mqtt_connects", "Successful (re)connections to the broker", registry=registry
        )
        self.mqtt_last_message = Gauge(
            "posfleet_mqtt_last_message_seconds", "Unix time of the last message from the broker", registry=registry
        )
        self.messages = Counter(
            "posfleet_messages", "Messages by kind and result", ["kind", "result"], registry=registry
        )
        self.rejected = Counter(
            "posfleet_messages_rejected", "Rejected messages by reason", ["reason"], registry=registry
        )
        self.queue_depth = Gauge(
            "posfleet_ingest_queue_depth", "Messages waiting between the MQTT thread and the loop", registry=registry
        )
        self.queue_overflows = Counter(
            "posfleet_ingest_queue_overflows",
            "Messages queued beyond capacity after waiting keepalive/3 for room: the loop is falling behind",
            registry=registry,
        )
        self.queue_capacity = Gauge(
            "posfleet_ingest_queue_capacity", "Capacity of the ingest queue", registry=registry
        )
        self.snapshot_time = 0.0
        self.snapshot_enabled = False
        self.snapshot_failures = Counter(
            "posfleet_snapshot_failures", "Failed state snapshot writes", registry=registry
        )
        self.registry_reloads = Counter(
            "posfleet_registry_reloads", "Registry reloads by result", ["result"], registry=registry
        )
        self.feed_records = Counter(
            "posfleet_feed_records",
            "Acquirer feed records by result: matched (the acquirer's own terminal), foreign (another acquirer's or an "
            "unregistered terminal: ignored), unknown (a terminal id nobody knows: ignored)",
            ["result"], registry=registry,
        )
        for result in FEED_RECORD_RESULTS:
            self.feed_records.labels(result)
        self.snapshot_restore = Gauge(
            "posfleet_snapshot_restore",
            "1 for the snapshot generation the state was restored from at start: current, previous or empty",
            ["source"], registry=registry,
        )
        self.snapshot_corrupt_files = Gauge(
            "posfleet_snapshot_corrupt_files",
            "Corrupt snapshot files set aside next to the snapshot (<path>.corrupt-*), waiting for a person",
            registry=registry,
        )
        self.task_restarts = Counter(
            "posfleet_task_restarts", "Background tasks restarted after dying with an exception", ["task"],
            registry=registry,
        )
        self.clock_jumps = Counter(
            "posfleet_clock_jumps", "Steps of the host's wall clock beyond the tolerance, by direction",
            ["direction"], registry=registry,
        )
        for kind in KINDS:
            for result in RESULTS:
                self.messages.labels(kind, result)
        for reason in (*REJECT_REASONS, *EXTRA_REASONS):
            self.rejected.labels(reason)
        for result in ("ok", "error"):
            self.registry_reloads.labels(result)
        for source in SNAPSHOT_SOURCES:
            self.snapshot_restore.labels(source)
        for task in TASKS:
            self.task_restarts.labels(task)
        for direction in ("forward", "backward"):
            self.clock_jumps.labels(direction)


class FleetCollector(Collector):
    """Yields fleet aggregates and problem series fresh on every scrape."""

    def __init__(
        self,
        fleet: Fleet,
        self_metrics: SelfMetrics,
        max_problem_series: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.self_metrics = self_metrics
        self.max_problem_series = max_problem_series
        self.clock = clock

    def describe(self) -> Iterator[Metric]:
        """No static description: the registry must not call collect() at registration."""
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Render the fleet view."""
        fleet, now = self.fleet, self.clock()
        yield GaugeMetricFamily("posfleet_up", "1 while the collector serves metrics", value=1)
        info = GaugeMetricFamily("posfleet_build_info", "Build information", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        # The per-terminal problem families are rendered by `render_problem_series` (text, not objects): at
        # thousands of series prometheus-client's per-sample formatting alone would exceed the 100 ms budget.
        active = sum(n for (_a, _s, c), n in fleet.counts.items() if not c.startswith("_"))
        yield GaugeMetricFamily(
            "posfleet_terminal_problem_series_dropped",
            "Problem series left out of this scrape because of metrics.max_problem_series",
            value=max(0, active - self.max_problem_series),
        )

        known = GaugeMetricFamily("posfleet_fleet_terminals", "Terminals known", labels=["acquirer", "site"])
        online = GaugeMetricFamily(
            "posfleet_fleet_online_terminals", "Terminals heard from within their offline threshold",
            labels=["acquirer", "site"],
        )
        shutdown = GaugeMetricFamily(
            "posfleet_fleet_shutdown_terminals", "Terminals shut down cleanly", labels=["acquirer", "site"]
        )
        by_cond = GaugeMetricFamily(
            "posfleet_fleet_condition_terminals", "Terminals in each condition",
            labels=["acquirer", "site", "condition"],
        )
        pseudo = {"_known": known, "_online": online, "_shutdown": shutdown}
        sites: set[tuple[str, str]] = set()
        for (acq, site, cond), n in fleet.counts.items():
            family = pseudo.get(cond)
            if family is not None:
                family.add_metric([acq, site], n)
            else:
                by_cond.add_metric([acq, site, cond], n)
            sites.add((acq, site))
        for acq, site in sites:
            for cond, family in pseudo.items():
                if (acq, site, cond) not in fleet.counts:
                    family.add_metric([acq, site], 0)
        yield known
        yield online
        yield shutdown
        yield by_cond

        versions = GaugeMetricFamily(
            "posfleet_fleet_app_version_terminals", "Terminals by model and software version",
            labels=["acquirer", "model", "app_version"],
        )
        for (acq, model, version), n in fleet.versions.items():
            if n:
                versions.add_metric([acq, model, version], n)
        yield versions

        feed_last = GaugeMetricFamily(
            "posfleet_acquirer_feed_last_message_seconds", "Unix receive time of the feed's last message",
            labels=["acquirer"],
        )
        feed_stale = GaugeMetricFamily(
            "posfleet_acquirer_feed_stale", "1 when the acquirer's feed is silent too long", labels=["acquirer"]
        )
        recorded = CounterMetricFamily(
            "posfleet_acquirer_txns_recorded", "Transactions the acquirer reported recorded", labels=["acquirer"]
        )
        for acq in sorted(fleet.acquirers()):
            feed = fleet.feeds.get(acq)
            feed_last.add_metric([acq], feed.last_rx if feed else 0.0)
            feed_stale.add_metric([acq], 1.0 if fleet.feed_stale(acq, now) else 0.0)
            recorded.add_metric([acq], feed.txns if feed else 0)
        yield feed_last
        yield feed_stale
        yield recorded

        yield GaugeMetricFamily(
            "posfleet_registry_terminals", "Terminals in the registry", value=len(fleet.registry.entries)
        )
        refused = CounterMetricFamily(
            "posfleet_bound_refused", "Things refused by a bound on what senders choose, by bound", labels=["bound"]
        )
        # Every known bound pre-initialised, so the first refusal is a rise and not a new series.
        counts = fleet.refused
        for bound in sorted({*BOUNDS, *counts}):
            refused.add_metric([bound], counts.get(bound, 0))
        yield refused
        sm = self.self_metrics
        yield GaugeMetricFamily(
            "posfleet_snapshot_enabled", "1 when state snapshots are configured", value=1 if sm.snapshot_enabled else 0
        )
        yield GaugeMetricFamily(
            "posfleet_snapshot_age_seconds",
            "Seconds since the last successful state snapshot (since start when none yet; 0 when disabled)",
            value=now - (sm.snapshot_time or fleet.started_at) if sm.snapshot_enabled else 0,
        )


# The text format's only escapes inside a label value (backslash, double quote, line feed). Everything else,
# carriage return and Unicode line separators included, is legal as is.
_ESCAPE = str.maketrans({"\\": r"\\", '"': r"\"", "\n": r"\n"})
_HEADER = (
    "# HELP posfleet_terminal_problem 1 per terminal and active problem condition\n"
    "# TYPE posfleet_terminal_problem gauge\n"
)
_SINCE_HEADER = (
    "# HELP posfleet_terminal_problem_since_seconds Unix time the condition became active\n"
    "# TYPE posfleet_terminal_problem_since_seconds gauge\n"
)


def _v(value: str) -> str:
    """A label value escaped for the text exposition format (a no-op for the usual plain ids)."""
    return value.translate(_ESCAPE) if ("\\" in value or '"' in value or "\n" in value) else value


def render_problem_series(fleet: Fleet, cap: int) -> str:
    """`posfleet_terminal_problem` and `..._since_seconds` in the text exposition format, capped."""
    problem, since = [_HEADER], [_SINCE_HEADER]
    emitted = 0
    terminals = fleet.terminals
    for tid in fleet.problem:
        t = terminals[tid]
        if t.conds is None:
            continue
        head = (
            f'{{terminal_id="{_v(tid)}",merchant_id="{_v(t.merchant)}",acquirer="{_v(t.acquirer)}",'
            f'site="{_v(t.site)}",model="{_v(t.model or "")}",condition="'
        )
        for cond, active in t.conds.items():
            if emitted >= cap:
                break
            labels = f'{head}{_v(cond)}",severity="{_v(active.severity)}",detail="{_v(active.detail)}"}}'
            problem.append(f"posfleet_terminal_problem{labels} 1.0\n")
            since.append(f"posfleet_terminal_problem_since_seconds{labels} {active.since!r}\n")
            emitted += 1
        if emitted >= cap:
            break
    return "".join(problem) + "".join(since)
