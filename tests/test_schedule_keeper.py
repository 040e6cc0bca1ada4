"""The schedule keeper: delayed casts saved in batches, held in memory only within the horizon,
flushed by a drain, with their caller across restarts; bad ones refused at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa
import trio

from spawnmesh import ActorSystem, Context, Node, WriteThrough, action, open_node
from spawnmesh.actors.kept import CALLER_KEY, SCHEDULE_LATE_KEY
from spawnmesh.clock import wall_ms
from spawnmesh.errors import InvalidArgument, Overloaded
from spawnmesh.statestore.base import Schedule
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.memory import MemoryStateStore
from spawnmesh.statestore.sql import SqlStateStore
from tests.conftest import test_config
from tests.test_durable_schedules import eventually
from tests.test_statestore_sql import KEY1, fresh_database


@dataclass
class Log:
    seen: list[str] = field(default_factory=list)
    callers: list[str] = field(default_factory=list)
    meta_keys: list[list[str]] = field(default_factory=list)
    at_ms: list[int] = field(default_factory=list)


def journal() -> ActorSystem:
    system = ActorSystem("journal")

    @system.actor("log", kind="unnamed", state=Log, snapshot=WriteThrough())
    class LogActor:
        @action
        async def note(self, ctx: Context[Log], text: str) -> int:
            ctx.state.seen.append(text)
            ctx.state.callers.append(str(ctx.caller) if ctx.caller else "")
            ctx.state.meta_keys.append(sorted(ctx.metadata))
            ctx.state.at_ms.append(wall_ms())
            return len(ctx.state.seen)

        @action
        async def remind(self, ctx: Context[Log], delay_ms: int) -> None:
            """Schedule a note to the ``inbox`` instance, as this actor."""
            await ctx.ref("inbox", parent="log").cast(
                "note", f"from {ctx.self_id.name}", delay_ms=delay_ms
            )

        @action
        async def slow(self, ctx: Context[Log], seconds: float) -> None:
            await trio.sleep(seconds)

    return system


async def notes(node: Node, name: str) -> Log:
    got = await node.ref("journal", name, parent="log").invoke("get_state")
    assert isinstance(got, Log)
    return got


async def kept(node: Node) -> int:
    return len(await node.store.list_schedules(limit=1_000_000))


class FarStore(SqlStateStore):
    """A SQL store whose schedule writes take 0.2 s longer, as over a slow network."""

    async def save_schedules(self, schedules: list[Schedule]) -> None:
        await trio.sleep(0.2)
        await super().save_schedules(schedules)


@asynccontextmanager
async def sql_node(url: sa.URL, *, far: bool = False, **overrides: object) -> AsyncIterator[Node]:
    store = (FarStore if far else SqlStateStore)(url, keyring=Keyring.parse(KEY1), pool_size=2)
    async with open_node(test_config(**overrides), journal(), store=store) as node:
        yield node


async def test_casts_due_beyond_the_horizon_are_not_held_and_fire_on_time() -> None:
    store = MemoryStateStore()
    config = test_config(**{"actors.schedule_horizon_ms": 1_000})
    async with open_node(config, journal(), store=store) as node:
        keeper = node.runtime.schedules
        ref = node.ref("journal", "h1", parent="log")
        start = wall_ms()
        for i in range(200):
            await ref.cast("note", f"far-{i:03}", delay_ms=2_500 + i)
        await ref.cast("note", "near", delay_ms=300)
        await keeper.flush()
        assert await kept(node) == 201
        assert keeper.held == 1  # only the one due within the horizon is in memory
        assert len(keeper._known) == 1
        await eventually(lambda: _has(node, "h1", 201), timeout_s=10)
        got = await notes(node, "h1")
        assert got.seen == ["near"] + [f"far-{i:03}" for i in range(200)]  # in due order
        first_far = got.at_ms[1] - start
        assert 2_500 <= first_far <= 2_500 + 400, first_far  # loaded back in time
        await eventually(lambda: _kept_is(node, 0))
        assert keeper.held == 0 and not keeper._known


async def test_a_node_loads_only_what_is_due_within_its_horizon_after_a_restart() -> None:
    store = MemoryStateStore()
    config = test_config(**{"actors.schedule_horizon_ms": 1_000})
    async with open_node(config, journal(), store=store) as node:
        ref = node.ref("journal", "h2", parent="log")
        for i in range(50):
            await ref.cast("note", f"later-{i}", delay_ms=60_000)
        await ref.cast("note", "soon", delay_ms=1_500)
    async with open_node(config, journal(), store=store) as node:
        keeper = node.runtime.schedules
        await eventually(lambda: _has(node, "h2", 1))
        assert (await notes(node, "h2")).seen == ["soon"]
        assert keeper.held == 0 and not keeper._known
        assert await kept(node) == 50  # the later ones wait in the store only


async def test_a_burst_of_delayed_casts_is_saved_in_batches_and_kept_by_the_drain(
    tmp_path: Path,
) -> None:
    """3,000 delayed casts, then a shutdown at once: every one is in the store afterwards
    (the drain waits for them, here three slow batches), and each fires once after the
    restart."""
    n = 3_000
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_node(url, far=True) as node:
            ref = node.ref("journal", "b1", parent="log")
            for i in range(n):
                await ref.cast("note", str(i), delay_ms=1_500)
            assert node.runtime.schedules.pending_writes() > 0  # not written one by one
        store = SqlStateStore(url, keyring=Keyring.parse(KEY1))
        await store.open()
        try:
            assert len(await store.list_schedules(limit=n + 1)) == n
        finally:
            await store.aclose()
        async with sql_node(url) as node:
            await eventually(lambda: _has(node, "b1", n), timeout_s=60)
            got = await notes(node, "b1")
            assert sorted(got.seen, key=int) == [str(i) for i in range(n)]  # each once
            await eventually(lambda: _kept_is(node, 0), timeout_s=20)


async def test_the_caller_of_a_kept_schedule_survives_a_restart(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_node(url) as node:
            await node.ref("journal", "alice", parent="log").invoke("remind", 800)
            await node.ref("journal", "bob", parent="log").invoke("remind", 60_000)
            await node.runtime.schedules.flush()
            [early, _late] = await node.store.list_schedules()
            assert early.metadata == {CALLER_KEY: '["journal", "alice", "log"]'}
        await trio.sleep(1.0)  # alice's falls due while the node is down
        async with sql_node(url) as node:
            await eventually(lambda: _has(node, "inbox", 1))
            got = await notes(node, "inbox")
            assert got.seen == ["from alice"]
            assert got.callers == ["journal/alice<log>"]
            assert got.meta_keys == [[SCHEDULE_LATE_KEY]]  # the caller is not metadata


async def test_a_delayed_cast_the_store_cannot_keep_is_refused_at_once(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_node(url) as node:
            ref = node.ref("journal", "x1", parent="log")
            with pytest.raises(InvalidArgument, match="longer than 255"):
                await ref.cast("n" * 300, "?", delay_ms=60_000)
            await ref.cast("note", "fine", delay_ms=100)  # the node goes on
            await eventually(lambda: _has(node, "x1", 1))
            assert node.supervisor is not None
            assert not any(node.supervisor.restarts.values()), node.supervisor.restarts


async def test_a_schedule_due_while_the_node_drains_stays_kept() -> None:
    """A kept schedule falling due during the drain is not fired into a node that is
    stopping (its turn would be cut off): it stays in the store and fires after the restart."""
    store = MemoryStateStore()
    config = test_config(**{"actors.shutdown_grace_ms": 3_000, "cluster.enabled": False})
    async with open_node(config, journal(), store=store) as node:
        slow = node.ref("journal", "d1", parent="log")
        await slow.invoke("note", "active")  # so the schedule would be queued on it at once
        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow.invoke, "slow", 0.6)
            await trio.sleep(0.05)
            await slow.cast("note", "during the drain", delay_ms=200)
            await node.runtime.schedules.flush()
            nursery.start_soon(node.shutdown)  # the drain waits for the slow turn
        assert (await store.load(("journal", "d1"))) is not None
    assert len(await store.list_schedules()) == 1
    async with open_node(config, journal(), store=store) as node:
        await eventually(lambda: _has(node, "d1", 2))
        assert (await notes(node, "d1")).seen == ["active", "during the drain"]


async def _has(node: Node, name: str, n: int) -> bool:
    try:
        return len((await notes(node, name)).seen) >= n
    except Overloaded:  # this probe queues behind a burst too
        return False


async def _kept_is(node: Node, n: int) -> bool:
    return await kept(node) == n
