"""In-memory statestore: the embedded store for tests, benchmarks and stateless deployments.

Keeps exactly what a durable store keeps (revision, blob, type, parent, tags), so it passes the
same conformance suite, fencing included. Nothing survives the process.
"""

from __future__ import annotations

from dataclasses import replace

import trio

from spawnmesh.errors import StaleActivation
from spawnmesh.statestore.base import ActorKey, Schedule, StateWrite, StoredState, WriteResult


class MemoryStateStore:
    """A dict of :class:`StoredState`, fenced like any store."""

    def __init__(self) -> None:
        self._rows: dict[ActorKey, StoredState] = {}
        self._schedules: dict[str, Schedule] = {}
        self.writes = 0
        """Items written since start (for tests and benchmarks)."""
        self.batches = 0

    async def open(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    async def load(self, key: ActorKey) -> StoredState | None:
        await trio.lowlevel.checkpoint()
        return self._rows.get(key)

    async def save_many(self, writes: list[StateWrite]) -> list[WriteResult]:
        await trio.lowlevel.checkpoint()
        rows = self._rows
        out: list[WriteResult] = []
        for w in writes:
            cur = rows.get(w.key)
            current_rev = cur.revision if cur is not None else 0
            if current_rev != w.base_revision:
                out.append(
                    StaleActivation(
                        f"{w.key[0]}/{w.key[1]}: write based on revision {w.base_revision}, "
                        f"current is {current_rev}"
                    )
                )
                continue
            rev = current_rev + 1
            rows[w.key] = StoredState(w.key, rev, w.blob, w.state_type, w.parent, w.tags)
            out.append(rev)
        self.writes += len(writes)
        self.batches += 1
        return out

    async def delete(self, key: ActorKey, base_revision: int | None = None) -> bool:
        await trio.lowlevel.checkpoint()
        cur = self._rows.get(key)
        if cur is None:
            return False
        if base_revision is not None and cur.revision != base_revision:
            raise StaleActivation(
                f"{key[0]}/{key[1]}: delete based on revision {base_revision}, "
                f"current is {cur.revision}"
            )
        del self._rows[key]
        return True

    async def healthy(self) -> bool:
        await trio.lowlevel.checkpoint()
        return True

    async def check_keys(self) -> None:
        """Nothing to check: this store keeps state in memory, unencrypted."""
        await trio.lowlevel.checkpoint()

    async def save_schedules(self, schedules: list[Schedule]) -> None:
        await trio.lowlevel.checkpoint()
        for sc in schedules:
            self._schedules[sc.id] = sc

    async def list_schedules(
        self,
        limit: int = 10_000,
        *,
        owner: str | None = None,
        due_before_ms: int | None = None,
        after: tuple[int, str] | None = None,
    ) -> list[Schedule]:
        await trio.lowlevel.checkpoint()
        rows = [
            s
            for s in self._schedules.values()
            if (owner is None or s.owner == owner)
            and (due_before_ms is None or s.due_ms < due_before_ms)
            and (after is None or (s.due_ms, s.id) > after)
        ]
        return sorted(rows, key=lambda s: (s.due_ms, s.id))[:limit]

    async def claim_schedules(self, from_owner: str | None, to_owner: str) -> int:
        await trio.lowlevel.checkpoint()
        moved = [
            s
            for s in self._schedules.values()
            if s.owner == from_owner or (from_owner is None and s.owner != to_owner)
        ]
        for s in moved:
            self._schedules[s.id] = replace(s, owner=to_owner)
        return len(moved)

    async def delete_schedules(self, schedule_ids: list[str]) -> int:
        await trio.lowlevel.checkpoint()
        return sum(self._schedules.pop(i, None) is not None for i in schedule_ids)
