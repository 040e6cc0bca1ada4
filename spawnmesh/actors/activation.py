"""The record of one activated actor: small, a few slots, no task of its own."""

from __future__ import annotations

from collections import deque
from typing import Any

from spawnmesh.actors.definition import ActorDef
from spawnmesh.ids import ActorId


class Activation:
    """An activated actor. ``busy`` is the turn baton: whoever holds it runs the next turn;
    ``waiters`` (created lazily) queues trio tasks and async jobs in arrival order."""

    __slots__ = (
        "adef",
        "blob",
        "busy",
        "dirty_since",
        "epoch",
        "id",
        "key",
        "last_used",
        "loaded",
        "revision",
        "state",
        "waiters",
    )

    def __init__(self, adef: ActorDef, actor_id: ActorId, epoch: int) -> None:
        self.adef = adef
        self.id = actor_id
        self.key = (actor_id.system, actor_id.name)
        self.epoch = epoch
        self.state: Any = None
        self.blob: bytes = b""
        """Encoded state as of the end of the last successful turn (what gets persisted)."""
        self.revision = 0
        """Store revision this activation's next write is fenced on."""
        self.loaded = False
        self.busy = False
        self.waiters: deque[Any] | None = None
        self.last_used = 0.0
        self.dirty_since = 0.0
        """trio time the committed state first differed from the stored one; 0.0 when clean."""

    def queued(self) -> int:
        """Invocations waiting for their turn."""
        return len(self.waiters) if self.waiters else 0
