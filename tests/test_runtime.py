"""The actor runtime through the SDK: turns, state, errors, queues, deadlines, lifecycle."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from spawnmesh import (
    ActionNotFound,
    ActorFailed,
    ActorNotFound,
    ActorSystem,
    CallCycle,
    Context,
    InvocationTimeout,
    NodeShuttingDown,
    Overloaded,
    Reply,
    WriteBehind,
    WriteThrough,
    action,
)
from spawnmesh.errors import InvalidArgument
from spawnmesh.statestore import MemoryStateStore


@dataclass
class Count:
    value: int = 0
    log: list[str] = field(default_factory=list)


def counter_system(snapshot: object = None, **kw: object) -> ActorSystem:
    sys_ = ActorSystem("t")

    @sys_.actor("counter", state=Count, snapshot=snapshot or WriteBehind(every_ms=50), **kw)  # type: ignore[arg-type]
    class Counter:
        @action
        async def add(self, ctx: Context[Count], n: int) -> int:
            ctx.state = Count(ctx.state.value + n, [*ctx.state.log, f"add{n}"])
            return ctx.state.value

        @action
        async def slow_add(self, ctx: Context[Count], n: int) -> int:
            await trio.sleep(0.01)
            ctx.state = Count(ctx.state.value + n, [*ctx.state.log, f"add{n}"])
            return ctx.state.value

        @action
        async def mutate_then_fail(self, ctx: Context[Count], n: int) -> None:
            ctx.state.value += n  # in place: must be undone
            ctx.state.log.append("bad")
            raise ValueError(f"boom {n}")

        @action
        async def sleep(self, ctx: Context[Count], seconds: float) -> str:
            await trio.sleep(seconds)
            return "woke"

        @action
        async def whoami(self, ctx: Context[Count]) -> dict[str, object]:
            return {
                "self": str(ctx.self_id),
                "caller": str(ctx.caller) if ctx.caller else None,
                "meta": dict(ctx.metadata),
            }

    return sys_


async def test_request_reply_and_state(make_node) -> None:
    async with make_node(counter_system()) as node:
        c = node.ref("t", "counter")
        assert await c.invoke("add", 2) == 2
        assert await c.invoke("add", 3) == 5
        st = await c.get_state()
        assert st == Count(5, ["add2", "add3"])


async def test_write_behind_persists_coalesced(make_node, store: MemoryStateStore) -> None:
    async with make_node(counter_system(), store=store) as node:
        c = node.ref("t", "counter")
        for _ in range(100):
            await c.invoke("add", 1)
        assert store.writes <= 2  # coalesced: the latest state, not 100 writes
        await trio.sleep(0.2)
        row = await store.load(("t", "counter"))
        assert row is not None and row.revision >= 1
        assert b"add1" in row.blob
        writes = store.writes
        await trio.sleep(0.2)
        assert store.writes == writes  # unchanged state is not written again


async def test_write_through_is_durable_before_reply(make_node, store: MemoryStateStore) -> None:
    async with make_node(counter_system(WriteThrough()), store=store) as node:
        c = node.ref("t", "counter")
        for i in range(1, 6):
            assert await c.invoke("add", 1) == i
            row = await store.load(("t", "counter"))
            assert row is not None and row.revision == i


async def test_state_survives_restart(make_node, store: MemoryStateStore) -> None:
    async with make_node(counter_system(), store=store) as node:
        await node.ref("t", "counter").invoke("add", 41)
    async with make_node(counter_system(), store=store) as node:  # shutdown flushed it
        assert await node.ref("t", "counter").invoke("add", 1) == 42


async def test_one_turn_at_a_time_in_arrival_order(make_node) -> None:
    sys_ = ActorSystem("t")
    inside = 0
    seen: list[int] = []

    @sys_.actor("serial", state=Count)
    class Serial:
        @action
        async def step(self, ctx: Context[Count], i: int) -> None:
            nonlocal inside
            inside += 1
            assert inside == 1, "two turns overlapped"
            await trio.sleep(0.001)
            seen.append(i)
            inside -= 1

    async with make_node(sys_) as node:
        ref = node.ref("t", "serial")
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(ref.invoke, "step", i)
                await trio.lowlevel.checkpoint()  # each caller arrives before the next
        assert seen == list(range(50))


async def test_handler_error_resets_state_and_node_stays_up(make_node) -> None:
    async with make_node(counter_system()) as node:
        c = node.ref("t", "counter")
        await c.invoke("add", 10)
        with pytest.raises(ActorFailed) as info:
            await c.invoke("mutate_then_fail", 5)
        err = info.value
        assert err.error_type == "ValueError" and err.error_message == "boom 5"
        assert "mutate_then_fail" in err.traceback_text and err.node == "test-node"
        assert await c.get_state() == Count(10, ["add10"])
        assert await c.invoke("add", 1) == 11


async def test_unknown_actor_and_action(make_node) -> None:
    async with make_node(counter_system()) as node:
        with pytest.raises(ActorNotFound):
            await node.ref("t", "nobody").invoke("add", 1)
        with pytest.raises(ActionNotFound, match="has no action 'nope'"):
            await node.ref("t", "counter").invoke("nope")


async def test_deadline_during_turn(make_node) -> None:
    async with make_node(counter_system()) as node:
        c = node.ref("t", "counter")
        with pytest.raises(InvocationTimeout):
            await c.invoke("sleep", 5.0, timeout_ms=20)
        assert await c.invoke("add", 1) == 1  # baton released, actor usable
        with trio.move_on_after(0.02) as scope:  # the caller's own scope is the deadline
            await c.invoke("sleep", 5.0)
        assert scope.cancelled_caught
        assert await c.invoke("add", 1) == 2


async def test_deadline_travels_down_the_call_chain(make_node) -> None:
    sys_ = counter_system()

    @sys_.actor("outer", state=None, stateful=False)
    class Outer:
        @action
        async def call(self, ctx: Context[None]) -> object:
            return await ctx.ref("counter").invoke("sleep", 5.0)

    async with make_node(sys_) as node:
        with pytest.raises(InvocationTimeout):
            await node.ref("t", "outer").invoke("call", timeout_ms=30)
        # both actors are free again: neither turn is still running
        assert await node.ref("t", "counter").invoke("add", 1, timeout_ms=100) == 1


async def test_deadline_while_queued(make_node) -> None:
    async with make_node(counter_system()) as node:
        c = node.ref("t", "counter")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.invoke, "sleep", 0.2)
            await trio.sleep(0.01)
            with pytest.raises(InvocationTimeout, match="no reply within 20 ms"):
                await c.invoke("add", 1, timeout_ms=20)
        assert await c.invoke("add", 1) == 1  # the timed-out call never ran


async def test_per_actor_queue_bound(make_node) -> None:
    async with make_node(counter_system(), **{"actors.max_queue_per_actor": 3}) as node:
        c = node.ref("t", "counter")
        results: list[object] = []

        async def call() -> None:
            try:
                results.append(await c.invoke("slow_add", 1))
            except Overloaded as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(call)
        overloaded = [r for r in results if isinstance(r, Overloaded)]
        assert len(overloaded) == 2  # 1 running + 3 queued accepted
        assert sorted(r for r in results if isinstance(r, int)) == [1, 2, 3, 4]


async def test_per_node_queue_bound(make_node) -> None:
    async with make_node(counter_system(), **{"actors.max_queued_per_node": 1}) as node:
        c = node.ref("t", "counter")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.invoke, "sleep", 0.05)
            await trio.sleep(0.005)
            nursery.start_soon(c.invoke, "add", 1)
            await trio.sleep(0.005)
            with pytest.raises(Overloaded):
                await c.invoke("add", 1)


async def test_call_cycle_fails_at_once(make_node) -> None:
    sys_ = ActorSystem("t")

    @sys_.actor("a", state=Count)
    class A:
        @action
        async def ping(self, ctx: Context[Count], depth: int) -> int:
            return await ctx.ref("b").invoke("ping", depth + 1)  # type: ignore[no-any-return]

        @action
        async def me(self, ctx: Context[Count]) -> object:
            return await ctx.self_ref.invoke("me")

    @sys_.actor("b", state=Count)
    class B:
        @action
        async def ping(self, ctx: Context[Count], depth: int) -> int:
            return await ctx.ref("a").invoke("ping", depth + 1)  # type: ignore[no-any-return]

    async with make_node(sys_) as node:
        with trio.fail_after(1):  # a deadlock would hang until the 30 s default
            with pytest.raises(CallCycle) as info:
                await node.ref("t", "a").invoke("ping", 0)
            assert info.value.chain == ["t/a", "t/b", "t/a"]
            with pytest.raises(CallCycle):
                await node.ref("t", "a").invoke("me")


async def test_caller_and_metadata_in_context(make_node) -> None:
    sys_ = counter_system()

    @sys_.actor("front", state=None, stateful=False)
    class Front:
        @action
        async def relay(self, ctx: Context[None]) -> object:
            return await ctx.ref("counter").invoke("whoami", metadata={"trace": "x"})

    async with make_node(sys_) as node:
        got = await node.ref("t", "front").invoke("relay")
        assert got == {"self": "t/counter", "caller": "t/front", "meta": {"trace": "x"}}
        direct = await node.ref("t", "counter").invoke("whoami", metadata={"k": "v"})
        assert direct["caller"] is None and direct["meta"] == {"k": "v"}


async def test_unnamed_spawn_explicit_lazy_and_after_restart(
    make_node, store: MemoryStateStore
) -> None:
    sys_ = ActorSystem("shop")

    @sys_.actor("cart", kind="unnamed", state=Count, snapshot=WriteThrough())
    class Cart:
        @action
        async def add(self, ctx: Context[Count], n: int) -> list[str]:
            ctx.state = Count(ctx.state.value + n, [ctx.self_id.name, ctx.self_id.parent or ""])
            return ctx.state.log

    async with make_node(sys_, store=store) as node:
        one = await node.spawn("shop", "cart-1", "cart")
        assert await one.invoke("add", 1) == ["cart-1", "cart"]
        assert await node.ref("shop", "cart-1").invoke("add", 1) == ["cart-1", "cart"]
        lazy = node.ref("shop", "cart-2", parent="cart")
        assert await lazy.invoke("add", 5) == ["cart-2", "cart"]
        with pytest.raises(InvalidArgument, match="template"):
            await node.ref("shop", "cart").invoke("add", 1)
        with pytest.raises(ActorNotFound):
            await node.spawn("shop", "x", "no-such-template")
    async with make_node(sys_, store=store) as node:  # the stored row names its template
        await node.ref("shop", "cart-2").invoke("add", 1)
        assert (await node.ref("shop", "cart-2").get_state()).value == 6


async def test_pooled_calls_spread_over_instances(make_node) -> None:
    sys_ = ActorSystem("t")
    running: set[str] = set()
    peak = 0

    @sys_.actor("pool", kind="pooled", pool_size=3)
    class Pool:
        @action
        async def work(self, ctx: Context[None]) -> str:
            nonlocal peak
            running.add(ctx.self_id.name)
            peak = max(peak, len(running))
            await trio.sleep(0.01)
            running.discard(ctx.self_id.name)
            return ctx.self_id.name

    async with make_node(sys_) as node:
        names: list[str] = []

        async def call() -> None:
            names.append(await node.ref("t", "pool").invoke("work"))

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(call)
        assert set(names) == {"pool#0", "pool#1", "pool#2"}
        assert peak == 3


async def test_cast_runs_in_order_and_returns_at_once(make_node) -> None:
    async with make_node(counter_system()) as node:
        c = node.ref("t", "counter")
        for i in range(1, 4):
            await c.cast("slow_add", i)
        assert (await c.get_state()).value == 0 or True  # casts are queued behind nothing
        assert await c.invoke("add", 0) == 6  # queued after the three casts, FIFO
        assert (await c.get_state()).log == ["add1", "add2", "add3", "add0"]


async def test_workflow_side_effects_broadcast_forward_pipe(make_node) -> None:
    sys_ = ActorSystem("wf")
    got: list[tuple[str, object]] = []

    @sys_.actor("sink", state=Count, channels={"news": "on_news"})
    class Sink:
        @action
        async def on_news(self, ctx: Context[Count], item: object) -> None:
            got.append(("news", item))

        @action
        async def effect(self, ctx: Context[Count], item: object) -> None:
            got.append(("effect", item))

        @action
        async def failing_effect(self, ctx: Context[Count], item: object) -> None:
            raise RuntimeError("effects never reach the caller")

        @action
        async def echo(self, ctx: Context[Count], item: object) -> object:
            return {"echo": item}

    @sys_.actor("src", state=Count)
    class Src:
        @action
        async def go(self, ctx: Context[Count], x: int) -> Reply:
            sink = ctx.ref("sink")
            return (
                ctx.reply(x * 10, state=Count(x))
                .effect(sink, "effect", x)
                .effect(sink, "failing_effect", x)
                .broadcast("news", {"x": x})
            )

        @action
        async def fwd(self, ctx: Context[Count], x: int) -> Reply:
            return ctx.reply(x * 10).forward(ctx.ref("sink"), "echo")

        @action
        async def pip(self, ctx: Context[Count], x: int) -> Reply:
            return ctx.reply(x * 10).pipe(ctx.ref("sink"), "echo")

    async with make_node(sys_) as node:
        src = node.ref("wf", "src")
        assert await src.invoke("go", 1) == 10
        await trio.sleep(0.05)
        assert sorted(got, key=str) == [("effect", 1), ("news", {"x": 1})]
        assert await src.invoke("fwd", 2) == {"echo": 2}  # the input went on
        assert await src.invoke("pip", 2) == {"echo": 20}  # the output went on
        assert (await src.get_state()).value == 1


async def test_broadcast_reaches_active_unnamed_instances(make_node) -> None:
    sys_ = ActorSystem("wf")

    @sys_.actor("room", kind="unnamed", state=Count, channels=["lobby"])
    class Room:
        @action
        async def receive(self, ctx: Context[Count], n: int) -> None:
            ctx.state = Count(ctx.state.value + n)

        @action
        async def hello(self, ctx: Context[Count]) -> None:
            return None

    async with make_node(sys_) as node:
        rooms = [node.ref("wf", f"r{i}", parent="room") for i in range(3)]
        for r in rooms:
            await r.invoke("hello")
        assert await node.broadcast("wf", "lobby", 7) == 3
        await trio.sleep(0.05)
        assert [(await r.get_state()).value for r in rooms] == [7, 7, 7]


async def test_timers_fire_as_turns(make_node, autojump_clock: trio.testing.MockClock) -> None:
    sys_ = ActorSystem("t")

    @sys_.actor("ticker", state=Count)
    class Ticker:
        @action(timer_ms=1000)
        async def tick(self, ctx: Context[Count]) -> None:
            ctx.state = Count(ctx.state.value + 1)

    async with make_node(sys_) as node:
        await trio.sleep(10.5)
        assert (await node.ref("t", "ticker").get_state()).value == 10


async def test_passivation_when_idle_and_reload(
    make_node, store: MemoryStateStore, autojump_clock: trio.testing.MockClock
) -> None:
    async with make_node(
        counter_system(deactivate_after_ms=5_000), store=store,
        **{"actors.sweep_interval_ms": 1000},
    ) as node:
        c = node.ref("t", "counter")
        await c.invoke("add", 3)
        assert node.runtime.active_count() == 1
        await trio.sleep(3)
        assert node.runtime.active_count() == 1
        await trio.sleep(4)
        assert node.runtime.active_count() == 0
        assert node.metrics.passivations_total == 1
        row = await store.load(("t", "counter"))
        assert row is not None and b"add3" in row.blob  # flushed before passivation
        assert await c.invoke("add", 1) == 4  # reactivated with its state
        assert node.metrics.activations_total == 2


async def test_no_passivation_with_turn_queued(
    make_node, autojump_clock: trio.testing.MockClock
) -> None:
    async with make_node(
        counter_system(deactivate_after_ms=1_000), **{"actors.sweep_interval_ms": 100}
    ) as node:
        c = node.ref("t", "counter")
        await c.invoke("sleep", 5.0)  # busy far longer than the idle timeout
        assert node.runtime.active_count() == 1
        await trio.sleep(2)
        assert node.runtime.active_count() == 0


async def test_delayed_and_scheduled_casts(
    make_node, autojump_clock: trio.testing.MockClock
) -> None:
    from spawnmesh import clock

    async with make_node(counter_system()) as node:
        base = trio.current_time()
        clock.set_wall_clock(lambda: 1_000_000 + int((trio.current_time() - base) * 1000))
        try:
            c = node.ref("t", "counter")
            await c.cast("add", 1, delay_ms=2_000)
            await c.cast("add", 10, at_epoch_ms=1_005_000)
            await trio.sleep(1.9)
            assert (await c.get_state()).value == 0
            await trio.sleep(0.2)
            assert (await c.get_state()).value == 1
            await trio.sleep(3)
            assert (await c.get_state()).value == 11
        finally:
            clock.set_wall_clock(None)


async def test_drain_finishes_turns_flushes_and_refuses_new(
    make_node, store: MemoryStateStore
) -> None:
    async with make_node(counter_system(), store=store) as node:
        c = node.ref("t", "counter")
        result: list[object] = []

        async def long_call() -> None:
            result.append(await c.invoke("slow_add", 5))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_call)
            await trio.sleep(0.001)
            assert await node.shutdown(grace_s=2)
            with pytest.raises(NodeShuttingDown):
                await c.invoke("add", 1)
        assert result == [5]
        row = await store.load(("t", "counter"))
        assert row is not None and b"add5" in row.blob
        assert node.readiness()[0] is False


async def test_stale_activation_is_fenced_and_retried(store: MemoryStateStore, make_node) -> None:
    """Two nodes share a store and both activate one actor: a write based on a stale revision
    is refused, the stale activation is dropped, and the call is retried on fresh state."""
    sys_ = counter_system(WriteThrough())
    async with make_node(sys_, store=store) as a, make_node(sys_, store=store) as b:
        ca, cb = a.ref("t", "counter"), b.ref("t", "counter")
        assert await ca.invoke("add", 1) == 1
        assert await cb.invoke("add", 1) == 2  # b loads revision 1
        assert await ca.invoke("add", 1) == 3  # a's write on revision 1 is fenced; retried
        assert a.metrics.stale_activations_total == 1
        row = await store.load(("t", "counter"))
        assert row is not None and row.revision == 3


async def test_definition_errors() -> None:
    from spawnmesh.errors import DefinitionError

    sys_ = ActorSystem("t")
    with pytest.raises(DefinitionError, match="defines no actions"):

        @sys_.actor("empty", state=Count)
        class Empty:
            pass

    with pytest.raises(DefinitionError, match="stateless"):

        @sys_.actor("p", kind="pooled", state=Count)
        class P:
            @action
            async def a(self, ctx: Context[Count]) -> None: ...

    with pytest.raises(DefinitionError, match="name"):
        sys_.actor("bad name!")(type("X", (), {"a": action(lambda self, ctx: None)}))


async def test_drain_gives_up_after_grace_period(
    make_node, autojump_clock: trio.testing.MockClock
) -> None:
    """A turn that outlives the grace period makes drain report an unclean stop, on time."""
    async with make_node(counter_system()) as node:
        c = node.ref("t", "counter")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.invoke, "sleep", 100.0)
            await trio.sleep(0.001)
            t0 = trio.current_time()
            assert await node.shutdown(grace_s=5) is False
            assert 5 <= trio.current_time() - t0 < 6
            nursery.cancel_scope.cancel()
