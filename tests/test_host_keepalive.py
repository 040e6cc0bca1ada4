"""A host that hangs without closing its connection is detached by the node's keepalive pings.

The example grpclib host (a separate process) holds a Connect stream to a node that pings every
300 ms and gives 700 ms for the answer. Idle, it stays attached through many pings. Stopped
with SIGSTOP (its TCP connection stays open: the kernel still acknowledges, but nothing answers
the HTTP/2 pings), it is detached within about a second; continued, it reconnects on its own and
serves turns again.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from spawnmesh.host.convert import from_any
from spawnmesh.host.gen.spawnmesh.tck.v1 import Value
from spawnmesh.testing.host_conformance import Harness, open_host_harness, wait_until

ROOT = Path(__file__).resolve().parents[1]
GRPCLIB_HOST = [sys.executable, str(ROOT / "examples" / "hosts" / "grpclib_host.py")]

pytestmark = pytest.mark.slow

PINGS = {"host.keepalive_ms": 300, "host.keepalive_timeout_ms": 700}


def sessions(h: Harness) -> list[object]:
    assert h.node.host_api is not None
    hs = h.node.host_api.hosts.systems.get(h.system)
    return [] if hs is None else list(hs.sessions)


async def add(h: Harness, n: int) -> int:
    got = from_any(await h.ref("counter").invoke("add", Value(n=n)), None)
    assert isinstance(got, Value), got
    return got.n


async def test_a_stopped_host_is_detached_and_a_resumed_one_attaches_again() -> None:
    async with open_host_harness(GRPCLIB_HOST, overrides=PINGS) as h:
        first = sessions(h)
        assert len(first) == 1
        base = await add(h, 1)
        await trio.sleep(2.0)  # about six pings, each answered
        assert sessions(h) == first, "an idle, healthy host was dropped"

        os.kill(h.process.pid, signal.SIGSTOP)
        try:
            stopped = trio.current_time()
            await wait_until(lambda: not h.attached(), "the stopped host detached", 5.0)
            took = trio.current_time() - stopped
        finally:
            os.kill(h.process.pid, signal.SIGCONT)
        assert took < 2.5, took  # a ping interval plus the timeout, with room

        await wait_until(h.attached, "the resumed host attached again", 10.0)
        assert sessions(h) != first
        assert await add(h, 2) == base + 2  # turns go to the new session; the state stayed


async def test_no_pings_when_keepalive_is_off() -> None:
    off = {"host.keepalive_ms": 0}
    async with open_host_harness(GRPCLIB_HOST, overrides=off) as h:
        first = sessions(h)
        os.kill(h.process.pid, signal.SIGSTOP)
        try:
            await trio.sleep(2.0)
            assert sessions(h) == first  # nothing notices a silent host but the turns' deadlines
        finally:
            os.kill(h.process.pid, signal.SIGCONT)
