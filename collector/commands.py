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
