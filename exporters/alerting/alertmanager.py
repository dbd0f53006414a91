"""Maintenance windows as Alertmanager silences, through Alertmanager's v2 HTTP API (urllib, no extra deps).

`maintenance_silence` is a pure function from a scope (acquirer, merchant or terminals) and a kind to the
silence to create; `AlertmanagerClient` only moves JSON. Every silence posfleet creates carries a comment that
starts with `MARKER`, so `list` can tell maintenance windows from other silences.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

__all__ = [
    "HOST_MAINTENANCE_ALERTS",
    "MARKER",
    "AlertmanagerClient",
    "AlertmanagerError",
    "Kind",
    "Matcher",
    "Scope",
    "Silence",
    "SilenceSpec",
    "maintenance_silence",
    "regex_escape",
]

MARKER: Final = "[posfleet maintenance]"
# Announced acquirer host maintenance: the host or its feed is down on purpose. Only what the maintenance itself
# causes is muted; terminals' own faults (hardware, offline, backlog...) still page.
HOST_MAINTENANCE_ALERTS: Final = ("PosTerminalUpstreamMissing", "PosUpstreamFeedStale")

Kind = Literal["all", "host"]


class AlertmanagerError(RuntimeError):
    """Alertmanager could not be reached or refused the request; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Matcher:
    """One label matcher of a silence."""

    name: str
    value: str
    is_regex: bool = False
    is_equal: bool = True

    def to_api(self) -> dict[str, Any]:
        """The v2 API's JSON form."""
        return {"name": self.name, "value": self.value, "isRegex": self.is_regex, "isEqual": self.is_equal}

    def __str__(self) -> str:
        op = ("=~" if self.is_regex else "=") if self.is_equal else ("!~" if self.is_regex else "!=")
        return f"{self.name}{op}{json.dumps(self.value)}"


@dataclass(frozen=True, slots=True)
class Scope:
    """What is under maintenance: exactly one of acquirer, merchant or a set of terminals."""

    acquirer: str | None = None
    merchant: str | None = None
    terminals: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        given = [x for x in (self.acquirer, self.merchant, self.terminals or None) if x]
        if len(given) != 1:
            raise ValueError("give exactly one of an acquirer, a merchant or terminals")


@dataclass(frozen=True, slots=True)
class SilenceSpec:
    """A silence to create."""

    matchers: tuple[Matcher, ...]
    starts_at: datetime
    ends_at: datetime
    created_by: str
    comment: str

    def to_api(self) -> dict[str, Any]:
        """The v2 API's JSON body for POST /api/v2/silences."""
        return {
            "matchers": [m.to_api() for m in self.matchers],
            "startsAt": _iso(self.starts_at),
            "endsAt": _iso(self.ends_at),
            "createdBy": self.created_by,
            "comment": self.comment,
        }


@dataclass(frozen=True, slots=True)
class Silence:
    """A silence as Alertmanager reports it."""

    id: str
    state: str
    matchers: tuple[Matcher, ...]
    starts_at: str
    ends_at: str
    created_by: str
    comment: str

    @property
    def is_maintenance(self) -> bool:
        """Created by `posfleet maintenance`."""
        return self.comment.startswith(MARKER)


# Go RE2 metacharacters; other punctuation needs no escape (and RE2 rejects escaping some of it).
_RE2_SPECIAL: Final = frozenset("\\.+*?()|[]{}^$")


def regex_escape(text: str) -> str:
    """Escape a literal for an Alertmanager (Go RE2, anchored) regex matcher."""
    return "".join("\\" + c if c in _RE2_SPECIAL else c for c in text)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def maintenance_silence(
    scope: Scope,
    kind: Kind,
    *,
    starts_at: datetime,
    ends_at: datetime,
    author: str,
    reason: str,
) -> SilenceSpec:
    """The silence for a maintenance window; ValueError when it makes no sense."""
    if ends_at <= starts_at:
        raise ValueError("the maintenance window must end after it starts")
    if not author.strip():
        raise ValueError("an author is required")
    if not reason.strip():
        raise ValueError("a reason is required")
    matchers: list[Matcher] = []
    if scope.acquirer:
        matchers.append(Matcher("acquirer", scope.acquirer))
        what = f"acquirer {scope.acquirer}"
    elif scope.merchant:
        matchers.append(Matcher("merchant_id", scope.merchant))
        what = f"merchant {scope.merchant}"
    else:
        ids = sorted(set(scope.terminals))
        if len(ids) == 1:
            matchers.append(Matcher("terminal_id", ids[0]))
        else:
            matchers.append(Matcher("terminal_id", "|".join(regex_escape(t) for t in ids), is_regex=True))
        what = f"terminals {', '.join(ids)}"
    if kind == "host":
        if not scope.acquirer:
            raise ValueError("--kind host needs --acquirer: host maintenance is announced per acquirer")
        matchers.append(Matcher("alertname", "|".join(HOST_MAINTENANCE_ALERTS), is_regex=True))
    comment = f"{MARKER} kind={kind} {what}: {reason.strip()}"
    return SilenceSpec(tuple(matchers), starts_at, ends_at, author.strip(), comment)


def _silence_from_api(body: dict[str, Any]) -> Silence:
    return Silence(
        id=str(body["id"]),
        state=str(body.get("status", {}).get("state", "")),
        matchers=tuple(
            Matcher(str(m["name"]), str(m["value"]), bool(m.get("isRegex")), bool(m.get("isEqual", True)))
            for m in body.get("matchers", [])
        ),
        starts_at=str(body.get("startsAt", "")),
        ends_at=str(body.get("endsAt", "")),
        created_by=str(body.get("createdBy", "")),
        comment=str(body.get("comment", "")),
    )


class AlertmanagerClient:
    """The few v2 API calls posfleet needs."""

    def __init__(self, base_url: str, timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: object = None, query: dict[str, Any] | None = None) -> Any:
        url = f"{self.base_url}/api/v2/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace").strip()[:500]
            raise AlertmanagerError(
                f"Alertmanager at {self.base_url} refused {method} /api/v2/{path}: HTTP {err.code} {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise AlertmanagerError(
                f"cannot reach Alertmanager at {self.base_url}: {reason} "
                "(is it running? pass --alertmanager URL or set POSFLEET_ALERTMANAGER_URL)"
            ) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise AlertmanagerError(f"{self.base_url} did not answer with JSON: is it an Alertmanager?") from None

    def create_silence(self, spec: SilenceSpec) -> str:
        """Create a silence; returns its id."""
        answer = self._call("POST", "silences", spec.to_api())
        if not isinstance(answer, dict) or "silenceID" not in answer:
            raise AlertmanagerError(f"unexpected answer from {self.base_url}: {answer!r}")
        return str(answer["silenceID"])

    def list_silences(self) -> list[Silence]:
        """All silences Alertmanager knows (active, pending and expired)."""
        answer = self._call("GET", "silences")
        if not isinstance(answer, list):
            raise AlertmanagerError(f"unexpected answer from {self.base_url}: {answer!r}")
        return [_silence_from_api(s) for s in answer]

    def expire_silence(self, silence_id: str) -> None:
        """Expire (end) a silence now."""
        self._call("DELETE", f"silence/{urllib.parse.quote(silence_id, safe='')}")

    def alerts(self, *, active: bool = True, silenced: bool = True, inhibited: bool = True) -> list[dict[str, Any]]:
        """Alerts as Alertmanager holds them (GET /api/v2/alerts)."""
        answer = self._call(
            "GET",
            "alerts",
            query={"active": str(active).lower(), "silenced": str(silenced).lower(),
                   "inhibited": str(inhibited).lower()},
        )
        if not isinstance(answer, list):
            raise AlertmanagerError(f"unexpected answer from {self.base_url}: {answer!r}")
        return answer

    def post_alerts(self, alerts: Sequence[dict[str, Any]]) -> None:
        """Send alerts as Prometheus would (POST /api/v2/alerts); for tests and drills."""
        self._call("POST", "alerts", list(alerts))
