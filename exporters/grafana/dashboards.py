"""Grafana dashboards as plain dicts: `render()` builds them, `write()`/`drift()` keep `dashboards/` in step.

Every query uses datasource variables (`${datasource}` for Prometheus, `${influx}` for InfluxDB/InfluxQL), so
the JSON imports into any Grafana. Metric names are the contract of docs/metrics.md; history measurements are
the schema of docs/storage.md. Each panel's description says which question it answers; docs/dashboards.md
is the long form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.fleet.conditions import critical_conditions
from exporters.artifacts import artifact_dir

__all__ = [
    "DASHBOARDS_DIR",
    "INFLUX_DS_UID",
    "PROMETHEUS_DS_UID",
    "TAGS",
    "drift",
    "iter_panels",
    "render",
    "render_text",
    "write",
]

Json = dict[str, Any]

# Grafana 11's dashboard schema; older Grafanas migrate it on load, newer ones accept it unchanged.
SCHEMA_VERSION = 39
TAGS = ["posfleet"]
# The repository's dashboards/ in a checkout, the copy shipped in the wheel otherwise (exporters.artifacts).
DASHBOARDS_DIR = artifact_dir(__file__, "dashboards", "shipped")
# uids of the provisioned datasources (deploy/grafana/provisioning/datasources); the variables default to them
# and fall back to the first datasource of the right type anywhere else.
PROMETHEUS_DS_UID = "posfleet-prometheus"
INFLUX_DS_UID = "posfleet-influxdb"

PROM = {"type": "prometheus", "uid": "${datasource}"}
INFLUX = {"type": "influxdb", "uid": "${influx}"}
# Per-site and per-terminal series (only where something is wrong) carry `site`; the fleet aggregates are per
# acquirer only (docs/metrics.md), so they take ACQ_SEL: a site filter cannot narrow them.
FLEET_SEL = 'acquirer=~"$acquirer",site=~"$site"'
ACQ_SEL = 'acquirer=~"$acquirer"'


def since(selector: str) -> str:
    """Seconds each problem (terminal, condition) of `selector` has been active, with the problem's labels.

    `posfleet_terminal_problem_since_seconds` carries only terminal_id and condition (it keeps /metrics small);
    the rest is joined from `posfleet_terminal_problem`, whose value is 1."""
    return (
        "time() - (posfleet_terminal_problem_since_seconds * on (job, instance, terminal_id, condition) "
        f"group_left (merchant_id, acquirer, site, model, severity, detail) posfleet_terminal_problem{{{selector}}})"
    )
# History measurements and tags (docs/storage.md).
HB = "heartbeat"


# --------------------------------------------------------------------------------------------- building blocks


def prom(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, table: bool = False) -> Json:
    """A Prometheus target; `table` makes it an instant query shown as one row per series."""
    target: Json = {"datasource": PROM, "refId": ref, "expr": expr, "legendFormat": legend or "__auto"}
    if table:
        target |= {"format": "table", "instant": True, "range": False}
    elif instant:
        target |= {"instant": True, "range": False}
    else:
        target |= {"range": True, "instant": False}
    return target


def influxql(query: str, alias: str = "", *, ref: str = "A") -> Json:
    """A raw InfluxQL target (`$timeFilter`, `$__interval` and `$terminal_id` are Grafana's to fill in)."""
    return {
        "datasource": INFLUX,
        "refId": ref,
        "query": query,
        "rawQuery": True,
        "resultFormat": "time_series",
        "alias": alias,
    }


@dataclass
class Board:
    """Accumulates panels left to right, wrapping at Grafana's 24 columns."""

    uid: str
    title: str
    description: str
    variables: list[Json]
    panels: list[Json] = field(default_factory=list)
    _x: int = 0
    _y: int = 0
    _row_h: int = 0

    def row(self, title: str) -> None:
        """Start a new (always expanded) row."""
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": len(self.panels) + 1,
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
            }
        )
        self._y += 1

    def add(self, panel: Json, size: tuple[int, int]) -> None:
        """Place a panel `size` = (columns wide, rows high)."""
        w, h = size
        if self._x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self._x, "y": self._y}
        self.panels.append(panel)
        self._x += w
        self._row_h = max(self._row_h, h)

    def _newline(self) -> None:
        self._y += self._row_h
        self._x = 0
        self._row_h = 0

    def to_json(self) -> Json:
        """The dashboard model as Grafana stores it."""
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": TAGS,
            "timezone": "utc",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "weekStart": "",
            "annotations": {"list": [_builtin_annotation()]},
            "links": [
                {
                    "type": "dashboards",
                    "title": "posfleet",
                    "tags": TAGS,
                    "asDropdown": True,
                    "includeVars": False,
                    "keepTime": True,
                    "targetBlank": False,
                    "icon": "external link",
                    "tooltip": "",
                    "url": "",
                }
            ],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


def _builtin_annotation() -> Json:
    return {
        "builtIn": 1,
        "datasource": {"type": "grafana", "uid": "-- Grafana --"},
        "enable": True,
        "hide": True,
        "iconColor": "rgba(0, 211, 255, 1)",
        "name": "Annotations & Alerts",
        "type": "dashboard",
    }


def _panel(kind: str, title: str, description: str, targets: list[Json], unit: str, **opts: Any) -> Json:
    defaults: Json = {"unit": unit}
    if "mappings" in opts:
        defaults["mappings"] = opts.pop("mappings")
    if "thresholds" in opts:
        steps = [{"color": "green", "value": None}]
        steps += [{"color": color, "value": value} for value, color in opts.pop("thresholds")]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    if "custom" in opts:
        defaults["custom"] = opts.pop("custom")
    overrides = opts.pop("overrides", [])
    panel: Json = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": targets[0]["datasource"],
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": opts.pop("options", {}),
    }
    panel.update(opts)
    return panel


def timeseries(title: str, description: str, targets: list[Json], unit: str = "short", **opts: Any) -> Json:
    """Lines over time."""
    opts.setdefault("options", {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]}})
    return _panel("timeseries", title, description, targets, unit, **opts)


def stat(title: str, description: str, target: Json, unit: str = "short", **opts: Any) -> Json:
    """One big number (the last value)."""
    opts.setdefault(
        "options",
        {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name",
        },
    )
    return _panel("stat", title, description, [target], unit, **opts)


def bargauge(title: str, description: str, target: Json, unit: str = "short", **opts: Any) -> Json:
    """One bar per series, current value."""
    opts.setdefault(
        "options",
        {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "orientation": "horizontal",
            "displayMode": "basic",
            "showUnfilled": True,
        },
    )
    return _panel("bargauge", title, description, [target], unit, **opts)


def state_timeline(title: str, description: str, targets: list[Json], **opts: Any) -> Json:
    """Which condition held when."""
    opts.setdefault("options", {"mergeValues": True, "showValue": "never", "rowHeight": 0.8})
    return _panel("state-timeline", title, description, targets, "short", **opts)


def table(title: str, description: str, target: Json, columns: list[str], **opts: Any) -> Json:
    """Instant table showing exactly `columns` (label names, plus `Value` under its display name)."""
    transformations: list[Json] = [
        {"id": "filterFieldsByName", "options": {"include": {"names": columns}}},
        {"id": "organize", "options": {"indexByName": {name: i for i, name in enumerate(columns)}}},
    ]
    opts.setdefault("options", {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}})
    return _panel(
        "table", title, description, [target], opts.pop("unit", "short"), transformations=transformations, **opts
    )


def drilldown_link(column: str) -> Json:
    """Override making a table column link to the terminal drill-down for that terminal."""
    return {
        "matcher": {"id": "byName", "options": column},
        "properties": [
            {
                "id": "links",
                "value": [
                    {
                        "title": "Terminal drill-down",
                        "url": "/d/posfleet-terminal/terminal-drill-down"
                        "?var-terminal_id=${__value.raw}&${__url_time_range}",
                    }
                ],
            }
        ],
    }


def rename(column: str, name: str, unit: str | None = None) -> Json:
    """Override giving a column a display name (and unit)."""
    props: list[Json] = [{"id": "displayName", "value": name}]
    if unit:
        props.append({"id": "unit", "value": unit})
    return {"matcher": {"id": "byName", "options": column}, "properties": props}


def datasource_var(name: str, label: str, plugin: str, default_uid: str) -> Json:
    """A datasource picker, so the same JSON works on every Grafana."""
    return {
        "type": "datasource",
        "name": name,
        "label": label,
        "query": plugin,
        "current": {"selected": False, "text": default_uid, "value": default_uid},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_var(name: str, label: str, ds: Json, query: str, *, multi: bool) -> Json:
    """A variable filled from a query (label values in Prometheus, tag values in InfluxDB)."""
    var: Json = {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": ds,
        "query": query,
        "definition": query,
        "hide": 0,
        "includeAll": multi,
        "multi": multi,
        "options": [],
        "refresh": 2,
        "regex": "",
        "skipUrlSync": False,
        "sort": 1,
    }
    if multi:
        var["allValue"] = ".*"
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    else:
        var["current"] = {}
    return var


PROM_VAR = datasource_var("datasource", "Prometheus", "prometheus", PROMETHEUS_DS_UID)
INFLUX_VAR = datasource_var("influx", "InfluxDB", "influxdb", INFLUX_DS_UID)
ACQUIRER_VAR = query_var("acquirer", "Acquirer", PROM, "label_values(posfleet_fleet_terminals, acquirer)", multi=True)
# Sites that had a problem (per-site series exist only then): the ones worth filtering to; every site's counts
# are in the API (GET /api/v1/sites).
SITE_VAR = query_var(
    "site", "Site", PROM, 'label_values(posfleet_site_terminals{acquirer=~"$acquirer"}, site)', multi=True
)
JOB_VAR = query_var("job", "Collector job", PROM, "label_values(posfleet_up, job)", multi=True)


# ------------------------------------------------------------------------------------------------- dashboards

# Conditions that mean "not taking or not delivering payments" (the catalogue's critical ones).
CONDITIONS_CRITICAL = "|".join(critical_conditions())
OK_BAD = [(1, "red")]


def fleet_overview() -> Board:
    """Where is the fleet hurting, and which merchants/sites to call first."""
    b = Board(
        "posfleet-fleet-overview",
        "posfleet / Fleet overview",
        "How many terminals are in trouble, of which kind, at which acquirer, merchant and site.",
        [PROM_VAR, ACQUIRER_VAR, SITE_VAR],
    )
    known = f"sum(posfleet_fleet_terminals{{{ACQ_SEL}}})"
    online = f"sum(posfleet_fleet_online_terminals{{{ACQ_SEL}}})"
    shutdown = f"sum(posfleet_fleet_shutdown_terminals{{{ACQ_SEL}}})"

    def cond(condition: str, by: str = "") -> str:
        group = f" by ({by})" if by else ""
        return f'sum{group}(posfleet_fleet_condition_terminals{{{ACQ_SEL},condition="{condition}"}})'

    b.row("Fleet now")
    b.add(
        stat(
            "Terminals known",
            "How many terminals does the collector know (registered + unregistered seen)?",
            prom(known, "known", instant=True),
            color="fixed",
        ),
        (4, 4),
    )
    b.add(
        stat(
            "Online share",
            "Which share of terminals that should be online (known minus cleanly shut down) sent a heartbeat "
            "within their offline threshold?",
            prom(f"{online} / clamp_min({known} - {shutdown}, 1)", "online", instant=True),
            "percentunit",
            thresholds=[(0, "red"), (0.9, "orange"), (0.98, "green")],
        ),
        (4, 4),
    )
    b.add(
        stat(
            "Offline",
            "How many terminals stopped sending heartbeats without a clean shutdown?",
            prom(cond("offline"), "offline", instant=True),
            thresholds=OK_BAD,
        ),
        (4, 4),
    )
    b.add(
        stat(
            "Upload backlog",
            "How many terminals hold transactions they could not upload?",
            prom(cond("upload_backlog"), "upload backlog", instant=True),
            thresholds=OK_BAD,
        ),
        (4, 4),
    )
    b.add(
        stat(
            "Upstream missing",
            "How many terminals had uploads acknowledged that the acquirer's feed never recorded?",
            prom(cond("upstream_missing"), "upstream missing", instant=True),
            thresholds=OK_BAD,
        ),
        (4, 4),
    )
    b.add(
        stat(
            "Stale acquirer feeds",
            "How many acquirer feeds are silent (upstream checks paused for them)?",
            # Per acquirer first: during a fleet-leader change two partitioned collectors may both export it.
            prom('sum(max by (acquirer) (posfleet_acquirer_feed_stale{acquirer=~"$acquirer"}))', "stale feeds",
                 instant=True),
            thresholds=OK_BAD,
        ),
        (4, 4),
    )

    b.row("Conditions by acquirer")
    b.add(
        bargauge(
            "Terminals by condition",
            "Which conditions are active right now, and on how many terminals?",
            prom(
                f"sum by (condition) (posfleet_fleet_condition_terminals{{{ACQ_SEL}}})", "{{condition}}", instant=True
            ),
            thresholds=OK_BAD,
        ),
        (8, 10),
    )
    b.add(
        table(
            "Conditions per acquirer",
            "Is a condition concentrated at one acquirer (their outage) or spread (ours)?",
            prom(f"sum by (acquirer, condition) (posfleet_fleet_condition_terminals{{{ACQ_SEL}}})", table=True),
            ["acquirer", "condition", "Value"],
            overrides=[rename("Value", "terminals")],
        ),
        (8, 10),
    )
    b.add(
        timeseries(
            "Online share by acquirer",
            "Did one acquirer's terminals drop off the network, and when?",
            [
                prom(
                    f"sum by (acquirer) (posfleet_fleet_online_terminals{{{ACQ_SEL}}}) / clamp_min("
                    f"sum by (acquirer) (posfleet_fleet_terminals{{{ACQ_SEL}}}) - "
                    f"sum by (acquirer) (posfleet_fleet_shutdown_terminals{{{ACQ_SEL}}}), 1)",
                    "{{acquirer}}",
                )
            ],
            "percentunit",
        ),
        (8, 10),
    )
    b.add(
        timeseries(
            "Upload backlog and upstream missing over time",
            "Are transactions piling up on terminals or vanishing between host and acquirer, and since when?",
            [
                prom(cond("upload_backlog", "acquirer"), "backlog {{acquirer}}"),
                prom(cond("upstream_missing", "acquirer"), "missing {{acquirer}}", ref="B"),
            ],
        ),
        (12, 9),
    )
    b.add(
        timeseries(
            "Problem terminals by condition over time",
            "When did each kind of problem start, and is it growing?",
            [prom(f"sum by (condition) (posfleet_fleet_condition_terminals{{{ACQ_SEL}}})", "{{condition}}")],
        ),
        (12, 9),
    )

    b.row("Software and hardware")
    b.add(
        bargauge(
            "Software versions",
            "Which app versions run on which models (is a rollout complete)?",
            prom(
                'sum by (model, app_version) (posfleet_fleet_app_version_terminals{acquirer=~"$acquirer"})',
                "{{model}} {{app_version}}",
                instant=True,
            ),
        ),
        (8, 10),
    )
    b.add(
        table(
            "Hardware faults",
            "Which terminals need a technician or paper, and for which part?",
            prom(
                since(f'{FLEET_SEL},condition="hardware_fault"'),
                table=True,
            ),
            ["terminal_id", "merchant_id", "site", "model", "severity", "detail", "Value"],
            overrides=[rename("Value", "active for", "s"), drilldown_link("terminal_id")],
        ),
        (16, 10),
    )

    b.row("Where to look first")
    problems = f"posfleet_terminal_problem{{{FLEET_SEL}}}"
    b.add(
        table(
            "Mass outages",
            "Which sites or acquirers have most of their terminals offline together (one shared cause), since when?",
            # One row per site or acquirer whichever collector judged it (the fleet leader, when partitioned).
            prom(f"time() - min by (scope, acquirer, site) (posfleet_fleet_mass_offline_since_seconds{{{ACQ_SEL}}})",
                 table=True),
            ["scope", "acquirer", "site", "Value"],
            overrides=[rename("Value", "offline for", "s")],
            options={"showHeader": True, "sortBy": [{"displayName": "offline for", "desc": True}]},
        ),
        (24, 6),
    )
    b.add(
        table(
            "Top problem merchants",
            "Which merchants have the most terminals in a problem condition?",
            prom(
                f"topk(10, count by (merchant_id, acquirer) (count by (merchant_id, acquirer, terminal_id) "
                f"({problems})))",
                table=True,
            ),
            ["merchant_id", "acquirer", "Value"],
            overrides=[rename("Value", "terminals")],
            options={"showHeader": True, "sortBy": [{"displayName": "terminals", "desc": True}]},
        ),
        (8, 10),
    )
    b.add(
        table(
            "Top problem sites",
            "Which sites have the most terminals in a problem condition?",
            prom(
                f"topk(10, count by (site, acquirer) (count by (site, acquirer, terminal_id) ({problems})))", table=True
            ),
            ["site", "acquirer", "Value"],
            overrides=[rename("Value", "terminals")],
            options={"showHeader": True, "sortBy": [{"displayName": "terminals", "desc": True}]},
        ),
        (8, 10),
    )
    b.add(
        table(
            "Critical problems",
            "Which terminals have a critical condition now, and for how long?",
            prom(since(f'{FLEET_SEL},severity="critical"'), table=True),
            ["terminal_id", "merchant_id", "acquirer", "site", "condition", "detail", "Value"],
            overrides=[rename("Value", "active for", "s"), drilldown_link("terminal_id")],
            options={"showHeader": True, "sortBy": [{"displayName": "active for", "desc": True}]},
        ),
        (8, 10),
    )
    return b


def upstream() -> Board:
    """Are the acquirers' feeds alive, and whose transactions never reached them."""
    b = Board(
        "posfleet-upstream",
        "posfleet / Upstream",
        "Freshness of each acquirer's transaction feed and the terminals whose acknowledged uploads the feed "
        "never recorded.",
        [PROM_VAR, INFLUX_VAR, ACQUIRER_VAR, SITE_VAR],
    )
    acq = 'acquirer=~"$acquirer"'
    b.row("Feeds")
    b.add(
        stat(
            "Feed age",
            "How long ago did each acquirer's feed last send anything? (never = no message yet)",
            prom(f"time() - max by (acquirer) (posfleet_acquirer_feed_last_message_seconds{{{acq}}})", "{{acquirer}}",
                 instant=True),
            "s",
            thresholds=[(300, "red")],
            mappings=[
                {"type": "range", "options": {"from": 1e9, "to": None, "result": {"text": "never", "color": "red"}}}
            ],
        ),
        (12, 5),
    )
    b.add(
        state_timeline(
            "Feed stale",
            "When was each feed silent long enough to pause the upstream check?",
            [prom(f"max by (acquirer) (posfleet_acquirer_feed_stale{{{acq}}})", "{{acquirer}}")],
            mappings=[
                {
                    "type": "value",
                    "options": {"0": {"text": "fresh", "color": "green"}, "1": {"text": "stale", "color": "red"}},
                }
            ],
        ),
        (12, 5),
    )
    b.add(
        timeseries(
            "Transactions recorded",
            "How many transactions per second does each acquirer report "
            "recorded (a drop to zero is an outage or a stopped feed)?",
            [
                prom(
                    f"sum by (acquirer) (rate(posfleet_acquirer_txns_recorded_total{{{acq}}}[$__rate_interval]))",
                    "{{acquirer}}",
                )
            ],
            "ops",
        ),
        (24, 8),
    )

    b.row("Activity against the learned baseline")
    b.add(
        timeseries(
            "Recorded vs usual volume",
            "Is each acquirer recording as many transactions per hour as usual for this time (drop = 1: far below "
            "usual while the feed still arrives, acquirer_volume_drop)?",
            [
                prom(
                    "3600 * sum by (acquirer) "
                    f"(rate(posfleet_acquirer_txns_recorded_total{{{acq}}}[$__rate_interval]))",
                    "{{acquirer}} recorded",
                ),
                prom(
                    f"max by (acquirer) (posfleet_acquirer_volume_usual_per_hour{{{acq}}})",
                    "{{acquirer}} usual", ref="B",
                ),
                prom(f"max by (acquirer) (posfleet_acquirer_volume_drop{{{acq}}})", "{{acquirer}} drop", ref="C"),
            ],
            "short",
        ),
        (12, 8),
    )
    b.add(
        timeseries(
            "Terminals that stopped selling",
            "How many healthy-looking terminals of each acquirer have recorded no transaction for longer than "
            "their learned activity makes likely (activity_drop), and how many baselines are evaluated or still "
            "learning?",
            [
                prom(
                    f'sum by (acquirer) (posfleet_fleet_condition_terminals{{{acq},condition="activity_drop"}})',
                    "{{acquirer}} stopped selling",
                ),
                prom("sum by (state) (posfleet_activity_baselines)", "baselines {{state}}", ref="B"),
            ],
        ),
        (12, 8),
    )

    b.row("Missing upstream")
    b.add(
        timeseries(
            "Terminals with missing transactions",
            "At which acquirer do acknowledged uploads go unrecorded, on how many terminals, since when?",
            [
                prom(
                    'sum by (acquirer) (posfleet_fleet_condition_terminals{acquirer=~"$acquirer",'
                    'condition="upstream_missing"})',
                    "{{acquirer}}",
                )
            ],
        ),
        (12, 9),
    )
    b.add(
        table(
            "Terminals missing upstream",
            "Which terminals' transactions did the acquirer not record?",
            prom(
                since(f'{FLEET_SEL},condition="upstream_missing"'),
                table=True,
            ),
            ["terminal_id", "merchant_id", "acquirer", "site", "Value"],
            overrides=[rename("Value", "missing for", "s"), drilldown_link("terminal_id")],
        ),
        (12, 9),
    )
    b.add(_acknowledged_vs_recorded(), (24, 8))
    return b


def _acknowledged_vs_recorded() -> Json:
    """History table: per acquirer, transactions its host acknowledged to terminals vs those its feed recorded."""
    acq = '"acquirer" =~ /^$acquirer$/ AND $timeFilter'
    uploaded = influxql(
        'SELECT sum("uploaded") AS "acknowledged" FROM (SELECT non_negative_difference(last("uploaded_count")) '
        f'AS "uploaded" FROM "{HB}" WHERE {acq} GROUP BY time($__interval), "terminal_id", "acquirer") '
        'WHERE $timeFilter GROUP BY "acquirer"'
    )
    recorded = influxql(
        f'SELECT count("txn_id") AS "recorded" FROM "upstream_txn" WHERE {acq} GROUP BY "acquirer"', ref="B"
    )
    for target in (uploaded, recorded):
        target["resultFormat"] = "table"
    panel = _panel(
        "table",
        "Acknowledged vs recorded per acquirer (history)",
        "Over the selected range, how many transactions did each acquirer's host acknowledge to terminals, "
        "how many did its feed record, and how many are missing (includes those still in the feed's batch)?",
        [uploaded, recorded],
        "short",
        options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
    )
    panel["transformations"] = [
        {"id": "joinByField", "options": {"byField": "acquirer", "mode": "outer"}},
        {
            "id": "calculateField",
            "options": {
                "mode": "binary",
                "alias": "not recorded",
                "binary": {"left": "acknowledged", "operator": "-", "right": "recorded"},
            },
        },
        {
            "id": "organize",
            "options": {
                "excludeByName": {"Time": True, "Time 1": True, "Time 2": True},
                "indexByName": {"acquirer": 0, "acknowledged": 1, "recorded": 2, "not recorded": 3},
            },
        },
    ]
    return panel


def collector_health() -> Board:
    """Is the collector itself seeing and processing what the fleet sends."""
    b = Board(
        "posfleet-collector",
        "posfleet / Collector health",
        "The collector's own health: ingest, rejects, MQTT session, history write spool and scrape cost. "
        "Check here before trusting any other posfleet dashboard.",
        [PROM_VAR, JOB_VAR],
    )
    job = 'job=~"$job"'
    up_map = [
        {"type": "value", "options": {"0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}}
    ]
    b.row("Process and MQTT")
    b.add(
        stat(
            "Scrape up",
            "Does Prometheus reach the collector's /metrics?",
            prom(f"up{{{job}}}", "{{instance}}", instant=True),
            mappings=up_map,
        ),
        (4, 4),
    )
    b.add(
        stat(
            "MQTT connected",
            "Is the collector connected and subscribed to the broker?",
            prom(f"posfleet_mqtt_connected{{{job}}}", "{{instance}}", instant=True),
            mappings=up_map,
        ),
        (4, 4),
    )
    b.add(
        stat(
            "Broker silence",
            "How long since the broker delivered any message (fleet-wide silence = our side)?",
            prom(f"time() - posfleet_mqtt_last_message_seconds{{{job}}}", "{{instance}}", instant=True),
            "s",
            thresholds=[(120, "red")],
        ),
        (4, 4),
    )
    b.add(
        stat(
            "MQTT reconnects",
            "How often did the MQTT session drop in the selected range?",
            prom(
                f"sum by (instance) (increase(posfleet_mqtt_connects_total{{{job}}}[$__range]))",
                "{{instance}}",
                instant=True,
            ),
            thresholds=[(2, "orange")],
        ),
        (4, 4),
    )
    b.add(
        table(
            "Build",
            "Which version is running where?",
            prom(f"posfleet_build_info{{{job}}}", table=True),
            ["instance", "version"],
        ),
        (8, 4),
    )
    b.add(
        state_timeline(
            "MQTT session",
            "When was the collector disconnected from the broker?",
            [prom(f"posfleet_mqtt_connected{{{job}}}", "{{instance}}")],
            mappings=up_map,
        ),
        (24, 4),
    )

    b.row("Ingest")
    b.add(
        timeseries(
            "Messages by kind and result",
            "How many messages per second arrive, and how many are accepted, rejected, duplicate or stale?",
            [
                prom(
                    f"sum by (kind, result) (rate(posfleet_messages_total{{{job}}}[$__rate_interval]))",
                    "{{kind}} {{result}}",
                )
            ],
            "ops",
        ),
        (12, 9),
    )
    b.add(
        timeseries(
            "Rejects by reason",
            "Why are messages rejected (firmware bug, bad ids, card data)?",
            [
                prom(
                    f"sum by (reason) (rate(posfleet_messages_rejected_total{{{job}}}[$__rate_interval]))", "{{reason}}"
                )
            ],
            "ops",
        ),
        (12, 9),
    )
    b.add(
        timeseries(
            "Ingest queue fill",
            "Is the collector keeping up (queue between MQTT and processing)?",
            [prom(f"posfleet_ingest_queue_depth{{{job}}} / posfleet_ingest_queue_capacity{{{job}}}", "{{instance}}")],
            "percentunit",
        ),
        (12, 8),
    )
    b.add(
        timeseries(
            "Registry",
            "How many terminals are registered, and do registry reloads fail?",
            [
                prom(f"posfleet_registry_terminals{{{job}}}", "registered {{instance}}"),
                prom(
                    f"sum by (result) (increase(posfleet_registry_reloads_total{{{job}}}[$__rate_interval]))",
                    "reloads {{result}}",
                    ref="B",
                ),
            ],
        ),
        (12, 8),
    )

    _history_writes(b, job, up_map)

    b.row("State and scrape")
    b.add(
        timeseries(
            "State snapshot age",
            "Would a restart lose much state (snapshot age, failures)?",
            [
                prom(f"posfleet_snapshot_age_seconds{{{job}}}", "age {{instance}}"),
                prom(
                    f"increase(posfleet_snapshot_failures_total{{{job}}}[$__rate_interval])",
                    "failures {{instance}}",
                    ref="B",
                ),
            ],
            "s",
        ),
        (8, 8),
    )
    b.add(
        timeseries(
            "Scrape cost",
            "How long does a scrape take and how many samples does it return?",
            [
                prom(f"scrape_duration_seconds{{{job}}}", "duration {{instance}}"),
                prom(f"scrape_samples_scraped{{{job}}}", "samples {{instance}}", ref="B"),
            ],
            "s",
            overrides=[
                {
                    "matcher": {"id": "byFrameRefID", "options": "B"},
                    "properties": [{"id": "unit", "value": "short"}, {"id": "custom.axisPlacement", "value": "right"}],
                }
            ],
        ),
        (8, 8),
    )
    b.add(
        timeseries(
            "Problem series dropped",
            "Are per-terminal problem series cut by the cap (tables incomplete; the fleet counts still hold)?",
            [prom(f"posfleet_terminal_problem_series_dropped{{{job}}}", "{{instance}}")],
        ),
        (8, 8),
    )
    return b


TERMINAL_VAR = query_var(
    "terminal_id", "Terminal", INFLUX, f'SHOW TAG VALUES FROM "{HB}" WITH KEY = "terminal_id"', multi=False
)


def terminal() -> Board:
    """Everything about one terminal: its conditions now and over time, and its reported history."""
    b = Board(
        "posfleet-terminal",
        "posfleet / Terminal drill-down",
        "One terminal: its active conditions (Prometheus) and its heartbeat history (InfluxDB via InfluxQL).",
        [PROM_VAR, INFLUX_VAR, TERMINAL_VAR],
    )
    tid = 'terminal_id="$terminal_id"'
    b.row("Conditions (Prometheus)")
    b.add(
        table(
            "Active conditions",
            "What is wrong with this terminal right now, and since when?",
            prom(since(tid), table=True),
            ["condition", "severity", "detail", "merchant_id", "acquirer", "site", "model", "Value"],
            overrides=[rename("Value", "active for", "s")],
        ),
        (24, 6),
    )
    b.add(
        state_timeline(
            "Conditions over time",
            "When did each condition start and clear?",
            [prom(f"max by (condition) (posfleet_terminal_problem{{{tid}}})", "{{condition}}")],
            mappings=[{"type": "value", "options": {"1": {"text": "active", "color": "red"}}}],
        ),
        (24, 7),
    )
    _terminal_history(b)
    return b


def _terminal_history(b: Board) -> None:
    """InfluxQL panels over the terminal's history (measurements and fields: docs/storage.md)."""
    where = "\"terminal_id\" = '$terminal_id' AND $timeFilter"
    per_interval = "GROUP BY time($__interval)"
    b.row("History (InfluxDB)")
    b.add(
        timeseries(
            "Heartbeats",
            "Is the terminal sending heartbeats at its interval (gaps = offline)?",
            [influxql(f'SELECT count("seq") FROM "{HB}" WHERE {where} {per_interval} fill(0)', "heartbeats")],
            custom={"drawStyle": "bars", "fillOpacity": 60},
        ),
        (12, 8),
    )
    b.add(
        timeseries(
            "Queue depth and oldest queued age",
            "Are transactions queueing on the terminal, and how long has the oldest waited (terminal clock)?",
            [
                influxql(
                    f'SELECT max("queue_depth") FROM "{HB}" WHERE {where} {per_interval} fill(null)', "queue depth"
                ),
                influxql(
                    f'SELECT last("terminal_ts") - last("oldest_queued_ts") FROM "{HB}" WHERE {where} '
                    f"{per_interval} fill(null)",
                    "oldest queued age",
                    ref="B",
                ),
            ],
            overrides=[
                {
                    "matcher": {"id": "byName", "options": "oldest queued age"},
                    "properties": [{"id": "unit", "value": "s"}, {"id": "custom.axisPlacement", "value": "right"}],
                }
            ],
        ),
        (12, 8),
    )
    b.add(
        timeseries(
            "Completed, uploaded and recorded upstream",
            "Where do this terminal's transactions stop: completed but not uploaded (queue), uploaded "
            "but not recorded by the acquirer (upstream missing)?",
            [
                influxql(
                    f'SELECT non_negative_difference(last("txn_count")) FROM "{HB}" WHERE {where} {per_interval}',
                    "completed",
                ),
                influxql(
                    f'SELECT non_negative_difference(last("uploaded_count")) FROM "{HB}" WHERE {where} {per_interval}',
                    "uploaded (host acknowledged)",
                    ref="B",
                ),
                influxql(
                    f'SELECT count("txn_id") FROM "upstream_txn" WHERE {where} {per_interval} fill(0)',
                    "recorded by the acquirer",
                    ref="C",
                ),
            ],
        ),
        (24, 8),
    )
    b.add(
        timeseries(
            "Signal",
            "Is the network link weak (RSSI below -95 dBm makes uploads time out)?",
            [influxql(f'SELECT mean("rssi_dbm") FROM "{HB}" WHERE {where} {per_interval} fill(null)', "RSSI")],
            "dBm",
            thresholds=[(-95, "red")],
            custom={"thresholdsStyle": {"mode": "line"}},
        ),
        (12, 8),
    )
    b.add(
        timeseries(
            "Battery",
            "Is the terminal on battery, and is it running flat?",
            [influxql(f'SELECT min("battery_pct") FROM "{HB}" WHERE {where} {per_interval} fill(null)', "battery")],
            "percent",
        ),
        (12, 8),
    )
    b.add(
        state_timeline(
            "Power source and peripherals",
            "When did the terminal run on battery, and when were printer, display or card reader faulty?",
            [
                influxql(f'SELECT last("power_source") FROM "{HB}" WHERE {where} {per_interval}', "power"),
                influxql(f'SELECT last("printer") FROM "{HB}" WHERE {where} {per_interval}', "printer", ref="B"),
                influxql(f'SELECT last("display") FROM "{HB}" WHERE {where} {per_interval}', "display", ref="C"),
                influxql(
                    f'SELECT last("card_reader") FROM "{HB}" WHERE {where} {per_interval}', "card reader", ref="D"
                ),
            ],
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "mains": {"color": "green"},
                        "battery": {"color": "orange"},
                        "ok": {"color": "green"},
                        "paper_out": {"color": "orange"},
                        "fault": {"color": "red"},
                    },
                }
            ],
        ),
        (24, 7),
    )
    b.add(
        state_timeline(
            "Conditions (history)",
            "Which conditions did the collector raise and clear for this terminal, beyond Prometheus' retention?",
            [
                influxql(
                    f'SELECT last("active") FROM "condition" WHERE {where} {per_interval}, "condition" fill(previous)',
                    "$tag_condition",
                )
            ],
            mappings=[
                {
                    "type": "value",
                    "options": {
                        "true": {"text": "active", "color": "red"},
                        "false": {"text": "clear", "color": "green"},
                    },
                }
            ],
        ),
        (24, 7),
    )


def _history_writes(b: Board, job: str, up_map: list[Json]) -> None:
    """The InfluxDB writer's self-metrics (docs/storage.md): is history complete, and is the spool filling?"""
    b.row("History writes (InfluxDB)")
    b.add(
        stat(
            "History writer up",
            "Are history writes succeeding (DOWN = retrying with backoff, spooling)?",
            prom(f"posfleet_influx_up{{{job}}}", "{{instance}}", instant=True),
            mappings=up_map,
        ),
        (4, 8),
    )
    b.add(
        timeseries(
            "History points by outcome",
            "How many points per second are written, spooled, replayed or dropped?",
            [prom(f"sum by (result) (rate(posfleet_influx_points_total{{{job}}}[$__rate_interval]))", "{{result}}")],
            "ops",
        ),
        (10, 8),
    )
    b.add(
        timeseries(
            "Points lost by reason",
            "Is history losing data, and why (spool full, rejected, ...)?",
            [
                prom(
                    f"sum by (reason) (increase(posfleet_influx_dropped_total{{{job}}}[$__rate_interval]))",
                    "{{reason}}",
                )
            ],
            thresholds=[(1, "red")],
        ),
        (10, 8),
    )
    b.add(
        timeseries(
            "Write spool",
            "How much history waits on disk for the server to come back?",
            [prom(f"posfleet_influx_spool_bytes{{{job}}}", "spool {{instance}}")],
            "bytes",
        ),
        (8, 8),
    )
    b.add(
        timeseries(
            "Points waiting",
            "How many points wait in memory and in the spool?",
            [
                prom(f"posfleet_influx_buffer_points{{{job}}}", "memory {{instance}}"),
                prom(f"posfleet_influx_spool_points{{{job}}}", "spool {{instance}}", ref="B"),
            ],
        ),
        (8, 8),
    )
    b.add(
        timeseries(
            "Write latency p99",
            "How long does one write request to InfluxDB take?",
            [
                prom(
                    "histogram_quantile(0.99, sum by (le) "
                    f"(rate(posfleet_influx_write_seconds_bucket{{{job}}}[$__rate_interval])))",
                    "p99",
                )
            ],
            "s",
        ),
        (8, 8),
    )


# ------------------------------------------------------------------------------------------------ rendering

BOARDS = {
    "fleet-overview.json": fleet_overview,
    "terminal.json": terminal,
    "upstream.json": upstream,
    "collector-health.json": collector_health,
}


def render() -> dict[str, Json]:
    """Every dashboard by file name."""
    return {name: build().to_json() for name, build in BOARDS.items()}


def render_text(dashboard: Json) -> str:
    """The committed form: stable key order, two-space indent, trailing newline."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    """Write every dashboard into `directory`; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in render().items():
        path = directory / name
        path.write_text(render_text(dashboard), encoding="utf-8")
        written.append(path)
    return written


def drift(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """Files in `directory` that differ from (or are missing against) what the source renders, or are extra."""
    expected = {name: render_text(d) for name, d in render().items()}
    problems = []
    for name, text in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{name}: differs from the generator")
    for path in sorted(directory.glob("*.json")):
        if path.name not in expected:
            problems.append(f"{path.name}: not produced by the generator")
    return problems


def iter_panels(dashboard: Json) -> Iterator[Json]:
    """Every non-row panel, including those nested inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel
