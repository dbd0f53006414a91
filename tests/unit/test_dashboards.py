"""The dashboard generator: committed JSON in step, Grafana model sane, every query syntactically valid and
naming only documented metrics, and the `dashboards`/`grafana` commands' exit codes."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporters.grafana import cli as grafana_cli
from exporters.grafana import dashboards

ROOT = Path(__file__).resolve().parents[2]
UIDS = {"posfleet-fleet-overview", "posfleet-terminal", "posfleet-upstream", "posfleet-collector"}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "timeFilter", "__value", "__url_time_range"}
VAR_RE = re.compile(r"\$\{?(\w+)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posfleet")
    grafana_cli.register(p.add_subparsers(dest="command", required=True))
    return p


def run(*argv: str) -> int:
    args = parser().parse_args(list(argv))
    result: int = args.handler(args)
    return result


def targets(board: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, t) for panel in dashboards.iter_panels(board) for t in panel["targets"]]


@pytest.fixture(scope="module")
def boards() -> dict[str, dict[str, Any]]:
    return dashboards.render()


def test_committed_dashboards_match_the_generator() -> None:
    assert dashboards.drift() == [], "run `posfleet dashboards render` and commit dashboards/"


def test_render_is_deterministic(boards: dict[str, dict[str, Any]]) -> None:
    again = dashboards.render()
    assert [dashboards.render_text(b) for b in boards.values()] == [dashboards.render_text(b) for b in again.values()]


def test_check_passes_on_fresh_render_and_fails_on_every_kind_of_drift(tmp_path: Path) -> None:
    assert run("dashboards", "render", "--dir", str(tmp_path)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(dashboards.BOARDS)
    assert run("dashboards", "check", "--dir", str(tmp_path)) == 0

    edited = tmp_path / "upstream.json"
    original = edited.read_text()
    edited.write_text(original.replace("Feed age", "Feed age (edited in the UI)"))
    assert run("dashboards", "check", "--dir", str(tmp_path)) == 1
    edited.write_text(original)

    (tmp_path / "terminal.json").unlink()
    assert run("dashboards", "check", "--dir", str(tmp_path)) == 1
    assert run("dashboards", "render", "--dir", str(tmp_path)) == 0

    (tmp_path / "stray.json").write_text("{}")
    assert run("dashboards", "check", "--dir", str(tmp_path)) == 1


def test_stable_uids_shared_tag_and_schema(boards: dict[str, dict[str, Any]]) -> None:
    assert {b["uid"] for b in boards.values()} == UIDS
    for board in boards.values():
        assert board["tags"] == ["posfleet"]
        assert board["schemaVersion"] == dashboards.SCHEMA_VERSION
        assert "id" not in board, "a dashboard id is per-Grafana; only the uid may be committed"
        assert board["links"][0]["tags"] == ["posfleet"]


def test_panels_have_unique_ids_a_question_and_fit_the_grid(boards: dict[str, dict[str, Any]]) -> None:
    for board in boards.values():
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), board["uid"]
        cells: set[tuple[int, int]] = set()
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, panel["title"]
            mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
            assert not cells & mine, f"{board['uid']}: {panel['title']} overlaps another panel"
            cells |= mine
        for panel in dashboards.iter_panels(board):
            assert panel["description"].strip(), f"{panel['title']}: says no question it answers"
            assert panel["targets"], panel["title"]


def test_every_query_uses_a_datasource_variable_and_defined_variables(boards: dict[str, dict[str, Any]]) -> None:
    for board in boards.values():
        variables = {v["name"] for v in board["templating"]["list"]}
        for panel, target in targets(board):
            ds = target["datasource"]
            assert ds in ({"type": "prometheus", "uid": "${datasource}"}, {"type": "influxdb", "uid": "${influx}"})
            assert ds["uid"].strip("${}") in variables
            assert panel["datasource"] == ds, f"{panel['title']}: mixes datasources"
            query = target.get("expr") or target["query"]
            unknown = set(VAR_RE.findall(query)) - variables - GRAFANA_BUILTINS
            assert not unknown, f"{panel['title']}: undefined variables {unknown}"
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                assert var["datasource"]["uid"].strip("${}") in variables


def test_every_metric_named_is_documented(boards: dict[str, dict[str, Any]]) -> None:
    documented = (ROOT / "docs/metrics.md").read_text()
    storage = ROOT / "docs/storage.md"
    if storage.exists():
        documented += storage.read_text()
    for board in boards.values():
        for panel, target in targets(board):
            for metric in re.findall(r"\bposfleet_[a-z_]+", target.get("expr", "")):
                base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
                assert metric in documented or base in documented, f"{panel['title']}: {metric} is not in docs/"


def test_every_promql_query_parses(boards: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed (Debian package prometheus)")
    rules = []
    for board in boards.values():
        for var in board["templating"]["list"]:
            if var["type"] == "query" and var["datasource"]["type"] == "prometheus":
                match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"])
                assert match, var["query"]
                rules.append(substitute(match.group(1)))
        for _, target in targets(board):
            if "expr" in target:
                rules.append(substitute(target["expr"]))
    rule_file = tmp_path / "queries.yml"
    rule_file.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "q", "rules": [{"record": f"q:{i}", "expr": e} for i, e in enumerate(rules)]}]}
        )
    )
    result = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def substitute(expr: str) -> str:
    """The values Grafana would put in (as the integration test does)."""
    for name, value in {
        "acquirer": ".*",
        "site": ".*",
        "job": ".*",
        "terminal_id": "T00000",
        "__rate_interval": "1m",
        "__interval": "15s",
        "__range": "5m",
    }.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return expr


def test_provisioning_points_at_the_dashboards_and_datasources() -> None:
    ds = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/posfleet.yaml").read_text())
    uids = {d["type"]: d["uid"] for d in ds["datasources"]}
    assert uids["prometheus"] == dashboards.PROMETHEUS_DS_UID
    assert uids["influxdb"] == dashboards.INFLUX_DS_UID
    prov = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/posfleet.yaml").read_text())
    path = prov["providers"][0]["options"]["path"]
    compose = yaml.safe_load((ROOT / "deploy/docker-compose.yml").read_text())
    assert f"../dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


# ------------------------------------------------------------------------------------------- grafana push


def test_push_without_the_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "grafana_client.api", None)
    assert run("grafana", "push", "--url", "http://127.0.0.1:9") == 2
    assert "pip install 'posfleet[grafana]'" in capsys.readouterr().err


def test_push_without_url_fails_clearly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("GRAFANA_URL", raising=False)
    assert run("grafana", "push") == 2
    assert "GRAFANA_URL" in capsys.readouterr().err


def test_push_to_unreachable_grafana_exits_1(tmp_path: Path) -> None:
    from tests.harness.core import free_port

    token = tmp_path / "token"
    token.write_text("t\n")
    assert (
        run("grafana", "push", "--url", f"http://127.0.0.1:{free_port()}", "--token-file", str(token), "--timeout", "2")
        == 1
    )


def test_push_creates_the_folder_and_overwrites_each_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.harness.dash import FakeGrafana

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with FakeGrafana() as grafana:
        monkeypatch.setenv("GRAFANA_URL", grafana.url)
        assert run("grafana", "push", "--token-file", str(token)) == 0
        assert grafana.auth == {"Bearer s3cret"}
        assert grafana.folders == {"posfleet": "posfleet"}
        assert {d["dashboard"]["uid"] for d in grafana.dashboards} == UIDS
        assert all(d["overwrite"] and d["folderUid"] == "posfleet" for d in grafana.dashboards)
        assert all("id" not in d["dashboard"] for d in grafana.dashboards)
        # A second push finds the folder and overwrites again.
        assert run("grafana", "push", "--token-file", str(token)) == 0
        assert len(grafana.dashboards) == 2 * len(UIDS)
        assert grafana.folder_creations == 1
    json.dumps(grafana.dashboards)


def test_docs_describe_every_dashboard_and_panel(boards: dict[str, dict[str, Any]]) -> None:
    doc = (ROOT / "docs/dashboards.md").read_text()
    for name, board in boards.items():
        assert f"`{board['uid']}`" in doc and f"`{name}`" in doc
        for panel in dashboards.iter_panels(board):
            assert f"| {panel['title']} |" in doc, f"docs/dashboards.md lacks panel {panel['title']!r}"
            assert panel["description"] in doc, f"docs/dashboards.md has another question for {panel['title']!r}"
