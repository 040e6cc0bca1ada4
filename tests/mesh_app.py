"""The app the real-process mesh tests run (``spawnmesh run --app mesh_app:system``, with
``tests/`` on ``PYTHONPATH``): unnamed write-through counters that can say which node runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from spawnmesh import ActorSystem, Context, WriteThrough, action
from spawnmesh.actors.definition import Kind

system = ActorSystem("e2e")


@dataclass
class Count:
    """A counter's value."""

    value: int = 0


@system.actor("counter", kind=Kind.UNNAMED, state=Count, snapshot=WriteThrough())
class Counter:
    """Invoke ``<any name>`` with parent ``counter``; the state is durable before each reply."""

    @action
    async def add(self, ctx: Context[Count], n: int = 1) -> int:
        ctx.state = Count(ctx.state.value + int(n))
        return ctx.state.value

    @action
    async def value(self, ctx: Context[Count]) -> int:
        return ctx.state.value

    @action
    async def where(self, ctx: Context[Count]) -> str:
        return ctx.node_id
