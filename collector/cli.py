"""`posfleet` command line: parses arguments and wires the pipeline stages; no logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from collector import __version__, commands
from collector.support import cli as support_cli
from exporters.alerting import cli as alerting_cli
from exporters.grafana import cli as grafana_cli


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(prog="posfleet", description="Watch a fleet of card-payment terminals.")
    parser.add_argument("--version", action="version", version=f"posfleet {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    alerting_cli.register(sub)
    grafana_cli.register(sub)
    support_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `posfleet` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = args.handler
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
