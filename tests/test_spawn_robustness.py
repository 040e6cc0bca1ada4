"""The Spawn port against misbehaving peers, with real processes and sockets on loopback.

A real node process (``spawnmesh run``) and a real Spawn host process (``tests/spawn_host.py``):
a host that reads a turn and closes the connection without answering (on a new connection and
on a reused one) fails that turn at once, the turn is never sent twice, and the node stays
responsive; a host that closes idle keep-alive connections costs nothing (the next turn goes,
once, on a new connection). In process, against the proxy's HTTP server: one client flooding
pipelined requests does not starve another connection.

The host's turns run in an extra system (``quiet``: no timers), so its connection pool on the
node carries only the turns these tests make.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
from spawnmesh.spawn_compat.http_server import Request, Response, serve_http
from tests.e2e import NodeProcess, free_port, running_node, spawn_env
from tests.test_spawn_proxy import HostProc, i64, start_host, stop_host, value_of

pytestmark = pytest.mark.slow

QUIET = "quiet"
"""The host's extra system: spawnee (whoami: the payload back) and dropper (vanish)."""


def post(url: str, body: bytes = b"", timeout: float = 15.0) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Setup:
    host: HostProc
    node: NodeProcess
    proxy: int
    """The node's Spawn port."""

    def invoke(self, actor: str, action: str, n: int = 0) -> tuple[int, pb.InvocationResponse]:
        req = pb.InvocationRequest(action_name=action)
        req.system.name = QUIET
        req.actor.id.name = actor
        req.actor.id.system = QUIET
        req.value.type_url, req.value.value = i64(n)
        status, body = post(
            f"http://127.0.0.1:{self.proxy}/api/v1/system/{QUIET}/actors/{actor}/invoke",
            req.SerializeToString(),
        )
        return status, pb.InvocationResponse.FromString(body)

    def host_call(self, path: str) -> bytes:
        status, body = post(f"http://127.0.0.1:{self.host.port}{path}", timeout=5)
        assert status == 200, (path, status, body)
        return body

    def turns(self, actor: str) -> list[dict[str, Any]]:
        turns: list[dict[str, Any]] = json.loads(self.host_call("/debug/turns"))
        return [t for t in turns if t["system"] == QUIET and t["actor"] == actor]

    def health_s(self) -> float:
        """Seconds /health took on a new connection (the node answers promptly)."""
        t0 = time.monotonic()
        status, body = post(f"http://127.0.0.1:{self.proxy}/health", timeout=5)
        assert (status, json.loads(body)) == (200, {"status": "up"})
        return time.monotonic() - t0

    def cpu_s(self) -> float:
        """CPU seconds the node process has used so far."""
        fields = Path(f"/proc/{self.node.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    host = start_host("--proxy", "", "--port", "0")
    proxy = free_port()
    env = spawn_env(proxy, host.port)
    try:
        with running_node(tmp_path_factory.mktemp("node"), key=None, env=env) as node:
            s = Setup(host, node, proxy)
            query = f"proxy=127.0.0.1:{proxy}&extra={QUIET}"
            outcome = json.loads(s.host_call(f"/debug/register?{query}"))
            assert outcome["status"] == "OK" and outcome["extra"] == "OK", outcome
            yield s
    finally:
        stop_host(host)


def assert_no_answer_error(status: int, resp: pb.InvocationResponse, took: float) -> None:
    assert status == 500 and resp.status.status == pb.ERROR, (status, resp)
    assert resp.status.message.startswith("host_unavailable:"), resp
    assert "closed the connection without an answer" in resp.status.message, resp
    assert took < 3.0, took  # at once, not at a deadline


def test_a_host_closing_a_new_connection_without_answering_fails_the_turn_only(
    setup: Setup,
) -> None:
    """The audit's freeze: a host reads the turn on a NEW connection and closes it cleanly
    without an answer. The node used to read EOF for ever without yielding (no deadline, not
    even SIGTERM, could stop it); now the turn fails at once with host_unavailable, the node
    uses no CPU meanwhile, answers /health, and the next turns run."""
    setup.host_call("/debug/drop-idle")  # so the turn opens a new connection
    before = len(setup.turns("dropper"))
    t0 = time.monotonic()
    status, resp = setup.invoke("dropper", "vanish")
    assert_no_answer_error(status, resp, time.monotonic() - t0)
    vanished = setup.turns("dropper")[before:]
    assert [t["nth"] for t in vanished] == [1]  # sent once, the first on its connection
    cpu = setup.cpu_s()
    time.sleep(0.5)
    assert setup.cpu_s() - cpu < 0.3  # not spinning
    assert setup.health_s() < 1.0
    status, resp = setup.invoke("spawnee", "whoami", 7)
    assert status == 200 and value_of(resp) == i64(7), resp
    t0 = time.monotonic()  # and again: every such turn fails alone
    status, resp = setup.invoke("dropper", "vanish")
    assert_no_answer_error(status, resp, time.monotonic() - t0)


def test_a_turn_read_on_a_reused_connection_then_unanswered_is_not_sent_again(
    setup: Setup,
) -> None:
    """A host reads a turn on a REUSED keep-alive connection, runs it (the host logs it) and
    closes without answering: the node must not take the EOF for an idle close and send the
    turn again (the turn would run twice); the caller gets the error."""
    status, resp = setup.invoke("spawnee", "whoami", 1)  # a keep-alive connection, now idle
    assert status == 200, resp
    before = len(setup.turns("dropper"))
    t0 = time.monotonic()
    status, resp = setup.invoke("dropper", "vanish")
    took = time.monotonic() - t0
    vanished = setup.turns("dropper")[before:]
    assert len(vanished) == 1, vanished  # exactly once
    assert vanished[0]["nth"] >= 2, vanished  # on a reused connection
    assert_no_answer_error(status, resp, took)
    status, resp = setup.invoke("spawnee", "whoami", 2)
    assert status == 200 and value_of(resp) == i64(2), resp


def test_idle_connections_closed_by_the_host_are_not_used_and_the_turn_goes_once(
    setup: Setup,
) -> None:
    """A host that closes idle keep-alive connections (an idle timeout): the node notices
    before sending (the socket is readable: EOF), so the next turn goes once, on a new
    connection, and succeeds."""
    for n in range(3):
        status, resp = setup.invoke("spawnee", "whoami", n)
        assert status == 200, resp
        closed = int(setup.host_call("/debug/drop-idle"))
        assert closed >= 1
        time.sleep(0.05)
        before = len(setup.turns("spawnee"))
        status, resp = setup.invoke("spawnee", "whoami", 10 + n)
        assert status == 200 and value_of(resp) == i64(10 + n), resp
        sent = setup.turns("spawnee")[before:]
        assert [t["nth"] for t in sent] == [1], sent  # once, on a new connection


# ---------------------------------------------------------------------------- pipelining


async def health(req: Request) -> Response:
    """An answer that never awaits (like the proxy's /health, 404 and errors)."""
    return Response(200, b'{"status": "up"}', "application/json")


async def test_a_client_flooding_pipelined_requests_does_not_starve_other_connections() -> None:
    """One connection keeps thousands of pipelined GETs buffered: answering them needs no
    waiting, so the connection's task used to run for seconds without yielding. Another
    connection's request is answered within 100 ms meanwhile."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            lambda task_status: serve_http(
                health, "127.0.0.1", 0, max_body_bytes=1000, task_status=task_status
            )
        )
        stop = threading.Event()
        flooding = threading.Event()
        answered = [0]
        flood = socket.create_connection(("127.0.0.1", port))
        batch = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" * 2000

        def writer() -> None:
            try:
                while not stop.is_set():
                    flood.sendall(batch)
            except OSError:
                pass

        def reader() -> None:
            try:
                while not stop.is_set():
                    data = flood.recv(1 << 20)
                    if not data:
                        return
                    answered[0] += data.count(b"HTTP/1.1 200")
                    if answered[0] >= 5000:
                        flooding.set()
            except OSError:
                pass

        def probe() -> float:
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200"), data
            return time.monotonic() - t0

        threads = [threading.Thread(target=f, daemon=True) for f in (writer, reader)]
        for t in threads:
            t.start()
        try:
            assert await trio.to_thread.run_sync(flooding.wait, 10)  # the flood is on
            took = []
            for _ in range(5):
                took.append(await trio.to_thread.run_sync(probe))
                await trio.sleep(0.05)
        finally:
            stop.set()
            flood.shutdown(socket.SHUT_RDWR)
            flood.close()
            for t in threads:
                await trio.to_thread.run_sync(t.join, 5)
        assert max(took) < 0.1, took
        nursery.cancel_scope.cancel()
