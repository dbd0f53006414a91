"""API tokens and their scopes: `read:<acquirer>`, `read:*`, `write:upstream:<acquirer>`, `write:upstream`.

- `read:<acquirer>` sees that acquirer's terminals; `read:*` sees all of them.
- `write:upstream:<acquirer>` may post that acquirer's feed only: an acquirer's host holds a token that cannot
  speak for another acquirer. `write:upstream` (no acquirer) keeps its original meaning, every acquirer, for
  one trusted gateway that relays all feeds; give acquirers the scoped form.
- Write scopes read nothing, read scopes write nothing.

Tokens come from a file (`http.tokens_file`, one `token scope[,scope...]` per line, `#` comments) and/or the
environment variable POSFLEET_API_TOKENS (same format, entries separated by `;`). Tokens are compared in
constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from collector.config import load_metrics_token

__all__ = ["Principal", "Tokens", "bearer", "load_metrics_token", "load_tokens", "token_matches"]


@dataclass(frozen=True, slots=True)
class Principal:
    """What a token may do."""

    name: str
    read_all: bool
    read: frozenset[str]
    write_all: bool = False  # `write:upstream`: the feed of every acquirer
    write: frozenset[str] = frozenset()  # `write:upstream:<acquirer>`

    def can_read(self, acquirer: str) -> bool:
        """May this token see terminals of `acquirer`?"""
        return self.read_all or acquirer in self.read

    def can_write_upstream(self, acquirer: str) -> bool:
        """May this token post the feed of `acquirer`?"""
        return self.write_all or acquirer in self.write

    @property
    def writes_upstream(self) -> bool:
        """Does this token hold any upstream write scope?"""
        return self.write_all or bool(self.write)


OPEN = Principal("anonymous", True, frozenset())


def bearer(header: str | None) -> bytes | None:
    """The credentials of an `Authorization: Bearer …` header (the scheme in any case), or None."""
    # RFC 7235: the auth-scheme is case-insensitive and one or more spaces separate it from the token.
    scheme, _, credentials = (header or "").strip().partition(" ")
    given = credentials.strip().encode()
    return given if scheme.lower() == "bearer" and given else None


def token_matches(expected: str, header: str | None) -> bool:
    """Does the header carry exactly this bearer token? (constant time)"""
    given = bearer(header)
    return given is not None and hmac.compare_digest(expected.encode(), given)


@dataclass(frozen=True, slots=True)
class Tokens:
    """All configured tokens; `required` is False only when none are configured (demo mode)."""

    by_token: dict[str, Principal]

    @property
    def required(self) -> bool:
        """True when the API demands a token for reads."""
        return bool(self.by_token)

    def lookup(self, header: str | None) -> Principal | None:
        """The principal for an `Authorization: Bearer …` header (the scheme in any case), or None."""
        given = bearer(header)
        if given is None:
            return None
        found = None
        for token, principal in self.by_token.items():
            if hmac.compare_digest(token.encode(), given):
                found = principal
        return found


WRITE_ALL = "write:upstream"
WRITE_ONE = "write:upstream:"


def _known_scope(scope: str) -> bool:
    # `read:` and `write:upstream:` need a name after the colon: `read:` alone would silently grant nothing.
    return (scope.startswith("read:") and len(scope) > 5) or scope == WRITE_ALL or (
        scope.startswith(WRITE_ONE) and len(scope) > len(WRITE_ONE) and scope[len(WRITE_ONE):] != "*")


def _parse(lines: list[str], source: str) -> dict[str, Principal]:
    out: dict[str, Principal] = {}
    for n, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{source} entry {n}: expected 'TOKEN SCOPE[,SCOPE...]'")
        token, scopes = parts[0], [s.strip() for s in parts[1].split(",") if s.strip()]
        if len(token) < 16:
            raise ValueError(f"{source} entry {n}: token shorter than 16 characters")
        bad = [s for s in scopes if not _known_scope(s)]
        if bad:
            raise ValueError(f"{source} entry {n}: unknown scope(s) {', '.join(bad)}")
        reads = {s[5:] for s in scopes if s.startswith("read:")}
        out[token] = Principal(
            name=f"{source}#{n}",
            read_all="*" in reads,
            read=frozenset(reads - {"*"}),
            write_all=WRITE_ALL in scopes,
            write=frozenset(s[len(WRITE_ONE):] for s in scopes if s.startswith(WRITE_ONE)),
        )
    return out


def load_tokens(path: str | None) -> Tokens:
    """Tokens from the file and the environment."""
    tokens: dict[str, Principal] = {}
    if path:
        tokens.update(_parse(Path(path).read_text(encoding="utf-8").splitlines(), path))
    env = os.environ.get("POSFLEET_API_TOKENS")
    if env:
        tokens.update(_parse(env.split(";"), "POSFLEET_API_TOKENS"))
    return Tokens(tokens)
