"""Busy-polling on the Spawn port (spawnmesh.spawn_compat.busypoll): when a wait may spin, what a
spin returns (bytes, EOF, nothing), the running hit rate, and a real node spinning for its host's
answers (and not at all with ``spawn.busy_poll_us = 0``)."""

from __future__ import annotations

import math
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh.spawn_compat import fastio
from spawnmesh.spawn_compat.busypoll import BACKOFF_MAX, BusyPoll, SpinSite, usable_cpus
from tests.test_spawn_proxy import HostProc, count, i64, spawn_host, spawn_node  # noqa: F401

LIMIT_US = 2_000  # generous: a spin that should catch a write 1 ms later does on a loaded box


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
    assert usable_cpus() == len(os.sched_getaffinity(0))


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


@given(st.lists(st.booleans(), max_size=80))
def test_missed_spins_back_off_and_a_hit_starts_afresh(outcomes: list[bool]) -> None:
    """Each eligible wait of a site either spins (its outcome taken from the list: the bytes
    come, or not) or sleeps at once; checked against a model of the back-off: after two misses
    in a row, 1, 2, 4 ... waits sleep at once (at most BACKOFF_MAX); a hit resets it."""
    bp = BusyPoll(100, cpus=2)
    site = bp.site(0)
    missed = backoff = skip = 0
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
                missed = backoff = 0
            else:
                missed += 1
                if missed >= 2:
                    backoff = min(backoff * 2 or 1, BACKOFF_MAX)
                    skip = backoff
            counts[hit] += 1
            assert (site.spin(a.fileno(), 10, 1e-5) is not None) is hit
            assert 0 <= site.skip == skip <= site.backoff == backoff <= BACKOFF_MAX
    assert (bp.hits, bp.misses) == (counts[True], counts[False])


def test_hopeless_spins_cost_a_vanishing_share_of_waits() -> None:
    """A site whose spins never catch anything spins about log2(n) + a few times in n waits."""
    site = BusyPoll(100, cpus=2).site(0)
    spins = 0
    with socket_pair() as (a, _b):
        for _ in range(5_000):
            if site.budget(0, math.inf):
                spins += 1
                assert site.spin(a.fileno(), 10, 1e-6) is None
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
            assert bp.misses <= 1  # at most one spin of 2 ms, then trio's wait got it

            b.close()
            assert await fastio.receive(stream, 100, site) == b""
    finally:
        await stream.aclose()
        b.close()


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
@pytest.mark.parametrize("limit_us", [LIMIT_US, 0])
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
    # the host's answers are caught (it answers well within 2 ms); the caller runs in the
    # node's process here, so a wait for its next request cannot be: those spins miss and
    # back off (a few dozen at most in 200 waits)
    assert bp.hits >= 150, (bp.hits, bp.misses)
    assert bp.misses <= 40, (bp.hits, bp.misses)
    assert counts["hit"] == bp.hits and counts["miss"] == bp.misses
    assert counts["s"] == pytest.approx(bp.spun_s)
