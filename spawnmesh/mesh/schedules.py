"""Kept schedules of cluster members that died or left are taken over by one live member.

A node keeps its delayed casts in the statestore under its own name and fires them itself
(:mod:`spawnmesh.actors.runtime`); after a restart under the same name it loads them again. A
member that dies or leaves for good would leave its schedules unfired, so one survivor takes
them over: the live member its name hashes to (rendezvous hashing: members with the same view
pick the same one, and a departure moves nothing else). The store's compare-and-set on the
owner (:meth:`~spawnmesh.statestore.base.StateStore.claim_schedules`) settles members whose
views differ: each schedule goes to exactly one of them.

A member that leaves gracefully may still keep a few schedules while it drains (a turn finishing
then makes a delayed cast): for a minute after its leave, its adopter claims again at every
sweep tick. A member seen dead is claimed once: it may be alive behind a partition, still
keeping schedules of its own.

A sweep catches what no membership event covers: owners no member knows as alive (a node that
was renamed, one forgotten by membership, an adopter that died before firing what it took).
Their schedules are taken once overdue by ``cluster.orphan_schedules_after_ms``: a live owner
would have fired and forgotten them by then. A member wrongly declared dead (a partition) may
still fire its own beside their adopter: delivery stays at least once.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from spawnmesh.clock import wall_ms
from spawnmesh.cluster.state import Status
from spawnmesh.errors import StatestoreUnavailable

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime

log = logging.getLogger("spawnmesh.mesh")

_GONE = (Status.DEAD, Status.LEFT)

RECLAIM_S = 60.0
"""How long after a member left its adopter claims its schedules again at every tick."""


def adopter(departed: str, live: Iterable[str]) -> str | None:
    """The live member that takes over ``departed``'s schedules (None if none is live):
    the highest ``blake2b(departed, member)``, so every member computes the same one from the
    same view."""
    prefix = departed.encode() + b"\x00"
    best: tuple[bytes, str] | None = None
    for name in live:
        h = hashlib.blake2b(prefix + name.encode(), digest_size=8).digest()
        if best is None or (h, name) > best:
            best = (h, name)
    return None if best is None else best[1]


class ScheduleAdoption:
    """Follows membership on one node and takes over the schedules it is due to (a supervised
    child of the node, next to the router)."""

    def __init__(self, runtime: Runtime, orphan_after_ms: int) -> None:
        self.runtime = runtime
        self.orphan_after_ms = orphan_after_ms
        self.sweep_every_s = min(max(orphan_after_ms / 4000, 0.5), 30.0)
        self._handled: set[str] = set()
        """Departed members already dealt with (forgotten when they are seen alive again)."""
        self._left: dict[str, float] = {}
        """Members that left and that this node adopts: when it first claimed (trio time)."""

    async def run(self, membership: Any, *, task_status: trio.TaskStatus[None]) -> None:
        """Adopt on every membership change; every ``sweep_every_s``, claim again from members
        that left lately, and sweep for orphans (only once orphans can be told apart from
        members not heard of yet)."""
        version = membership.version
        task_status.started()
        first_sweep = trio.current_time() + self.orphan_after_ms / 1000
        next_tick = trio.current_time() + self.sweep_every_s
        while True:
            await self._departures(membership)
            with trio.move_on_at(next_tick):
                version = await membership.wait_changed(version)
                continue
            await self._reclaim()
            if trio.current_time() >= first_sweep:
                await self._sweep(membership)
            next_tick = trio.current_time() + self.sweep_every_s

    async def _departures(self, membership: Any) -> None:
        """Take over the schedules of members that died or left, where this node is their
        adopter."""
        me = self.runtime.node_id
        members = membership.members()
        gone = {m.name: m.status for m in members if m.status in _GONE and m.name != me}
        self._handled &= gone.keys()
        for name in [n for n in self._left if n not in self._handled]:
            del self._left[name]  # back, or forgotten
        live = [m.name for m in members if m.status not in _GONE]
        for name in sorted(gone.keys() - self._handled):
            if adopter(name, live) == me:
                if not await self._adopt(name):
                    continue  # the store did not answer: tried again at the next change
                if gone[name] is Status.LEFT:
                    self._left[name] = trio.current_time()
            self._handled.add(name)

    async def _reclaim(self) -> None:
        """Claim again from the members that left within ``RECLAIM_S`` (what they kept while
        draining, after the first claim)."""
        now = trio.current_time()
        for name, at in list(self._left.items()):
            if now - at > RECLAIM_S:
                del self._left[name]
            else:
                await self._adopt(name)

    async def _sweep(self, membership: Any) -> None:
        """Take over overdue schedules whose owner no member knows as alive."""
        me = self.runtime.node_id
        alive = {m.name for m in membership.members() if m.status not in _GONE}
        try:
            overdue = await self.runtime.store.list_schedules(
                due_before_ms=wall_ms() - self.orphan_after_ms
            )
        except StatestoreUnavailable as exc:
            log.warning("orphaned schedules not looked for: %s", exc)
            return
        for owner in sorted({sc.owner for sc in overdue} - alive - {me}):
            await self._adopt(owner)

    async def _adopt(self, owner: str) -> bool:
        """Whether the store answered (the schedules may have gone to another member)."""
        try:
            await self.runtime.schedules.adopt(owner)
        except StatestoreUnavailable as exc:
            log.warning("schedules of %s not taken over yet: %s", owner, exc)
            return False
        return True
