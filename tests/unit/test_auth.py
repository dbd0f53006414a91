"""API tokens: the bearer scheme in any case (RFC 7235), scopes per acquirer, bad scopes refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.http.auth import Tokens, load_metrics_token, load_tokens, token_matches

TOKEN = "tok-0123456789abcdef"


def tokens(tmp_path: Path, line: str, monkeypatch: pytest.MonkeyPatch) -> Tokens:
    monkeypatch.delenv("POSFLEET_API_TOKENS", raising=False)
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN} {line}\n")
    return load_tokens(str(path))


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER {TOKEN}", f"beArEr {TOKEN}", f"Bearer   {TOKEN}  ",
    f" Bearer {TOKEN}",
])
def test_bearer_scheme_is_case_insensitive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    principal = tokens(tmp_path, "read:*", monkeypatch).lookup(header)
    assert principal is not None and principal.read_all


@pytest.mark.parametrize("header", [
    None, "", TOKEN, f"Basic {TOKEN}", f"Bearer{TOKEN}", "Bearer ", "Bearer", f"Bearer {TOKEN}x", f"Token {TOKEN}",
])
def test_anything_else_is_no_principal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, header: str | None) -> None:
    assert tokens(tmp_path, "read:*", monkeypatch).lookup(header) is None


def test_write_upstream_alone_means_every_acquirer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tokens(tmp_path, "write:upstream", monkeypatch).lookup(f"Bearer {TOKEN}")
    assert p is not None
    assert p.can_write_upstream("acq-a") and p.can_write_upstream("anything") and p.writes_upstream
    assert not p.can_read("acq-a")


def test_scoped_write_is_for_its_acquirers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tokens(tmp_path, "write:upstream:acq-a, write:upstream:acq-c,read:acq-a", monkeypatch).lookup(
        f"Bearer {TOKEN}")
    assert p is not None
    assert p.can_write_upstream("acq-a") and p.can_write_upstream("acq-c") and p.writes_upstream
    assert not p.can_write_upstream("acq-b") and not p.can_write_upstream("*")
    assert p.can_read("acq-a") and not p.can_read("acq-c")


def test_read_scopes_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tokens(tmp_path, "read:*", monkeypatch).lookup(f"Bearer {TOKEN}")
    assert p is not None and not p.writes_upstream and not p.can_write_upstream("acq-a")


@pytest.mark.parametrize("scope", ["write:upstream:", "write:upstream:*", "read:", "write", "write:*", "admin"])
def test_unknown_or_empty_scopes_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scope: str) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        tokens(tmp_path, scope, monkeypatch)


def test_metrics_token_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics-token"
    assert load_metrics_token(None) is None
    path.write_text("metrics-token-0123456789\n")
    token = load_metrics_token(str(path))
    assert token == "metrics-token-0123456789"
    assert token_matches(token, f"bearer {token}") and token_matches(token, f"Bearer {token}")
    assert not token_matches(token, f"Basic {token}") and not token_matches(token, None)
    assert not token_matches(token, "Bearer metrics-token-012345678")
    for bad in ("short\n", "two words-0123456789\n", "\n"):
        path.write_text(bad)
        with pytest.raises(ValueError, match="at least 16 characters"):
            load_metrics_token(str(path))
