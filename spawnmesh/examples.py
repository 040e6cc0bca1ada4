"""The built-in example actor system that ``spawnmesh run`` hosts when no ``--app`` is given.

``examples/counter``: a named counter (write-through); ``examples/cart``: a template of unnamed
shopping carts; ``examples/worker``: a pooled stateless worker; ``examples/audit``: a named
subscriber of the ``cart-events`` channel that carts broadcast to.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from spawnmesh.actors.context import Context, Reply
from spawnmesh.actors.definition import Kind, WriteThrough
from spawnmesh.system import ActorSystem, action

examples = ActorSystem("examples")


@dataclass
class CounterState:
    """A counter's value and how many times it changed."""

    value: int = 0
    changes: int = 0


@examples.actor("counter", state=CounterState, snapshot=WriteThrough())
class Counter:
    """A named counter whose state is durable before every reply."""

    @action
    async def add(self, ctx: Context[CounterState], n: int = 1) -> int:
        ctx.state = CounterState(ctx.state.value + int(n), ctx.state.changes + 1)
        return ctx.state.value

    @action
    async def value(self, ctx: Context[CounterState]) -> int:
        return ctx.state.value

    @action
    async def reset(self, ctx: Context[CounterState]) -> Reply:
        return ctx.reply(0, state=CounterState())


@dataclass
class Item:
    """A cart line."""

    sku: str
    qty: int = 1


@dataclass
class CartState:
    """A shopping cart's lines, by SKU."""

    items: dict[str, Item] = field(default_factory=dict)
    checked_out: bool = False


@examples.actor("cart", kind=Kind.UNNAMED, state=CartState, deactivate_after_ms=30_000)
class Cart:
    """Unnamed carts: invoke ``cart-<anything>`` with parent ``cart`` to get one."""

    @action
    async def add_item(self, ctx: Context[CartState], item: Item) -> Reply:
        if ctx.state.checked_out:
            raise ValueError("cart already checked out")
        items = dict(ctx.state.items)
        old = items.get(item.sku)
        items[item.sku] = Item(item.sku, item.qty + (old.qty if old else 0))
        new = replace(ctx.state, items=items)
        return ctx.reply(len(items), state=new).broadcast(
            "cart-events", {"cart": ctx.self_id.name, "sku": item.sku, "qty": item.qty}
        )

    @action
    async def checkout(self, ctx: Context[CartState]) -> Reply:
        total = sum(i.qty for i in ctx.state.items.values())
        return ctx.reply({"items": total}, state=replace(ctx.state, checked_out=True))


@dataclass
class AuditState:
    """Events seen on the cart-events channel."""

    events: int = 0
    last: dict[str, object] = field(default_factory=dict)


@examples.actor("audit", state=AuditState, channels={"cart-events": "receive"})
class Audit:
    """Counts cart events it receives by broadcast."""

    @action
    async def receive(self, ctx: Context[AuditState], event: dict[str, object]) -> None:
        ctx.state = AuditState(ctx.state.events + 1, event)


@examples.actor("worker", kind=Kind.POOLED, pool_size=4)
class Worker:
    """A pooled, stateless worker: hashes what it is given."""

    @action
    async def digest(self, ctx: Context[None], text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()


def systems() -> list[ActorSystem]:
    """What ``spawnmesh run`` hosts by default."""
    return [examples]
