"""Kept schedules in a cluster: each fires once, from one member.

Three embedded nodes on loopback (real gossip, real peer wire) share one statestore. A node
fires only the schedules it keeps; a member that leaves hands its schedules to one survivor,
which fires them when due; a member that restarts under the same name takes back only its own;
schedules whose owner no member knows are taken over once overdue (concurrent sweeps move each
one once); a due schedule its actor's owner refuses for now (a full queue) stays kept and is
retried until queued. The rendezvous choice of the adopter is property-tested, and so is the
adoption under any churn of deaths, leaves and comebacks. A SIGKILLed owner with real
processes and PostgreSQL: ``tests/test_e2e_schedules.py``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import hypothesis.strategies as st
import msgspec
import trio
from hypothesis import given

from spawnmesh import ActorSystem, Context, Node, WriteThrough, action, open_node
from spawnmesh.actors.definition import Kind
from spawnmesh.actors.runtime import Runtime, RuntimeSettings
from spawnmesh.clock import wall_ms
from spawnmesh.cluster.state import MemberView, Status
from spawnmesh.errors import Overloaded
from spawnmesh.ids import ActorId
from spawnmesh.mesh.schedules import ScheduleAdoption, adopter
from spawnmesh.ops.metrics import Metrics
from spawnmesh.statestore import MemoryStateStore
from spawnmesh.statestore.base import Schedule
from tests.conftest import test_config

ledger = ActorSystem("ledger")


@dataclass
class Entries:
    items: list[str] = field(default_factory=list)


GATE = trio.Event()
"""Holds ``hold`` turns until set (a test makes a new one)."""


@ledger.actor("book", kind=Kind.UNNAMED, state=Entries, snapshot=WriteThrough())
class Book:
    @action
    async def hold(self, ctx: Context[Entries]) -> None:
        await GATE.wait()

    @action
    async def hold_then_note(self, ctx: Context[Entries], item: str) -> None:
        """Once the gate opens, schedule ``note(item)`` on this book, 300 ms later."""
        await GATE.wait()
        await ctx.ref(ctx.self_id.name, parent="book").cast("note", item, delay_ms=300)

    @action
    async def note(self, ctx: Context[Entries], item: str) -> int:
        ctx.state = Entries([*ctx.state.items, item])
        return len(ctx.state.items)

    @action
    async def items(self, ctx: Context[Entries]) -> list[str]:
        return ctx.state.items


def _config(name: str, seeds: tuple[str, ...] = (), orphan_ms: int = 60_000,
            **more: Any) -> Any:
    return test_config(
        name=name,
        **{"cluster.seeds": ",".join(seeds), "cluster.preset": "local",
           "cluster.orphan_schedules_after_ms": orphan_ms, **more},
    )


def seed_of(node: Node) -> str:
    assert node.membership is not None
    return f"127.0.0.1:{node.membership.addr[1]}"


async def until(pred: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll ``await pred()`` until true (views, stores and actor state have no event to
    wait on)."""
    with trio.fail_after(timeout_s):
        while not await pred():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def converged(nodes: list[Node]) -> None:
    """Until every node sees exactly ``nodes`` alive."""
    want = {n.name for n in nodes}

    async def agreed() -> bool:
        return all(n.membership is not None and set(n.membership.live()) == want
                   for n in nodes)

    await until(agreed, 15.0)


async def started(stack: AsyncExitStack, store: MemoryStateStore, *names: str,
                  seed: str = "", orphan_ms: int = 60_000) -> list[Node]:
    """Nodes ``names`` (the first one the seed of the others), closed with ``stack``."""
    nodes = []
    for name in names:
        node = await stack.enter_async_context(
            open_node(_config(name, (seed,) if seed else (), orphan_ms), ledger, store=store))
        seed = seed or seed_of(node)
        nodes.append(node)
    return nodes


async def items(node: Node, name: str) -> list[str]:
    got = await node.ref("ledger", name, parent="book").invoke("items")
    assert isinstance(got, list)
    return got


async def settle(node: Node, books: dict[str, list[str]]) -> None:
    """Until every book holds at least as many notes as ``books`` expects."""

    async def filled() -> bool:
        for name, want in books.items():
            if len(await items(node, name)) < len(want):
                return False
        return True

    await until(filled)


async def schedule_notes(node: Node, books: dict[str, list[str]], delay_ms: int) -> None:
    for name, notes in books.items():
        for note in notes:
            await node.ref("ledger", name, parent="book").cast("note", note, delay_ms=delay_ms)


async def kept_by(store: MemoryStateStore, owner: str) -> int:
    return len(await store.list_schedules(owner=owner))


async def wait_kept(store: MemoryStateStore, owner: str, n: int) -> None:
    async def kept() -> bool:
        return await kept_by(store, owner) == n

    await until(kept)


BOOKS = {f"b{i}": [f"b{i}-first", f"b{i}-second"] for i in range(6)}


async def test_a_leaving_member_hands_its_schedules_to_one_survivor() -> None:
    store = MemoryStateStore()
    async with AsyncExitStack() as stack:
        b, c = await started(stack, store, "b", "c")
        async with open_node(_config("a", (seed_of(b),)), ledger, store=store) as a:
            await converged([a, b, c])
            await schedule_notes(a, BOOKS, delay_ms=1_500)
            await wait_kept(store, "a", 12)
        # a left gracefully long before the notes fall due: they must not be lost
        await converged([b, c])
        await settle(b, BOOKS)
        await trio.sleep(0.5)  # time for a duplicate to show
        for name, notes in BOOKS.items():
            assert sorted(await items(c, name)) == sorted(notes), name
        assert b.metrics.schedules_adopted_total + c.metrics.schedules_adopted_total == 12
        assert {b.metrics.schedules_adopted_total, c.metrics.schedules_adopted_total} == {0, 12}
        late = [n for n in (b, c) if n.metrics.schedules_adopted_total]
        assert late and late[0].name == adopter("a", ["b", "c"])

        async def none_kept() -> bool:
            return not await store.list_schedules()

        await until(none_kept)


async def test_a_member_restarting_takes_back_only_its_own_schedules() -> None:
    store = MemoryStateStore()
    async with AsyncExitStack() as stack:
        a, b = await started(stack, store, "a", "b")
        async with open_node(_config("c", (seed_of(a),)), ledger, store=store) as c:
            await converged([a, b, c])
            await schedule_notes(a, BOOKS, delay_ms=2_500)
            await schedule_notes(c, {"mine": ["c-own"]}, delay_ms=60_000)
            await wait_kept(store, "a", 12)
            await wait_kept(store, "c", 1)
        await converged([a, b])
        assert await kept_by(store, "c") == 0  # handed over when c left
        async with open_node(_config("c", (seed_of(a),)), ledger, store=store) as c2:
            await converged([a, b, c2])
            await settle(a, BOOKS)
            await trio.sleep(0.5)
            for name, notes in BOOKS.items():  # fired by a alone, not again by c
                assert sorted(await items(c2, name)) == sorted(notes), name
        # the notes are forgotten once fired; c's own schedule went to its adopter when c
        # left, and stays there
        heir = adopter("c", ["a", "b"])
        assert [s.owner for s in await store.list_schedules()] == [heir]
        assert [a.metrics.schedules_adopted_total, b.metrics.schedules_adopted_total] == [
            int(heir == "a"), int(heir == "b")]


async def test_orphaned_schedules_are_taken_over_once_when_overdue() -> None:
    store = MemoryStateStore()
    payload = msgspec.msgpack.encode("from-a-ghost")
    due = wall_ms() - 1_000
    for i in range(8):
        await store.save_schedules([Schedule(f"ghost-{i}", "ledger", f"g{i}", "book", "note",
                                             payload, {}, due, "ghost")])
    await store.save_schedules([Schedule("future", "ledger", "g0", "book", "note",
                                         msgspec.msgpack.encode("later"), {},
                                         wall_ms() + 60_000, "ghost")])
    async with AsyncExitStack() as stack:
        nodes = await started(stack, store, "x", "y", "z", orphan_ms=400)
        await converged(nodes)
        x = nodes[0]
        await settle(x, {f"g{i}": ["from-a-ghost"] for i in range(8)})
        await trio.sleep(1.0)  # several sweeps of every node later
        for i in range(8):
            assert await items(x, f"g{i}") == ["from-a-ghost"]
        adopted = [n.metrics.schedules_adopted_total for n in nodes]
        assert sum(adopted) == 9, adopted  # the future one came along with its owner's
        [future] = await store.list_schedules()
        assert future.id == "future" and future.owner in {"x", "y", "z"}


@given(st.text(min_size=1, max_size=12),
       st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=8, unique=True),
       st.randoms())
def test_adopter_is_the_same_for_any_order_and_stable(
    departed: str, live: list[str], rnd: Any
) -> None:
    chosen = adopter(departed, live)
    assert chosen in live
    shuffled = list(live)
    rnd.shuffle(shuffled)
    assert adopter(departed, shuffled) == chosen
    others = [n for n in live if n != chosen]
    if others:  # another member leaving does not move the choice
        assert adopter(departed, [n for n in live if n != others[0]]) == chosen
    assert adopter(departed, []) is None


def test_adopters_spread_over_the_members() -> None:
    live = [f"node-{i}" for i in range(4)]
    counts = dict.fromkeys(live, 0)
    for i in range(400):
        chosen = adopter(f"gone-{i}", live)
        assert chosen is not None
        counts[chosen] += 1
    assert min(counts.values()) > 60, counts


async def test_a_schedule_its_actors_owner_refuses_for_now_is_retried_until_queued() -> None:
    global GATE
    GATE = trio.Event()
    store = MemoryStateStore()
    small = {"actors.max_queue_per_actor": 2}
    async with open_node(_config("a", **small), ledger, store=store) as a, \
            open_node(_config("b", (seed_of(a),), **small), ledger, store=store) as b:
        await converged([a, b])
        assert a.router is not None
        adef = a.runtime.definition_for(ActorId("ledger", "s0", "book"))
        assert adef is not None
        name = next(n for n in (f"s{i}" for i in range(100))
                    if a.router.owner(ActorId("ledger", n, "book"), adef) == "b")
        on_b = b.ref("ledger", name, parent="book")
        await on_b.cast("hold")
        await on_b.cast("note", "queued-1")
        await on_b.cast("note", "queued-2")  # b's queue for it is full now
        await a.ref("ledger", name, parent="book").cast("note", "scheduled", delay_ms=200)
        await trio.sleep(1.0)  # due, refused by b (Overloaded) a few times meanwhile
        assert a.metrics.scheduled_fired_total == 0
        assert await kept_by(store, "a") == 1  # still kept while b cannot take it
        GATE.set()

        async def delivered() -> bool:
            try:
                got = await on_b.invoke("items")
            except Overloaded:  # the probe queues behind the others
                return False
            return isinstance(got, list) and "scheduled" in got

        await until(delivered)
        assert await on_b.invoke("items") == ["queued-1", "queued-2", "scheduled"]
        assert a.metrics.scheduled_fired_total == 1
        await wait_kept(store, "a", 0)


async def test_schedules_kept_while_a_member_drains_reach_its_adopter_promptly() -> None:
    """A turn finishing during a's drain schedules a note: a keeps it under its name but no
    longer fires it; its adopter claims again at its next tick (2 s here), well before the
    orphan sweep (8 s overdue) would."""
    global GATE
    GATE = trio.Event()
    store = MemoryStateStore()
    async with AsyncExitStack() as stack:
        b, c = await started(stack, store, "b", "c", orphan_ms=8_000)
        async with open_node(_config("a", (seed_of(b),), 8_000), ledger, store=store) as a:
            await converged([a, b, c])
            assert a.router is not None
            adef = a.runtime.definition_for(ActorId("ledger", "d0", "book"))
            assert adef is not None
            name = next(n for n in (f"d{i}" for i in range(100))
                        if a.router.owner(ActorId("ledger", n, "book"), adef) == "a")
            await a.ref("ledger", name, parent="book").cast("hold_then_note", "drained")

            async def a_left() -> bool:
                assert b.membership is not None
                return any(m.name == "a" and m.status is Status.LEFT
                           for m in b.membership.members())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.shutdown)  # leaves, then drains: the held turn finishes
                await until(a_left)
                GATE.set()
            assert await kept_by(store, "a") == 1  # made after a handed its schedules over
        left = trio.current_time()

        async def noted() -> bool:
            return "drained" in await items(b, name)

        await until(noted, 7.0)
        assert trio.current_time() - left < 6.0
        await trio.sleep(0.5)
        assert await items(c, name) == ["drained"]  # once
        assert await kept_by(store, "a") == 0


class _View:
    """What ``ScheduleAdoption`` reads of membership: every member with its status (one view,
    shared by every node of the model: they agree)."""

    def __init__(self, names: list[str]) -> None:
        self.status = dict.fromkeys(names, Status.ALIVE)

    def members(self) -> list[MemberView]:
        return [MemberView(n, ("10.0.0.1", 7946), b"", 0, s) for n, s in self.status.items()]


NAMES = [f"n{i}" for i in range(5)]
EVENTS = st.lists(
    st.tuples(st.sampled_from(["dies", "leaves", "returns"]), st.sampled_from(NAMES)),
    max_size=25,
)


@given(EVENTS, st.randoms())
def test_under_any_churn_no_schedule_stays_with_a_departed_member(
    events: list[tuple[str, str]], rnd: Any
) -> None:
    """Members die, leave and come back (a comeback is a fresh process under the old name)
    in any order; after each change every live member's adoption runs (in any order). Then no
    schedule is kept by a departed member while one is live, and none is lost."""

    async def main() -> None:
        store = MemoryStateStore()
        for i, name in enumerate(NAMES):
            for j in range(3):
                await store.save_schedules([Schedule(f"{name}-{j}", "ledger", f"x{i}{j}",
                                                     "book", "note", b"", {}, 10**15, name)])
        view = _View(NAMES)

        def fresh(name: str) -> ScheduleAdoption:
            rt = Runtime(store, Metrics(name), RuntimeSettings(), name)
            return ScheduleAdoption(rt, 60_000)

        nodes = {n: fresh(n) for n in NAMES}
        for what, name in events:
            if what == "returns":
                if view.status[name] is Status.ALIVE:
                    continue
                nodes[name] = fresh(name)
                view.status[name] = Status.ALIVE
            else:
                view.status[name] = Status.DEAD if what == "dies" else Status.LEFT
            live = [n for n in NAMES if view.status[n] is Status.ALIVE]
            rnd.shuffle(live)
            for n in live:
                await nodes[n]._departures(view)
            rows = await store.list_schedules()
            assert len(rows) == 3 * len(NAMES)  # nothing lost
            if live:
                stuck = [r.id for r in rows if view.status[r.owner] is not Status.ALIVE]
                assert stuck == [], (events, view.status)

    trio.run(main)
