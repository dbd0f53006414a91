"""`posfleet dashboards render|check` and `posfleet grafana push`: wiring only, the work is in dashboards.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from exporters.grafana import dashboards

__all__ = ["register"]

# Where `grafana push` puts the dashboards when the user names no folder.
DEFAULT_FOLDER_UID = "posfleet"
DEFAULT_FOLDER_TITLE = "posfleet"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `dashboards render|check` and `grafana push`."""
    dash = sub.add_parser("dashboards", help="generate Grafana dashboards from source")
    dash_sub = dash.add_subparsers(dest="dashboards_command", required=True, metavar="ACTION")
    render = dash_sub.add_parser("render", help="write the dashboards JSON")
    render.add_argument("--dir", type=Path, default=dashboards.DASHBOARDS_DIR, help="output directory")
    render.set_defaults(handler=cmd_render)
    check = dash_sub.add_parser("check", help="exit 1 when the committed dashboards differ from the source")
    check.add_argument("--dir", type=Path, default=dashboards.DASHBOARDS_DIR, help="directory to compare")
    check.set_defaults(handler=cmd_check)

    graf = sub.add_parser("grafana", help="talk to a Grafana over its HTTP API")
    graf_sub = graf.add_subparsers(dest="grafana_command", required=True, metavar="ACTION")
    push = graf_sub.add_parser(
        "push",
        help="create or overwrite the dashboards in a Grafana (needs the 'grafana' extra)",
        description="URL from --url or GRAFANA_URL; API token from --token-file, GRAFANA_TOKEN_FILE or "
        "GRAFANA_TOKEN (a service-account token with dashboard and folder write rights).",
    )
    push.add_argument("--url", default=None, help="Grafana base URL (default: $GRAFANA_URL)")
    push.add_argument("--token-file", type=Path, default=None, help="file holding the API token")
    push.add_argument("--folder-uid", default=DEFAULT_FOLDER_UID, help="folder uid (created when missing)")
    push.add_argument("--folder-title", default=DEFAULT_FOLDER_TITLE, help="folder title when creating it")
    push.add_argument("--dir", type=Path, default=dashboards.DASHBOARDS_DIR, help="dashboards to push")
    push.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    push.set_defaults(handler=cmd_push)


def cmd_render(args: argparse.Namespace) -> int:
    """Write every dashboard."""
    for path in dashboards.write(args.dir):
        print(path)
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Compare the committed dashboards with the generator's output."""
    problems = dashboards.drift(args.dir)
    for problem in problems:
        print(f"{args.dir}/{problem}", file=sys.stderr)
    if problems:
        print("dashboards drifted: run `posfleet dashboards render` and commit the result", file=sys.stderr)
        return 1
    return 0


def _token(args: argparse.Namespace) -> str | None:
    token_file = args.token_file or os.environ.get("GRAFANA_TOKEN_FILE")
    if token_file:
        return Path(token_file).read_text(encoding="utf-8").strip()
    return os.environ.get("GRAFANA_TOKEN")


def cmd_push(args: argparse.Namespace) -> int:
    """Create the folder if needed and overwrite each dashboard by uid."""
    try:
        from grafana_client.api import GrafanaApi
        from grafana_client.client import GrafanaClientError, GrafanaException
    except ImportError:
        print(
            "posfleet grafana push needs grafana-client: pip install 'posfleet[grafana]'",
            file=sys.stderr,
        )
        return 2
    url = args.url or os.environ.get("GRAFANA_URL")
    if not url:
        print("no Grafana URL: pass --url or set GRAFANA_URL", file=sys.stderr)
        return 2
    try:
        token = _token(args)
    except OSError as err:
        print(f"cannot read the token file: {err}", file=sys.stderr)
        return 2
    files = sorted(args.dir.glob("*.json"))
    if not files:
        print(f"no dashboards in {args.dir}", file=sys.stderr)
        return 2
    api = GrafanaApi.from_url(url, credential=token, timeout=args.timeout)
    try:
        try:
            api.folder.get_folder(args.folder_uid)
        except GrafanaClientError as err:
            if err.status_code != 404:
                raise
            api.folder.create_folder(args.folder_title, uid=args.folder_uid)
        for path in files:
            board: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            board.pop("id", None)  # ids are per-Grafana; the uid is what identifies a posfleet dashboard
            api.dashboard.update_dashboard(
                {"dashboard": board, "folderUid": args.folder_uid, "overwrite": True, "message": "posfleet push"}
            )
            print(f"pushed {board['uid']} ({path.name})")
    except (GrafanaException, OSError) as err:
        print(f"grafana push failed: {err}", file=sys.stderr)
        return 1
    return 0
