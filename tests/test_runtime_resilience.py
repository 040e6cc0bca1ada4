"""The runtime survives its own and its users' failures without losing or wedging work: a
crash of the async-turns service, an initial state that cannot be built."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio

from spawnmesh import ActorSystem, Context, action
from spawnmesh.errors import ActorFailed

RELEASE: list[trio.Event] = []


@dataclass
class Count:
    n: int = 0


@dataclass
class Unencodable:
    handle: object = None


def system() -> ActorSystem:
    s = ActorSystem("res")

    @s.actor("w", state=Count)
    class W:
        @action
        async def hold(self, ctx: Context[Count]) -> None:
            await RELEASE[-1].wait()

        @action
        async def add(self, ctx: Context[Count], n: int) -> int:
            ctx.state.n += n
            return ctx.state.n

        @action
        async def nap(self, ctx: Context[Count], s: float) -> None:
            await trio.sleep(s)
            ctx.state.n += 1

    @s.actor("bad", state=Unencodable, initial_state=lambda: Unencodable(handle=object()))
    class Bad:
        @action
        async def hi(self, ctx: Context[Unencodable]) -> None: ...

    return s


async def test_a_cast_queued_while_async_turns_restart_runs_after_the_restart(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    RELEASE.append(trio.Event())
    async with make_node(system()) as node:
        rt = node.runtime
        w = node.ref("res", "w")
        await w.invoke("add", 0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(w.invoke, "hold")  # holds the baton
            await trio.sleep(0.02)
            await w.cast("add", 5)  # queued behind it

            async def bug() -> None:
                raise RuntimeError("injected: the async-turns service crashes")

            assert rt._jobs is not None
            rt._jobs.start_soon(bug)
            with trio.fail_after(2):
                while rt._jobs is not None:  # noqa: ASYNC110 (the gap before the restart)
                    await trio.sleep(0.001)
            RELEASE[-1].set()  # the turn ends while the service is down: the cast waits
        with trio.fail_after(5):
            while await w.invoke("get_state") != Count(5):  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert node.supervisor is not None
        assert node.supervisor.restarts["async-turns"] == 1
        assert rt.queued_count() == 0
        assert await w.invoke("add", 1) == 6  # and the actor is not wedged


async def test_an_initial_state_that_fails_is_an_actor_failure_not_a_crash(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    async with make_node(system()) as node:
        w = node.ref("res", "w")
        await w.cast("nap", 0.3)  # an async turn in flight meanwhile
        with pytest.raises(ActorFailed, match="initial state"):
            await node.ref("res", "bad").invoke("hi")
        await node.ref("res", "bad").cast("hi")  # the same through an async turn
        await trio.sleep(0.5)
        assert await w.invoke("get_state") == Count(1)  # not cut off
        assert node.supervisor is not None
        assert not any(node.supervisor.restarts.values()), node.supervisor.restarts
