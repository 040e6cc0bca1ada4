"""The mesh in process: three embedded nodes on loopback (real gossip, real peer wire) sharing
one statestore. Invocations through any node reach the one owner; a join and a graceful leave
hand actors off with every update kept; errors, casts, pipes, broadcasts, spawns and call
cycles work across nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.lowlevel

from spawnmesh import ActorSystem, Context, Node, WriteThrough, action, open_node
from spawnmesh.actors.context import Reply
from spawnmesh.actors.definition import Kind
from spawnmesh.errors import ActorFailed, ActorNotFound, CallCycle
from spawnmesh.ids import ActorId
from spawnmesh.statestore import MemoryStateStore
from tests.conftest import test_config

mesh = ActorSystem("mesh")


@dataclass
class Count:
    value: int = 0


@mesh.actor("counter", kind=Kind.UNNAMED, state=Count, snapshot=WriteThrough())
class Counter:
    @action
    async def add(self, ctx: Context[Count], n: int) -> int:
        ctx.state = Count(ctx.state.value + n)
        return ctx.state.value

    @action
    async def snapshot(self, ctx: Context[Count]) -> Count:
        return ctx.state

    @action
    async def where(self, ctx: Context[Count]) -> str:
        return ctx.node_id

    @action
    async def boom(self, ctx: Context[Count]) -> None:
        raise ValueError("kaboom")

    @action
    async def double_then_add(self, ctx: Context[Count], n: int) -> Reply:
        return ctx.reply(n * 2).pipe(ActorId("mesh", ctx.self_id.name + "-sink", "counter"),
                                     "add")


@dataclass
class Seen:
    events: list[str] = field(default_factory=list)


@mesh.actor("listener", kind=Kind.UNNAMED, state=Seen, channels={"news": "hear"})
class Listener:
    @action
    async def hear(self, ctx: Context[Seen], text: str) -> None:
        ctx.state = Seen([*ctx.state.events, text])

    @action
    async def count(self, ctx: Context[Seen]) -> int:
        return len(ctx.state.events)


@mesh.actor("ping", kind=Kind.UNNAMED, stateful=False)
class Ping:
    @action
    async def call(self, ctx: Context[None], other: str) -> str:
        return str(await ctx.ref(other, parent="ping").invoke("call", ctx.self_id.name))


def _config(name: str, seeds: tuple[str, ...] = ()) -> Any:
    return test_config(
        name=name,
        **{"cluster.seeds": ",".join(seeds), "cluster.preset": "local",
           "actors.default_timeout_ms": 10_000},
    )


@asynccontextmanager
async def cluster(names: list[str], store: MemoryStateStore) -> AsyncIterator[list[Node]]:
    """Nodes ``names`` joined into one cluster; waits until every view has all of them."""
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_node(_config(names[0]), mesh, store=store))
        assert first.membership is not None
        seed = f"127.0.0.1:{first.membership.addr[1]}"
        nodes = [first]
        for name in names[1:]:
            nodes.append(await stack.enter_async_context(
                open_node(_config(name, (seed,)), mesh, store=store)))
        await converged(nodes)
        yield nodes


async def converged(nodes: list[Node], timeout_s: float = 15.0) -> None:
    """Until every node's placement spans exactly ``nodes``."""
    want = {n.name for n in nodes}
    with trio.fail_after(timeout_s):
        while True:
            if all(n.router is not None and set(n.router.placement.members("mesh/counter"))
                   == want for n in nodes):
                return
            await trio.sleep(0.02)


async def eventually(probe: Any, want: object, timeout_s: float = 10.0) -> None:
    """Until ``await probe()`` returns ``want``."""
    with trio.fail_after(timeout_s):
        while True:
            if await probe() == want:
                return
            await trio.sleep(0.01)


def owners(nodes: list[Node], name: str) -> list[str]:
    return [n.name for n in nodes if n.runtime.owns(("mesh", name))]


def ref(node: Node, name: str, parent: str = "counter") -> Any:
    return node.ref("mesh", name, parent=parent)


async def test_every_node_reaches_the_one_owner() -> None:
    store = MemoryStateStore()
    async with cluster(["a", "b", "c"], store) as nodes:
        expected: dict[str, int] = {}
        for i in range(60):
            name = f"k{i}"
            for j, node in enumerate(nodes):
                expected[name] = expected.get(name, 0) + j + 1
                assert await ref(node, name).invoke("add", j + 1) == expected[name]
        for name in expected:
            assert len(owners(nodes, name)) == 1, name
            where = {await ref(n, name).invoke("where") for n in nodes}
            assert where == set(owners(nodes, name))
        remote = next(n for n in nodes if owners(nodes, "k0") != [n.name])
        assert await ref(remote, "k0").invoke("snapshot") == Count(expected["k0"])  # typed
        spread = {owners(nodes, f"k{i}")[0] for i in range(60)}
        assert spread == {"a", "b", "c"}  # 60 keys over 3 members: each owns some
        assert sum(n.metrics.remote_invocations_total for n in nodes) > 0
        assert sum(n.metrics.stale_activations_total for n in nodes) == 0


async def test_typed_errors_and_cycles_cross_nodes() -> None:
    store = MemoryStateStore()
    async with cluster(["a", "b"], store) as nodes:
        a = nodes[0]
        name = next(f"e{i}" for i in range(100) if
                    a.router is not None and a.router.remote_owner(
                        ActorId("mesh", f"e{i}", "counter"),
                        a.runtime.definitions()[0]) == "b")
        with pytest.raises(ActorFailed) as err:
            await ref(a, name).invoke("boom")
        assert err.value.error_type == "ValueError" and "kaboom" in str(err.value)
        assert err.value.node == "b"
        with pytest.raises(ActorNotFound):
            await a.ref("mesh", "nobody-knows-me").invoke("add", 1)
        # x -> y -> x across nodes is a cycle, not a deadlock
        with pytest.raises(CallCycle):
            with trio.fail_after(5):
                await a.ref("mesh", "x", parent="ping").invoke("call", "y")


async def test_pipe_cast_and_broadcast_across_nodes() -> None:
    store = MemoryStateStore()
    async with cluster(["a", "b", "c"], store) as nodes:
        a = nodes[0]
        assert await ref(a, "p1").invoke("double_then_add", 5) == 10  # piped into p1-sink
        assert await ref(nodes[2], "p1-sink").invoke("add", 0) == 10
        for i in range(20):
            await ref(a, f"c{i}").cast("add", i)
        for i in range(20):
            await eventually(lambda i=i: ref(nodes[1], f"c{i}").invoke("add", 0), i)
        listeners = [f"l{i}" for i in range(12)]
        for name in listeners:  # activate them (wherever they are owned)
            assert await ref(a, name, "listener").invoke("count") == 0
        active_on = {owners(nodes, name)[0] for name in listeners}
        assert len(active_on) > 1  # the broadcast must really cross nodes
        await nodes[1].broadcast("mesh", "news", "hello")
        for name in listeners:
            await eventually(lambda name=name: ref(a, name, "listener").invoke("count"), 1)


async def test_join_and_leave_hand_actors_off_with_every_update_kept() -> None:
    store = MemoryStateStore()
    names = [f"h{i}" for i in range(40)]
    async with AsyncExitStack() as stack:
        nodes = await stack.enter_async_context(cluster(["a", "b"], store))
        a = nodes[0]
        acked = dict.fromkeys(names, 0)
        failures: list[BaseException] = []

        async def load(node: Node, stop: trio.Event) -> None:
            i = 0
            while not stop.is_set():
                name = names[i % len(names)]
                i += 1
                try:
                    acked[name] = await ref(node, name).invoke("add", 1)
                except Exception as exc:
                    failures.append(exc)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            stop = trio.Event()
            nursery.start_soon(load, a, stop)
            await trio.sleep(0.3)
            assert a.membership is not None
            seed = f"127.0.0.1:{a.membership.addr[1]}"
            async with open_node(_config("c", (seed,)), mesh, store=store) as c:
                await converged([*nodes, c])
                await trio.sleep(0.5)  # load goes on with c owning a third of the keys
                assert any(c.runtime.owns(("mesh", n)) for n in names)
                await trio.sleep(0.2)
            # c left gracefully (leave, hand-off, drain) while the load went on
            await converged(nodes)
            await trio.sleep(0.3)
            stop.set()
        assert failures == []
        for name in names:  # every acknowledged increment is in the state
            assert await ref(a, name).invoke("add", 0) == acked[name]
            assert len(owners(nodes, name)) == 1
        assert sum(n.metrics.handoffs_total for n in nodes) > 0


async def test_a_spawned_instance_is_found_by_name_through_any_node_and_after_a_leave() -> None:
    """Unnamed instances spawned through one node, whose state never changes, are found by
    their names alone through every node, also after a member that owned some left: the first
    activation writes the initial state, whose row names the template (before, only the
    spawning node and the owner knew it, in memory)."""
    store = MemoryStateStore()
    names = [f"s{i}" for i in range(16)]

    async def stored(name: str) -> bool:
        row = await store.load(("mesh", name))
        return row is not None and row.parent == "counter"

    async with cluster(["a", "b"], store) as nodes:
        a = nodes[0]
        assert a.membership is not None
        seed = f"127.0.0.1:{a.membership.addr[1]}"
        async with open_node(_config("c", (seed,)), mesh, store=store) as c:
            await converged([*nodes, c])
            for name in names:
                await c.spawn("mesh", name, "counter")
                assert await c.ref("mesh", name).invoke("add", 0) == 0  # activated, unchanged
            assert any(c.runtime.owns(("mesh", n)) for n in names)
            for name in names:
                await eventually(lambda name=name: stored(name), True)
        await converged(nodes)  # c left: its instances were handed off
        for name in names:
            for node in nodes:
                assert await node.ref("mesh", name).invoke("add", 0) == 0
            assert len(owners(nodes, name)) == 1
