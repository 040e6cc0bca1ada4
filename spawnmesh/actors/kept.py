"""Kept schedules: delayed and scheduled casts saved in the statestore until they are queued,
so they fire after a restart, or on the member that takes a departed node's schedules over.

Writes are batched: one service task saves new schedules and forgets queued ones, up to
``_BATCH`` per transaction, so a burst of delayed casts costs a deque entry each, not a task
and a transaction each. Memory is bounded by a horizon: a schedule is held (a timer on the
node's scheduler) only while it is due within ``horizon_ms``; one made for later is saved and
dropped from memory, and the same service loads it back when it comes within reach (every
quarter of the horizon, at most every minute). A node that restarts, or adopts schedules,
reads only those due within the horizon.

Each schedule fires from one node at a time: the one that owns it in the store. Firing is at
least once: a schedule queued on its actor is then forgotten in the store, and one queued but
not yet forgotten when the node stops fires again after the restart.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import msgspec
import trio

from spawnmesh.actors.scheduler import Scheduler
from spawnmesh.clock import wall_ms
from spawnmesh.codec import to_builtins
from spawnmesh.errors import InvalidArgument, SpawnmeshError, StatestoreUnavailable
from spawnmesh.ids import ActorId
from spawnmesh.ops.metrics import Metrics
from spawnmesh.statestore.base import Schedule, StateStore
from spawnmesh.statestore.schema import MAX_ACTION

log = logging.getLogger("spawnmesh.schedules")

SCHEDULE_LATE_KEY: Final = "spawnmesh-schedule-late-ms"
"""Metadata of a kept schedule fired late (after a restart): how late, in milliseconds."""
CALLER_KEY: Final = "spawnmesh-schedule-caller"
"""Stored metadata of a kept schedule: its caller (a JSON ``[system, name, parent]``), given
back to the turn as its caller, not as metadata."""
PAGE: Final = 5_000
"""Kept schedules read from the store per query when loading them."""
_BATCH: Final = 1_000
"""Most schedules saved, or forgotten, per transaction."""
_MAX_TICK_S: Final = 60.0


class Kept:
    """A delayed invocation: held in memory until it fires, kept in the store until queued."""

    __slots__ = ("caller", "durable", "fired", "held", "meta", "payload", "saved", "schedule")

    def __init__(self, schedule: Schedule, payload: Any, meta: Mapping[str, str],
                 caller: ActorId | None, *, durable: bool = True) -> None:
        self.schedule = schedule
        self.payload = payload
        """The payload as the turn receives it."""
        self.meta = meta
        """The metadata as the turn receives it."""
        self.caller = caller
        self.durable = durable
        """Kept in the store (False: in memory only, lost with the process)."""
        self.saved = False
        """The store has it."""
        self.fired = False
        """Queued on its actor (or dropped): to be forgotten."""
        self.held = False
        """On the scheduler, to fire when due."""

    @property
    def target(self) -> ActorId:
        sc = self.schedule
        return ActorId(sc.system, sc.actor, sc.parent)


class ScheduleKeeper:
    """The kept schedules of one node: made here or loaded from the store, saved, held within
    the horizon, fired through ``on_due``, forgotten once queued."""

    def __init__(
        self,
        store: StateStore,
        metrics: Metrics,
        scheduler: Scheduler,
        node_id: str,
        *,
        horizon_ms: int,
        on_due: Callable[[Kept], None],
        decode: Callable[[ActorId, Schedule], Any],
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.scheduler = scheduler
        self.node_id = node_id
        self.horizon_ms = horizon_ms
        self._on_due = on_due
        self._decode = decode
        self._known: dict[str, Kept] = {}
        """Schedules of the store this node holds, or saves, until forgotten: a load skips
        them, so none fires twice from one node."""
        self._to_save: deque[Kept] = deque()
        self._to_forget: deque[Kept] = deque()
        self._writing = False
        self._work = trio.Event()
        self._written = trio.Event()
        self._reach_ms = 0
        """Schedules due before this (Unix ms) are held: the horizon of the last load, set
        before it reads, so one saved meanwhile is held by whichever sees it first."""
        self._loaded_to_ms: int | None = None
        """Every owned schedule due before this was read (None: none read yet)."""
        self._loads = 0
        self._tombstones: set[str] = set()
        """Forgotten while a load was reading (it may have read them): not held again."""
        self._recovery = trio.Event()
        """Set by :meth:`start_recovery`: loading starts."""
        self._adopt_all = False
        self._seq = itertools.count()
        self.held = 0
        """Schedules on the scheduler, not due yet."""
        self.running = False
        self.handed_over = False
        """The node is leaving its cluster: its kept schedules are left to their adopter."""

    # ------------------------------------------------------------------ making and firing

    def keep(
        self,
        target: ActorId,
        action: str,
        payload: Any,
        metadata: Mapping[str, str] | None,
        caller: ActorId | None,
        delay_ms: int,
    ) -> None:
        """A delayed invocation: kept in the store, and fired through ``on_due`` after
        ``delay_ms``. InvalidArgument if the action name is longer than a store keeps. One
        that cannot be kept (payload not encodable, the node not running) fires from memory."""
        if len(action) > MAX_ACTION:
            raise InvalidArgument(f"action {action[:40]!r}...: longer than {MAX_ACTION}")
        meta = dict(metadata or {})
        due = wall_ms() + delay_ms
        blob: bytes | None = None
        if self.running:
            try:
                blob = b"" if payload is None else msgspec.msgpack.encode(to_builtins(payload))
            except (TypeError, ValueError, msgspec.EncodeError) as exc:
                log.warning("delayed %s.%s is not durable (payload not encodable: %s)", target,
                            action, exc)
        if blob is None:
            sc = Schedule("", target.system, target.name, target.parent, action, b"", meta, due)
            self._hold(Kept(sc, payload, meta, caller, durable=False), delay_ms)
            return
        stored = meta
        if caller is not None:
            stored = {**meta, CALLER_KEY: json.dumps(list(caller))}
        sid = f"{wall_ms():011x}{next(self._seq):08x}{secrets.token_hex(6)}"  # creation order
        sc = Schedule(sid, target.system, target.name, target.parent, action, blob, stored,
                      due, self.node_id)
        kept = Kept(sc, payload, meta, caller)
        self._known[sc.id] = kept
        self._to_save.append(kept)
        self._work.set()
        if due < self._reach_ms:
            self._hold(kept, delay_ms)

    def fired(self, kept: Kept) -> None:
        """``kept`` was queued on its actor, or dropped: stop keeping it."""
        if kept.fired:
            return
        kept.fired = True
        if kept.saved:
            self._to_forget.append(kept)
            self._work.set()
        # else: in memory only, or still to be saved (the writer drops it instead)

    def adopter_fires(self, kept: Kept) -> bool:
        """Whether a due schedule is left to the member that takes this leaving node's
        schedules over (it is in the store, and this node has handed them over)."""
        return self.handed_over and kept.saved

    def _hold(self, kept: Kept, delay_ms: int | None = None) -> None:
        """Fire ``kept`` after ``delay_ms`` (one made here: exactly its delay, so schedules
        made in order with one delay fire in that order), or when its due time comes."""
        kept.held = True
        self.held += 1
        if delay_ms is None:
            delay_ms = max(0, kept.schedule.due_ms - wall_ms())
        self.scheduler.call_at(trio.current_time() + delay_ms / 1000, lambda: self._due(kept))

    def _due(self, kept: Kept) -> None:
        self.held -= 1
        if not kept.fired:
            self._on_due(kept)

    # ------------------------------------------------------------------ the service

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Save and forget in batches; load what comes within the horizon (after
        :meth:`start_recovery`). Restartable: its queues live on the keeper."""
        self.running = True
        self._reach_ms = max(self._reach_ms, wall_ms() + self.horizon_ms)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop)
            nursery.start_soon(self._load_loop)

    def pending_writes(self) -> int:
        """Schedules not saved yet, or queued and not forgotten yet."""
        return len(self._to_save) + len(self._to_forget)

    async def flush(self) -> None:
        """Wait until every schedule made so far is saved (or refused for good by the store)
        and every queued one forgotten; bounded by the caller's scopes."""
        while self._to_save or self._to_forget or self._writing:
            self._written = trio.Event()
            self._work.set()
            await self._written.wait()

    async def _write_loop(self) -> None:
        backoff = 0.1
        failing = False
        while True:
            if not self._to_save and not self._to_forget:
                self._written.set()
                self._work = trio.Event()
                await self._work.wait()
                continue
            self._writing = True
            try:
                if self._to_save:
                    await self._save_batch()
                if self._to_forget:
                    await self._forget_batch()
            except StatestoreUnavailable as exc:
                if not failing:  # once per outage
                    failing = True
                    log.warning("cannot keep or forget %d schedules yet (retrying): %s",
                                self.pending_writes(), exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._writing = False
            if failing:
                log.info("kept schedules written again")
            backoff, failing = 0.1, False

    async def _save_batch(self) -> None:
        batch: list[Kept] = []
        while self._to_save and len(batch) < _BATCH:
            kept = self._to_save.popleft()
            if kept.fired:  # queued before it was saved: nothing to keep
                self._known.pop(kept.schedule.id, None)
            else:
                batch.append(kept)
        if not batch:
            return
        try:
            await self.store.save_schedules([k.schedule for k in batch])
        except SpawnmeshError as exc:
            if exc.retryable:
                self._to_save.extendleft(reversed(batch))
                raise
            await self._save_one_by_one(batch)
            return
        except BaseException:  # cancelled: saved again later (saving is idempotent)
            self._to_save.extendleft(reversed(batch))
            raise
        for kept in batch:
            self._saved(kept)

    async def _save_one_by_one(self, batch: list[Kept]) -> None:
        """A batch the store refused: keep what it takes, fire the rest from memory."""
        for i, kept in enumerate(batch):
            try:
                await self.store.save_schedules([kept.schedule])
            except SpawnmeshError as exc:
                if exc.retryable:
                    self._to_save.extendleft(reversed(batch[i:]))
                    raise
                log.error("delayed %s.%s is not durable (the store refused it: %s)",
                          kept.target, kept.schedule.action, exc)
                kept.durable = False
                self._known.pop(kept.schedule.id, None)
                if not kept.held and not kept.fired:
                    self._hold(kept)
            except BaseException:
                self._to_save.extendleft(reversed(batch[i:]))
                raise
            else:
                self._saved(kept)

    def _saved(self, kept: Kept) -> None:
        kept.saved = True
        if kept.fired:  # it fired while being saved
            self._to_forget.append(kept)
        elif not kept.held:
            if kept.schedule.due_ms < self._reach_ms:  # came within reach meanwhile
                self._hold(kept)
            else:  # loaded back when it comes within reach
                self._known.pop(kept.schedule.id, None)

    async def _forget_batch(self) -> None:
        batch = [self._to_forget.popleft() for _ in range(min(_BATCH, len(self._to_forget)))]
        try:
            await self.store.delete_schedules([k.schedule.id for k in batch])
        except BaseException:
            self._to_forget.extendleft(reversed(batch))
            raise
        for kept in batch:
            sid = kept.schedule.id
            self._known.pop(sid, None)
            if self._loads:
                self._tombstones.add(sid)

    # ------------------------------------------------------------------ loading

    def start_recovery(self, *, adopt_all: bool) -> None:
        """Start loading this node's kept schedules (from before a restart), retrying while
        the store is unavailable. ``adopt_all`` (a node alone, not in a cluster) first takes
        over the schedules every other node name kept: nothing else would fire them."""
        self._adopt_all = self._adopt_all or adopt_all
        self._recovery.set()
        self._loaded_to_ms = None  # read everything within reach again (skipping held ones)

    def hand_over(self) -> None:
        """Stop firing the schedules kept in the store (the node is leaving its cluster: the
        member that takes them over fires them, and only it); load and adopt no more."""
        self.handed_over = True

    async def adopt(self, from_owner: str) -> int:
        """Take over the schedules ``from_owner`` kept (a member that died or left), and hold
        those within reach, overdue ones firing at once; how many this node took (0 if
        another member took them first, or this node is leaving). Raises
        StatestoreUnavailable."""
        if from_owner == self.node_id or self.handed_over:
            return 0
        n = await self.store.claim_schedules(from_owner, self.node_id)
        if n:
            log.info("took over %d kept schedules of %s", n, from_owner)
            self.metrics.schedules_adopted_total += n
            await self._load(None)
        return n

    def _tick_s(self) -> float:
        return min(_MAX_TICK_S, max(0.2, self.horizon_ms / 4000))

    async def _load_loop(self) -> None:
        await self._recovery.wait()
        backoff = 0.2
        while not self.handed_over:
            try:
                if self._adopt_all:
                    n = await self.store.claim_schedules(None, self.node_id)
                    self._adopt_all = False
                    if n:
                        log.info("took over %d kept schedules of other node names", n)
                        self.metrics.schedules_adopted_total += n
                        self._loaded_to_ms = None
                await self._load(self._loaded_to_ms)
            except StatestoreUnavailable as exc:
                log.warning("cannot load kept schedules yet (retrying): %s", exc)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            await trio.sleep(self._tick_s())

    async def _load(self, from_ms: int | None) -> None:
        """Hold this node's kept schedules due before the horizon (from ``from_ms`` on, or
        all) that it does not hold yet, a page at a time."""
        reach = wall_ms() + self.horizon_ms
        self._reach_ms = max(self._reach_ms, reach)
        after = None if from_ms is None else (from_ms - 1, "")
        n = 0
        self._loads += 1
        try:
            while True:
                page = await self.store.list_schedules(
                    PAGE, owner=self.node_id, due_before_ms=reach, after=after
                )
                n += self._hold_loaded(page)
                if len(page) < PAGE:
                    break
                after = (page[-1].due_ms, page[-1].id)
        finally:
            self._loads -= 1
            if not self._loads:
                self._tombstones.clear()
        if from_ms is None or self._loaded_to_ms is not None:
            self._loaded_to_ms = max(self._loaded_to_ms or 0, reach)
        if n:
            log.info("%d kept schedules loaded", n)

    def _hold_loaded(self, page: list[Schedule]) -> int:
        """Hold schedules read from the store (those not known yet); how many."""
        now_ms = wall_ms()
        n = 0
        for sc in page:
            if sc.id in self._known or sc.id in self._tombstones or self.handed_over:
                continue
            meta = dict(sc.metadata)
            kept = Kept(sc, None, meta, _caller(meta.pop(CALLER_KEY, None)))
            kept.saved = True
            self._known[sc.id] = kept
            try:
                kept.payload = self._decode(kept.target, sc)
            except SpawnmeshError as exc:
                log.error("kept schedule %s for %s.%s dropped: %s", sc.id, kept.target,
                          sc.action, exc)
                self.fired(kept)  # forgotten in the store
                continue
            late = now_ms - sc.due_ms
            if late > 0:
                meta[SCHEDULE_LATE_KEY] = str(late)
            self._hold(kept)
            n += 1
        return n


def _caller(stored: str | None) -> ActorId | None:
    """The caller a kept schedule stored (None if none, or unreadable)."""
    if not stored:
        return None
    try:
        system, name, parent = json.loads(stored)
        if isinstance(system, str) and isinstance(name, str) and (
            parent is None or isinstance(parent, str)
        ):
            return ActorId(system, name, parent)
    except (ValueError, TypeError):
        pass
    log.warning("kept schedule with an unreadable caller %r: fired without one", stored[:80])
    return None
