"""Fleet-level conditions across partitioned collectors: mass_offline of a site (or acquirer) whose terminals are
spread over several collectors, judged once, by one collector; upstream_feed_stale exported once.

    every collector, every evaluation round:  posfleet.fleet.counts.<instance>  {sites: [[acq, site, offline,
        shutdown], ...], acquirers: [[acq, offline, shutdown], ...]}   (sparse: sites with an offline terminal here,
        or watched by the leader)
    the fleet leader (the owner of partition 0): sums the latest report of every collector, takes the number of
        terminals of each site and acquirer from the full registry, runs the same hysteresis as a single
        collector (`collector.fleet.detect.advance_mass`), publishes the sites it watches
        (posfleet.fleet.watch: every site in or on its way into or out of mass_offline, so that every collector
        reports its shut-down terminals there too) and is the only one exporting the mass-offline and the acquirer
        feed series.

Decisions:
- Reports older than REPORT_MAX_AGE rounds are dropped: a dead collector's offline terminals are counted again
  by whoever takes its partitions over, not twice.
- A new leader starts without the old one's hysteresis: a mass outage in progress is raised again after
  `mass_offline.raise_after` of its rounds (the series has a gap of that length, never a false raise).
- A report is bounded (MAX_REPORT_SITES sites); what is left out is counted in the report (`dropped`) and logged.

`sparse_report`, `registry_totals` and `FleetJudge` are pure (unit-tested); `FleetWide` is the I/O.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from typing import Final, NamedTuple, Protocol

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from collector.config import Config, Thresholds
from collector.fleet.detect import MassKey, MassOffline, advance_mass
from collector.fleet.registry import Registry
from collector.fleet.state import UNKNOWN, Fleet

__all__ = ["FleetJudge", "FleetWide", "Report", "registry_totals", "sparse_report"]

log = logging.getLogger(__name__)

SUBJECT: Final = "posfleet.fleet"
LEADER_PARTITION: Final = 0
REPORT_MAX_AGE: Final = 3  # evaluation rounds
MAX_REPORT_SITES: Final = 50_000

Key = tuple[str, str]  # (acquirer, site)


class Report(NamedTuple):
    """One collector's offline and shut-down terminals per site (sparse) and per acquirer."""

    sites: dict[Key, tuple[int, int]]
    acquirers: dict[str, tuple[int, int]]
    dropped: int = 0

    def encode(self, instance: str) -> bytes:
        """The message body."""
        return json.dumps({
            "instance": instance,
            "sites": [[a, s, off, shut] for (a, s), (off, shut) in sorted(self.sites.items())],
            "acquirers": [[a, off, shut] for a, (off, shut) in sorted(self.acquirers.items())],
            "dropped": self.dropped,
        }).encode()

    @staticmethod
    def decode(data: bytes) -> tuple[str, Report]:
        """(instance, report); ValueError/KeyError/TypeError for a malformed body."""
        d = json.loads(data)
        sites = {(str(a), str(s)): (int(off), int(shut)) for a, s, off, shut in d["sites"]}
        acqs = {str(a): (int(off), int(shut)) for a, off, shut in d["acquirers"]}
        return str(d["instance"]), Report(sites, acqs, int(d.get("dropped", 0)))


def sparse_report(counts: Mapping[tuple[str, str, str], int], acquirer_counts: Mapping[tuple[str, str], int],
                  problem_sites: Iterable[Key], watch: Iterable[Key], max_sites: int = MAX_REPORT_SITES) -> Report:
    """What one collector tells the leader: sites with an offline terminal here (among its problem sites: never
    a walk over every site) plus the sites the leader watches; every acquirer with an offline or shut-down
    terminal."""
    keys = {k for k in problem_sites if counts.get((k[0], k[1], "offline"), 0) > 0} | set(watch)
    keys = {k for k in keys if k[0] != UNKNOWN}
    ordered = sorted(keys)
    sites = {(a, s): (counts.get((a, s, "offline"), 0), counts.get((a, s, "_shutdown"), 0))
             for a, s in ordered[:max_sites]}
    acqs: dict[str, tuple[int, int]] = {}
    for (a, cond), _n in acquirer_counts.items():
        if cond in ("offline", "_shutdown") and a != UNKNOWN:
            off, shut = acquirer_counts.get((a, "offline"), 0), acquirer_counts.get((a, "_shutdown"), 0)
            if off or shut:
                acqs[a] = (off, shut)
    return Report(sites, acqs, max(0, len(ordered) - max_sites))


def registry_totals(registry: Registry) -> tuple[Counter[Key], Counter[str]]:
    """Registered terminals per (acquirer, site) and per acquirer: the whole fleet, whoever holds them."""
    sites: Counter[Key] = Counter()
    acqs: Counter[str] = Counter()
    for e in registry.entries.values():
        sites[(e.acquirer, e.site)] += 1
        acqs[e.acquirer] += 1
    return sites, acqs


class FleetJudge:
    """The leader's decision: the latest report of every collector summed, the registry's totals, the hysteresis
    of a single collector. Pure: time is passed in as evaluation rounds."""

    def __init__(self, th: Thresholds, max_age: int = REPORT_MAX_AGE) -> None:
        self.th, self.max_age = th, max_age
        self.reports: dict[str, tuple[int, Report]] = {}  # instance -> (round received, report)
        self.mass: dict[MassKey, tuple[MassOffline, float]] = {}
        self.round = 0

    def receive(self, instance: str, report: Report) -> None:
        """A collector's report (its newest replaces the one before)."""
        self.reports[instance] = (self.round, report)

    def judge(self, now: float, site_known: Mapping[Key, int], acq_known: Mapping[str, int]
              ) -> list[tuple[str, str, str, bool]]:
        """One round: (scope, acquirer, site, raised) for every change."""
        self.round += 1
        for instance in [i for i, (r, _) in self.reports.items() if self.round - r > self.max_age]:
            del self.reports[instance]
        site_off: Counter[Key] = Counter()
        site_shut: Counter[Key] = Counter()
        acq_off: Counter[str] = Counter()
        acq_shut: Counter[str] = Counter()
        for _, rep in self.reports.values():
            for k, (off, shut) in rep.sites.items():
                site_off[k] += off
                site_shut[k] += shut
            for a, (off, shut) in rep.acquirers.items():
                acq_off[a] += off
                acq_shut[a] += shut
        keys: set[MassKey] = {("site", a, s) for (a, s), n in site_off.items() if n > 0}
        keys |= {("acquirer", a, "") for a, n in acq_off.items() if n > 0}
        keys |= set(self.mass)
        changed: list[tuple[str, str, str, bool]] = []
        for key in sorted(keys):
            scope, acq, site = key
            if scope == "site":
                offline, expected = site_off[(acq, site)], site_known.get((acq, site), 0) - site_shut[(acq, site)]
            else:
                offline, expected = acq_off[acq], acq_known.get(acq, 0) - acq_shut[acq]
            raised = advance_mass(self.mass, key, offline, expected, self.th, now)
            if raised is not None:
                changed.append((scope, acq, site, raised))
        return changed

    def active(self) -> list[tuple[str, str, str, float]]:
        """Active mass-offline conditions as (scope, acquirer, site, since), as Fleet.mass_offline()."""
        return sorted((scope, a, s, since) for (scope, a, s), (st, since) in self.mass.items() if st.active)

    def watched(self) -> list[Key]:
        """Sites in, or on their way into or out of, mass_offline: every collector reports them."""
        return sorted((a, s) for scope, a, s in self.mass if scope == "site")


class FleetWideHost(Protocol):
    """What fleet-level judging needs from the collector."""

    @property
    def cfg(self) -> Config: ...
    @property
    def fleet(self) -> Fleet: ...
    @property
    def partitions(self) -> set[int]: ...
    @property
    def instance(self) -> str: ...
    @property
    def registry_file(self) -> Registry: ...


class FleetWide:
    """Publishes this collector's sparse counts every evaluation round; judges the fleet when it leads."""

    def __init__(self, host: FleetWideHost, nc: Client, clock: Callable[[], float]) -> None:
        self.host, self.nc, self.clock = host, nc, clock
        self.judge = FleetJudge(host.cfg.thresholds)
        self.watch: list[Key] = []
        self.subs: list[Subscription] = []
        self.malformed = 0
        self._totals: tuple[Registry, Counter[Key], Counter[str]] | None = None

    @property
    def leader(self) -> bool:
        """True while this collector holds partition 0."""
        return LEADER_PARTITION in self.host.partitions

    async def __aenter__(self) -> FleetWide:
        self.subs.append(await self.nc.subscribe(f"{SUBJECT}.counts.*", cb=self._on_counts))
        self.subs.append(await self.nc.subscribe(f"{SUBJECT}.watch", cb=self._on_watch))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for sub in self.subs:
            with suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_counts(self, msg: Msg) -> None:
        try:
            instance, report = Report.decode(msg.data)
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return
        if self.leader and instance != self.host.instance:  # its own is taken directly in round()
            self.judge.receive(instance, report)

    async def _on_watch(self, msg: Msg) -> None:
        try:
            self.watch = [(str(a), str(s)) for a, s in json.loads(msg.data)]
        except (ValueError, TypeError):
            self.malformed += 1

    def exported(self) -> tuple[list[tuple[str, str, str, float]], bool]:
        """(mass-offline conditions to export, whether to export the acquirer feed series): the leader's only."""
        return (self.judge.active(), True) if self.leader else ([], False)

    def totals(self) -> tuple[Counter[Key], Counter[str]]:
        """The registry's per-site and per-acquirer totals, computed once per registry load."""
        reg = self.host.registry_file
        if self._totals is None or self._totals[0] is not reg:
            self._totals = (reg, *registry_totals(reg))
        return self._totals[1], self._totals[2]

    async def round(self) -> None:
        """Publish this collector's counts; as the leader, judge and publish what it watches."""
        fleet = self.host.fleet
        report = sparse_report(fleet.counts, fleet.acquirer_counts, list(fleet.problem_sites), self.watch)
        if report.dropped:
            log.error("fleet counts of %d sites left out of this round's report (more than %d)", report.dropped,
                      MAX_REPORT_SITES)
        await self.nc.publish(f"{SUBJECT}.counts.{self.host.instance}", report.encode(self.host.instance))
        if not self.leader:
            if self.judge.mass or self.judge.reports:
                self.judge = FleetJudge(self.host.cfg.thresholds)  # a leader again later starts afresh
            return
        self.judge.receive(self.host.instance, report)
        site_known, acq_known = self.totals()
        for scope, acq, site, raised in self.judge.judge(self.clock(), site_known, acq_known):
            log.info("%s fleet-wide mass_offline on %s %s%s", "raised" if raised else "cleared", scope, acq,
                     f"/{site}" if site else "")
        await self.nc.publish(f"{SUBJECT}.watch", json.dumps(self.judge.watched()).encode())

    async def run(self) -> None:
        """Every evaluation round (supervised by the app); a round NATS cannot take is tried again next time."""
        while True:
            await asyncio.sleep(self.host.cfg.state.eval_interval_s)
            try:
                await self.round()
            except (nats.errors.Error, OSError) as err:
                log.warning("fleet-wide round failed: %s", err or type(err).__name__)
