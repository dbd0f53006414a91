"""Prometheus exposition: a custom collector over the fleet state plus self-metrics, on an injected registry.

The fleet side is rendered fresh on every scrape from incrementally kept counts and the set of problem
terminals (capped): per acquirer always, per site only where something is wrong, per terminal only for problem
terminals. Its size follows problems, not the number of sites or terminals. A scrape copies what it shows on the
event loop (`take_view`, under a millisecond at 2,000 problems) and formats the text in chunks that yield to the
loop between them (`render_exposition_async`), so a scrape never stalls ingest for more than a few milliseconds.
See docs/metrics.md for the interface.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from collector import __version__
from collector.fleet.detect import CONDITIONS
from collector.fleet.protocol import REJECT_REASONS
from collector.fleet.state import BOUNDS, Active, Fleet, Terminal

__all__ = ["FleetCollector", "FleetView", "SelfMetrics", "render_exposition",
           "render_exposition_async", "render_problem_series", "take_view"]

KINDS = ("heartbeat", "status", "upstream", "txn", "other")
RESULTS = ("accepted", "rejected", "duplicate", "stale")
# Reasons the collector adds beyond the decoder's: a full unknown-terminal bound, a bug, a feed nobody configured.
EXTRA_REASONS = ("unknown_terminal_overflow", "internal_error", "unknown_acquirer")
FEED_RECORD_RESULTS = ("matched", "foreign", "unknown", "elsewhere")
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
            "posfleet_ingest_queue_depth",
            "Messages received from the broker and not yet applied (at capacity the socket is no longer read)",
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
            "unregistered terminal: ignored), unknown (a terminal id nobody knows: ignored), elsewhere (a terminal of "
            "a partition another collector owns: applied there)",
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


@dataclass(frozen=True, slots=True)
class FleetView:
    """What one scrape shows of the fleet, taken on the event loop in one cheap piece.

    The aggregates are copies bounded by acquirers and versions; the problem sites and terminals are copied as
    id lists (C-level copies) and read from the live maps while the text is formatted in chunks on the loop.
    Nothing here grows with sites or healthy terminals."""

    now: float
    acquirers: tuple[str, ...]
    acquirer_counts: dict[tuple[str, str], int]  # (acquirer, condition or pseudo-condition) -> terminals
    # Sites with at least one active condition, and the live per-site counts, read when the text is formatted
    # (on the loop, between yields): one chunk's figures are from one moment, another chunk's a moment later.
    sites: list[tuple[str, str]]
    site_counts: Mapping[tuple[str, str, str], int]
    site_changes: Mapping[tuple[str, str], int]  # problem site -> when its counts last changed (Fleet.site_changes)
    sites_dropped: int
    mass: list[tuple[str, str, str, float]]  # active mass-offline: (scope, acquirer, site, since)
    versions: list[tuple[tuple[str, str, str], int]]
    feeds: list[tuple[str, float, bool, int]]  # (acquirer, last message, stale, transactions recorded)
    registry_terminals: int
    refused: dict[str, int]
    # Problem terminal ids, and the live terminals, read when the text is formatted (on the loop, between yields):
    # copying 2,000 terminals' conditions up front cost the loop ~3 ms in one piece; a terminal whose problems
    # cleared meanwhile is left out.
    problem_ids: list[str]
    terminals: Mapping[str, Terminal]
    terminal_changes: Mapping[str, int]  # problem terminal -> when its lines last changed (Fleet.terminal_changes)
    cap: int
    problems_dropped: int
    lines: SparseLines  # the scraper's text of problem sites and terminals, kept between scrapes
    baselines: dict[str, int] = field(default_factory=dict)  # activity baselines by state
    volumes: list[tuple[str, float, bool]] = field(default_factory=list)  # (acquirer, usual per hour, drop)


def take_view(fleet: Fleet, cap: int, now: float, lines: SparseLines | None = None) -> FleetView:
    """Copy what a scrape needs, on the loop: O(acquirers + versions), plus two list copies (problem sites and
    terminals) done in C."""
    acq_counts = dict(fleet.acquirer_counts)
    with_feed = fleet.acquirers()  # the registry's and those with a feed: each has feed series
    # ... plus "unknown" once an unregistered terminal is seen: counts, but no feed (nobody may speak for it).
    acquirers = with_feed | {a for (a, c), n in acq_counts.items() if c == "_known" and n > 0}
    # Problem sites share the problem series' cap: a fleet where everything is wrong must not render every site.
    problem_sites = list(fleet.problem_sites)
    total = sum(n for (_a, c), n in acq_counts.items() if not c.startswith("_"))
    feeds = []
    for acq in sorted(with_feed):
        feed = fleet.feeds.get(acq)
        feeds.append((acq, feed.last_rx if feed else 0.0, fleet.feed_stale(acq, now), feed.txns if feed else 0))
    return FleetView(
        now=now,
        acquirers=tuple(sorted(acquirers)),
        acquirer_counts=acq_counts,
        sites=problem_sites[:cap],
        site_counts=fleet.counts,
        site_changes=fleet.site_changes,
        sites_dropped=max(0, len(problem_sites) - cap),
        mass=sorted(fleet.mass_offline()),
        versions=[(k, n) for k, n in fleet.versions.items() if n],
        feeds=feeds,
        registry_terminals=len(fleet.registry.entries),
        refused=dict(fleet.refused),
        problem_ids=list(fleet.problem),
        terminals=fleet.terminals,
        terminal_changes=fleet.terminal_changes,
        cap=cap,
        baselines={**fleet.activity.counts(), "restore_problems": fleet.activity.restore_problems},
        volumes=_every_acquirer(fleet.activity.volume_view(now), with_feed),
        problems_dropped=max(0, total - cap),
        lines=lines or SparseLines(),
    )


def _every_acquirer(volumes: list[tuple[str, float, bool]], acquirers: set[str]) -> list[tuple[str, float, bool]]:
    """The acquirers' volume rows, with a zero row for each acquirer whose feed has not been heard yet: its series
    exist from the first scrape, not from its first feed batch."""
    heard = {acq for acq, _, _ in volumes}
    return sorted([*volumes, *((acq, 0.0, False) for acq in acquirers - heard)])


# Set while a scrape's view is formatted: the collector then reads this copy instead of taking another one, so
# every family of one scrape comes from the same moment.
_VIEW: ContextVar[FleetView | None] = ContextVar("posfleet_fleet_view", default=None)


class FleetCollector(Collector):
    """Yields per-acquirer aggregates, mass-offline and feed state fresh on every scrape (bounded by acquirers)."""

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
        self.lines = SparseLines()  # problem sites' and terminals' text, formatted again only when they change
        # Partitioned collectors (collector/cluster/fleetwide.py): the fleet leader's mass-offline conditions, and
        # whether this collector exports the acquirer feed series (the leader only), instead of its own shard's.
        self.fleet_level: Callable[[], tuple[list[tuple[str, str, str, float]], bool]] | None = None

    def describe(self) -> Iterator[Metric]:
        """No static description: the registry must not call collect() at registration."""
        return iter(())

    def view(self) -> FleetView:
        """A copy of what the next scrape shows (call on the event loop)."""
        view = take_view(self.fleet, self.max_problem_series, self.clock(), self.lines)
        if self.fleet_level is not None:
            mass, feeds = self.fleet_level()
            view = replace(view, mass=mass, feeds=view.feeds if feeds else [])
        return view

    def collect(self) -> Iterator[Metric]:
        """Render the fleet view (the copy of the scrape in progress, else one taken now)."""
        view = _VIEW.get() or self.view()
        yield GaugeMetricFamily("posfleet_up", "1 while the collector serves metrics", value=1)
        info = GaugeMetricFamily("posfleet_build_info", "Build information", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        # The sparse families (per terminal, per problem site) are rendered as text by `render_sparse`: at
        # thousands of series prometheus-client's per-sample formatting alone would exceed the render budget.
        yield GaugeMetricFamily(
            "posfleet_terminal_problem_series_dropped",
            "Problem series left out of this scrape because of metrics.max_problem_series",
            value=view.problems_dropped,
        )
        yield GaugeMetricFamily(
            "posfleet_site_series_dropped",
            "Problem sites left out of this scrape because of metrics.max_problem_series",
            value=view.sites_dropped,
        )
        known = GaugeMetricFamily("posfleet_fleet_terminals", "Terminals known, per acquirer", labels=["acquirer"])
        online = GaugeMetricFamily(
            "posfleet_fleet_online_terminals", "Terminals heard from within their offline threshold, per acquirer",
            labels=["acquirer"],
        )
        shutdown = GaugeMetricFamily(
            "posfleet_fleet_shutdown_terminals", "Terminals shut down cleanly, per acquirer", labels=["acquirer"]
        )
        by_cond = GaugeMetricFamily(
            "posfleet_fleet_condition_terminals", "Terminals in each condition, per acquirer",
            labels=["acquirer", "condition"],
        )
        sites = GaugeMetricFamily(
            "posfleet_fleet_problem_sites", "Sites with at least one terminal in a condition, per acquirer",
            labels=["acquirer"],
        )
        per_acq_sites: dict[str, int] = {}
        for acq, _site in view.sites:
            per_acq_sites[acq] = per_acq_sites.get(acq, 0) + 1
        counts = view.acquirer_counts
        # Every acquirer and condition pre-initialised: a first problem is a rise, never a new series.
        for acq in view.acquirers:
            known.add_metric([acq], counts.get((acq, "_known"), 0))
            online.add_metric([acq], counts.get((acq, "_online"), 0))
            shutdown.add_metric([acq], counts.get((acq, "_shutdown"), 0))
            sites.add_metric([acq], per_acq_sites.get(acq, 0))
            for cond in CONDITIONS:
                by_cond.add_metric([acq, cond], counts.get((acq, cond), 0))
        yield known
        yield online
        yield shutdown
        yield by_cond
        yield sites

        mass = GaugeMetricFamily(
            "posfleet_fleet_mass_offline",
            "1 while a site's or an acquirer's terminals are offline together (site is empty for an acquirer)",
            labels=["scope", "acquirer", "site"],
        )
        mass_since = GaugeMetricFamily(
            "posfleet_fleet_mass_offline_since_seconds", "Unix time the mass-offline condition was raised",
            labels=["scope", "acquirer", "site"],
        )
        for scope, acq, site, since in view.mass:
            mass.add_metric([scope, acq, site], 1)
            mass_since.add_metric([scope, acq, site], since)
        yield mass
        yield mass_since

        versions = GaugeMetricFamily(
            "posfleet_fleet_app_version_terminals", "Terminals by model and software version",
            labels=["acquirer", "model", "app_version"],
        )
        for (acq, model, version), n in view.versions:
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
        for acq, last_rx, stale, txns in view.feeds:
            feed_last.add_metric([acq], last_rx)
            feed_stale.add_metric([acq], 1.0 if stale else 0.0)
            recorded.add_metric([acq], txns)
        yield feed_last
        yield feed_stale
        yield recorded
        yield from _activity_families(view)

        yield GaugeMetricFamily(
            "posfleet_registry_terminals", "Terminals in the registry", value=view.registry_terminals
        )
        refused = CounterMetricFamily(
            "posfleet_bound_refused", "Things refused by a bound on what senders choose, by bound", labels=["bound"]
        )
        # Every known bound pre-initialised, so the first refusal is a rise and not a new series.
        for bound in sorted({*BOUNDS, *view.refused}):
            refused.add_metric([bound], view.refused.get(bound, 0))
        yield refused
        sm = self.self_metrics
        yield GaugeMetricFamily(
            "posfleet_snapshot_enabled", "1 when state snapshots are configured", value=1 if sm.snapshot_enabled else 0
        )
        yield GaugeMetricFamily(
            "posfleet_snapshot_age_seconds",
            "Seconds since the last successful state snapshot (since start when none yet; 0 when disabled)",
            value=view.now - (sm.snapshot_time or self.fleet.started_at) if sm.snapshot_enabled else 0,
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


_SITE_HEADERS = (
    "# HELP posfleet_site_condition_terminals Terminals in each active condition, only sites and conditions with one\n"
    "# TYPE posfleet_site_condition_terminals gauge\n",
    "# HELP posfleet_site_terminals Terminals known, only sites with a terminal in a condition\n"
    "# TYPE posfleet_site_terminals gauge\n",
)


# Sites or terminals between two yields to the loop in `render_exposition_async`: well under 0.5 ms of work.
CHUNK = 250
_SITE_KEYS: Final = (*CONDITIONS, "_known")


class SparseLines:
    """The text of each problem site and terminal, kept from one scrape to the next and formatted again only when
    what it shows changed.

    At the series cap (5,000 problems on 2,000 sites) formatting took ~22 ms of every scrape: a scraper asking
    every 0.25 s (the peer benchmark's) spent a tenth of a core on it. Each site's and terminal's lines are kept
    with when what they show last changed (`Fleet.site_changes` and `Fleet.terminal_changes`: a running number
    the fleet moves on every count, condition or label change), so a scrape only looks that number up for each.
    Only what the last scrapes showed is kept: at most twice the sites and terminals of one scrape, so the series
    cap bounds it too.
    """

    def __init__(self) -> None:
        # (acquirer, site) -> (when its counts last changed, condition lines, known line)
        self._sites: dict[tuple[str, str], tuple[int, bytes, bytes]] = {}
        # terminal id -> (when its lines last changed, the terminal object, problem lines, since lines): a restored
        # or adopted terminal is a new object
        self._terminals: dict[str, tuple[int, Terminal, bytes, bytes]] = {}

    def site(self, acq: str, site: str, counts: Mapping[tuple[str, str, str], int], changed: int | None
             ) -> tuple[bytes, bytes]:
        """The site's `posfleet_site_condition_terminals` lines and its `posfleet_site_terminals` line; `changed`
        is when its counts last changed (`Fleet.site_changes`)."""
        kept = self._sites.get((acq, site))
        if kept is not None and changed is not None and kept[0] == changed:
            return kept[1], kept[2]
        values = [counts.get((acq, site, c), 0) for c in _SITE_KEYS]
        head = f'{{acquirer="{_v(acq)}",site="{_v(site)}"'
        conds = "".join(f'posfleet_site_condition_terminals{head},condition="{cond}"}} {n}\n'
                        for cond, n in zip(CONDITIONS, values, strict=False) if n > 0).encode()
        known = f"posfleet_site_terminals{head}}} {values[-1]}\n".encode()
        if changed is not None:
            self._sites[(acq, site)] = (changed, conds, known)
        return conds, known

    def terminal(self, tid: str, t: Terminal, changed: int | None) -> tuple[bytes, bytes]:
        """The terminal's `posfleet_terminal_problem` and `..._since_seconds` lines, one per active condition;
        `changed` is when they last changed (`Fleet.terminal_changes`)."""
        kept = self._terminals.get(tid)
        if kept is not None and changed is not None and kept[0] == changed and kept[1] is t:
            return kept[2], kept[3]
        problem, since = _terminal_lines(tid, t, (t.conds or {}).items())
        if changed is not None:
            self._terminals[tid] = (changed, t, problem, since)
        return problem, since

    def terminals(self) -> set[str]:
        """The terminals whose text is kept."""
        return set(self._terminals)

    def keep_only(self, sites: list[tuple[str, str]], tids: list[str]) -> None:
        """Forget what this scrape did not show, once more than twice as much is kept."""
        if len(self._sites) > 2 * len(sites) + CHUNK:
            kept_sites = self._sites
            self._sites = {k: kept_sites[k] for k in sites if k in kept_sites}
        if len(self._terminals) > 2 * len(tids) + CHUNK:
            kept = self._terminals
            self._terminals = {tid: kept[tid] for tid in tids if tid in kept}


def _terminal_lines(tid: str, t: Terminal, conds: Iterable[tuple[str, Active]]) -> tuple[bytes, bytes]:
    head = (
        f'{{terminal_id="{_v(tid)}",merchant_id="{_v(t.merchant)}",acquirer="{_v(t.acquirer)}",'
        f'site="{_v(t.site)}",model="{_v(t.model or "")}",condition="'
    )
    problem = since = ""  # a terminal has one or two conditions: adding strings beats a list and a join
    for cond, a in conds:
        problem += (f'posfleet_terminal_problem{head}{_v(cond)}",severity="{_v(a.severity)}",'
                    f'detail="{_v(a.detail)}"}} 1\n')
        since += (f'posfleet_terminal_problem_since_seconds{{terminal_id="{_v(tid)}",condition="{_v(cond)}"}} '
                  f"{a.since:.3f}\n")
    return problem.encode(), since.encode()


def _sparse_chunks(view: FleetView, out: list[bytes]) -> Iterator[None]:
    """Append the families whose size follows problems to `out` as text, yielding every CHUNK items.

    Per problem site, then per problem terminal. `..._since_seconds` carries only `terminal_id` and `condition`
    (join it to `posfleet_terminal_problem` for the rest): the full label set twice per problem would put 2,000
    problems alone near the 1 MB budget."""
    conds, known = [_SITE_HEADERS[0].encode()], [_SITE_HEADERS[1].encode()]
    counts, changes, lines = view.site_counts, view.site_changes, view.lines
    for i, (acq, site) in enumerate(view.sites, 1):
        site_conds, site_known = lines.site(acq, site, counts, changes.get((acq, site)))
        conds.append(site_conds)
        known.append(site_known)
        if i % CHUNK == 0:
            yield
    problem, since = [_HEADER.encode()], [_SINCE_HEADER.encode()]
    emitted, cap, terminals, changes_t = 0, view.cap, view.terminals, view.terminal_changes
    shown = []
    for i, tid in enumerate(view.problem_ids, 1):
        t = terminals.get(tid)
        if t is None or not t.conds:
            continue
        active = t.conds
        if emitted + len(active) > cap:  # the last terminal within the cap: the conditions that fit, not kept
            text, since_text = _terminal_lines(tid, t, list(active.items())[: cap - emitted])
            problem.append(text)
            since.append(since_text)
            break
        text, since_text = lines.terminal(tid, t, changes_t.get(tid))
        problem.append(text)
        since.append(since_text)
        shown.append(tid)
        emitted += len(active)
        if emitted >= cap:
            break
        if i % CHUNK == 0:
            yield
    lines.keep_only(view.sites, shown)
    out.extend((b"".join(conds), b"".join(known), b"".join(problem), b"".join(since)))


def render_sparse(view: FleetView) -> bytes:
    """The families whose size follows problems (problem sites and terminals), as text."""
    out: list[bytes] = []
    for _ in _sparse_chunks(view, out):
        pass
    return b"".join(out)


def render_problem_series(fleet: Fleet, cap: int) -> str:
    """The sparse families of the fleet as it is now (problem sites and terminals, capped), as text."""
    return render_sparse(take_view(fleet, cap, time.time())).decode()


def _head(registry: CollectorRegistry, view: FleetView) -> bytes:
    token = _VIEW.set(view)
    try:
        return generate_latest(registry)
    finally:
        _VIEW.reset(token)


def render_exposition(registry: CollectorRegistry, view: FleetView) -> bytes:
    """The whole /metrics body from a view, in one go."""
    return _head(registry, view) + render_sparse(view)


async def render_exposition_async(registry: CollectorRegistry, view: FleetView) -> bytes:
    """The whole /metrics body from a view, yielding to the loop every CHUNK series so ingest keeps running.

    On the loop rather than in a thread: a formatting thread holds the GIL for up to the switch interval (5 ms)
    every time the loop wants it back, and the loop wants it back on every socket call; measured, that stalled
    the loop 3x longer than rendering here in small chunks (docs/performance.md)."""
    await asyncio.sleep(0)  # the copy was one step already
    head = _head(registry, view)  # self-metrics and per-acquirer families: bounded, ~1 ms
    await asyncio.sleep(0)
    out: list[bytes] = [head]
    for _ in _sparse_chunks(view, out):
        await asyncio.sleep(0)
    return b"".join(out)


def _activity_families(view: FleetView) -> Iterator[Metric]:
    """Activity baselines (collector.fleet.activity): terminals by baseline state, and per acquirer its usual
    volume now and acquirer_volume_drop. Both states and every feed are always present (no new series later)."""
    baselines = GaugeMetricFamily(
        "posfleet_activity_baselines", "Terminals by activity baseline state (learning: not evaluated yet)",
        labels=["state"],
    )
    for state in ("evaluated", "learning"):
        baselines.add_metric([state], view.baselines.get(state, 0))
    yield baselines
    yield GaugeMetricFamily(
        "posfleet_activity_baseline_restore_problems",
        "Snapshot baselines that could not be used at start (a corrupt or mismatched buffer: learned again)",
        value=view.baselines.get("restore_problems", 0),
    )
    usual = GaugeMetricFamily(
        "posfleet_acquirer_volume_usual_per_hour", "Transactions the acquirer's feed usually records per hour now",
        labels=["acquirer"],
    )
    drop = GaugeMetricFamily(
        "posfleet_acquirer_volume_drop",
        "1 when the acquirer's feed, still arriving, records far fewer transactions than usual (acquirer_volume_drop)",
        labels=["acquirer"],
    )
    for acq, per_hour, dropped in view.volumes:
        usual.add_metric([acq], per_hour)
        drop.add_metric([acq], 1.0 if dropped else 0.0)
    yield usual
    yield drop
