"""The example hosts pass the conformance kit, as separate processes on loopback; the kit
fails a host that does not behave."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from spawnmesh.testing.host_conformance import (
    check_state_round_trip,
    open_host_harness,
    run_checks,
)

ROOT = Path(__file__).resolve().parents[1]
GRPCLIB_HOST = [sys.executable, str(ROOT / "examples/hosts/grpclib_host.py")]

pytestmark = pytest.mark.slow


async def test_grpclib_host_over_the_connect_stream_passes() -> None:
    """The Connect stream transport, on the default (stepped) bridge."""
    async with open_host_harness(GRPCLIB_HOST) as h:
        report = await run_checks(h)
    assert report.ok, report.text()


async def test_grpclib_host_serving_hostservice_passes() -> None:
    """The host-served transport (the node calls HandleTurn), on the thread bridge."""
    cmd = [*GRPCLIB_HOST, "--serve", "127.0.0.1:0"]
    async with open_host_harness(cmd, overrides={"host.bridge": "thread"}) as h:
        report = await run_checks(h)
    assert report.ok, report.text()


async def test_the_kit_fails_a_host_that_is_gone() -> None:
    async with open_host_harness(GRPCLIB_HOST) as h:
        h.process.kill()
        await h.process.wait()
        report = await run_checks(h, [check_state_round_trip], per_check_timeout=5)
    assert not report.ok
    assert "HostUnavailable" in report.text(), report.text()


async def test_grpclib_host_passes_on_a_clustered_node() -> None:
    """With membership and the mesh router on, the node advertises the host's actor types
    after the registration, so placement routes them to it."""
    cluster = {"cluster.enabled": True, "cluster.gossip_port": 0, "cluster.peer_port": 0}
    async with open_host_harness(GRPCLIB_HOST, overrides=cluster) as h:
        report = await run_checks(h)
    assert report.ok, report.text()
