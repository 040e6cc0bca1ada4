"""Interop with an implementation we did not write: a host and a client written with Google's
grpcio and protobuf (stubs generated from spec/ by grpcio-tools), each a separate process."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from spawnmesh.testing.host_conformance import Harness, open_host_harness, run_checks

pytest.importorskip("grpc_tools", reason="needs the dev extra (grpcio, grpcio-tools)")

ROOT = Path(__file__).resolve().parents[1]
HOSTS = ROOT / "examples" / "hosts"
GRPCIO_HOST = [sys.executable, str(HOSTS / "grpcio_host.py")]
GRPCLIB_HOST = [sys.executable, str(HOSTS / "grpclib_host.py")]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """grpcio stubs generated once from spec/ for the processes of this module."""
    out = tmp_path_factory.mktemp("grpcio-stubs")
    sys.path.insert(0, str(HOSTS))
    try:
        import grpcio_stubs

        grpcio_stubs.generate(out)
    finally:
        sys.path.remove(str(HOSTS))
    yield {"SPAWNMESH_GRPCIO_STUBS": str(out)}


async def run_client(h: Harness, env: dict[str, str], cart: str) -> dict[str, dict[str, object]]:
    """The grpcio client against the harness's node: its JSON output by step."""
    done = await trio.run_process(
        [
            sys.executable,
            str(HOSTS / "grpcio_client.py"),
            "--node",
            f"127.0.0.1:{h.node.host_api.port}",
            "--cart",
            cart,
        ],
        env={**os.environ, **env},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    steps = [json.loads(line) for line in done.stdout.decode().splitlines() if line.startswith("{")]
    return {s.pop("step"): s for s in steps}


def assert_cart_scenario(out: dict[str, dict[str, object]], cart: str) -> None:
    assert out["spawn"] == {"status": "OK"}
    assert out["checkout"] == {
        "cart": cart,
        "lines": 2,
        "total_cents": 180,
        "type_url": "type.googleapis.com/spawnmesh.tck.v1.Receipt",
    }
    closed = out["closed_cart"]
    assert closed["code"] == "UNKNOWN" and closed["reason"] == "actor_failed"
    meta = closed["metadata"]
    assert isinstance(meta, dict) and meta["error_type"] == "TckError"
    assert meta["error_message"] == "cart is checked out"
    assert out["no_actor"]["code"] == "NOT_FOUND" and out["no_actor"]["reason"] == "actor_not_found"
    assert out["deadline"]["code"] == "DEADLINE_EXCEEDED"
    bad = out["bad_registration"]
    assert bad["code"] == "INVALID_ARGUMENT" and bad["reason"] == "invalid_definition"
    fields = [v[0] for v in bad["violations"]]  # type: ignore[union-attr]
    assert fields == [
        "actor_system.registry.actors[b].timer_actions[0].seconds",
        "actor_system.registry.actors[b].metadata.channel_group[0].action",
    ]
    assert out["oversized"]["code"] == "RESOURCE_EXHAUSTED"


async def test_grpcio_host_passes_the_conformance_kit(stubs: dict[str, str]) -> None:
    async with open_host_harness(GRPCIO_HOST, env=stubs) as h:
        report = await run_checks(h)
    assert report.ok, report.text()


async def test_grpcio_client_uses_the_cart_of_a_grpcio_host(stubs: dict[str, str]) -> None:
    async with open_host_harness(GRPCIO_HOST, env=stubs) as h:
        out = await run_client(h, stubs, "cart-g1")
        state = await h.ref("cart-g1").get_state()
        assert state.type_url == "type.googleapis.com/spawnmesh.tck.v1.Cart"
    assert_cart_scenario(out, "cart-g1")


async def test_grpcio_client_uses_the_cart_of_a_grpclib_host(stubs: dict[str, str]) -> None:
    async with open_host_harness(GRPCLIB_HOST) as h:
        out = await run_client(h, stubs, "cart-g2")
    assert_cart_scenario(out, "cart-g2")
