"""Tier 4: the membership shell with real loopback UDP/TCP sockets under trio's MockClock
(autojump): join, failure detection, refutation, graceful leave, and packets of another cluster
or key rejected before the core (counted, logged, never admitted)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from spawnmesh.cluster import config as presets
from spawnmesh.cluster.addr import format_addr
from spawnmesh.cluster.membership import Membership, MembershipSettings
from spawnmesh.cluster.messages import NodeMeta
from spawnmesh.cluster.seal import Channel
from spawnmesh.cluster.state import Status
from spawnmesh.cluster.swim import EventKind, MemberEvent
from spawnmesh.keyring import Keyring

KEY_A = Keyring([("a", bytes(range(32)))])
KEY_B = Keyring([("b", bytes(range(1, 33)))])
KEY_A_WRONG = Keyring([("a", bytes(range(1, 33)))])


@dataclass
class Shell:
    """One membership service running in its own cancel scope (stop it = crash it)."""

    m: Membership
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    events: list[tuple[float, EventKind, str]] = field(default_factory=list)
    deaf: bool = False
    """While true, every inbound packet is dropped (a stalled, unreachable node)."""

    @property
    def name(self) -> str:
        return self.m.name

    @property
    def addr(self) -> str:
        return format_addr(self.m.addr)

    def status_of(self, name: str) -> Status | None:
        for v in self.m.members():
            if v.name == name:
                return v.status
        return None

    def kinds_about(self, name: str) -> list[EventKind]:
        return [k for _, k, n in self.events if n == name]

    def stop(self) -> None:
        self.scope.cancel()
        self.m.close()


def settings(**kw: Any) -> MembershipSettings:
    values: dict[str, Any] = {"bind_host": "127.0.0.1", "port": 0, "swim": presets.lan()}
    values.update(kw)
    return MembershipSettings(**values)


@asynccontextmanager
async def cluster() -> AsyncIterator[Callable[..., Any]]:
    """``start(name, **settings) -> Shell``; every shell is stopped when the block ends."""
    shells: list[Shell] = []
    async with trio.open_nursery() as nursery:

        async def start(name: str, **kw: Any) -> Shell:
            m = Membership(name, settings(**kw), NodeMeta(("127.0.0.1", 1), [f"s/{name}"]))
            shell = Shell(m)
            m.subscribe(lambda e: shell.events.append((trio.current_time(), e.kind, e.member.name)))
            await m.open()
            real_open = m.transport.open
            m.transport.open = lambda data, src, ch: (  # type: ignore[method-assign]
                None if shell.deaf else real_open(data, src, ch)
            )

            async def run(task_status: trio.TaskStatus[None]) -> None:
                with shell.scope:
                    await m.run(task_status=task_status)

            await nursery.start(run)
            shells.append(shell)
            return shell

        try:
            yield start
        finally:
            for s in shells:
                s.stop()


async def until(pred: Callable[[], object], what: str, timeout_s: float = 120.0) -> float:
    """Wait (virtual time) until ``pred()`` holds; returns the virtual time it took."""
    t0 = trio.current_time()
    with trio.move_on_after(timeout_s):
        while not pred():  # noqa: ASYNC110 - polling views, not an event
            await trio.sleep(0.05)
        return trio.current_time() - t0
    raise AssertionError(f"not within {timeout_s} virtual s: {what}")


def all_alive(shells: list[Shell]) -> bool:
    names = {s.name for s in shells}
    return all({v.name for v in s.m.members() if v.status is Status.ALIVE} == names for s in shells)


async def test_three_join_detect_a_crash_and_refute(autojump_clock: trio.abc.Clock) -> None:
    async with cluster() as start:
        a = await start("a")
        b = await start("b", seeds=(a.addr,))
        c = await start("c", seeds=(b.addr,))  # learns of a through b
        await until(lambda: all_alive([a, b, c]), "three members alive everywhere")
        assert set(a.m.live()) == {"a", "b", "c"}
        assert a.m.live()["c"].actor_types == ["s/c"]
        assert c.m.joined_once

        # Refutation: c stops hearing anything for a moment, gets suspected, and refutes.
        c.deaf = True
        await until(
            lambda: a.status_of("c") is Status.SUSPECT or b.status_of("c") is Status.SUSPECT,
            "c suspected",
        )
        c.deaf = False
        await until(
            lambda: a.status_of("c") is Status.ALIVE and b.status_of("c") is Status.ALIVE,
            "c refuted",
        )
        assert c.m.swim.incarnation >= 1
        assert EventKind.ALIVE in a.kinds_about("c") + b.kinds_about("c")
        assert EventKind.DEAD not in a.kinds_about("c") + b.kinds_about("c")

        # Crash: c stops; a and b declare it dead (suspect first).
        v0 = a.m.version
        c.stop()
        took = await until(
            lambda: a.status_of("c") is Status.DEAD and b.status_of("c") is Status.DEAD,
            "c dead at a and b",
        )
        assert took < 30, took  # lan preset, 3 nodes: probe + 4 s suspicion
        assert set(a.m.live()) == {"a", "b"}
        assert a.m.version > v0
        assert a.kinds_about("c")[-2:] in ([EventKind.SUSPECT, EventKind.DEAD], [EventKind.DEAD])


async def test_graceful_leave_is_left_never_suspect(autojump_clock: trio.abc.Clock) -> None:
    async with cluster() as start:
        a = await start("a")
        b = await start("b", seeds=(a.addr,))
        c = await start("c", seeds=(a.addr,))
        await until(lambda: all_alive([a, b, c]), "joined")
        t0 = trio.current_time()
        assert await c.m.leave(5.0)
        c.stop()
        await until(
            lambda: a.status_of("c") is Status.LEFT and b.status_of("c") is Status.LEFT,
            "c left at a and b",
        )
        assert trio.current_time() - t0 < 2.0
        await trio.sleep(30)  # long past any suspicion timeout
        for s in (a, b):
            assert s.kinds_about("c")[-1] is EventKind.LEFT
            assert EventKind.SUSPECT not in s.kinds_about("c")[1:]
            assert EventKind.DEAD not in s.kinds_about("c")
        assert set(a.m.live()) == {"a", "b"}


async def test_seeds_retried_until_one_answers(autojump_clock: trio.abc.Clock) -> None:
    """A node whose seed is not up yet keeps retrying (with backoff) and joins when it is."""
    async with cluster() as start:
        a = await start("a")
        port = a.m.addr[1]
        a.stop()
        await trio.sleep(0.1)
        b = await start("b", seeds=(f"127.0.0.1:{port}",), retry_min_s=0.5, retry_max_s=4.0)
        await trio.sleep(10)
        assert not b.m.joined_once and b.m.swim.alone
        # a comes back on the same port
        a2 = await start("a", port=port)
        await until(lambda: all_alive([a2, b]), "b joined once a came up", 10)


@pytest.mark.parametrize(
    ("intruder", "reason"),
    [
        ({"keyring": KEY_A_WRONG}, "bad tag"),
        ({"keyring": KEY_B}, "unknown key id"),
        ({"keyring": KEY_A, "cluster": "other"}, "wrong cluster"),
        ({}, "not encrypted"),
    ],
    ids=["wrong-key", "unknown-key-id", "wrong-cluster-name", "no-key"],
)
async def test_foreign_packets_are_rejected_and_never_admitted(
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    intruder: dict[str, Any],
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.cluster.transport")
    async with cluster() as start:
        a = await start("a", keyring=KEY_A)
        b = await start("b", keyring=KEY_A, seeds=(a.addr,))
        await until(lambda: all_alive([a, b]), "a and b joined")
        x = await start("x", seeds=(a.addr, b.addr), retry_min_s=0.5, retry_max_s=2.0, **intruder)
        assert await x.m.join([a.addr]) == 0
        await trio.sleep(20)  # x keeps retrying its seeds and gossiping at them
        for s in (a, b):
            assert s.status_of("x") is None, s.m.members()
            assert s.m.transport.stats.rejected.get(reason, 0) >= 2
            assert set(s.m.live()) == {"a", "b"}
        assert x.m.swim.alone and not x.m.joined_once
        lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
        assert any(reason in line and "127.0.0.1:" in line for line in lines), lines
        # rate-limited: far fewer lines than rejected packets
        total = sum(a.m.transport.stats.rejected.values()) + sum(
            b.m.transport.stats.rejected.values()
        )
        assert len(lines) < total, (len(lines), total)


async def test_key_rotation_keeps_the_cluster_together(autojump_clock: trio.abc.Clock) -> None:
    """Nodes holding {old, new} open packets sealed under either; a node still on the old key
    alone can talk to them as long as they seal with it."""
    both_old_newest = Keyring([("b", bytes(range(1, 33))), ("a", bytes(range(32)))])
    async with cluster() as start:
        a = await start("a", keyring=KEY_A)
        b = await start("b", keyring=both_old_newest, seeds=(a.addr,))
        await until(lambda: all_alive([a, b]), "old-key and two-key nodes joined")
        assert b.m.transport.stats.rejected == {}
        sealed = b.m.transport.sealer.seal(b"x", Channel.UDP)
        assert a.m.transport.sealer.open(sealed, Channel.UDP) == b"x"


async def test_subscribers_see_events_in_order_and_version_moves(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with cluster() as start:
        a = await start("a")
        seen: list[MemberEvent] = []
        a.m.subscribe(seen.append)
        a.m.subscribe(lambda e: 1 / 0)  # a failing subscriber does not stop delivery
        v = a.m.version
        b = await start("b", seeds=(a.addr,))
        assert await a.m.wait_changed(v) != v
        await until(lambda: all_alive([a, b]), "joined")
        assert [e.kind for e in seen][:1] == [EventKind.JOIN]
        v = a.m.version
        await b.m.update_meta(NodeMeta(("127.0.0.1", 2), ["s/new"], tags={"zone": "z"}))
        await a.m.wait_changed(v)
        await until(lambda: a.m.live()["b"].tags == {"zone": "z"}, "new meta at a")
        assert a.m.live()["b"].actor_types == ["s/new"]
