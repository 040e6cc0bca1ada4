"""One task and one heap for everything that fires later: timer actions and delayed or
scheduled invocations. An actor's timers cost a heap entry, not a task."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable
from typing import Any

import trio

log = logging.getLogger("spawnmesh.scheduler")


class Scheduler:
    """Runs callbacks at trio times; callbacks are synchronous and must not block."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._wake = trio.Event()

    def call_at(self, when: float, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` at trio time ``when`` (or as soon as possible after)."""
        if not self._heap or when < self._heap[0][0]:
            self._wake.set()
        heapq.heappush(self._heap, (when, next(self._seq), fn))

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire due callbacks until cancelled."""
        task_status.started()
        heap = self._heap
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, fn = heapq.heappop(heap)
                try:
                    fn()
                except Exception:  # one bad callback must not stop every timer of the node
                    log.exception("scheduled callback failed")
            self._wake = trio.Event()
            deadline = heap[0][0] if heap else now + 3600
            with trio.move_on_at(deadline):
                await self._wake.wait()
