"""The state writer: the only place actor state is written to the statestore.

One task writes batches one after another, so an actor never has two writes in flight (its
fencing revision stays exact). Urgent writes (write-through turns, passivation, shutdown) wake
it at once and are group-committed with whatever else is pending; write-behind actors are
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
        self._dirty: dict[tuple[str, str], Activation] = {}
        self._urgent: list[_Urgent] = []
        self._wake = trio.Event()
        self._tick_s = self._default_s
        self._in_flight = 0
        """Urgent items of the batch being written (no longer in _urgent, not yet durable)."""
        self._batch_lock = trio.Lock()
        """One batch at a time (run() and flush_all() may both write): an actor never has two
        writes in flight."""
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
                self._wake.set()  # the writer sleeps without a deadline while nothing is dirty
            act.dirty_since = now
            self._dirty[act.key] = act

    async def write(self, act: Activation) -> None:
        """Make ``act``'s committed state durable now (group-committed); raises StaleActivation
        or StatestoreUnavailable when it cannot."""
        item = _Urgent(act)
        self._urgent.append(item)
        self._wake.set()
        await item.done.wait()
        if item.error is not None:
            raise item.error

    async def write_many(self, acts: list[Activation]) -> dict[tuple[str, str], Exception]:
        """Make several activations durable in as few batches as possible; returns the
        errors of those that failed, by key."""
        items = [_Urgent(a) for a in acts]
        self._urgent.extend(items)
        self._wake.set()
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
        """Write batches until cancelled; urgent items first, then due write-behind items."""
        task_status.started()
        backoff = 0.05
        while True:
            if not self._urgent and not self._more:
                with trio.move_on_after(self._tick_s if self._dirty else 3600):
                    await self._wake.wait()
            self._wake = trio.Event()
            ok = await self.flush_once(only_due=True)
            if ok:
                backoff = 0.05
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def flush_all(self) -> bool:
        """Write everything pending, due or not (shutdown, handoff). True if all succeeded."""
        while self._urgent or self._dirty:
            if not await self.flush_once(only_due=False):
                return False
        return True

    async def flush_once(self, *, only_due: bool) -> bool:
        """Write one batch; returns False if the store failed (items stay pending)."""
        lock = self._batch_lock
        try:  # uncontended (the usual case): no extra trip through the scheduler
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            return await self._flush_once(only_due)
        finally:
            lock.release()

    async def _flush_once(self, only_due: bool) -> bool:
        urgent, self._urgent = self._urgent[: self._batch_max], self._urgent[self._batch_max :]
        acts: dict[tuple[str, str], Activation] = {u.act.key: u.act for u in urgent}
        now = trio.current_time()
        room = self._batch_max - len(acts)
        self._more = bool(self._urgent)
        if room > 0 and self._dirty:
            # Iterate in place (nothing below mutates _dirty): copying 20,000 items into
            # tuples per batch cost more in garbage collection than the batch's SQL.
            for act in self._dirty.values():
                if room <= 0:
                    self._more = True
                    break
                key = act.key
                if key in acts or (only_due and now - act.dirty_since < self.interval_s(act)):
                    continue
                acts[key] = act
                room -= 1
        if not acts:
            for u in urgent:
                u.done.set()
            return True
        batch = list(acts.values())
        blobs = [a.blob for a in batch]
        writes = [
            StateWrite(
                a.key,
                a.revision,
                b,
                a.adef.codec.type_name,
                a.id.parent,
                owner=f"{self._node_id}#{a.epoch}",
            )
            for a, b in zip(batch, blobs, strict=True)
        ]
        m = self._metrics
        self._in_flight = len(urgent)  # taken out of _urgent; write-behind ones stay in _dirty
        try:
            results = await self._store.save_many(writes)
        except StatestoreUnavailable as exc:
            return self._failed(urgent, exc)
        except Exception as exc:  # a store bug must not kill the writer or lose the batch
            log.exception("statestore raised unexpectedly")
            return self._failed(urgent, StatestoreUnavailable(f"statestore error: {exc!r}"))
        finally:
            self._in_flight = 0
        self.healthy = True
        m.state_write_batches_total += 1
        m.state_writes_total += len(batch)
        stale: set[tuple[str, str]] = set()
        for act, blob, res in zip(batch, blobs, results, strict=True):
            if isinstance(res, StaleActivation):
                stale.add(act.key)
                m.stale_activations_total += 1
                self.forget(act)
                self._on_stale(act)
                continue
            act.revision = res
            if act.blob is blob:
                if self._dirty.get(act.key) is act:
                    del self._dirty[act.key]
                act.dirty_since = 0.0
            else:  # committed again while the write was in flight: still dirty
                self._dirty[act.key] = act
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
