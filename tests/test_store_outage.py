"""Bad days through a whole node: the database goes away and comes back; a row is corrupt.

A node (``open_node``) runs on a real PostgreSQL / MariaDB reached through a TCP proxy that the
test cuts (an outage) and restores. While the database is down the node stays up and reports
not ready with a reason, write-through invocations fail with ``StatestoreUnavailable`` and leave
the actor at its last durable state, invocations that must load state fail the same way, and
write-behind state stays pending; when the database returns, readiness comes back by itself and
the pending state is written. A corrupt row (a sealed blob copied from another actor) is a
``StateCorrupt`` for that actor only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import sqlalchemy as sa
import trio

from spawnmesh import (
    ActorSystem,
    Context,
    Node,
    Reply,
    WriteBehind,
    WriteThrough,
    action,
    open_node,
)
from spawnmesh.errors import InvocationTimeout, StateCorrupt, StatestoreUnavailable
from spawnmesh.statestore import schema
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.sql import SqlStateStore
from tests.conftest import test_config
from tests.test_statestore_sql import KEY1, _Proxy, fresh_database


def bank() -> ActorSystem:
    system = ActorSystem("bank")

    @system.actor("ledger", state=int, snapshot=WriteThrough())
    class Ledger:
        @action
        async def add(self, ctx: Context[int], n: int) -> int:
            ctx.state += n
            return ctx.state

    @system.actor("tally", state=int, snapshot=WriteBehind(every_ms=20))
    class Tally:
        @action
        async def add(self, ctx: Context[int], n: int) -> int:
            ctx.state += n
            return ctx.state

    @system.actor("journal", state=int, snapshot=WriteBehind(every_ms=60_000))
    class Journal:
        @action
        async def add(self, ctx: Context[int], n: int) -> int:
            ctx.state += n
            return ctx.state

        @action
        async def add_now(self, ctx: Context[int], n: int) -> Reply:
            """The same, durable before the reply (a checkpoint)."""
            ctx.state += n
            reply = ctx.reply(ctx.state)
            reply.checkpoint = True
            return reply

    @system.actor("account", kind="unnamed", state=int, snapshot=WriteThrough())
    class Account:
        @action
        async def add(self, ctx: Context[int], n: int) -> int:
            ctx.state += n
            return ctx.state

    return system


@asynccontextmanager
async def through_proxy(url: sa.URL) -> AsyncIterator[tuple[_Proxy, sa.URL, trio.Nursery]]:
    """The database behind a TCP proxy the test cuts (an outage) and restores: the proxy, the
    URL through it, and the nursery that serves it (cut at the end, so its tasks end)."""
    proxy = _Proxy(url.host or "127.0.0.1", int(url.port or 0))
    async with trio.open_nursery() as nursery:
        await proxy.start(nursery)
        yield proxy, url.set(host="127.0.0.1", port=proxy.port), nursery
        proxy.cut()


def _store(url: sa.URL) -> SqlStateStore:
    return SqlStateStore(url, keyring=Keyring.parse(KEY1), pool_size=4, connect_timeout_s=2)


@asynccontextmanager
async def node_on(url: sa.URL) -> AsyncIterator[Node]:
    async with open_node(test_config(**{"actors.write_behind_ms": 20}), bank(),
                         store=_store(url)) as node:
        yield node


async def stored_int(url: sa.URL, name: str) -> int | None:
    """The value stored for bank/NAME, read directly (not through the proxy)."""
    store = _store(url)
    await store.open()
    try:
        got = await store.load(("bank", name))
        return None if got is None else int(msgspec.msgpack.decode(got.blob))
    finally:
        await store.aclose()


async def wait_until(pred: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Poll ``pred`` (node state has no event to wait on) until true, failing after a while."""
    with trio.fail_after(timeout_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.05)


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
async def test_node_rides_out_an_outage(dialect: str, tmp_path: Path) -> None:
    with fresh_database(dialect, tmp_path) as url:
        async with through_proxy(url) as (proxy, via, nursery), node_on(via) as node:
            ledger = node.ref("bank", "ledger")
            tally = node.ref("bank", "tally")
            assert await ledger.invoke("add", 5) == 5
            assert await tally.invoke("add", 1) == 1
            await wait_until(lambda: node.runtime.writer.pending() == 0)
            assert node.readiness() == (True, [])

            proxy.cut()  # the database goes away
            # write-through: the reply waits for durability, so it fails, and the actor
            # is back at its last durable state
            with pytest.raises(StatestoreUnavailable):
                await ledger.invoke("add", 10)
            assert await ledger.invoke("get_state") == 5
            # an actor whose state must be loaded cannot be activated
            with pytest.raises(StatestoreUnavailable):
                await node.ref("bank", "acct-1", parent="account").invoke("add", 1)
            # write-behind: accepted now, kept pending while writes fail
            assert await tally.invoke("add", 1) == 2
            assert await tally.invoke("add", 1) == 3
            await trio.sleep(0.3)
            assert node.runtime.writer.pending() >= 1
            await wait_until(lambda: not node.readiness()[0])
            reasons = node.readiness()[1]
            assert any("state writes failing" in r or "statestore unavailable" in r
                       for r in reasons), reasons
            assert node.runtime.active_count() >= 2  # the node is still up and serving
            assert await tally.invoke("get_state") == 3

            await proxy.start(nursery)  # the database comes back on the same address
            await wait_until(lambda: node.readiness()[0])  # readiness returns by itself
            await wait_until(lambda: node.runtime.writer.pending() == 0)
            assert await stored_int(url, "tally") == 3  # pending state was written
            assert await stored_int(url, "ledger") == 5  # the failed add left no trace
            assert await ledger.invoke("add", 10) == 15
            assert await stored_int(url, "ledger") == 15
            acct = node.ref("bank", "acct-1", parent="account")
            assert await acct.invoke("add", 1) == 1


@pytest.mark.parametrize("dialect", ["postgresql"])
async def test_a_failed_checkpoint_keeps_the_pending_state_it_follows(
    dialect: str, tmp_path: Path
) -> None:
    """A write-behind actor's acknowledged state is not durable yet when a checkpoint turn
    fails on an outage: the checkpoint's change is undone, the earlier state still gets
    written when the database is back."""
    with fresh_database(dialect, tmp_path) as url:
        async with through_proxy(url) as (proxy, via, nursery), node_on(via) as node:
            journal = node.ref("bank", "journal")
            assert await journal.invoke("add", 5) == 5  # acknowledged, written in 60 s
            proxy.cut()
            with pytest.raises(StatestoreUnavailable):
                await journal.invoke("add_now", 1)
            assert await journal.invoke("get_state") == 5
            assert node.runtime.writer.pending() == 1  # still owed to the store
            await proxy.start(nursery)
            await node.runtime.writer.flush_all()
            assert await stored_int(url, "journal") == 5


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
async def test_node_started_while_the_database_is_down_recovers(
    dialect: str, tmp_path: Path
) -> None:
    with fresh_database(dialect, tmp_path) as url:  # a fresh database: no schema yet either
        async with through_proxy(url) as (proxy, via, nursery):
            proxy.cut()  # down before the node starts
            await trio.sleep(0.05)
            async with node_on(via) as node:
                ready, reasons = node.readiness()
                assert not ready and "statestore unavailable" in reasons, reasons
                with pytest.raises(StatestoreUnavailable):
                    await node.ref("bank", "ledger").invoke("add", 1)
                await proxy.start(nursery)
                await wait_until(lambda: node.readiness()[0])
                assert await node.ref("bank", "ledger").invoke("add", 2) == 2  # schema created
                assert await stored_int(url, "ledger") == 2


class _SlowProxy(_Proxy):
    """A proxy that delays every chunk sent to the database by ``delay_s`` (a slow database)."""

    delay_s = 0.0

    async def _handle(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream(self.host, self.target)
        async with client, upstream, trio.open_nursery() as n:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream, slow: bool) -> None:
                try:
                    async for chunk in src:
                        if slow and self.delay_s:
                            await trio.sleep(self.delay_s)
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                n.cancel_scope.cancel()

            n.start_soon(pump, client, upstream, True)
            n.start_soon(pump, upstream, client, False)


async def test_slow_database_fails_callers_by_their_deadline_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with fresh_database("postgresql", tmp_path) as url:
        proxy = _SlowProxy(url.host or "127.0.0.1", int(url.port or 0))
        async with trio.open_nursery() as nursery:
            await proxy.start(nursery)
            via = url.set(host="127.0.0.1", port=proxy.port)
            async with node_on(via) as node:
                ledger = node.ref("bank", "ledger")
                assert await ledger.invoke("add", 1) == 1
                proxy.delay_s = 0.3  # every statement now takes at least 0.3 s
                with pytest.raises(InvocationTimeout):
                    await ledger.invoke("add", 10, timeout_ms=100)
                # the caller gave up, not the writer: the committed state is made durable
                await wait_until(lambda: node.runtime.writer.pending() == 0)
                proxy.delay_s = 0.0
                assert await stored_int(url, "ledger") == 11
                assert await ledger.invoke("add", 1) == 12  # its revision is still exact
                assert await stored_int(url, "ledger") == 12
                assert node.readiness()[0]
            proxy.cut()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
async def test_corrupt_row_fails_that_actor_only(dialect: str, tmp_path: Path) -> None:
    with fresh_database(dialect, tmp_path) as url:
        async with node_on(url) as node:
            for name in ("victim", "donor", "bystander"):
                assert await node.ref("bank", name, parent="account").invoke("add", 7) == 7
        # copy the donor's sealed row (a valid ciphertext, for another actor) onto the victim
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        st = schema.state
        with engine.begin() as conn:
            donor = conn.execute(sa.select(st.c.data, st.c.key_id, st.c.revision)
                                 .where(st.c.system == "bank", st.c.name == "donor")).one()
            conn.execute(st.update().where(st.c.system == "bank", st.c.name == "victim")
                         .values(data=donor.data, key_id=donor.key_id, revision=donor.revision))
        engine.dispose()

        async with node_on(url) as node:
            victim = node.ref("bank", "victim", parent="account")
            for _ in range(2):  # a clear error each time, never a crash
                with pytest.raises(StateCorrupt) as err:
                    await victim.invoke("add", 1)
                assert "bank/victim" in str(err.value)
            assert await node.ref("bank", "bystander", parent="account").invoke("add", 1) == 8
            assert await node.ref("bank", "donor", parent="account").invoke("add", 1) == 8
            assert await node.ref("bank", "new", parent="account").invoke("add", 2) == 2
            assert node.readiness() == (True, [])
