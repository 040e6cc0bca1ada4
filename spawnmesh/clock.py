"""The one place spawnmesh reads the wall clock (epoch milliseconds), and the real-time clock of
bounded busy-waits.

Monotonic time comes from ``trio.current_time()`` (controllable by MockClock); wall time is
needed only for Spawn's epoch-ms schedules and stored timestamps, and tests can replace it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

_wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000  # noqa: E731


def wall_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return _wall_ms()


def set_wall_clock(fn: Callable[[], int] | None) -> None:
    """Replace the wall clock (tests); None restores the system clock."""
    global _wall_ms
    _wall_ms = fn if fn is not None else (lambda: time.time_ns() // 1_000_000)


spin_clock: Final[Callable[[], float]] = time.perf_counter
"""Seconds on the system's high-resolution monotonic clock, for a busy-wait bounded in
microseconds (:mod:`spawnmesh.spawn_compat.busypoll`): it must end in real time even under
trio's MockClock, which stands still while nothing sleeps."""
