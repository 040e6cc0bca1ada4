"""The app the real-process mesh tests run (``spawnmesh run --app mesh_app:system``, with
``tests/`` on ``PYTHONPATH``): unnamed write-through counters that can say which node runs them
and which calls they applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spawnmesh import ActorSystem, Context, WriteThrough, action
from spawnmesh.actors.definition import Kind

system = ActorSystem("e2e")


@dataclass
class Count:
    """A counter's value, and the ids of the ``record`` calls applied, in order."""

    value: int = 0
    ops: list[str] = field(default_factory=list)


@system.actor("counter", kind=Kind.UNNAMED, state=Count, snapshot=WriteThrough())
class Counter:
    """Invoke ``<any name>`` with parent ``counter``; the state is durable before each reply."""

    @action
    async def add(self, ctx: Context[Count], n: int = 1) -> int:
        ctx.state = Count(ctx.state.value + int(n), ctx.state.ops)
        return ctx.state.value

    @action
    async def record(self, ctx: Context[Count], op: str) -> int:
        """Add 1 and remember the call's id: a test can then tell which calls were applied,
        and how often."""
        ctx.state = Count(ctx.state.value + 1, [*ctx.state.ops, op])
        return ctx.state.value

    @action
    async def ops(self, ctx: Context[Count]) -> list[str]:
        return ctx.state.ops

    @action
    async def value(self, ctx: Context[Count]) -> int:
        return ctx.state.value

    @action
    async def where(self, ctx: Context[Count]) -> str:
        return ctx.node_id
