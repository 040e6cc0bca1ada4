"""The state writer as a state machine: concurrent lanes, group commit, coalescing, failures.

Hypothesis drives random mixes of write-behind commits and write-through turns against a store
that takes random time and fails at random, with one to three lanes, and checks the writer's
promises: an actor is never in two batches in flight (so every write is fenced on an exact
revision and none is fenced off), a write-through caller returns only once its state is
durable (or gets StatestoreUnavailable and its actor goes back to its last durable state), and
after ``flush_all`` the store holds every actor's latest committed state.
"""

from __future__ import annotations

import random

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnmesh.actors.activation import Activation
from spawnmesh.actors.definition import ActorDef, WriteBehind, WriteThrough
from spawnmesh.actors.writer import StateWriter
from spawnmesh.errors import StatestoreUnavailable
from spawnmesh.ids import ActorId
from spawnmesh.ops.metrics import Metrics
from spawnmesh.statestore.base import StateWrite, WriteResult
from spawnmesh.statestore.memory import MemoryStateStore


class RacyStore(MemoryStateStore):
    """A memory store whose batches take random time and sometimes fail before writing; it
    checks that no actor is in two batches at once."""

    def __init__(self, lanes: int, seed: int, fail_rate: float) -> None:
        super().__init__()
        self.write_lanes = lanes
        self._rng = random.Random(seed)
        self._fail_rate = fail_rate
        self.flying: set[tuple[str, str]] = set()
        self.overlaps = 0
        self.most_at_once = 0
        self._batches_now = 0

    async def save_many(self, writes: list[StateWrite]) -> list[WriteResult]:
        keys = {w.key for w in writes}
        assert len(keys) == len(writes)
        self.overlaps += len(keys & self.flying)
        self.flying |= keys
        self._batches_now += 1
        self.most_at_once = max(self.most_at_once, self._batches_now)
        try:
            await trio.sleep(self._rng.choice((0.0, 0.001, 0.004, 0.02)))
            if self._rng.random() < self._fail_rate:
                raise StatestoreUnavailable("flaky store")
            return await super().save_many(writes)
        finally:
            self.flying -= keys
            self._batches_now -= 1


op = st.tuples(st.integers(0, 11), st.sampled_from(["change", "change", "turn", "pause"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=1, max_size=120),
    lanes=st.integers(1, 3),
    batch_max=st.integers(1, 8),
    fail_rate=st.sampled_from([0.0, 0.0, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_lanes_never_overlap_and_everything_lands(
    ops: list[tuple[int, str]], lanes: int, batch_max: int, fail_rate: float, seed: int
) -> None:
    store = RacyStore(lanes, seed, fail_rate)
    stale: list[Activation] = []
    writer = StateWriter(
        store,
        Metrics("n"),
        node_id="n",
        default_interval_ms=5,
        batch_max=batch_max,
        on_stale=stale.append,
    )
    behind = ActorDef("s", "wb", snapshot=WriteBehind(every_ms=3))
    writer.note_interval(3)  # as Runtime.register does
    through = ActorDef("s", "wt", snapshot=WriteThrough())
    # actors 0-5 write-behind, 6-11 write-through (each with its turn baton)
    acts = [Activation(behind if i < 6 else through, ActorId("s", f"a{i}"), 1) for i in range(12)]
    batons = [trio.Lock() for _ in acts]
    durable: dict[int, bytes] = {}
    counter = 0

    async def turn(i: int, blob: bytes) -> None:
        """A write-through turn: commit, wait for the writer, reset on failure."""
        act = acts[i]
        async with batons[i]:
            prev = act.blob
            act.blob = blob
            try:
                await writer.write(act)
            except StatestoreUnavailable:
                act.blob = prev
                writer.forget(act)
                return
            got = await store.load(act.key)
            assert got is not None and got.blob == blob  # durable before the reply
            assert got.revision == act.revision
            durable[i] = blob

    async def main() -> None:
        nonlocal counter
        with trio.fail_after(120):  # virtual time: a stuck writer fails instead of hanging
            await run()

    async def run() -> None:
        nonlocal counter
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as turns:
                for i, what in ops:
                    counter += 1
                    blob = f"{i}:{counter}".encode()
                    if what == "pause":
                        await trio.sleep(0.002)
                    elif i < 6:  # a write-behind commit
                        acts[i].blob = blob
                        writer.mark_dirty(acts[i], trio.current_time())
                    else:
                        turns.start_soon(turn, i, blob)
                    await trio.lowlevel.checkpoint()
            while not await writer.flush_all():  # noqa: ASYNC110 (a flaky store: retry)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert store.overlaps == 0
    assert store.most_at_once <= lanes + 1  # the lanes, plus flush_all's own batches
    assert stale == []  # every write was fenced on the exact revision
    assert writer.pending() == 0
    for i, act in enumerate(acts):
        got = trio.run(store.load, act.key)
        if not act.blob:
            assert got is None
            continue
        assert got is not None and (got.blob, got.revision) == (act.blob, act.revision), i
        if i in durable:
            assert got.blob == act.blob
