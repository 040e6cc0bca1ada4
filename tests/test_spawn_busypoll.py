"""Busy-polling on the Spawn port (spawnmesh.spawn_compat.busypoll): when a wait may spin, what a
spin returns (bytes, EOF, nothing), the running hit rate, and a real node spinning for its host's
answers (and not at all with ``spawn.busy_poll_us = 0``)."""

from __future__ import annotations

import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh.spawn_compat import fastio
from spawnmesh.spawn_compat.busypoll import (
    BACKOFF_MAX,
    BusyPoll,
    SpinSite,
    cgroup_cpu_quota,
    usable_cpus,
)
from tests.test_spawn_proxy import HostProc, count, i64, spawn_host, spawn_node  # noqa: F401

LIMIT_US = 20_000
"""Generous: a spin must catch a write made 0.3 ms later by a thread, which needs the GIL the
spinner retakes after each read (CPython forces a switch after 5 ms), on a loaded machine."""


@contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def later(seconds: float, fn: object) -> threading.Timer:
    """Run ``fn`` in a thread after ``seconds`` (a spin holds the trio loop: a trio task could
    not write meanwhile; ``os.read`` releases the GIL between tries)."""
    t = threading.Timer(seconds, fn)  # type: ignore[arg-type]
    t.start()
    return t


# ---------------------------------------------------------------------------- when it spins


def test_off_with_zero_or_one_usable_cpu() -> None:
    assert not BusyPoll(0, cpus=8).enabled
    assert not BusyPoll(200, cpus=1).enabled
    assert BusyPoll(200, cpus=2).enabled
    assert usable_cpus() <= len(os.sched_getaffinity(0))


def test_a_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path: Path) -> None:
    """A container limited to fewer than two CPUs by its quota never spins (it would burn the
    quota), whatever its affinity mask; cgroup v2 and v1 layouts, read from real files."""
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    pod = root / "kubepods" / "pod1"
    pod.mkdir(parents=True)
    (root / "kubepods" / "cpu.max").write_text("max 100000\n")
    (pod / "cpu.max").write_text("150000 100000\n")
    proc.write_text("0::/kubepods/pod1\n")
    assert cgroup_cpu_quota(proc, root) == 1.5
    assert usable_cpus(proc, root) == min(1.5, len(os.sched_getaffinity(0)))
    assert not BusyPoll(200, cpus=usable_cpus(proc, root)).enabled
    (pod / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(proc, root) is None  # no quota anywhere up the tree
    v1 = root / "cpu,cpuacct" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/docker/abc\n3:memory:/docker/abc\n")
    assert cgroup_cpu_quota(proc, root) == 4.0
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(proc, root) is None
    assert cgroup_cpu_quota(tmp_path / "missing", root) is None
    proc.write_text("garbage\n")
    assert cgroup_cpu_quota(proc, root) is None


def test_budget_rules() -> None:
    site = BusyPoll(200, cpus=2).site(1)
    assert site.budget(0, math.inf) == pytest.approx(200e-6)
    assert site.budget(1, math.inf) == 0  # another task can run: no spin
    assert site.budget(0, 50e-6) == pytest.approx(50e-6)  # never past trio's next deadline
    assert site.budget(0, -1.0) == 0
    site.active = 2  # two turns in flight on a pool that spins for one
    assert site.budget(0, math.inf) == 0
    site.active = 1
    site.skip = 1  # backing off after missed spins
    assert site.budget(0, math.inf) == 0
    assert site.budget(0, math.inf) > 0
    assert BusyPoll(0, cpus=2).site(1).budget(0, math.inf) == 0


def test_a_spin_returns_bytes_that_come_within_its_budget() -> None:
    bp = BusyPoll(LIMIT_US, cpus=2)
    site = bp.site(0)
    with socket_pair() as (a, b):
        t = later(0.0005, lambda: b.send(b"answer"))
        assert site.spin(a.fileno(), 100, 0.5) == b"answer"
        t.join()
    assert (bp.hits, bp.misses) == (1, 0)
    assert 0 < bp.spun_s < 0.5


def test_a_spin_sees_eof_and_gives_up_after_its_budget() -> None:
    bp = BusyPoll(LIMIT_US, cpus=2)
    site = bp.site(0)
    with socket_pair() as (a, b):
        assert site.spin(a.fileno(), 100, 0.001) is None  # nothing came
        assert (bp.hits, bp.misses) == (0, 1)
        assert bp.spun_s >= 0.001
        b.shutdown(socket.SHUT_WR)
        assert site.spin(a.fileno(), 100, 0.5) == b""
        assert (bp.hits, bp.misses) == (1, 1)


def test_a_spin_propagates_socket_errors() -> None:
    site = BusyPoll(LIMIT_US, cpus=2).site(0)
    a, b = socket.socketpair()
    fd = a.fileno()
    a.close()
    b.close()
    with pytest.raises(OSError):
        site.spin(fd, 100, 0.01)


@given(st.lists(st.booleans(), max_size=120))
def test_misses_run_up_a_debt_that_backs_off_and_hits_pay_it(outcomes: list[bool]) -> None:
    """Each eligible wait of a site either spins (its outcome taken from the list: the bytes
    come, or not) or sleeps at once; checked against a model of the back-off: a miss adds 1 to
    the debt, a hit takes 1/2 off; at 2, the next 1, 2, 4 ... waits (at most BACKOFF_MAX) sleep
    at once and the debt drops to 1; paid off, the back-off starts short again."""
    bp = BusyPoll(100, cpus=2)
    site = bp.site(0)
    debt = 0.0
    backoff = skip = 0
    counts = {True: 0, False: 0}
    with socket_pair() as (a, b):
        for hit in outcomes:
            spins = site.budget(0, math.inf) > 0
            assert spins == (skip == 0)
            if not spins:
                skip -= 1
                continue
            if hit:
                b.send(b"x")
                if debt:
                    debt = max(debt - 0.5, 0.0)
                    if not debt:
                        backoff = 0
            else:
                debt += 1
                if debt >= 2:
                    backoff = min(backoff * 2 or 1, BACKOFF_MAX)
                    skip, debt = backoff, 1.0
            counts[hit] += 1
            assert (site.spin(a.fileno(), 10, 1e-5) is not None) is hit
            assert (site.debt, site.skip, site.backoff) == (debt, skip, backoff)
            assert 0 <= site.skip <= site.backoff <= BACKOFF_MAX and 0 <= site.debt < 2
    assert (bp.hits, bp.misses) == (counts[True], counts[False])


def spins_in(waits: int, hit: Callable[[int], bool]) -> tuple[int, SpinSite]:
    """Offer a fresh site ``waits`` eligible waits; its n-th spin (from 1) catches its bytes
    if ``hit(n)``. Returns how many waits spun, and the site."""
    site = BusyPoll(100, cpus=2).site(0)
    spins = 0
    with socket_pair() as (a, b):
        for _ in range(waits):
            if site.budget(0, math.inf):
                spins += 1
                if hit(spins):
                    b.send(b"x")
                assert (site.spin(a.fileno(), 10, 1e-6) is not None) is hit(spins)
    return spins, site


def test_a_site_whose_spins_alternate_hit_and_miss_backs_off() -> None:
    """A host answering fast and slow in turn: half the spins would miss, so the site backs off
    (before, each hit started afresh and every slow answer cost a whole spin)."""
    spins, _ = spins_in(4_000, lambda n: n % 2 == 1)
    assert spins <= 60, spins


def test_mostly_hits_with_a_rare_miss_keep_spinning() -> None:
    site = BusyPoll(100, cpus=2).site(0)
    with socket_pair() as (a, b):
        for i in range(300):
            assert site.budget(0, math.inf) > 0, i
            if i % 5:  # one miss in five spins
                b.send(b"x")
            site.spin(a.fileno(), 10, 1e-6)


def test_hopeless_spins_cost_a_vanishing_share_of_waits() -> None:
    """A site whose spins never catch anything spins about log2(n) + a few times in n waits."""
    spins, site = spins_in(5_000, lambda n: False)
    assert spins <= 20, spins
    assert site.backoff == BACKOFF_MAX


# ---------------------------------------------------------------------------- fastio with a site


async def test_receive_spins_then_waits_without_losing_bytes() -> None:
    bp = BusyPoll(LIMIT_US, cpus=2)
    site: SpinSite = bp.site(0)
    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    try:
        with trio.fail_after(10):
            t = later(0.0003, lambda: b.send(b"soon"))  # caught by the spin: no yield
            assert await fastio.receive(stream, 100, site) == b"soon"
            t.join()
            assert (bp.hits, bp.misses) == (1, 0)

            async def send_late() -> None:
                await trio.sleep(0.05)
                b.send(b"late")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_late)  # runnable: the receive does not spin past it
                assert await fastio.receive(stream, 100, site) == b"late"
            assert bp.misses <= 1  # at most one spin of 20 ms, then trio's wait got it

            b.close()
            assert await fastio.receive(stream, 100, site) == b""
    finally:
        await stream.aclose()
        b.close()


# ---------------------------------------------------------------------------- streams and the loop


PING_LIMIT_US = 200


def _stream(sock: socket.socket) -> trio.SocketStream:
    sock.setblocking(False)
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def test_spinning_reads_keep_the_stream_whole_and_in_order() -> None:
    """A writer thread sends numbered chunks with gaps around the bound (some caught by a
    spin, some by trio's wait, some already there); the reader gets every byte once, in order,
    then EOF, and the site's counts stay consistent."""
    bp = BusyPoll(PING_LIMIT_US, cpus=2)
    site = bp.site(0)
    a, b = socket.socketpair()
    rng = random.Random(7)
    chunks = [os.urandom(rng.randint(1, 3000)) for _ in range(600)]
    gaps = [rng.choice((0.0, 0.0, 50e-6, 150e-6, 400e-6, 0.001)) for _ in chunks]

    def write() -> None:  # sleeps, not busy-waits: the reader needs the GIL to spin
        for chunk, gap in zip(chunks, gaps, strict=True):
            if gap:
                time.sleep(gap)
            b.sendall(chunk)
        b.shutdown(socket.SHUT_WR)

    stream = _stream(a)
    got = bytearray()
    t = threading.Thread(target=write)
    try:
        with trio.fail_after(30):
            t.start()
            while True:
                data = await fastio.receive(stream, 4093, site)
                if not data:
                    break
                got += data
            assert await fastio.receive(stream, 4093, site) == b""  # EOF again, not an error
    finally:
        t.join()
        await stream.aclose()
        b.close()
    assert bytes(got) == b"".join(chunks)
    assert bp.hits + bp.misses > 0 and site.active == 0
    assert 0 <= site.skip <= site.backoff


async def test_spins_that_keep_hitting_do_not_hold_other_sockets_for_many_bounds() -> None:
    """While one task ping-pongs with a peer answering in ~100 us (each of its waits spins and
    hits), trio still polls its other sockets every few spins: fastio yields once 200 us have
    passed since it last did (counting calls alone let 16 exchanges, 32 calls with a spin in
    every other one, about 3 ms, pass without a poll). Counted in spins between two I/O polls,
    not in time: preemption on a loaded machine stretches time, not the count."""
    bp = BusyPoll(PING_LIMIT_US, cpus=2)
    most = await _ping_pong_most_spins_between_polls(bp)
    assert bp.hits > 0
    assert most <= 4, f"{most} spins that hit ran without the loop polling its sockets"


class _SpinsBetweenPolls(trio.abc.Instrument):
    """The most spins that hit between two consecutive I/O polls of the run loop."""

    def __init__(self, bp: BusyPoll) -> None:
        self.bp = bp
        self.at: int | None = None
        self.most = 0

    def after_io_wait(self, timeout: float) -> None:
        self.at = self.bp.hits

    def before_io_wait(self, timeout: float) -> None:
        if self.at is not None:
            self.most = max(self.most, self.bp.hits - self.at)


async def _ping_pong_most_spins_between_polls(bp: BusyPoll) -> int:
    """Run 1,500 exchanges against a thread that answers each after ~100 us; return the most
    spins that hit between two I/O polls of the loop."""
    site = bp.site(0)
    a, b = socket.socketpair()
    stop = threading.Event()

    def peer() -> None:
        b.settimeout(5)
        try:
            while not stop.is_set():
                if not b.recv(100):
                    return
                time.sleep(100e-6)  # releases the GIL (a busy-wait would hold it)
                b.sendall(b"pong")
        except OSError:
            return

    t = threading.Thread(target=peer)
    t.start()
    stream = _stream(a)
    gaps = _SpinsBetweenPolls(bp)
    try:
        with trio.fail_after(30):
            await trio.sleep(0.01)
            trio.lowlevel.add_instrument(gaps)
            try:
                for _ in range(1500):
                    await fastio.send(stream, b"ping")
                    assert await fastio.receive(stream, 100, site) == b"pong"
            finally:
                trio.lowlevel.remove_instrument(gaps)
    finally:
        stop.set()
        await stream.aclose()
        t.join()
        b.close()
    return gaps.most


# ---------------------------------------------------------------------------- a real node


def _counts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("spawnmesh_spawn_busy_poll"):
            name, value = line.rsplit(" ", 1)
            outcome = "hit" if 'outcome="hit"' in name else "miss" if "miss" in name else "s"
            out[outcome] = float(value)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("limit_us", [10_000, 0])  # the setting's largest bound, and off
async def test_a_node_spins_for_its_hosts_answers_unless_told_not_to(
    spawn_host: HostProc, limit_us: int  # noqa: F811
) -> None:
    async with spawn_node(spawn_host, **{"spawn.busy_poll_us": limit_us}) as proxy:
        bp = proxy.node.spawn_proxy.busy_poll
        for n in range(1, 201):  # an instance of the host's UNNAMED "bench" template
            assert await proxy.value("b", "add", i64(1), register_ref="bench") == count(n)
        counts = _counts(proxy.node.metrics.render().decode())
    if limit_us == 0:
        assert (bp.hits, bp.misses, bp.spun_s) == (0, 0, 0.0)
        assert counts == {"hit": 0.0, "miss": 0.0, "s": 0.0}
        return
    # the host's answers are caught when it answers within the bound (on an idle machine
    # nearly all 200; under load, with the back-off, fewer); the caller runs in the node's
    # process here, so a wait for its next request cannot be: those spins miss and back off
    assert bp.hits > 0, (bp.hits, bp.misses)
    assert bp.misses <= 60, (bp.hits, bp.misses)
    assert counts["hit"] == bp.hits and counts["miss"] == bp.misses
    assert counts["s"] == pytest.approx(bp.spun_s)
