"""Durable schedules: delayed / scheduled invocations are kept in the statestore until they fire,
so they survive a restart of the node and fire when it is back (at least once), overdue ones at
once with how late they are in metadata (``spawnmesh-schedule-late-ms``)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import sqlalchemy as sa
import trio

from spawnmesh import ActorSystem, Context, Node, WriteThrough, action, open_node
from spawnmesh.actors.kept import PAGE, SCHEDULE_LATE_KEY
from spawnmesh.clock import wall_ms
from spawnmesh.errors import Overloaded
from spawnmesh.statestore.base import Schedule
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.memory import MemoryStateStore
from spawnmesh.statestore.sql import SqlStateStore
from tests.conftest import test_config
from tests.test_statestore_sql import KEY1, _db_files, fresh_database


@dataclass
class Deposit:
    amount: int
    memo: str = ""


@dataclass
class Box:
    total: int = 0
    memos: list[str] = field(default_factory=list)
    late_ms: list[int] = field(default_factory=list)


def vault() -> ActorSystem:
    system = ActorSystem("vault")

    @system.actor("box", kind="unnamed", state=Box, snapshot=WriteThrough())
    class BoxActor:
        @action
        async def deposit(self, ctx: Context[Box], d: Deposit) -> int:
            ctx.state.total += d.amount
            ctx.state.memos.append(d.memo)
            late = ctx.metadata.get(SCHEDULE_LATE_KEY)
            ctx.state.late_ms.append(int(late) if late is not None else -1)
            return ctx.state.total

    return system


@asynccontextmanager
async def node_on(url: sa.URL) -> AsyncIterator[Node]:
    store = SqlStateStore(url, keyring=Keyring.parse(KEY1), pool_size=2)
    async with open_node(test_config(), vault(), store=store) as node:
        yield node


async def eventually(pred: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``await pred()`` until true (store and actor state have no event to wait on)."""
    with trio.fail_after(timeout_s):
        while not await pred():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def box(node: Node, name: str) -> Box:
    got = await node.ref("vault", name, parent="box").invoke("get_state")
    assert isinstance(got, Box)
    return got


async def kept(node: Node) -> int:
    return len(await node.store.list_schedules())


async def has_kept(node: Node, n: int, *, exactly: bool = False) -> bool:
    k = await kept(node)
    return k == n if exactly else k >= n


async def total_at_least(node: Node, name: str, total: int) -> bool:
    return (await box(node, name)).total >= total


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_schedule_survives_restart(dialect: str, tmp_path: Path) -> None:
    with fresh_database(dialect, tmp_path) as url:
        async with node_on(url) as node:
            b = node.ref("vault", "b1", parent="box")
            assert await b.invoke("deposit", Deposit(1, "now")) == 1
            await b.cast("deposit", Deposit(10, "overdue"), delay_ms=200)
            await b.cast("deposit", Deposit(100, "future"), delay_ms=3_000)
            due = wall_ms() + 200
            await eventually(lambda: has_kept(node, 2))
        # the node is down while the first one falls due
        await trio.sleep(0.5)
        async with node_on(url) as node:
            await eventually(lambda: total_at_least(node, "b1", 11))
            got = await box(node, "b1")
            assert got.memos == ["now", "overdue"]
            late = got.late_ms[1]
            assert late >= 300, got  # fired at once after the restart, lateness reported
            assert late <= wall_ms() - due
            assert await kept(node) == 1  # the fired one is no longer kept
            await trio.sleep(0.5)
            assert (await box(node, "b1")).total == 11  # the future one waits for its time
            await eventually(lambda: total_at_least(node, "b1", 111))
            got = await box(node, "b1")
            assert got.memos == ["now", "overdue", "future"]
            assert got.late_ms[2] == -1  # on time: no lateness reported
            await eventually(lambda: has_kept(node, 0, exactly=True))


async def test_schedule_fired_in_process_is_forgotten() -> None:
    store = MemoryStateStore()
    async with open_node(test_config(), vault(), store=store) as node:
        b = node.ref("vault", "m1", parent="box")
        await b.cast("deposit", Deposit(3), delay_ms=50)
        assert len(await store.list_schedules()) <= 1
        await eventually(lambda: total_at_least(node, "m1", 3))
        await eventually(lambda: has_kept(node, 0, exactly=True))
        # an immediate cast is never kept
        await b.cast("deposit", Deposit(1))
        assert await store.list_schedules() == []


async def test_kept_schedule_payload_is_not_plaintext(tmp_path: Path) -> None:
    secret = "SCHEDULED-SECRET-7f3a"
    with fresh_database("sqlite", tmp_path) as url:
        async with node_on(url) as node:
            await node.ref("vault", "s1", parent="box").cast(
                "deposit", Deposit(1, secret), delay_ms=60_000
            )
            await eventually(lambda: has_kept(node, 1))
            files = _db_files(tmp_path)
            assert files, "no database files found"
            for name, data in files.items():
                assert secret.encode() not in data, f"plaintext payload in {name}"
            [sc] = await node.store.list_schedules()
            assert secret.encode() in sc.payload  # and it opens again


async def test_recovery_does_not_refire_schedules_this_node_knows() -> None:
    store = MemoryStateStore()
    async with open_node(test_config(), vault(), store=store) as node:
        b = node.ref("vault", "r1", parent="box")
        await b.cast("deposit", Deposit(1, "once"), delay_ms=300)
        await eventually(lambda: has_kept(node, 1))
        node.runtime.schedules.start_recovery(adopt_all=True)  # e.g. a second load racing the first
        await eventually(lambda: total_at_least(node, "r1", 1))
        await eventually(lambda: has_kept(node, 0, exactly=True))
        node.runtime.schedules.start_recovery(adopt_all=True)
        await trio.sleep(0.4)
        assert (await box(node, "r1")).memos == ["once"]


async def test_a_burst_of_overdue_schedules_beyond_the_queue_bound_is_all_delivered() -> None:
    """After a long outage, more schedules fall due at once for one actor than its queue holds,
    and more than the node reads from the store in one page: every one is delivered once (a
    due schedule was admitted when it was made: it is not refused again)."""
    store = MemoryStateStore()
    due = wall_ms() - 5_000
    n = PAGE + 100
    await store.save_schedules([
        Schedule(f"burst-{i:03}", "vault", "q1", "box", "deposit",
                 msgspec.msgpack.encode({"amount": 1, "memo": f"m{i:03}"}), {}, due, "test-node")
        for i in range(n)
    ])
    config = test_config(**{"actors.max_queue_per_actor": 8})
    async with open_node(config, vault(), store=store) as node:

        async def all_in() -> bool:
            try:
                return await total_at_least(node, "q1", n)
            except Overloaded:  # this probe queues behind the burst too
                return False

        await eventually(all_in, timeout_s=20)
        await eventually(lambda: has_kept(node, 0, exactly=True))
        got = await box(node, "q1")
        assert got.total == n
        assert sorted(got.memos) == sorted(f"m{i:03}" for i in range(n))  # each once
        assert node.metrics.scheduled_fired_total == n
