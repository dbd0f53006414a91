"""Who takes which partition (collector.cluster.ownership.plan): tables, then whole clusters simulated round by
round with leases that only one holder can have (what NATS KV's create gives), members joining and dying."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.cluster.ownership import Plan, fair_share, plan
from collector.cluster.partition import shard_partitions

NONE: frozenset[int] = frozenset()


@pytest.mark.parametrize(("n", "members", "share"), [(64, 1, 64), (64, 2, 32), (64, 3, 22), (16, 5, 4), (8, 0, 8)])
def test_fair_share(n: int, members: int, share: int) -> None:
    assert fair_share(n, members) == share


def test_alone_takes_at_most_max_take_per_round_preferred_first() -> None:
    prefs = shard_partitions((1, 2), 16)
    p = plan("a", 16, {}, {"a": prefs}, max_take=4)
    assert len(p.take) == 4 and set(p.take) <= prefs and not p.release


def test_a_dead_members_partitions_are_free_and_taken() -> None:
    # b died: its member key and leases expired. Only a's leases remain.
    leases = {p: "a" for p in range(8)}
    p = plan("a", 16, leases, {"a": NONE}, max_take=8)
    assert sorted(p.take) == list(range(8, 16))


def test_above_share_releases_a_few_at_a_time_never_below_share() -> None:
    leases = {p: "a" for p in range(16)}
    p = plan("a", 16, leases, {"a": NONE, "b": NONE}, max_release=4)
    assert len(p.release) == 4 and not p.take
    p = plan("a", 16, {q: "a" for q in range(10)}, {"a": NONE, "b": NONE}, max_release=4)
    assert len(p.release) == 2  # down to the share (8), not below


def test_gives_back_what_a_member_with_room_prefers() -> None:
    leases = {p: "a" for p in range(16)}
    b_prefs = shard_partitions((1, 2), 16)
    p = plan("a", 16, leases, {"a": shard_partitions((0, 2), 16), "b": b_prefs})
    assert len(p.release) == 4 and set(p.release) <= b_prefs


def test_leaves_a_free_partition_to_the_member_that_prefers_it() -> None:
    leases = {p: "a" for p in range(7)}
    b_prefs = frozenset({7})
    p = plan("a", 16, leases, {"a": NONE, "b": b_prefs})
    assert 7 not in p.take and p.take


def test_at_share_does_nothing() -> None:
    leases = {p: ("a" if p < 8 else "b") for p in range(16)}
    assert plan("a", 16, leases, {"a": NONE, "b": NONE}) == Plan()


def simulate(n: int, members: dict[str, frozenset[int]], leases: dict[int, str], rng: random.Random,
             rounds: int = 80) -> dict[int, str]:
    """Rounds in random member order; a take succeeds only if the lease is still free (KV create)."""
    for _ in range(rounds):
        order = list(members)
        rng.shuffle(order)
        for me in order:
            decision = plan(me, n, leases, members)
            for p in decision.release:
                assert leases[p] == me
                del leases[p]
            for p in decision.take:
                leases.setdefault(p, me)
    return leases


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 128), st.integers(1, 6), st.booleans(), st.integers(0, 2**32))
def test_a_cluster_converges_every_partition_owned_within_share(n: int, k: int, sharded: bool, seed: int) -> None:
    rng = random.Random(seed)
    members = {f"c{i}": (shard_partitions((i, k), n) if sharded else NONE) for i in range(k)}
    leases = simulate(n, members, {}, rng)
    assert set(leases) == set(range(n))
    share = fair_share(n, k)
    held = {m: sum(1 for o in leases.values() if o == m) for m in members}
    assert all(h <= share for h in held.values()), held
    # Stable: one more round changes nothing.
    assert all(plan(m, n, leases, members) == Plan() for m in members)
    if sharded and n >= k:
        assert all(leases[p] == m for m, prefs in members.items() for p in prefs)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 64), st.integers(2, 5), st.integers(0, 2**32))
def test_a_dead_members_partitions_are_shared_by_the_survivors(n: int, k: int, seed: int) -> None:
    rng = random.Random(seed)
    members = {f"c{i}": NONE for i in range(k)}
    leases = simulate(n, members, {}, rng)
    dead = rng.choice(list(members))
    del members[dead]
    leases = {p: o for p, o in leases.items() if o != dead}  # its leases expire
    leases = simulate(n, members, leases, rng)
    assert set(leases) == set(range(n)) and dead not in leases.values()
    assert all(sum(1 for o in leases.values() if o == m) <= fair_share(n, k - 1) for m in members)
