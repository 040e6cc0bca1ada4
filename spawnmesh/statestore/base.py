"""The ``StateStore`` protocol every statestore implements, and its record types.

Safety of single activation rests here: every write names the revision it was based on, and a
store applies it only if that revision is still the current one (checked in the same
statement/transaction). A fenced-off write reports ``StaleActivation`` for that item only.
Revisions start at 1 for the first write; ``0`` as a base means "no row may exist yet".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import msgspec

from spawnmesh.errors import StaleActivation

ActorKey = tuple[str, str]
"""(system, name): the key of one actor's state."""

NO_TAGS: Mapping[str, str] = MappingProxyType({})
"""Shared empty tags (an empty dict per actor would cost 64 bytes each)."""


@dataclass(slots=True, frozen=True)
class StoredState:
    """One actor's persisted state as a store returns it (already decrypted)."""

    key: ActorKey
    revision: int
    blob: bytes
    state_type: str = ""
    parent: str | None = None
    tags: Mapping[str, str] = field(default_factory=lambda: NO_TAGS)
    updated_ms: int = 0


class StateWrite(msgspec.Struct, frozen=True, gc=False):
    """A write of ``blob`` for ``key``, fenced on ``base_revision`` (0: the row must not exist).

    A msgspec Struct, not a dataclass: the state writer builds one per persisted row, and a
    frozen slots dataclass cost 2.4 us each there, this 0.3 us (and, holding no cycles, it is
    not tracked by the garbage collector)."""

    key: ActorKey
    base_revision: int
    blob: bytes
    state_type: str = ""
    parent: str | None = None
    tags: Mapping[str, str] = NO_TAGS
    owner: str = ""
    """Node id (and activation epoch) of the activation that wrote it, for operators."""


@dataclass(slots=True, frozen=True)
class Schedule:
    """A delayed or scheduled fire-and-forget invocation kept until it has been enqueued, so
    it survives a restart of the node (fired at least once, late if the node was down)."""

    id: str
    system: str
    actor: str
    parent: str | None
    action: str
    payload: bytes
    """The payload encoded as msgpack (``spawnmesh.codec``); b"" for none."""
    metadata: Mapping[str, str]
    due_ms: int
    """When it is due, in Unix epoch milliseconds."""
    owner: str = ""
    """Node that keeps it and fires it: the one that scheduled it, or the member that took it
    over when that one died or left (:meth:`StateStore.claim_schedules`)."""


WriteResult = int | StaleActivation
"""Per item of a batch: the new revision, or the StaleActivation that fenced it off."""


@runtime_checkable
class StateStore(Protocol):
    """Async interface of a statestore. Implementations must pass the conformance suite
    (:mod:`spawnmesh.testing.statestore`). Errors reaching the database raise
    ``StatestoreUnavailable``; an undecryptable or undecodable row raises ``StateCorrupt``."""

    async def open(self) -> None:
        """Connect, create or migrate the schema. Called once before any other method."""

    async def aclose(self) -> None:
        """Release connections. No other method is called afterwards."""

    async def load(self, key: ActorKey) -> StoredState | None:
        """The current state of ``key``, or None if nothing was ever written (or deleted)."""

    async def save_many(self, writes: list[StateWrite]) -> list[WriteResult]:
        """Apply a batch of fenced writes, at most one per key, in one transaction where
        the store supports it. Returns one result per write, in order."""

    async def delete(self, key: ActorKey, base_revision: int | None = None) -> bool:
        """Delete ``key``'s state (fenced on ``base_revision`` unless None). True if removed."""

    async def healthy(self) -> bool:
        """A cheap check that the store answers, for readiness."""

    async def check_keys(self) -> None:
        """Raise ConfigError if the configured encryption keys cannot open the rows already
        stored (checked on a small sample when the node first reaches the store); a store that
        does not encrypt just returns."""

    async def save_schedules(self, schedules: list[Schedule]) -> None:
        """Keep ``schedules`` (each replacing one with the same id) until deleted, all or none
        (one transaction where the store supports it); InvalidArgument if one is over a limit
        of the store."""

    async def list_schedules(
        self,
        limit: int = 10_000,
        *,
        owner: str | None = None,
        due_before_ms: int | None = None,
        after: tuple[int, str] | None = None,
    ) -> list[Schedule]:
        """Kept schedules in ``(due_ms, id)`` order, at most ``limit``; only those kept by
        ``owner``, due before ``due_before_ms``, and past ``after`` (the ``(due_ms, id)`` of
        the last one of the previous page) when given."""

    async def claim_schedules(self, from_owner: str | None, to_owner: str) -> int:
        """Make ``to_owner`` the owner of every schedule ``from_owner`` keeps (None: every
        schedule another node keeps), atomically per schedule: of nodes claiming the same
        schedules at once, each schedule goes to exactly one. Returns how many this call
        moved."""

    async def delete_schedules(self, schedule_ids: list[str]) -> int:
        """Forget schedules (they were queued); how many existed."""
