"""``spawnmesh run`` as a Spawn proxy: a real node process configured with Spawn's own
environment variables (PROXY_HTTP_PORT, USER_FUNCTION_PORT, SPAWN_STATESTORE_KEY), a real
Spawn-protocol host process; the host registers, invokes, and after the node restarts (and the
host registers again, as a Spawn host does when its sidecar restarts) the state is still there.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2 as wr

from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
from tests.e2e import free_port, http_get, running_node, spawn_env
from tests.test_spawn_proxy import COUNT_URL, INT_URL, SYSTEM, start_host, stop_host

pytestmark = pytest.mark.slow


def post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def add(proxy: int, n: int) -> int:
    req = pb.InvocationRequest(action_name="add")
    req.system.name = SYSTEM
    req.actor.id.name = "counter"
    req.actor.id.system = SYSTEM
    req.value.type_url = INT_URL
    req.value.value = wr.Int64Value(value=n).SerializeToString()
    status, body = post(
        f"http://127.0.0.1:{proxy}/api/v1/system/{SYSTEM}/actors/counter/invoke",
        req.SerializeToString(),
    )
    resp = pb.InvocationResponse.FromString(body)
    assert status == 200 and resp.status.status == pb.OK, (status, resp)
    assert resp.value.type_url == COUNT_URL
    return int(wr.Int64Value.FromString(resp.value.value).value)


def test_spawnmesh_run_serves_spawn_hosts_with_spawns_environment(tmp_path: Path) -> None:
    host = start_host("--proxy", "", "--port", "0")
    proxy = free_port()
    env = spawn_env(proxy, host.port)
    try:
        for round_ in range(2):
            with running_node(tmp_path, key=None, env=env) as node:
                status, body = post(
                    f"http://127.0.0.1:{host.port}/debug/register?proxy=127.0.0.1:{proxy}", b""
                )
                assert status == 200 and json.loads(body)["status"] == "OK", body
                # counter starts at 5 and init adds 100 on each activation; the second node
                # loads the 106 the first one flushed when it stopped
                want = 5 + 100 + 1 if round_ == 0 else 106 + 100 + 2
                assert add(proxy, round_ + 1) == want
                status, text = http_get(f"http://127.0.0.1:{proxy}/health/readiness")
                assert (status, json.loads(text)) == (200, {"status": "up"})
                assert node.stop().returncode == 0
    finally:
        stop_host(host)
