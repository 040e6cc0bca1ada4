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

- the machine gives this process at least two CPUs, by its affinity mask and by its cgroup's
  CPU quota (a container limited to one CPU counts as one): on one, the spinner would hold the
  CPU the host and the callers need, or burn the quota;
- nothing else in the node is queued to run (trio's run queue is empty; a task woken in the
  same scheduling pass as the waiting one is not in it, and may wait the bound), and never past
  trio's next deadline;
- the port is lightly loaded (:attr:`SpinSite.max_active`): a wait for a host's answer spins
  only when it is the pool's only turn in flight, a wait for a caller's next request only when
  no request is being handled. Under load the event loop has work and a spinner would take a
  CPU from the host and the callers;
- spins of this kind have been catching their bytes: each miss adds 1 to a debt and each hit
  takes 1/2 off it, so two misses in a row, or misses in more than about a third of the spins
  (a slow host, an idle caller, a host alternating fast and slow answers, a producer that needs
  the CPU the spinner holds), reach 2: the kind then lets the next 1, 2, 4 ... up to 1,024
  waits sleep at once before it tries again; hits that pay the debt off start afresh.

While a wait spins, the node's other sockets are not polled and a task woken in the same
scheduling pass waits; :mod:`.fastio` yields whenever 200 us have passed since it last did,
so the loop polls its other sockets at least about every half a millisecond (a spin, the time
bound and the work between two calls). Sans trio: :mod:`.fastio` asks :meth:`SpinSite.budget`
and calls :meth:`SpinSite.spin`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

from spawnmesh.clock import spin_clock

BACKOFF_MAX: Final = 1024
"""Most waits a kind of wait lets sleep at once, after its spins kept missing, before it spins
again (the CPU a hopeless spin wastes is then at most a thousandth of the bound per wait)."""


def usable_cpus(
    proc_cgroup: Path = Path("/proc/self/cgroup"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> float:
    """CPUs this process may use: its affinity mask (a container's cpuset counts), capped by
    its cgroup's CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) if it has one."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, cgroup_root)
    return min(cpus, quota) if quota is not None else cpus


def cgroup_cpu_quota(proc_cgroup: Path, cgroup_root: Path) -> float | None:
    """The CPU quota (in CPUs) of this process's cgroup and its ancestors, the smallest one;
    None without a quota (or where cgroups cannot be read)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[float] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        files: tuple[str, ...]
        if controllers == "":  # cgroup v2: "0::/path"
            base, files = cgroup_root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # cgroup v1: "4:cpu,cpuacct:/path"
            base = cgroup_root / controllers
            if not base.is_dir():
                base = cgroup_root / "cpu"
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        rel = Path(path.lstrip("/"))
        for d in (base / rel, *(base / p for p in rel.parents)):
            q = _quota_in(d, files)
            if q is not None:
                found.append(q)
    return min(found) if found else None


def _quota_in(d: Path, files: tuple[str, ...]) -> float | None:
    try:
        if files == ("cpu.max",):
            quota, _, period = (d / "cpu.max").read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or "100000")
        quota_us = int((d / files[0]).read_text())
        if quota_us < 0:  # -1: no quota
            return None
        return quota_us / int((d / files[1]).read_text())
    except (OSError, ValueError, ZeroDivisionError):
        return None


class BusyPoll:
    """The node's busy-poll bound and counts, shared by the Spawn port's server and its host
    pools (exported as metrics)."""

    __slots__ = ("hits", "limit_s", "misses", "spun_s")

    def __init__(self, limit_us: int, *, cpus: float | None = None) -> None:
        """Spin up to ``limit_us`` per wait; 0 turns it off, as do fewer than two usable
        CPUs (``cpus``: the count to assume; by default :func:`usable_cpus`)."""
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

    __slots__ = ("active", "backoff", "debt", "max_active", "owner", "skip")

    def __init__(self, owner: BusyPoll, max_active: int) -> None:
        self.owner = owner
        self.max_active = max_active
        self.active = 0
        """Exchanges of this kind in flight (kept by the caller: a pool's turns, a server's
        requests being handled)."""
        self.debt = 0.0
        """Misses not yet paid off by hits (+1 per miss, -1/2 per hit); 2 starts a back-off."""
        self.backoff = 0
        """Waits to let sleep at once at the next back-off (doubles per back-off)."""
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
            if self.debt:
                self.debt = max(self.debt - 0.5, 0.0)
                if not self.debt:
                    self.backoff = 0  # paid off: the next back-off starts short again
            return data
        owner.misses += 1
        owner.spun_s += now - start
        self.debt += 1.0
        if self.debt >= 2.0:
            self.backoff = min(self.backoff * 2 or 1, BACKOFF_MAX)
            self.skip = self.backoff
            self.debt = 1.0  # one more miss after the pause backs off again, for longer
        return None
