"""Subcommands of the collector side: run, check-config, simulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from collector.config import ConfigError, load_config

log = logging.getLogger(__name__)


def _run(args: argparse.Namespace) -> int:
    from collector.app import run_collector
    from collector.fleet.registry import RegistryError
    from collector.fleet.snapshot import SnapshotError

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"posfleet: invalid configuration: {err}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_collector(cfg))
    except (RegistryError, SnapshotError, OSError) as err:
        print(f"posfleet: cannot start: {err}", file=sys.stderr)
        return 2


def _check_config(args: argparse.Namespace) -> int:
    try:
        load_config(args.config)
    except ConfigError as err:
        print(f"posfleet: invalid configuration: {err}", file=sys.stderr)
        return 2
    print(f"{args.config}: OK")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from collector.sim.simulator import run_cli

    return run_cli(args)


def _demo(args: argparse.Namespace) -> int:
    from collector.sim.demo import run_demo

    return run_demo(args)


def _baseline_learn(args: argparse.Namespace) -> int:
    import time

    from collector.config import resolve_token
    from collector.fleet.registry import RegistryError, load_registry
    from collector.fleet.snapshot import SnapshotError, load_snapshot, save_snapshot
    from collector.fleet.state import Fleet
    from exporters.history.backfill import ExportSource, HistoryError, HistorySource, InfluxSource, learn_baselines

    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"posfleet: invalid configuration: {err}", file=sys.stderr)
        return 2
    path = args.snapshot or cfg.state.snapshot_path
    if not path:
        print("posfleet baseline learn: no snapshot to write (state.snapshot_path is off; give --snapshot)",
              file=sys.stderr)
        return 2
    if args.days <= 0 or args.window_hours <= 0:
        print("posfleet baseline learn: --days and --window-hours must be positive", file=sys.stderr)
        return 2
    try:
        registry = load_registry(cfg.registry.path)
        token = resolve_token(cfg.influx)
    except (RegistryError, OSError, ValueError) as err:
        print(f"posfleet baseline learn: {err}", file=sys.stderr)
        return 2
    now = time.time()
    restored = load_snapshot(path, now, registry)
    fleet = Fleet(cfg, started_at=now, registry=registry, restored=restored.state, baselines=restored.activity)
    url = args.url or cfg.influx.url
    source: HistorySource = (
        ExportSource(url, token, cfg.influx.request_timeout_s) if args.reader == "export"
        else InfluxSource.from_bucket(url, cfg.influx.bucket, token, cfg.influx.request_timeout_s)
    )
    end = args.until if args.until is not None else now
    try:
        result = learn_baselines(fleet, source, end - args.days * 86_400.0, end, args.window_hours * 3600.0)
        save_snapshot(fleet, path)
    except (HistoryError, SnapshotError) as err:
        print(f"posfleet baseline learn: {err}; nothing was written", file=sys.stderr)
        return 1
    print(f"learned {result.heartbeats} heartbeats of {result.terminals} terminals ({result.evaluated} now "
          f"evaluated, {result.terminals - result.evaluated} still learning); {result.unknown_terminals} unknown "
          f"terminal ids and {result.backwards} counter-backwards points skipped; wrote {path}")
    return 0


BEGIN, END = "<!-- BEGIN GENERATED SCHEMAS -->", "<!-- END GENERATED SCHEMAS -->"


def render_schema_section() -> str:
    """The generated JSON Schema section of docs/protocol.md."""
    import json

    from collector.fleet.protocol import json_schemas

    parts = [BEGIN]
    for name, schema in json_schemas().items():
        parts += [f"### {name}", "", "```json", json.dumps(schema, indent=2, sort_keys=True), "```", ""]
    parts.append(END)
    return "\n".join(parts)


def _schema(args: argparse.Namespace) -> int:
    from pathlib import Path

    section = render_schema_section()
    if not args.write:
        print(section)
        return 0
    path = Path(args.write)
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        print(f"posfleet schema: {path} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + section + tail, encoding="utf-8")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add run, check-config, simulate and demo."""
    p = sub.add_parser("run", help="run the collector")
    p.add_argument("--config", "-c", help="YAML configuration (defaults apply when omitted)")
    p.set_defaults(handler=_run)

    p = sub.add_parser("schema", help="print the protocol's JSON Schemas (or --write them into docs/protocol.md)")
    p.add_argument("--write", metavar="FILE", help="replace the generated section of this Markdown file")
    p.set_defaults(handler=_schema)

    p = sub.add_parser("baseline", help="activity baselines (docs/activity.md)")
    bsub = p.add_subparsers(dest="baseline_command", required=True, metavar="SUBCOMMAND")
    q = bsub.add_parser(
        "learn",
        help="backfill the activity baselines from the heartbeat history in InfluxDB into the state snapshot "
        "(run while the collector is stopped)",
    )
    q.add_argument("--config", "-c", help="the collector's YAML configuration (influx, registry, state, activity)")
    q.add_argument("--days", type=float, default=28.0, help="how much history to read (default 28 days)")
    q.add_argument("--until", type=float, help="end of the history to read, Unix time (default now)")
    q.add_argument("--window-hours", type=float, default=6.0, help="history read per query (default 6 hours)")
    q.add_argument("--url", help="where to read the history (default influx.url)")
    q.add_argument("--reader", choices=("influxql", "export"), default="influxql",
                   help="influxql: InfluxDB's /query (1.x, 2.x v1 API); export: VictoriaMetrics' /api/v1/export")
    q.add_argument("--snapshot", help="snapshot to update (default state.snapshot_path)")
    q.set_defaults(handler=_baseline_learn)

    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("config")
    p.set_defaults(handler=_check_config)

    from collector.sim.simulator import add_arguments

    p = sub.add_parser("simulate", help="run a simulated fleet of terminals (and acquirer feeds) against a broker")
    add_arguments(p)
    p.set_defaults(handler=_simulate)

    p = sub.add_parser("demo", help="broker + collector + a simulated faulty fleet, with a live summary")
    p.add_argument("--mqtt-url", help="use this broker (e.g. Mosquitto) instead of the embedded one")
    p.add_argument("--terminals", type=int, default=40, help="fleet size (default 40)")
    p.add_argument("--interval", type=float, default=2.0, help="heartbeat interval in seconds (default 2)")
    p.add_argument("--http-port", type=int, default=9108, help="API and /metrics port (default 9108, 0 = any)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (0 = until Ctrl-C)")
    p.add_argument("--once", action="store_true", help="print plain summaries instead of refreshing the screen")
    p.set_defaults(handler=_demo)
