"""Who should own which partition: a pure decision over the leases and members read from NATS KV.

Each round a collector reads every lease (`partition -> owner`) and every live member (`instance -> its
preferred shard`), both kept alive by renewals under the bucket's TTL, and asks `plan` what to do:
- its fair share is ceil(partitions / live members) (itself counted even before its member key is seen);
- below it, it takes free partitions (no lease: never owned, cleanly released, or the owner died and its lease
  expired): its own preferred ones first, then any other that no live member with room prefers, in an order that
  differs per instance so that collectors starting together rarely race for the same partition;
- above it, or holding a partition that a live member with room prefers and does not hold, it releases,
  at most a few per round (a release costs the partition's snapshot and a replay by the next owner).
Taking is bounded per round too, so a collector that finds everything free does not grab all of it before the
others' member keys are seen. No I/O and no clock: presence in KV is the lease.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from collector.cluster.partition import fnv1a_32

__all__ = ["Plan", "fair_share", "plan"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What one collector should do this round."""

    take: tuple[int, ...] = ()
    release: tuple[int, ...] = ()


def fair_share(partitions: int, members: int) -> int:
    """How many partitions one of `members` live collectors may own."""
    return math.ceil(partitions / max(1, members))


def plan(
    me: str,
    partitions: int,
    leases: Mapping[int, str],
    members: Mapping[str, frozenset[int]],
    *,
    max_take: int = 8,
    max_release: int = 4,
) -> Plan:
    """The partitions `me` should take and release, given who holds which lease and who is alive with which
    preferred partitions (`members`, `me` included or not)."""
    alive = dict(members)
    mine_preferred = alive.setdefault(me, frozenset())
    share = fair_share(partitions, len(alive))
    mine = sorted(p for p, owner in leases.items() if owner == me)
    held: dict[str, int] = {}
    for owner in leases.values():
        held[owner] = held.get(owner, 0) + 1
    # Preferred partitions of the other live members that have room to take them (else giving one back would
    # only make it free for anybody, me included, again).
    others_want = {
        p for name, prefs in alive.items() if name != me and held.get(name, 0) < share
        for p in prefs if leases.get(p) != name
    }

    # Give back first: what another live member prefers (and I do not), then whatever is above my share.
    give = [p for p in mine if p in others_want and p not in mine_preferred]
    if len(mine) - len(give) > share:
        rest = sorted((p for p in mine if p not in give),
                      key=lambda p: (p in mine_preferred, fnv1a_32(f"{me}/{p}".encode())))
        give += rest[: len(mine) - len(give) - share]
    if give:
        return Plan(release=tuple(give[:max_release]))

    room = min(share - len(mine), max_take)
    if room <= 0:
        return Plan()
    # Left to a live member with room that prefers it: it takes its own first.
    free = [p for p in range(partitions) if p not in leases and p not in others_want]
    free.sort(key=lambda p: (p not in mine_preferred, fnv1a_32(f"{me}/{p}".encode())))
    return Plan(take=tuple(free[:room]))
