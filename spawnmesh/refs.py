"""Actor references: how SDK code (and handlers) invoke, cast to and spawn actors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from spawnmesh.errors import InvalidArgument
from spawnmesh.ids import ActorId

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime


class ActorRef:
    """A handle on one actor (which need not be active). Cheap to create; safe to keep."""

    __slots__ = ("_runtime", "id")

    def __init__(self, runtime: Runtime, actor_id: ActorId) -> None:
        self._runtime = runtime
        self.id = actor_id

    def __repr__(self) -> str:
        return f"ActorRef({self.id})"

    async def invoke(
        self,
        action: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        timeout_ms: int | None = None,
    ) -> Any:
        """Run ``action`` and return its reply value (raises a SpawnmeshError on failure).
        From inside a handler, the call chain travels along: a cycle raises CallCycle."""
        return await self._runtime.invoke(
            self.id, action, payload, metadata=metadata, timeout_ms=timeout_ms
        )

    async def cast(
        self,
        action: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        delay_ms: int | None = None,
        at_epoch_ms: int | None = None,
    ) -> None:
        """Fire-and-forget, now, after ``delay_ms`` or at ``at_epoch_ms`` (Unix epoch ms).
        Returns once queued; Overloaded if the actor's queue is full."""
        self._runtime.cast_nowait(
            self.id, action, payload, metadata=metadata, delay_ms=delay_ms,
            at_epoch_ms=at_epoch_ms,
        )
        await trio.lowlevel.checkpoint()

    async def spawn(self) -> ActorRef:
        """Register this unnamed instance explicitly (invoking it also spawns it lazily)."""
        if self.id.parent is None:
            raise InvalidArgument(f"{self.id} names no template (parent) to spawn from")
        await self._runtime.spawn(self.id.system, self.id.name, self.id.parent)
        return self

    async def get_state(self, *, timeout_ms: int | None = None) -> Any:
        """The actor's current state (a copy), through the built-in ``get_state`` action."""
        return await self.invoke("get_state", timeout_ms=timeout_ms)
