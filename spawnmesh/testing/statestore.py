"""Conformance suite every :class:`~spawnmesh.statestore.base.StateStore` must pass.

Use it from pytest by subclassing and providing an async ``store`` fixture that yields an
opened, empty store::

    class TestMyStore(StateStoreConformance):
        @pytest.fixture
        async def store(self):
            s = MyStore(...); await s.open(); yield s; await s.aclose()
"""

from __future__ import annotations

import os

import trio

from spawnmesh.errors import StaleActivation
from spawnmesh.statestore.base import Schedule, StateStore, StateWrite


def _w(name: str, base: int, blob: bytes, **kw: object) -> StateWrite:
    return StateWrite(("sys", name), base, blob, **kw)  # type: ignore[arg-type]


class StateStoreConformance:
    """Behaviour every statestore shares: round trips, fencing, batches, deletes, races."""

    async def test_load_missing_is_none(self, store: StateStore) -> None:
        assert await store.load(("sys", "nobody")) is None

    async def test_first_write_and_round_trip(self, store: StateStore) -> None:
        res = await store.save_many(
            [_w("a", 0, b"\x00\x01state", state_type="demo.Counter", parent="tmpl",
                tags={"zone": "eu"})]
        )
        assert res == [1]
        got = await store.load(("sys", "a"))
        assert got is not None
        assert (got.key, got.revision, got.blob) == (("sys", "a"), 1, b"\x00\x01state")
        assert got.state_type == "demo.Counter"
        assert got.parent == "tmpl"
        assert dict(got.tags) == {"zone": "eu"}

    async def test_revisions_advance_by_one(self, store: StateStore) -> None:
        rev = 0
        for i in range(5):
            (res,) = await store.save_many([_w("b", rev, str(i).encode())])
            assert isinstance(res, int)
            rev = res
        assert rev == 5
        got = await store.load(("sys", "b"))
        assert got is not None and got.revision == 5 and got.blob == b"4"

    async def test_stale_write_is_fenced_and_changes_nothing(self, store: StateStore) -> None:
        assert await store.save_many([_w("c", 0, b"one")]) == [1]
        assert await store.save_many([_w("c", 1, b"two")]) == [2]
        (res,) = await store.save_many([_w("c", 1, b"stale")])
        assert isinstance(res, StaleActivation)
        (res0,) = await store.save_many([_w("c", 0, b"new-row")])
        assert isinstance(res0, StaleActivation)
        got = await store.load(("sys", "c"))
        assert got is not None and (got.revision, got.blob) == (2, b"two")

    async def test_write_to_missing_row_with_nonzero_base_is_stale(
        self, store: StateStore
    ) -> None:
        (res,) = await store.save_many([_w("ghost", 3, b"x")])
        assert isinstance(res, StaleActivation)
        assert await store.load(("sys", "ghost")) is None

    async def test_batch_results_in_order(self, store: StateStore) -> None:
        await store.save_many([_w("d1", 0, b"a"), _w("d2", 0, b"a")])
        res = await store.save_many(
            [_w("d1", 1, b"b"), _w("d2", 7, b"b"), _w("d3", 0, b"b")]
        )
        assert res[0] == 2 and isinstance(res[1], StaleActivation) and res[2] == 1
        d2 = await store.load(("sys", "d2"))
        assert d2 is not None and d2.blob == b"a"

    async def test_two_activations_race_one_wins(self, store: StateStore) -> None:
        await store.save_many([_w("race", 0, b"base")])
        results: list[object] = []

        async def writer(tag: bytes) -> None:
            results.extend(await store.save_many([_w("race", 1, tag)]))

        async with trio.open_nursery() as n:
            n.start_soon(writer, b"left")
            n.start_soon(writer, b"right")
        wins = [r for r in results if r == 2]
        stale = [r for r in results if isinstance(r, StaleActivation)]
        assert len(wins) == 1 and len(stale) == 1
        got = await store.load(("sys", "race"))
        assert got is not None and got.revision == 2 and got.blob in (b"left", b"right")

    async def test_many_racers_never_lose_an_acknowledged_write(self, store: StateStore) -> None:
        """Racing read-modify-write loops: every acknowledged increment is in the final row."""
        await store.save_many([_w("ctr", 0, b"0")])
        acked = 0

        async def incrementer() -> None:
            nonlocal acked
            done = 0
            while done < 10:
                cur = await store.load(("sys", "ctr"))
                assert cur is not None
                (res,) = await store.save_many(
                    [_w("ctr", cur.revision, str(int(cur.blob) + 1).encode())]
                )
                if isinstance(res, int):
                    done += 1
                    acked += 1

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(incrementer)
        got = await store.load(("sys", "ctr"))
        assert got is not None and int(got.blob) == acked == 40

    async def test_delete(self, store: StateStore) -> None:
        assert await store.delete(("sys", "none")) is False
        await store.save_many([_w("e", 0, b"x")])
        try:
            await store.delete(("sys", "e"), base_revision=9)
        except StaleActivation:
            pass
        else:
            raise AssertionError("fenced delete of a newer row must raise StaleActivation")
        assert await store.load(("sys", "e")) is not None
        assert await store.delete(("sys", "e"), base_revision=1) is True
        assert await store.load(("sys", "e")) is None
        assert await store.save_many([_w("e", 0, b"again")]) == [1]

    async def test_binary_and_large_blobs(self, store: StateStore) -> None:
        blobs = [b"", bytes(range(256)), os.urandom(1 << 20)]
        for i, blob in enumerate(blobs):
            assert await store.save_many([_w(f"bin{i}", 0, blob)]) == [1]
        for i, blob in enumerate(blobs):
            got = await store.load(("sys", f"bin{i}"))
            assert got is not None and got.blob == blob

    async def test_unicode_names_and_systems_are_distinct(self, store: StateStore) -> None:
        await store.save_many(
            [StateWrite(("sys", "ü-名前"), 0, b"1"), StateWrite(("other", "ü-名前"), 0, b"2")]
        )
        a = await store.load(("sys", "ü-名前"))
        b = await store.load(("other", "ü-名前"))
        assert a is not None and b is not None and (a.blob, b.blob) == (b"1", b"2")

    async def test_large_batch(self, store: StateStore) -> None:
        writes = [_w(f"k{i}", 0, os.urandom(200)) for i in range(2500)]
        res = await store.save_many(writes)
        assert res == [1] * 2500
        got = await store.load(("sys", "k2499"))
        assert got is not None and got.blob == writes[-1].blob

    async def test_healthy(self, store: StateStore) -> None:
        assert await store.healthy() is True

    async def test_schedules_kept_listed_by_due_time_and_deleted(self, store: StateStore) -> None:
        assert await store.list_schedules() == []
        late = Schedule("s-2", "sys", "a", None, "ping", b"\x91\x01", {}, 2_000, "n1")
        soon = Schedule("s-1", "sys", "b", "tmpl", "tick", b"", {"k": "v"}, 1_000, "n1")
        await store.save_schedules([late])
        await store.save_schedules([soon])
        assert await store.list_schedules() == [soon, late]
        assert await store.list_schedules(limit=1) == [soon]
        moved = Schedule("s-2", "sys", "a", None, "ping", b"\x02", {}, 500, "n1")
        await store.save_schedules([moved])  # same id: replaced
        assert await store.list_schedules() == [moved, soon]
        assert await store.delete_schedules(["s-2"]) == 1
        assert await store.delete_schedules(["s-2", "s-9"]) == 0
        assert await store.list_schedules() == [soon]

    async def test_schedules_kept_and_forgotten_in_batches(self, store: StateStore) -> None:
        n = 1_234  # more than one IN (...) chunk
        batch = [
            Schedule(f"b-{i:04}", "sys", f"a{i % 7}", None, "ping", i.to_bytes(2, "big"),
                     {"i": str(i)}, 10_000 + i, "n1")
            for i in range(n)
        ]
        await store.save_schedules(batch)
        await store.save_schedules([])
        assert await store.list_schedules(limit=n + 1) == batch
        again = [Schedule(sc.id, sc.system, sc.actor, None, "pong", b"", {}, 5, "n1")
                 for sc in batch[:600]]
        await store.save_schedules(again)  # the same ids: replaced, not added
        got = await store.list_schedules(limit=n + 1)
        assert len(got) == n and got[:600] == again
        gone = [sc.id for sc in batch[::2]] + ["not-kept"]
        assert await store.delete_schedules(gone) == len(batch[::2])
        assert await store.delete_schedules([]) == 0
        assert {sc.id for sc in await store.list_schedules(limit=n)} == {
            sc.id for sc in batch[1::2]
        }

    async def test_schedules_listed_by_owner_and_due_time(self, store: StateStore) -> None:
        a1 = Schedule("o-1", "sys", "a", None, "ping", b"", {}, 1_000, "n1")
        a2 = Schedule("o-2", "sys", "b", None, "ping", b"", {}, 3_000, "n1")
        b1 = Schedule("o-3", "sys", "c", None, "ping", b"", {}, 2_000, "n2")
        for sc in (a1, a2, b1):
            await store.save_schedules([sc])
        assert await store.list_schedules(owner="n1") == [a1, a2]
        assert await store.list_schedules(owner="n2") == [b1]
        assert await store.list_schedules(owner="n3") == []
        assert await store.list_schedules(due_before_ms=2_500) == [a1, b1]
        assert await store.list_schedules(due_before_ms=1_000) == []  # strictly before
        assert await store.list_schedules(owner="n1", due_before_ms=2_500) == [a1]

    async def test_claiming_schedules_moves_only_the_old_owners(self, store: StateStore) -> None:
        mine = Schedule("c-1", "sys", "a", None, "ping", b"\x01", {"k": "v"}, 1_000, "n1")
        also = Schedule("c-2", "sys", "b", "tmpl", "tick", b"", {}, 2_000, "n1")
        other = Schedule("c-3", "sys", "c", None, "ping", b"", {}, 1_500, "n2")
        for sc in (mine, also, other):
            await store.save_schedules([sc])
        assert await store.claim_schedules("n1", "n3") == 2
        assert await store.claim_schedules("n1", "n3") == 0  # nothing left to move
        assert await store.list_schedules(owner="n1") == []
        got = await store.list_schedules(owner="n3")
        assert [(s.id, s.payload, dict(s.metadata), s.due_ms) for s in got] == [
            ("c-1", b"\x01", {"k": "v"}, 1_000),
            ("c-2", b"", {}, 2_000),
        ]
        assert all(s.owner == "n3" for s in got)
        assert await store.list_schedules(owner="n2") == [other]  # untouched

    async def test_concurrent_claims_move_each_schedule_once(self, store: StateStore) -> None:
        n = 40
        for i in range(n):
            await store.save_schedules(
                [Schedule(f"r-{i:03}", "sys", f"a{i}", None, "ping", b"", {}, 1_000 + i, "gone")]
            )
        moved: dict[str, int] = {}

        async def claim(me: str) -> None:
            moved[me] = await store.claim_schedules("gone", me)

        async with trio.open_nursery() as nursery:
            for me in ("x", "y", "z"):
                nursery.start_soon(claim, me)
        assert sum(moved.values()) == n, moved
        owners = {s.id: s.owner for s in await store.list_schedules()}
        assert len(owners) == n
        assert all(owners[k] in moved for k in owners)
        for me, count in moved.items():
            assert sum(1 for o in owners.values() if o == me) == count

    async def test_schedules_read_a_page_at_a_time(self, store: StateStore) -> None:
        want = [
            Schedule(f"p-{i:02}", "sys", f"a{i}", None, "ping", b"", {}, 1_000 + i // 3, "n1")
            for i in range(20)
        ]  # three schedules share each due time: pages break ties by id
        for sc in reversed(want):
            await store.save_schedules([sc])
        got: list[Schedule] = []
        after: tuple[int, str] | None = None
        while True:
            page = await store.list_schedules(7, owner="n1", after=after)
            got += page
            if len(page) < 7:
                break
            after = (page[-1].due_ms, page[-1].id)
        assert got == want
        assert await store.list_schedules(after=(1_006, "p-18")) == want[19:]

    async def test_claiming_every_other_owners_schedules(self, store: StateStore) -> None:
        for i, owner in enumerate(["n1", "n2", "me", "n2"]):
            await store.save_schedules(
                [Schedule(f"e-{i}", "sys", f"a{i}", None, "ping", b"", {}, 1_000 + i, owner)]
            )
        assert await store.claim_schedules(None, "me") == 3
        assert [s.owner for s in await store.list_schedules()] == ["me"] * 4
        assert await store.claim_schedules(None, "me") == 0
