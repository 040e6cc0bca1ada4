"""Edges of the runtime: pool members keep distinct names as they come and go; a timer slower
than its interval keeps one tick waiting, not a queue of them."""

from __future__ import annotations

import trio

from spawnmesh import ActorSystem, Context, Kind, action, timer


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
