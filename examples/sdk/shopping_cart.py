"""Unnamed shopping carts: spawned explicitly or lazily, nested dataclass state, checkout."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import trio

from spawnmesh import (
    ActorFailed,
    ActorSystem,
    Context,
    InvalidArgument,
    Kind,
    WriteBehind,
    action,
    open_node,
)

# --8<-- [start:define]
system = ActorSystem("shop")


@dataclass
class Item:
    """One cart line."""

    sku: str
    qty: int = 1
    price_cents: int = 0


@dataclass
class Cart:
    """A cart's state: lines by SKU, nested dataclasses are fine."""

    items: dict[str, Item] = field(default_factory=dict)
    checked_out: bool = False


@dataclass
class Receipt:
    """What checkout returns."""

    cart: str
    lines: int
    total_cents: int


@system.actor(
    "cart",
    kind=Kind.UNNAMED,  # a template: every cart instance has its own name and state
    state=Cart,
    snapshot=WriteBehind(every_ms=500),  # persist at most every 500 ms, coalesced
    deactivate_after_ms=30_000,  # passivate after 30 s idle; state is flushed first
)
class CartActor:
    """A shopping cart; instances are spawned from this template."""

    @action
    async def add_item(self, ctx: Context[Cart], item: Item) -> int:
        """Add ``item`` (merging quantities) and return the number of lines."""
        if ctx.state.checked_out:
            raise ValueError("cart is checked out")
        line = ctx.state.items.get(item.sku)
        if line is None:  # in-process payloads are the caller's objects: keep a copy
            ctx.state.items[item.sku] = replace(item)
        else:
            line.qty += item.qty
        return len(ctx.state.items)

    @action
    async def checkout(self, ctx: Context[Cart]) -> Receipt:
        """Close the cart and return a receipt."""
        if not ctx.state.items:
            raise ValueError("cart is empty")
        ctx.state.checked_out = True
        total = sum(i.qty * i.price_cents for i in ctx.state.items.values())
        return Receipt(ctx.self_id.name, len(ctx.state.items), total)
# --8<-- [end:define]


async def main() -> None:
    """Fill two carts, check one out, show the errors and the state."""
    async with open_node(None, system) as node:
        # --8<-- [start:spawn]
        alice = await node.spawn("shop", "cart-alice", "cart")  # explicit
        bob = node.ref("shop", "cart-bob", parent="cart")  # lazy: spawned on first call
        carol = await node.ref("shop", "cart-carol", parent="cart").spawn()  # explicit, by ref
        print("refs:", alice, bob, carol)
        # --8<-- [end:spawn]

        # --8<-- [start:use]
        await alice.invoke("add_item", Item("apple", 2, 50))
        await alice.invoke("add_item", Item("pear", 1, 80))
        print("alice lines:", await alice.invoke("add_item", Item("apple", 1, 50)))
        print("bob lines:", await bob.invoke("add_item", Item("tea", 3, 400)))
        print("receipt:", await alice.invoke("checkout"))
        try:
            await alice.invoke("add_item", Item("plum"))
        except ActorFailed as exc:
            print("rejected:", exc.error_message)
        try:
            await carol.invoke("checkout")
        except ActorFailed as exc:
            print("rejected:", exc.error_message)
        print("alice state:", await alice.get_state())
        try:
            await node.ref("shop", "cart").invoke("checkout")
        except InvalidArgument:
            print("the template itself cannot be invoked")
        # --8<-- [end:use]

        # --8<-- [start:passivate]
        # Idle carts are passivated after deactivate_after_ms (state flushed, memory freed);
        # the next call reactivates them with their state. Forced here for the demo:
        passivated = await node.runtime.passivate_idle(everything=True)
        print("passivated:", passivated, "active now:", node.runtime.active_count())
        print("bob after reactivation:", (await bob.get_state()).items["tea"].qty)
        # --8<-- [end:passivate]


if __name__ == "__main__":
    trio.run(main)
