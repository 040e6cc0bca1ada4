"""Adaptive busy-polling before a socket wait on the Spawn port (``spawn.busy_poll_us``).

Why: where an idle CPU halts at once (a virtual machine's vCPU halting is a VM exit), waking a
process that sleeps in ``epoll`` costs tens of microseconds, and a Spawn invocation wakes the
node twice: for the host's answer and for the caller's next request. BEAM, which runs Spawn's
own proxy, lets its schedulers spin briefly before they sleep for the same reason (``+sbwt``);
the Linux guest's ``haltpoll`` governor polls 200 us before halting for it too. The node polls
the one socket it waits on, for a bounded time, before handing the wait to trio; measured in
``docs/spawn-compat.md``.

A wait spins only when all of these hold, so the CPU it costs stays bounded and goes where it
pays:

- the machine gives this process more than one CPU (on one, the spinner would hold the CPU the
  host and the callers need);
- nothing else in the node is queued to run (trio's run queue is empty; a task woken in the
  same scheduling pass as the waiting one is not in it, and may wait the bound), and never past
  trio's next deadline;
- the port is lightly loaded (:attr:`SpinSite.max_active`): a wait for a host's answer spins
  only when it is the pool's only turn in flight, a wait for a caller's next request only when
  no request is being handled. Under load the event loop has work and a spinner would take a
  CPU from the host and the callers;
- spins of this kind have been catching their bytes: after two misses in a row (a slow host,
  an idle caller, a producer that needs the CPU the spinner holds) the kind lets the next
  1, 2, 4 ... up to 1,024 waits sleep at once before it tries again; a hit starts afresh.

While a wait spins, the node's other sockets and timers are served at most ``busy_poll_us``
late. Sans trio: :mod:`.fastio` asks :meth:`SpinSite.budget` and calls :meth:`SpinSite.spin`.
"""

from __future__ import annotations

import os
from typing import Final

from spawnmesh.clock import spin_clock

BACKOFF_MAX: Final = 1024
"""Most waits a kind of wait lets sleep at once, after its spins kept missing, before it spins
again (the CPU a hopeless spin wastes is then at most a thousandth of the bound per wait)."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: a container's cpuset counts)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


class BusyPoll:
    """The node's busy-poll bound and counts, shared by the Spawn port's server and its host
    pools (exported as metrics)."""

    __slots__ = ("hits", "limit_s", "misses", "spun_s")

    def __init__(self, limit_us: int, *, cpus: int | None = None) -> None:
        """Spin up to ``limit_us`` per wait; 0 turns it off, as does a single usable CPU."""
        if (usable_cpus() if cpus is None else cpus) < 2:
            limit_us = 0
        self.limit_s = max(limit_us, 0) / 1e6
        self.hits = 0
        """Waits that spun and got their bytes without sleeping."""
        self.misses = 0
        """Waits that spun for the whole bound, then slept."""
        self.spun_s = 0.0
        """Seconds spent spinning, hits and misses together."""

    @property
    def enabled(self) -> bool:
        """Whether any wait may spin."""
        return self.limit_s > 0

    def site(self, max_active: int) -> SpinSite:
        """A kind of wait that spins only while at most ``max_active`` exchanges of its kind
        are in flight (including the waiting one)."""
        return SpinSite(self, max_active)


class SpinSite:
    """One kind of wait (a host pool's answers, a server's next requests): how many of its
    exchanges are in flight, and whether its spins have been catching their bytes."""

    __slots__ = ("active", "backoff", "max_active", "missed", "owner", "skip")

    def __init__(self, owner: BusyPoll, max_active: int) -> None:
        self.owner = owner
        self.max_active = max_active
        self.active = 0
        """Exchanges of this kind in flight (kept by the caller: a pool's turns, a server's
        requests being handled)."""
        self.missed = 0
        """Spins in a row that missed."""
        self.backoff = 0
        """Waits to let sleep at once after the next miss streak (doubles per streak)."""
        self.skip = 0
        """Waits still to let sleep at once before the next spin."""

    def budget(self, runnable: int, to_deadline: float) -> float:
        """Seconds this wait may spin (0: sleep at once), given trio's runnable tasks and the
        seconds to its next deadline."""
        limit = self.owner.limit_s
        if not limit or runnable or self.active > self.max_active:
            return 0.0
        if self.skip:
            self.skip -= 1
            return 0.0
        return limit if to_deadline > limit else max(to_deadline, 0.0)

    def spin(self, fd: int, max_bytes: int, budget: float) -> bytes | None:
        """Read ``fd`` (non-blocking) until bytes (or EOF's ``b""``) come or ``budget`` seconds
        pass (None). Errors other than "not ready" propagate, as from ``os.read``."""
        read = os.read
        start = now = spin_clock()
        end = start + budget
        owner = self.owner
        while now < end:
            try:
                data = read(fd, max_bytes)
            except BlockingIOError:
                now = spin_clock()
                continue
            owner.hits += 1
            owner.spun_s += spin_clock() - start
            self.missed = self.backoff = 0
            return data
        owner.misses += 1
        owner.spun_s += now - start
        self.missed += 1
        if self.missed >= 2:
            self.backoff = min(self.backoff * 2 or 1, BACKOFF_MAX)
            self.skip = self.backoff
        return None
