"""A named counter: write-through state, get_state, a failing turn, deadlines, casts, timers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from spawnmesh import (
    ActorFailed,
    ActorSystem,
    Context,
    InvocationTimeout,
    Reply,
    WriteThrough,
    action,
    open_node,
    timer,
)

# --8<-- [start:define]
system = ActorSystem("demo")


@dataclass
class Counter:
    """The counter's state: its value and the amounts added, oldest first."""

    value: int = 0
    history: list[int] = field(default_factory=list)


@system.actor("counter", state=Counter, snapshot=WriteThrough())
class CounterActor:
    """A named counter; each new state is durable before the reply is sent."""

    @action
    async def add(self, ctx: Context[Counter], n: int) -> int:
        """Add ``n`` and return the new value (in-place mutation of the state is fine)."""
        ctx.state.value += n
        ctx.state.history.append(n)
        return ctx.state.value

    @action
    async def add_then_fail(self, ctx: Context[Counter], n: int) -> int:
        """Mutate the state, then raise: the turn fails and the state is reset."""
        ctx.state.value += n
        raise ValueError(f"refusing to add {n}")

    @action
    async def reset(self, ctx: Context[Counter]) -> Reply:
        """Reply with the old value and replace the state."""
        return ctx.reply(ctx.state.value, state=Counter())

    @action
    async def slow(self, ctx: Context[Counter], seconds: float) -> str:
        """Take a while: the caller's deadline cancels the turn."""
        await trio.sleep(seconds)
        return "done"

    @action
    def whoami(self, ctx: Context[Counter]) -> dict[str, object]:
        """A plain (non-async) handler: who called, with which metadata."""
        caller = str(ctx.caller) if ctx.caller else None  # None: not called by an actor
        return {"caller": caller, "metadata": dict(ctx.metadata)}
# --8<-- [end:define]


# --8<-- [start:timer]
@dataclass
class Ticks:
    """How often the ticker's timer fired."""

    count: int = 0


@system.actor("ticker", state=Ticks, deactivate_after_ms=0)
class Ticker:
    """A named actor with a timer; activated when the node starts, never passivated."""

    @timer(every_ms=100)
    async def tick(self, ctx: Context[Ticks]) -> None:
        """Runs every 100 ms as an ordinary turn."""
        ctx.state.count += 1
# --8<-- [end:timer]


async def main() -> None:
    """Embed a node, exercise the counter, print what happens."""
    # --8<-- [start:basics]
    async with open_node(None, system) as node:
        counter = node.ref("demo", "counter")
        print("add 5 ->", await counter.invoke("add", 5))
        print("add 2 ->", await counter.invoke("add", 2))
        print("state:", await counter.get_state())
        row = await node.store.load(("demo", "counter"))
        print("stored revision:", row.revision if row else None)  # write-through: 2 writes
        # --8<-- [end:basics]

        # --8<-- [start:failure]
        try:
            await counter.invoke("add_then_fail", 100)
        except ActorFailed as exc:
            print("failed:", exc.error_type, exc.error_message)
            print("traceback names the handler:", "add_then_fail" in exc.traceback_text)
        print("state after failure:", await counter.get_state())
        # --8<-- [end:failure]

        # --8<-- [start:deadlines]
        try:
            await counter.invoke("slow", 10.0, timeout_ms=50)
        except InvocationTimeout as exc:
            print("timeout_ms:", exc)
        with trio.move_on_after(0.05) as scope:
            await counter.invoke("slow", 10.0)
        print("move_on_after cancelled the call:", scope.cancelled_caught)
        print("counter still answers:", await counter.invoke("add", 0, timeout_ms=1000))
        # --8<-- [end:deadlines]

        # --8<-- [start:casts]
        print("whoami:", await counter.invoke("whoami", metadata={"user": "ada"}))
        await counter.cast("add", 1)  # fire-and-forget, runs soon
        await counter.cast("add", 10, delay_ms=100)  # runs in 100 ms
        soon = int(time.time() * 1000) + 150
        await counter.cast("add", 100, at_epoch_ms=soon)  # runs at a wall-clock time
        await trio.sleep(0.5)
        print("after casts:", (await counter.get_state()).value)
        # --8<-- [end:casts]

        print("reset ->", await counter.invoke("reset"))
        print("ticker ticked:", (await node.ref("demo", "ticker").get_state()).count >= 2)


if __name__ == "__main__":
    trio.run(main)
