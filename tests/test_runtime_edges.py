"""Edges of the runtime: pool members keep distinct names as they come and go; a timer slower
than its interval keeps one tick waiting, not a queue of them; casts keep their order while
their actor is being found, and through the drain."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio

from spawnmesh import ActorSystem, Context, Kind, action, open_node, timer
from spawnmesh.statestore.memory import MemoryStateStore
from tests.conftest import test_config


async def test_a_pool_member_passivated_frees_its_name_for_the_next_one(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    s = ActorSystem("w")
    pool = s.define("p", kind=Kind.POOLED, pool_size=2)

    @pool.action
    async def work(ctx: Context[None], seconds: float) -> str:
        await trio.sleep(seconds)
        return ctx.self_id.name

    async with make_node(s) as node:
        ref = node.ref("w", "p")
        rt = node.runtime
        names: list[str] = []

        async def go(seconds: float) -> None:
            names.append(await ref.invoke("work", seconds))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(go, 0.05)  # p#0
            await trio.sleep(0.01)
            nursery.start_soon(go, 1.0)  # p#1, busy throughout
            await trio.sleep(0.2)
            assert await rt.passivate_idle(everything=True) == 1  # p#0 only
            nursery.start_soon(go, 0.1)  # p#1 is busy: a new member, named p#0 again
            await trio.sleep(0.02)
            members = sorted(m.id.name for m in rt._pools[("w", "p")])
            assert members == ["p#0", "p#1"], members
            assert rt.active_count() == 2
        assert sorted(names) == ["p#0", "p#0", "p#1"]
        assert await rt.passivate_idle(everything=True) == 2
        assert rt.active_count() == 0 and rt._pools[("w", "p")] == []


async def test_a_slow_timer_keeps_one_tick_waiting(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    s = ActorSystem("t")
    ran: list[int] = []

    @s.actor("slow", deactivate_after_ms=0)
    class Slow:
        @timer(every_ms=20)
        async def tick(self, ctx: Context[None]) -> None:
            ran.append(1)
            await trio.sleep(0.2)  # ten intervals per tick

        @action
        async def ping(self, ctx: Context[None]) -> str:
            return "pong"

    async with make_node(s, **{"actors.max_queue_per_actor": 4}) as node:
        await trio.sleep(0.7)
        rt = node.runtime
        act = rt._table[("t", "slow")]
        assert act.queued() <= 1, act.queued()
        assert await node.ref("t", "slow").invoke("ping") == "pong"  # not Overloaded
        assert len(ran) >= 3, ran
        assert node.metrics.overloaded_total == 0
        assert node.metrics.timers_fired_total <= len(ran) + 1  # ticks queued, not skipped


@dataclass
class Seen:
    seen: list[int] = field(default_factory=list)


def ledger() -> ActorSystem:
    s = ActorSystem("o")

    @s.actor("log", kind=Kind.UNNAMED, state=Seen)
    class Log:
        @action
        async def add(self, ctx: Context[Seen], n: int) -> list[int]:
            ctx.state.seen.append(n)
            return ctx.state.seen

    @s.actor("named", state=Seen)
    class Named:
        @action
        async def add(self, ctx: Context[Seen], n: int) -> list[int]:
            ctx.state.seen.append(n)
            return ctx.state.seen

    return s


@pytest.mark.parametrize("cluster", [True, False])
async def test_casts_to_an_actor_found_in_the_store_keep_their_order(cluster: bool) -> None:
    """After a restart an unnamed instance is known only by its stored row: casts made
    while it is being looked up run in the order they were made, an invocation after them,
    and the drain finishes them (a node alone in its cluster has nobody to hand them to)."""
    store = MemoryStateStore()
    config = test_config(**{"cluster.enabled": cluster})
    async with open_node(config, ledger(), store=store) as node:
        await node.spawn("o", "x", "log")
        await node.ref("o", "x", parent="log").invoke("add", -1)
    for _ in range(5):  # trio runs new tasks in no fixed order: several chances to see it
        async with open_node(config, ledger(), store=store) as node:
            x = node.ref("o", "x")
            for i in range(5):
                await x.cast("add", i)
            got = await x.invoke("add", 5)
            assert got[-6:] == [0, 1, 2, 3, 4, 5], got
            for i in range(6, 9):
                await x.cast("add", i)
        async with open_node(config, ledger(), store=store) as node:  # drained, not dropped
            got = await node.ref("o", "x").invoke("get_state")
            assert got.seen[-3:] == [6, 7, 8], got
        async with open_node(config, ledger(), store=store) as node:
            await node.ref("o", "x").invoke("add", -1)


async def test_delayed_casts_due_together_run_in_the_order_they_were_made(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    async with make_node(ledger()) as node:
        for trial in range(5):
            named = node.ref("o", "named")
            for i in range(5):
                await named.cast("add", trial * 10 + i, delay_ms=50)
            await trio.sleep(0.3)
            got = await named.invoke("get_state")
            assert got.seen == [trial * 10 + i for i in range(5)], got
            await node.runtime.passivate_idle(everything=True)  # inactive when they fall due
            await node.store.delete(("o", "named"))
