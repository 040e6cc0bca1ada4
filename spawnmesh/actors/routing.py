"""What the runtime asks of the mesh: who owns an actor, and how to reach it.

The runtime stays a single-node engine; when the node is part of a cluster, the mesh router
(``spawnmesh.mesh.router``) implements this protocol and the runtime consults it on every
invocation that finds no local activation (a local activation means this node owns the actor:
activations the node stops owning are handed off at once, see ``Runtime.hand_off``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from spawnmesh.ids import ActorId

if TYPE_CHECKING:
    from spawnmesh.actors.activation import Activation
    from spawnmesh.actors.context import Broadcast
    from spawnmesh.actors.definition import ActorDef

Key = tuple[str, str]


class Routing(Protocol):
    """The mesh as seen from the runtime."""

    def remote_owner(self, target: ActorId, adef: ActorDef) -> str | None:
        """The node that owns ``target`` if it is not this one, else None (also when no live
        member hosts its type: this node, which has the definition, runs it)."""
        ...

    async def invoke_remote(
        self,
        owner: str,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        chain: tuple[Key, ...],
    ) -> Any:
        """Run the invocation on ``owner`` (re-routing within the caller's deadline if
        ownership moved) and return the reply value."""
        ...

    def cast_remote(
        self,
        owner: str,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
    ) -> None:
        """Queue a fire-and-forget invocation for ``owner`` (sent in the background)."""
        ...

    async def cast_acked(
        self,
        owner: str,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
    ) -> None:
        """Send a fire-and-forget invocation to ``owner`` and return once it is queued
        (re-routed while ownership moves); raises what stopped it."""
        ...

    def broadcast_remote(self, system: str, b: Broadcast, caller: ActorId | None) -> None:
        """Deliver ``b`` to the unnamed subscribers active on the other members."""
        ...

    async def spawn_remote(self, owner: str, target: ActorId) -> None:
        """Record unnamed instance ``target`` on its owner."""
        ...

    async def before_load(self, act: Activation) -> None:
        """Called before an activation loads its state: make the previous owner (if any is
        still alive) finish, flush and release the actor first."""
        ...
