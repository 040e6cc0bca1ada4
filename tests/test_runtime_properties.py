"""Property: whatever the interleaving of turns, failures, casts, passivations and restarts,
every acknowledged update is in the actor's state and in the store, and nothing else is."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnmesh import (
    ActorFailed,
    ActorSystem,
    Context,
    WriteBehind,
    WriteThrough,
    action,
    open_node,
)
from spawnmesh.statestore import MemoryStateStore
from tests.conftest import test_config


@dataclass
class Tally:
    total: int = 0
    seen: list[int] = field(default_factory=list)


def tally_system(write_through: bool) -> ActorSystem:
    s = ActorSystem("p")

    @s.actor("tally", kind="unnamed", state=Tally,
             snapshot=WriteThrough() if write_through else WriteBehind(every_ms=5))
    class T:
        @action
        async def add(self, ctx: Context[Tally], n: int) -> int:
            ctx.state.total += n  # in place, on purpose
            ctx.state.seen.append(n)
            return ctx.state.total

        @action
        async def add_then_fail(self, ctx: Context[Tally], n: int) -> None:
            ctx.state.total += n
            ctx.state.seen.append(n)
            await trio.lowlevel.checkpoint()
            raise RuntimeError("after mutating")

    return s


op = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 2), st.integers(1, 9)),
    st.tuples(st.just("fail"), st.integers(0, 2), st.integers(1, 9)),
    st.tuples(st.just("cast"), st.integers(0, 2), st.integers(1, 9)),
    st.tuples(st.just("passivate"), st.just(0), st.just(0)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25), write_through=st.booleans())
async def test_acknowledged_updates_are_kept(ops: list[tuple[str, int, int]],
                                             write_through: bool) -> None:
    store = MemoryStateStore()
    system = tally_system(write_through)
    model: dict[int, list[int]] = {0: [], 1: [], 2: []}
    config = test_config()
    i = 0
    while i <= len(ops):
        async with open_node(config, system, store=store) as node:
            refs = [node.ref("p", f"t{k}", parent="tally") for k in range(3)]
            restarted = False
            while i < len(ops) and not restarted:
                kind, k, n = ops[i]
                i += 1
                if kind == "add":
                    assert await refs[k].invoke("add", n) == sum(model[k]) + n
                    model[k].append(n)
                elif kind == "fail":
                    try:
                        await refs[k].invoke("add_then_fail", n)
                    except ActorFailed:
                        pass
                    else:
                        raise AssertionError("the failing action did not fail")
                elif kind == "cast":
                    await refs[k].cast("add", n)
                    model[k].append(n)
                elif kind == "passivate":
                    await node.runtime.passivate_idle(everything=True)
                else:
                    restarted = True  # leaving the block drains and flushes
            if i >= len(ops) and not restarted:
                for k in range(3):  # a sync call queues behind the casts (FIFO)
                    state = await refs[k].invoke("get_state")
                    assert state.seen == model[k] and state.total == sum(model[k])
                i += 1
    for k in range(3):  # after the last shutdown, the store holds exactly the model
        row = await store.load(("p", f"t{k}"))
        if not model[k]:
            continue
        assert row is not None
        stored = msgspec.msgpack.decode(row.blob, type=Tally)
        assert stored.seen == model[k]
