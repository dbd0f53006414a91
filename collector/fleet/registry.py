"""Registry of known terminals, loaded from CSV and reloadable without restart."""

from __future__ import annotations

import csv
import functools
import logging
import os
import sys
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

import msgspec

from collector.fleet.protocol import has_card_number, valid_id

__all__ = ["Place", "Registry", "RegistryEntry", "RegistryError", "load_registry"]

log = logging.getLogger(__name__)

COLUMNS = ("terminal_id", "merchant_id", "acquirer", "model", "site", "region", "tz")


class RegistryError(ValueError):
    """The registry file is invalid; lists every bad line."""


class Place(msgspec.Struct, frozen=True, gc=False):
    """Where a terminal is: its region and time zone, one object shared by every entry with the same pair."""

    region: str
    tz: str  # IANA zone of the site (activity baselines); "" = the acquirer's default (config `activity`)


@functools.lru_cache(maxsize=4096)
def _place(region: str, tz: str) -> Place:
    return Place(region, tz)


class RegistryEntry(msgspec.Struct, frozen=True, gc=False):
    """What the acquirer's records say about one terminal. Build it with `RegistryEntry.of`.

    Six slots: region and time zone repeat across a fleet and share one `Place` (a seventh slot took the entry
    from the allocator's 64 B size class to 80 B: ~16 MB per million terminals, docs/performance.md)."""

    terminal_id: str
    merchant_id: str
    acquirer: str
    model: str
    site: str
    place: Place

    @classmethod
    def of(cls, terminal_id: str, merchant_id: str, acquirer: str, model: str, site: str, region: str,
           tz: str = "") -> RegistryEntry:
        """An entry, its region and zone shared with every other entry that has the same."""
        return cls(terminal_id, merchant_id, acquirer, model, site, _place(region, tz))

    @property
    def region(self) -> str:
        return self.place.region

    @property
    def tz(self) -> str:
        return self.place.tz


@dataclass(frozen=True, slots=True)
class Registry:
    """An immutable snapshot of the registry; reload builds a new one."""

    entries: dict[str, RegistryEntry]
    mtime: float = 0.0

    def get(self, tid: str) -> RegistryEntry | None:
        """The entry for a terminal id, or None when unregistered."""
        return self.entries.get(tid)

    def acquirers(self) -> set[str]:
        """All acquirers named in the registry."""
        return {e.acquirer for e in self.entries.values()}

    def sites(self) -> set[tuple[str, str]]:
        """All (acquirer, site) pairs named in the registry."""
        return {(e.acquirer, e.site) for e in self.entries.values()}


EMPTY = Registry({})


@functools.lru_cache(maxsize=1024)
def _zone_problem(name: str) -> bool:
    """True when `name` is not a time zone this host knows (checked once per distinct name)."""
    try:
        zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return True
    return False


def load_registry(path: str | os.PathLike[str] | None) -> Registry:
    """Read the CSV; every bad line is reported at once."""
    if path is None:
        return EMPTY
    p = Path(path)
    problems: list[str] = []
    entries: dict[str, RegistryEntry] = {}
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)  # rows as lists: a dict per row would be 100k short-lived dicts to fragment the heap
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in COLUMNS[:3] if c not in header]
        if missing:
            raise RegistryError(f"{p}: missing columns {', '.join(missing)} (need {', '.join(COLUMNS)})")
        index = {c: header.index(c) for c in COLUMNS if c in header}
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            values = {c: (row[i].strip() if i < len(row) else "") for c, i in index.items()}
            for c in COLUMNS:
                values.setdefault(c, "")
            for col in ("terminal_id", "merchant_id", "acquirer"):
                if not valid_id(values[col]):
                    problems.append(f"line {lineno}: {col} must match [A-Za-z0-9_-]{{1,64}}")
                elif has_card_number(values[col]):  # as on the wire (check_id): ids go into labels and logs
                    problems.append(f"line {lineno}: {col} looks like a card number (Luhn and a card brand's "
                                    "prefix and length); it would be rejected on MQTT too")
            if values["tz"] and _zone_problem(values["tz"]):
                problems.append(f"line {lineno}: tz {values['tz']!r} is not a known IANA time zone")
            if values["terminal_id"] in entries:
                problems.append(f"line {lineno}: duplicate terminal_id {values['terminal_id']}")
            if len(problems) > 20:
                break
            # Names repeat (and meet the same strings again in snapshots and heartbeats): one object each. The
            # terminal id is unique: not interned (the intern table would cost ~31 B per terminal); restored
            # terminals share the registry's own id string instead (collector.fleet.snapshot).
            shared = {c: v if c == "terminal_id" else sys.intern(v) for c, v in values.items()}
            entries[shared["terminal_id"]] = RegistryEntry.of(
                terminal_id=shared["terminal_id"],
                merchant_id=shared["merchant_id"],
                acquirer=shared["acquirer"],
                model=shared["model"],
                site=shared["site"] or "unknown",
                region=shared["region"],
                tz=shared["tz"],
            )
    if problems:
        raise RegistryError(f"{p}: " + "; ".join(problems))
    return Registry(entries, p.stat().st_mtime)
