"""The state writer: the only place actor state is written to the statestore.

Batches are written by up to ``lanes`` tasks at once (the store's ``write_lanes``: a store with
a writer process seals and writes one batch while the node prepares the next), but an actor is
never in two batches in flight: a batch takes only actors not already flying, so every write is
fenced on an exact revision. Urgent writes (write-through turns, passivation, shutdown) wake a
lane at once and are group-committed with whatever else is pending; write-behind actors are
coalesced (only their latest committed state is written) and flushed when their interval is
due. A failed batch keeps every item pending and is retried with backoff: nothing committed is
dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from spawnmesh.actors.activation import Activation
from spawnmesh.actors.definition import WriteBehind
from spawnmesh.errors import StaleActivation, StatestoreUnavailable
from spawnmesh.statestore.base import StateStore, StateWrite

if TYPE_CHECKING:
    from spawnmesh.ops.metrics import Metrics

log = logging.getLogger("spawnmesh.writer")


class _Urgent:
    """A write somebody waits for; ``error`` is set if it could not be made durable."""

    __slots__ = ("act", "done", "error")

    def __init__(self, act: Activation) -> None:
        self.act = act
        self.done = trio.Event()
        self.error: Exception | None = None


class StateWriter:
    """Group-committing, coalescing writer of activations' committed state."""

    def __init__(
        self,
        store: StateStore,
        metrics: Metrics,
        *,
        node_id: str,
        default_interval_ms: int,
        batch_max: int,
        on_stale: Callable[[Activation], None],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._node_id = node_id
        self._default_s = default_interval_ms / 1000
        self._batch_max = batch_max
        self._on_stale = on_stale
        self._lanes = max(1, int(getattr(store, "write_lanes", 1)))
        """Batches written at once (a store says how many help: ``write_lanes``)."""
        self._dirty: dict[tuple[str, str], Activation] = {}
        self._urgent: list[_Urgent] = []
        self._flying: set[tuple[str, str]] = set()
        """Keys of actors in a batch being written: no other batch may take them."""
        self._batches = 0
        """Batches being written."""
        self._lot = trio.lowlevel.ParkingLot()
        """Idle lanes wait here for work."""
        self._landed = trio.Event()
        """Set (and replaced) whenever a batch finishes: flush_all waits for flying ones."""
        self._tick_s = self._default_s
        self._intervals: dict[int, float] = {}
        """Write-behind interval by id() of a definition's snapshot (looked up per dirty actor
        per batch)."""
        self._in_flight = 0
        """Urgent items of batches being written (no longer in _urgent, not yet durable)."""
        self._more = False
        """The last batch was full: more may be due, write again without waiting."""
        self.healthy = True
        """False while the last batch failed (readiness reports it)."""
        self.last_error = ""

    def interval_s(self, act: Activation) -> float:
        """Write-behind interval of this activation's definition, in seconds."""
        snap = act.adef.snapshot
        if isinstance(snap, WriteBehind) and snap.every_ms is not None:
            return snap.every_ms / 1000
        return self._default_s

    def note_interval(self, every_ms: int | None) -> None:
        """Make the flush tick at least as fine as a definition's write-behind interval."""
        if every_ms is not None:
            self._tick_s = min(self._tick_s, every_ms / 1000)

    def mark_dirty(self, act: Activation, now: float) -> None:
        """A write-behind actor committed a changed state; write it when its interval is due."""
        if act.dirty_since == 0.0:
            if not self._dirty:
                self._lot.unpark_all()  # lanes sleep without a deadline while nothing is dirty
            act.dirty_since = now
            self._dirty[act.key] = act

    async def write(self, act: Activation) -> None:
        """Make ``act``'s committed state durable now (group-committed); raises StaleActivation
        or StatestoreUnavailable when it cannot."""
        item = _Urgent(act)
        self._urgent.append(item)
        self._lot.unpark_all()
        await item.done.wait()
        if item.error is not None:
            raise item.error

    async def write_many(self, acts: list[Activation]) -> dict[tuple[str, str], Exception]:
        """Make several activations durable in as few batches as possible; returns the
        errors of those that failed, by key."""
        items = [_Urgent(a) for a in acts]
        self._urgent.extend(items)
        self._lot.unpark_all()
        for item in items:
            await item.done.wait()
        return {i.act.key: i.error for i in items if i.error is not None}

    def forget(self, act: Activation) -> None:
        """Drop pending write-behind state of a discarded (stale) activation."""
        if self._dirty.get(act.key) is act:
            del self._dirty[act.key]
        act.dirty_since = 0.0

    def pending(self) -> int:
        """Activations whose committed state is not yet durable (in flight included)."""
        return len(self._dirty) + len(self._urgent) + self._in_flight

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled, in ``lanes`` concurrent tasks; urgent items first,
        then due write-behind items."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._lanes):
                nursery.start_soon(self._lane)
            task_status.started()

    async def _lane(self) -> None:
        backoff = 0.05
        while True:
            taken = self._take(only_due=True)
            if taken is None:
                with trio.move_on_after(self._tick_s if self._dirty else 3600):
                    await self._lot.park()
                continue
            if await self._write(*taken):
                backoff = 0.05
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def flush_all(self) -> bool:
        """Write everything pending, due or not (shutdown, handoff), in ``lanes`` concurrent
        batches, and wait for batches in flight. True if all succeeded."""
        failed = False

        async def flusher() -> None:
            nonlocal failed
            while not failed:
                taken = self._take(only_due=False)
                if taken is not None:
                    if not await self._write(*taken):
                        failed = True
                elif self._batches:
                    await self._landed.wait()
                else:
                    return

        if self._lanes == 1:
            await flusher()
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(self._lanes):
                    nursery.start_soon(flusher)
        return not failed

    async def flush_once(self, *, only_due: bool) -> bool:
        """Write one batch (if anything can be taken); False if the store failed (items stay
        pending)."""
        taken = self._take(only_due=only_due)
        if taken is None:
            await trio.lowlevel.checkpoint()
            return True
        return await self._write(*taken)

    def _take(self, only_due: bool) -> tuple[list[_Urgent], list[Activation]] | None:
        """Collect the next batch (urgent items first) of actors not in flight, and mark them
        flying; None if there is nothing to write now. Synchronous: two lanes never take the
        same actor."""
        flying = self._flying
        room = self._batch_max
        acts: dict[tuple[str, str], Activation] = {}
        urgent: list[_Urgent] = []
        if self._urgent:
            keep: list[_Urgent] = []
            for u in self._urgent:
                key = u.act.key
                if key in flying or (room <= 0 and key not in acts):
                    keep.append(u)  # waits for the flight of this actor (or for room)
                    continue
                urgent.append(u)
                if key not in acts:
                    room -= 1
                acts[key] = u.act
            self._urgent = keep
        self._more = bool(self._urgent)
        if room > 0 and self._dirty:
            now = trio.current_time()
            intervals = self._intervals
            not_before = now - self._tick_s
            # Iterate in place (nothing below mutates _dirty): copying 20,000 items into
            # tuples per batch cost more in garbage collection than the batch's SQL.
            for act in self._dirty.values():
                key = act.key
                if key in acts or key in flying:
                    continue
                if only_due:
                    if act.dirty_since > not_before:
                        # _dirty is in dirty_since order and no interval is shorter than the
                        # tick: nothing further on is due either (a scan of 20,000 dirty
                        # actors per batch cost more than the rest of the batch)
                        break
                    snap = act.adef.snapshot
                    every = intervals.get(id(snap))
                    if every is None:
                        every = intervals[id(snap)] = self.interval_s(act)
                    if now - act.dirty_since < every:
                        continue
                if room <= 0:
                    self._more = True
                    break
                acts[key] = act
                room -= 1
        if not acts:
            return None
        flying.update(acts)
        return urgent, list(acts.values())

    async def _write(self, urgent: list[_Urgent], batch: list[Activation]) -> bool:
        """Write one taken batch and apply its results; False if the store failed."""
        blobs = [a.blob for a in batch]
        node_id = self._node_id
        m = self._metrics
        self._in_flight += len(urgent)  # taken out of _urgent; write-behind ones stay in _dirty
        self._batches += 1
        started = trio.current_time()
        try:
            # The writes are built in the call (not kept here): a store that encodes them
            # before waiting lets them go at once (see SqlStateStore.save_many).
            results = await self._store.save_many([
                StateWrite(a.key, a.revision, b, a.adef.codec.type_name, a.id.parent,
                           owner=f"{node_id}#{a.epoch}")
                for a, b in zip(batch, blobs, strict=True)
            ])
        except StatestoreUnavailable as exc:
            return self._failed(urgent, exc)
        except Exception as exc:  # a store bug must not kill the writer or lose the batch
            log.exception("statestore raised unexpectedly")
            return self._failed(urgent, StatestoreUnavailable(f"statestore error: {exc!r}"))
        finally:
            self._in_flight -= len(urgent)
            self._batches -= 1
            self._flying.difference_update([a.key for a in batch])
            self._landed.set()
            self._landed = trio.Event()
            if self._urgent or self._more:
                self._lot.unpark_all()  # items that waited for this flight (or for room)
        self.healthy = True
        m.state_write_batches_total += 1
        m.state_writes_total += len(batch)
        m.state_write_seconds.observe(trio.current_time() - started)
        m.state_write_batch_size.observe(len(batch))
        stale: set[tuple[str, str]] = set()
        dirty = self._dirty
        for act, blob, res in zip(batch, blobs, results, strict=True):
            if res.__class__ is not int:
                stale.add(act.key)
                m.stale_activations_total += 1
                self.forget(act)
                self._on_stale(act)
                continue
            act.revision = res
            if act.blob is blob:
                if dirty.get(act.key) is act:
                    del dirty[act.key]
                act.dirty_since = 0.0
            elif act.key not in dirty:  # committed again while in flight: still dirty
                act.dirty_since = 0.0
                self.mark_dirty(act, trio.current_time())
        for u in urgent:
            if u.act.key in stale:
                u.error = StaleActivation(
                    f"{u.act.id}: state was written by another activation; this one is dropped"
                )
            u.done.set()
        return True

    def _failed(self, urgent: list[_Urgent], exc: StatestoreUnavailable) -> bool:
        self.healthy = False
        self.last_error = str(exc)
        self._metrics.state_write_failures_total += 1
        log.warning("state write failed, will retry: %s", exc)
        now = trio.current_time()
        for u in urgent:  # waiters fail now; the state stays pending and is retried
            u.error = exc
            self.mark_dirty(u.act, now)
            u.done.set()
        return False
