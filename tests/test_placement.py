"""The placement table: a ring per actor type over the members hosting it, equal for equal views,
and the helpers the router and handoff use (pools, moved keys, handoffs)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.cluster.messages import NodeMeta
from spawnmesh.cluster.placement import (
    Move,
    Placement,
    actor_type_of,
    handoffs,
    moved,
    placement_key,
)
from spawnmesh.cluster.ring import Ring
from spawnmesh.ids import ActorId

VN = 16
"""Vnodes for structural properties (cheap rings); movement fractions use the default."""
TYPES = ["s/a", "s/b", "s/c", "t/a"]
NODES = [f"n{i}" for i in range(8)]
views = st.dictionaries(
    st.sampled_from(NODES), st.lists(st.sampled_from(TYPES), unique=True, max_size=4), max_size=8
)
actor_keys = st.lists(st.tuples(st.sampled_from([*TYPES, "s/none"]), st.text(max_size=8)),
                      max_size=40)  # fmt: skip


def meta_view(view: dict[str, list[str]]) -> dict[str, NodeMeta]:
    return {n: NodeMeta(("127.0.0.1", 7000 + i), types) for i, (n, types) in
            enumerate(view.items())}  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(views, st.randoms(use_true_random=False), actor_keys)
def test_equal_views_give_equal_tables_whatever_the_order(
    view: dict[str, list[str]], rnd: random.Random, ks: list[tuple[str, str]]
) -> None:
    items = list(view.items())
    rnd.shuffle(items)
    shuffled = {n: rnd.sample(types, len(types)) for n, types in items}
    a, b, c = Placement(view, VN), Placement(shuffled, VN), Placement(meta_view(shuffled), VN)
    assert a == b == c and a.version == b.version == c.version and hash(a) == hash(c)
    assert [a.owner(t, k) for t, k in ks] == [c.owner(t, k) for t, k in ks]
    # Members hosting nothing do not change the table.
    assert Placement({**view, "idle": []}, VN) == a


@settings(max_examples=100, deadline=None)
@given(views, actor_keys)
def test_rings_hold_only_members_hosting_the_type(
    view: dict[str, list[str]], ks: list[tuple[str, str]]
) -> None:
    p = Placement(view, VN)
    assert p.actor_types == tuple(sorted({t for types in view.values() for t in types}))
    for t in [*TYPES, "s/none"]:
        hosts = tuple(sorted(n for n, types in view.items() if t in types))
        assert p.members(t) == hosts
        ring = p.ring(t)
        assert (ring is None) == (not hosts)
        if ring is not None:
            assert ring.members == hosts and ring.vnodes == VN
    for t, k in ks:
        owner = p.owner(t, k)
        if p.members(t):
            assert owner in p.members(t) and owner == p.owners(t, k, 1)[0]
        else:  # no live member hosts it: the router runs it on its own node
            assert owner is None and p.owners(t, k, 3) == [] and list(p.pool_members(t, k)) == []


def test_types_with_the_same_hosts_share_a_ring_and_reuse_keeps_unchanged_rings() -> None:
    view = {"n1": ["s/a", "s/b", "s/c"], "n2": ["s/a", "s/b"], "n3": ["s/c"]}
    p = Placement(view)
    assert p.ring("s/a") is p.ring("s/b") and p.ring("s/c") is not p.ring("s/a")
    grown = {**view, "n4": ["s/c"]}
    q = Placement(grown, reuse=p)
    assert q == Placement(grown) and q.ring("s/a") is p.ring("s/a")
    assert q.ring("s/c") != p.ring("s/c")
    assert Placement(grown, vnodes=VN, reuse=p).ring("s/a") is not p.ring("s/a")  # other vnodes


@settings(max_examples=50, deadline=None)
@given(views, st.sampled_from(NODES), st.lists(st.sampled_from(TYPES), unique=True), actor_keys)
def test_moved_is_exactly_the_keys_whose_owner_changed(
    view: dict[str, list[str]], node: str, types: list[str], ks: list[tuple[str, str]]
) -> None:
    """A member joins (or changes its types): only keys of the types it hosts move, and only
    to it; the reverse change moves them back from it."""
    before = {n: ts for n, ts in view.items() if n != node}
    after = {**before, node: types}
    old, new = Placement(before, VN), Placement(after, VN, reuse=Placement(before, VN))
    got = moved(old, new, ks)
    want = [Move(t, k, old.owner(t, k), new.owner(t, k)) for t, k in ks
            if old.owner(t, k) != new.owner(t, k)]  # fmt: skip
    assert got == want
    assert all(m.new_owner == node and m.actor_type in types for m in got)
    back = moved(new, old, ks)
    assert [(m.actor_type, m.key, m.new_owner, m.old_owner) for m in back] == [
        tuple(m) for m in got
    ]


def test_join_moves_about_one_nth_of_the_keys() -> None:
    """16 members, a 17th joins: about 1/17 of 20,000 actors move, all to it; it leaves: they
    move back and nothing else moves."""
    base = {f"node-{i}": ["s/a"] for i in range(16)}
    keys = [("s/a", f"actor-{i}") for i in range(20_000)]
    p16 = Placement(base)
    p17 = Placement({**base, "node-new": ["s/a"]}, reuse=p16)
    join = moved(p16, p17, keys)
    assert {m.new_owner for m in join} == {"node-new"}
    assert 0.8 / 17 <= len(join) / len(keys) <= 1.2 / 17
    leave = moved(p17, p16, keys)
    assert sorted((m.key, m.old_owner) for m in leave) == sorted((m.key, "node-new") for m in join)


@settings(max_examples=50, deadline=None)
@given(views, st.sampled_from(NODES), actor_keys)
def test_handoffs_are_the_active_keys_this_node_no_longer_owns(
    view: dict[str, list[str]], me: str, ks: list[tuple[str, str]]
) -> None:
    p = Placement(view, VN)
    out = handoffs(p, me, ks)
    assert out == [Move(t, k, me, p.owner(t, k)) for t, k in ks if p.owner(t, k) != me]
    assert all(m.new_owner != me for m in out)


def test_handoffs_after_a_leave_name_the_new_owner() -> None:
    view = {"a": ["s/x"], "b": ["s/x"], "c": ["s/x", "s/y"]}
    p = Placement(view, VN)
    mine = [("s/x", f"k{i}") for i in range(200) if p.owner("s/x", f"k{i}") == "c"]
    mine.append(("s/y", "only-c-hosts-me"))
    assert handoffs(p, "c", mine) == []
    q = Placement({"a": ["s/x"], "b": ["s/x"]}, VN)  # c leaves
    out = handoffs(q, "c", mine)
    assert [(m.actor_type, m.key) for m in out] == mine
    assert {m.new_owner for m in out if m.actor_type == "s/x"} == {"a", "b"}
    assert out[-1] == Move("s/y", "only-c-hosts-me", "c", None)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(NODES), min_size=1, unique=True),
    st.integers(1, 4),
    st.dictionaries(st.sampled_from(NODES), st.integers(0, 6)),
    st.text(max_size=6),
)
def test_pool_pick_uses_a_free_instance_before_queueing(
    hosts: list[str], size: int, in_flight: dict[str, int], key: str
) -> None:
    p = Placement({n: ["s/pool"] for n in hosts}, VN)
    pick = p.pool_pick("s/pool", key, size, in_flight)
    order = list(p.pool_members("s/pool", key))
    assert sorted(order) == sorted(hosts)
    free = [m for m in order if in_flight.get(m, 0) < size]
    if free:
        assert pick == free[0]  # first in the key's order with a free instance
    else:
        assert pick == min(order, key=lambda m: in_flight.get(m, 0))  # least loaded, queue
    assert p.pool_pick("s/other", key, size, in_flight) is None


def test_pool_calls_spread_over_members_up_to_size_per_member() -> None:
    """A caller with 4 x 3 = 12 calls outstanding fills every member's 3 instances; with no
    load, calls keyed by a counter spread about evenly."""
    hosts = ["a", "b", "c", "d"]
    p = Placement({n: ["s/pool"] for n in hosts})
    in_flight: Counter[str] = Counter()
    for i in range(12):
        m = p.pool_pick("s/pool", str(i), 3, in_flight)
        assert m is not None
        in_flight[m] += 1
    assert in_flight == {m: 3 for m in hosts}
    spread = Counter(p.pool_pick("s/pool", str(i), 3, {}) for i in range(4000))
    assert set(spread) == set(hosts) and max(spread.values()) / 1000 <= 1.15


def test_actor_types_of_named_unnamed_and_pooled_actors() -> None:
    assert placement_key(ActorId("sys", "counter")) == ("sys/counter", "counter")
    assert placement_key(ActorId("sys", "user-42", "user")) == ("sys/user", "user-42")
    assert actor_type_of(ActorId("sys", "workers#3", "workers")) == "sys/workers"


def test_view_values_are_checked_and_tables_are_comparable() -> None:
    with pytest.raises(TypeError):
        Placement({"a": "s/x"})  # type: ignore[dict-item]
    empty = Placement({})
    assert empty.owner("s/x", "k") is None and empty.actor_types == ()
    assert empty != Placement({"a": ["s/x"]}) and empty != "x"
    assert Placement({"a": ["s/x"]}).ring("s/x") == Ring(["a"])
    assert len(empty.version) == 16 and "Placement(0 types" in repr(empty)
