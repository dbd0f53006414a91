"""Maintenance windows: silence building (pure), the v2 API client against a fake server, and the CLI's errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from collector.cli import main
from exporters.alerting import alertmanager as am
from exporters.alerting.cli import window_end
from tests.harness.core import free_port

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(hours=2)


def spec(scope: am.Scope, kind: am.Kind = "all") -> am.SilenceSpec:
    """A silence for scope with fixed times."""
    return am.maintenance_silence(scope, kind, starts_at=NOW, ends_at=LATER, author="ana", reason="router swap")


@pytest.mark.parametrize(
    ("scope", "kind", "matchers"),
    [
        (am.Scope(acquirer="acq-a"), "all", ['acquirer="acq-a"']),
        (am.Scope(merchant="M00042"), "all", ['merchant_id="M00042"']),
        (am.Scope(terminals=("T1",)), "all", ['terminal_id="T1"']),
        (am.Scope(terminals=("T2", "T1", "T2")), "all", ['terminal_id=~"T1|T2"']),
        (am.Scope(terminals=("a.b", "c+d")), "all", ['terminal_id=~"a\\\\.b|c\\\\+d"']),
        (
            am.Scope(acquirer="acq-m"),
            "host",
            ['acquirer="acq-m"', 'alertname=~"PosTerminalUpstreamMissing|PosUpstreamFeedStale"'],
        ),
    ],
)
def test_silence_matchers_per_scope_and_kind(scope: am.Scope, kind: am.Kind, matchers: list[str]) -> None:
    assert [str(m) for m in spec(scope, kind).matchers] == matchers


def test_host_maintenance_never_hides_terminal_faults() -> None:
    names = spec(am.Scope(acquirer="acq-m"), "host").matchers[-1].value.split("|")
    assert "PosTerminalHardwareFault" not in names and "PosTerminalOffline" not in names


def test_silence_body_for_the_v2_api() -> None:
    body = spec(am.Scope(terminals=("T1", "T2"))).to_api()
    assert body == {
        "matchers": [{"name": "terminal_id", "value": "T1|T2", "isRegex": True, "isEqual": True}],
        "startsAt": "2026-11-30T12:00:00Z",
        "endsAt": "2026-11-30T14:00:00Z",
        "createdBy": "ana",
        "comment": "[posfleet maintenance] kind=all terminals T1, T2: router swap",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ends_at": NOW}, "must end after it starts"),
        ({"author": " "}, "an author is required"),
        ({"reason": ""}, "a reason is required"),
    ],
)
def test_nonsense_windows_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"starts_at": NOW, "ends_at": LATER, "author": "ana", "reason": "x"} | kwargs
    with pytest.raises(ValueError, match=message):
        am.maintenance_silence(am.Scope(acquirer="acq-a"), "all", **args)


def test_host_kind_needs_an_acquirer() -> None:
    with pytest.raises(ValueError, match="--kind host needs --acquirer"):
        spec(am.Scope(merchant="M1"), "host")


@pytest.mark.parametrize("scope", [{}, {"acquirer": "a", "merchant": "m"}, {"terminals": ()}])
def test_scope_is_exactly_one_thing(scope: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        am.Scope(**scope)


def test_regex_escape_only_touches_re2_metacharacters() -> None:
    assert am.regex_escape("T-1_a.b+c|d(e)") == "T-1_a\\.b\\+c\\|d\\(e\\)"


def test_window_end_from_duration_or_until() -> None:
    assert window_end(None, "1h30m", NOW) == NOW + timedelta(minutes=90)
    assert window_end("2026-11-30T15:00:00+01:00", None, NOW) == datetime(2026, 11, 30, 14, tzinfo=UTC)
    with pytest.raises(ValueError, match="in the past"):
        window_end("2026-11-30T11:00:00Z", None, NOW)
    with pytest.raises(ValueError, match="not an ISO 8601 time"):
        window_end("tomorrow", None, NOW)


class FakeAlertmanager:
    """Just enough of the v2 silences API, recording requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.silences: dict[str, dict[str, Any]] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body))
                if not body.get("matchers"):
                    self._reply(400, "missing matchers")
                    return
                sid = f"s{len(fake.silences) + 1}"
                fake.silences[sid] = {"id": sid, "status": {"state": "active"}, **body}
                self._reply(200, {"silenceID": sid})

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, None))
                self._reply(200, list(fake.silences.values()))

            def do_DELETE(self) -> None:
                fake.requests.append(("DELETE", self.path, None))
                sid = self.path.rsplit("/", 1)[-1]
                if sid not in fake.silences:
                    self._reply(404, f"silence {sid} not found")
                    return
                fake.silences[sid]["status"] = {"state": "expired"}
                self._reply(200, None)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def fake_am() -> Iterator[FakeAlertmanager]:
    """A fake Alertmanager on a free port."""
    fake = FakeAlertmanager()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def test_client_creates_lists_and_expires(fake_am: FakeAlertmanager) -> None:
    client = am.AlertmanagerClient(fake_am.url)
    sid = client.create_silence(spec(am.Scope(acquirer="acq-a")))
    assert fake_am.requests[0][:2] == ("POST", "/api/v2/silences")
    listed = client.list_silences()
    assert [(s.id, s.state, s.is_maintenance) for s in listed] == [(sid, "active", True)]
    assert [str(m) for m in listed[0].matchers] == ['acquirer="acq-a"']
    client.expire_silence(sid)
    assert fake_am.requests[-1][:2] == ("DELETE", f"/api/v2/silence/{sid}")
    assert client.list_silences()[0].state == "expired"


def test_client_reports_refusals_with_alertmanagers_reason(fake_am: FakeAlertmanager) -> None:
    with pytest.raises(am.AlertmanagerError, match=r"refused DELETE /api/v2/silence/nope: HTTP 404 .*not found"):
        am.AlertmanagerClient(fake_am.url).expire_silence("nope")


def test_unreachable_alertmanager_is_a_clear_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(am.AlertmanagerError, match=rf"cannot reach Alertmanager at {url}: .*refused"):
        am.AlertmanagerClient(url, timeout_s=2).list_silences()


def test_cli_round_trip(fake_am: FakeAlertmanager, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--alertmanager", fake_am.url]
    assert main(["maintenance", "start", "--acquirer", "acq-m", "--kind", "host", "--reason", "host upgrade",
                 "--author", "ana", "--duration", "2h", *base]) == 0
    sid = capsys.readouterr().out.split("\t")[0]
    body = fake_am.silences[sid]
    assert body["createdBy"] == "ana" and "host upgrade" in body["comment"]
    assert main(["maintenance", "list", *base]) == 0
    out = capsys.readouterr().out
    assert sid in out and "host upgrade" in out and 'acquirer="acq-m"' in out
    assert main(["maintenance", "end", sid, *base]) == 0
    assert main(["maintenance", "list", *base]) == 0
    assert "no maintenance windows" in capsys.readouterr().out


def test_cli_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("POSFLEET_ALERTMANAGER_URL", dead)
    assert main(["maintenance", "list"]) == 1
    assert f"cannot reach Alertmanager at {dead}" in capsys.readouterr().err
    assert main(["maintenance", "start", "--merchant", "M1", "--kind", "host", "--reason", "x", "--author", "a",
                 "--duration", "1h"]) == 2
    assert "--kind host needs --acquirer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["maintenance", "start", "--acquirer", "a", "--reason", "x", "--duration", "1h", "--until", "x"])
