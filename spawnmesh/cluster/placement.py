"""Placement table: which live member owns an actor, as a pure function of the membership view.

One :class:`~spawnmesh.cluster.ring.Ring` per actor type, over the members that host that type
(types hosted by the same members share one ring). Every node with the same view builds an equal
table (same :attr:`Placement.version`) and so computes the same owner; when views differ for a
moment the statestore's fencing keeps state safe (see docs/mesh.md). Sans-IO: no clock, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import NamedTuple

from spawnmesh.cluster.messages import NodeMeta
from spawnmesh.cluster.ring import DEFAULT_VNODES, HASH_VERSION, Key, Ring
from spawnmesh.ids import ActorId

View = Mapping[str, NodeMeta] | Mapping[str, Collection[str]]
"""Live members: node id -> its metadata, or simply node id -> the actor types it hosts."""


def actor_type_of(actor: ActorId) -> str:
    """The type an actor is placed by: ``system/name`` of its definition (an unnamed or pooled
    instance's ``parent``, a named actor's own name)."""
    return f"{actor.system}/{actor.parent or actor.name}"


def placement_key(actor: ActorId) -> tuple[str, str]:
    """``(actor type, key)`` to pass to :meth:`Placement.owner` for ``actor``."""
    return actor_type_of(actor), actor.name


class Move(NamedTuple):
    """An actor whose owner changes: ``None`` means no live member hosts its type."""

    actor_type: str
    key: Key
    old_owner: str | None
    new_owner: str | None


def _types_of(node: str, value: NodeMeta | Collection[str]) -> Collection[str]:
    if isinstance(value, NodeMeta):
        return value.actor_types
    if isinstance(value, str | bytes):
        raise TypeError(f"view[{node!r}] must be a NodeMeta or a collection of actor types")
    return value


class Placement:
    """Immutable placement table built from a membership view.

    Equal views give equal tables (``==``, ``hash`` and :attr:`version` depend only on which
    members host which type, the vnode count and the hash version), whatever the order of
    the view or of each member's types. Members that host no type do not affect it.
    """

    __slots__ = ("_hosts", "_key", "_rings", "_version", "_vnodes")
    _hosts: dict[str, tuple[str, ...]]
    _key: tuple[int, int, tuple[tuple[str, tuple[str, ...]], ...]]
    _rings: dict[str, Ring]
    _version: str
    _vnodes: int

    def __init__(
        self, view: View, vnodes: int = DEFAULT_VNODES, reuse: Placement | None = None
    ) -> None:
        """Build the table; ``reuse``, the previous table, lends the rings whose member set is
        unchanged (a ring at 64 members x 1024 vnodes takes tens of ms to build)."""
        hosts: dict[str, set[str]] = {}
        for node, value in view.items():
            for t in _types_of(node, value):
                hosts.setdefault(t, set()).add(node)
        old: dict[tuple[str, ...], Ring] = {}
        if reuse is not None and reuse._vnodes == vnodes:
            old = {r.members: r for r in reuse._rings.values()}
        by_members: dict[tuple[str, ...], Ring] = {}
        rings: dict[str, Ring] = {}
        for t, nodes in hosts.items():
            members = tuple(sorted(nodes))
            ring = by_members.get(members)
            if ring is None:
                ring = old.get(members)
            if ring is None:
                ring = Ring(members, vnodes)
            by_members[members] = rings[t] = ring
        self._rings = rings
        self._hosts = {t: r.members for t, r in rings.items()}
        self._vnodes = vnodes
        self._key = (HASH_VERSION, vnodes, tuple(sorted(self._hosts.items())))
        digest = hashlib.blake2b(digest_size=8, person=b"smesh.placement")
        digest.update(repr(self._key).encode())
        self._version = digest.hexdigest()

    @property
    def version(self) -> str:
        """16 hex digits naming the table: equal on every node with the same view."""
        return self._version

    @property
    def vnodes(self) -> int:
        """Points per member on every ring."""
        return self._vnodes

    @property
    def actor_types(self) -> tuple[str, ...]:
        """Actor types some live member hosts, sorted."""
        return tuple(sorted(self._rings))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self is other or self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Placement({len(self._rings)} types, {self._version})"

    def members(self, actor_type: str) -> tuple[str, ...]:
        """The live members hosting ``actor_type``, sorted (empty if none)."""
        return self._hosts.get(actor_type, ())

    def ring(self, actor_type: str) -> Ring | None:
        """The ring of ``actor_type``, or None if no live member hosts it."""
        return self._rings.get(actor_type)

    def owner(self, actor_type: str, key: Key) -> str | None:
        """The member that owns actor ``key`` of ``actor_type``; None if no live member hosts
        the type (the caller raises ``NoOwner``)."""
        ring = self._rings.get(actor_type)
        return None if ring is None else ring.owner(key)

    def owners(self, actor_type: str, key: Key, n: int) -> list[str]:
        """Up to ``n`` distinct hosting members clockwise from ``key``: the owner, then the
        next owner if it is excluded, and so on."""
        ring = self._rings.get(actor_type)
        return [] if ring is None else ring.owners(key, n)

    def pool_members(self, actor_type: str, key: Key) -> Iterator[str]:
        """Every member hosting the pool ``actor_type``, once each, in the order of preference
        that ``key`` gives (clockwise from it). Different keys spread evenly over members."""
        ring = self._rings.get(actor_type)
        return iter(()) if ring is None else ring.walk(key)

    def pool_pick(
        self, actor_type: str, key: Key, size_per_member: int, in_flight: Mapping[str, int]
    ) -> str | None:
        """Where to send one call to the pool ``actor_type`` (None: no member hosts it).

        Every hosting member runs up to ``size_per_member`` instances; ``in_flight`` counts the
        calls this caller has outstanding per member. The pick is the first member in ``key``'s
        order with a free instance, else (all full) the least loaded one, where the call queues.
        Pass a per-call ``key`` (a counter) to spread calls, a caller id for affinity.
        """
        best: str | None = None
        best_load = 0
        for m in self.pool_members(actor_type, key):
            load = in_flight.get(m, 0)
            if load < size_per_member:
                return m
            if best is None or load < best_load:
                best, best_load = m, load
        return best


def moved(old: Placement, new: Placement, keys: Iterable[tuple[str, Key]]) -> list[Move]:
    """The ``(actor type, key)`` pairs among ``keys`` whose owner differs between two tables,
    in input order. Types whose ring did not change are skipped without hashing."""
    same: dict[str, bool] = {}
    out: list[Move] = []
    for t, k in keys:
        unchanged = same.get(t)
        if unchanged is None:
            unchanged = same[t] = old.ring(t) == new.ring(t)
        if unchanged:
            continue
        o, n = old.owner(t, k), new.owner(t, k)
        if o != n:
            out.append(Move(t, k, o, n))
    return out


def handoffs(placement: Placement, me: str, keys: Iterable[tuple[str, Key]]) -> list[Move]:
    """The actors among ``keys`` (those active on node ``me``) that ``placement`` assigns to
    another member or to none: what ``me`` must hand off. Checks every key, so an actor
    activated under an older view is caught whatever happened in between."""
    out: list[Move] = []
    for t, k in keys:
        n = placement.owner(t, k)
        if n != me:
            out.append(Move(t, k, me, n))
    return out
