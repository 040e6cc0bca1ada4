"""Spawn's HTTP protocol against a spawnmesh node, with a real Spawn-protocol host process
(``tests/spawn_host.py``, Google protobuf generated from ``spec/spawn/``) on loopback.

One host process serves the whole module (it registers with each test's node when told to);
each test runs its own embedded node with the Spawn API on an ephemeral port. Every item of
Spawn's semantics that SDKs depend on is checked as the host sees it (its turn log) and as a
client sees it (protobuf answers): registration, initial state and tags, byte-for-byte state,
default and init actions, eager activation, unnamed and pooled actors, async and scheduled
invocations, timers, workflows, metadata, checkpoint, re-registration, revisions, errors.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf import wrappers_pb2 as wr

from spawnmesh.clock import wall_ms
from spawnmesh.node import Node, open_node
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
from spawnmesh.spawn_compat.http_client import HttpPool
from spawnmesh.statestore import StateStore
from tests.conftest import test_config

ROOT = Path(__file__).resolve().parents[1]
HOST_SCRIPT = ROOT / "tests" / "spawn_host.py"
SYSTEM = "spawn-tck"
COUNT_URL = "type.googleapis.com/spawntck.Count"
INT_URL = "type.googleapis.com/google.protobuf.Int64Value"
STR_URL = "type.googleapis.com/google.protobuf.StringValue"
JSON_URL = "type.googleapis.com/spawn.JSONType"

pytestmark = pytest.mark.slow

Parts = tuple[str, bytes]


def i64(n: int) -> Parts:
    return INT_URL, wr.Int64Value(value=n).SerializeToString()


def count(n: int) -> Parts:
    return COUNT_URL, wr.Int64Value(value=n).SerializeToString()


def text(s: str) -> Parts:
    return STR_URL, wr.StringValue(value=s).SerializeToString()


def json_parts(value: object) -> Parts:
    return JSON_URL, pb.JSONType(content=json.dumps(value)).SerializeToString()


def value_of(resp: pb.InvocationResponse) -> Parts | None:
    return (
        (resp.value.type_url, resp.value.value) if resp.WhichOneof("payload") == "value" else None
    )


def json_of(resp: pb.InvocationResponse) -> Any:
    parts = value_of(resp)
    assert parts is not None and parts[0] == JSON_URL, resp
    return json.loads(pb.JSONType.FromString(parts[1]).content)


# ---------------------------------------------------------------------------- the host process


@dataclass
class HostProc:
    """The Spawn-protocol host process and its debug routes."""

    proc: subprocess.Popen[bytes]
    port: int

    async def call(self, path: str, body: bytes = b"") -> bytes:
        pool = HttpPool("127.0.0.1", self.port)
        try:
            status, out = await pool.post(path, body)
        finally:
            pool.close()
        assert status == 200, (path, status, out)
        return out

    async def register(self, proxy_port: int, **query: str) -> dict[str, Any]:
        q = "&".join(f"{k}={v}" for k, v in {"proxy": f"127.0.0.1:{proxy_port}", **query}.items())
        outcome: dict[str, Any] = json.loads(await self.call(f"/debug/register?{q}"))
        return outcome

    async def turns(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = json.loads(await self.call("/debug/turns"))
        return out

    async def reset(self) -> None:
        await self.call("/debug/reset")


def start_host(*args: str, env: Mapping[str, str] | None = None) -> HostProc:
    """Start ``tests/spawn_host.py`` and wait for its READY line."""
    proc = subprocess.Popen(
        [sys.executable, str(HOST_SCRIPT), *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("READY"):
        proc.kill()
        raise AssertionError(f"the Spawn host did not start: {line!r}")
    return HostProc(proc, int(line.split()[1]))


def stop_host(host: HostProc) -> None:
    host.proc.terminate()
    try:
        host.proc.wait(5)
    except subprocess.TimeoutExpired:
        host.proc.kill()
        host.proc.wait()


@pytest.fixture(scope="module")
def spawn_host() -> Iterator[HostProc]:
    host = start_host("--proxy", "", "--port", "0")
    try:
        yield host
    finally:
        stop_host(host)


# ---------------------------------------------------------------------------- the node side


class Proxy:
    """A client of one node's Spawn API (what an SDK's invoke/spawn do)."""

    def __init__(self, node: Node, port: int) -> None:
        self.node = node
        self.port = port
        self.pool = HttpPool("127.0.0.1", port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        return await self.pool.post(path, body)

    async def invoke(
        self,
        actor: str,
        action: str,
        value: Parts | None = None,
        *,
        system: str = SYSTEM,
        metadata: Mapping[str, str] | None = None,
        is_async: bool = False,
        scheduled_to: int = 0,
        register_ref: str = "",
        caller: str = "",
        expect: int = 200,
    ) -> pb.InvocationResponse:
        req = pb.InvocationRequest()
        req.system.name = system
        req.actor.id.name = actor
        req.actor.id.system = system
        req.action_name = action
        if value is None:
            req.noop.SetInParent()
        else:
            req.value.type_url, req.value.value = value
        req.metadata.update(metadata or {})
        setattr(req, "async", is_async)
        req.scheduled_to = scheduled_to
        req.register_ref = register_ref
        if caller:
            req.caller.name = caller
            req.caller.system = system
        status, body = await self.post(
            f"/api/v1/system/{system}/actors/{actor}/invoke", req.SerializeToString()
        )
        resp = pb.InvocationResponse.FromString(body)
        assert status == expect, (status, resp)
        want = pb.OK if expect == 200 else pb.ERROR
        assert resp.status.status == want, resp
        return resp

    async def value(
        self, actor: str, action: str, value: Parts | None = None, **kw: Any
    ) -> Parts | None:
        return value_of(await self.invoke(actor, action, value, **kw))

    async def spawn(
        self, *names: str, parent: str, revision: int = 0, expect: int = 200
    ) -> pb.SpawnResponse:
        req = pb.SpawnRequest()
        for name in names:
            aid = req.actors.add()
            aid.name, aid.system, aid.parent = name, SYSTEM, parent
        query = f"?revision={revision}" if revision else ""
        status, body = await self.post(
            f"/api/v1/system/{SYSTEM}/actors/spawn{query}", req.SerializeToString()
        )
        resp = pb.SpawnResponse.FromString(body)
        assert status == expect, (status, resp)
        return resp


@asynccontextmanager
async def spawn_node(
    host: HostProc,
    *systems: Any,
    register: bool = True,
    store: StateStore | None = None,
    query: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[Proxy]:
    """An embedded node serving the Spawn API, the host registered with it (by default)."""
    cfg = test_config(
        **{
            "spawn.enabled": True,
            "spawn.port": 0,
            "spawn.user_function_port": host.port,
            "actors.default_timeout_ms": 10_000,
            **overrides,
        }
    )
    async with open_node(cfg, *systems, store=store) as node:
        proxy = Proxy(node, node.spawn_proxy.port)
        await host.reset()
        if register:
            outcome = await host.register(proxy.port, **(query or {}))
            assert outcome["status"] == "OK", outcome
        try:
            yield proxy
        finally:
            proxy.pool.close()


async def wait_until(probe: Any, what: str, timeout_s: float = 10.0) -> Any:
    """Poll ``await probe()`` until truthy (a generous bound for a loaded machine)."""
    with trio.move_on_after(timeout_s):
        while True:
            got = await probe()
            if got:
                return got
            await trio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def of(turns: list[dict[str, Any]], actor: str) -> list[dict[str, Any]]:
    return [t for t in turns if t["actor"] == actor]


# ---------------------------------------------------------------------------- the tests


async def test_registration_initial_state_default_and_init_actions(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host, register=False) as proxy:
        outcome = await spawn_host.register(proxy.port)
        # Spawn's proxy answers OK "Accepted" with its protocol version (1.2)
        assert outcome == {
            "http": 200,
            "status": "OK",
            "message": "Accepted",
            "proxy": "spawnmesh",
            "protocol": [1, 2],
        }
        # counter (named, stateful) is activated at registration: its init runs unasked
        turns = await wait_until(lambda: _turns_of(spawn_host, "counter"), "counter's init")
        init = turns[0]
        assert init["action"] == "init" and init["payload"] == "noop"
        assert init["caller"] == f"{SYSTEM}/counter"  # the actor is its own caller
        # the registered state (byte for byte, its type URL) and tags are the initial ones
        assert init["state"] == [COUNT_URL, base64.b64encode(count(5)[1]).decode()]
        assert init["tags"] == {"origin": "registered", "suite": "spawn"}
        # every default action is answered by the node with the state (init's n + 100)
        for name in ("get", "Get", "get_state", "getState", "GetState"):
            assert await proxy.value("counter", name) == count(105)
        seen = await proxy.invoke("counter", "whoami")
        assert json_of(seen)["tags"] == {"origin": "registered", "suite": "spawn", "inited": "yes"}
        turns = of(await spawn_host.turns(), "counter")
        assert [t["action"] for t in turns] == ["init", "whoami"]  # the defaults never left
        # ... unless the host registered one of them: then they all go to the host
        assert await proxy.value("custom", "get") == text("host-get")
        assert await proxy.value("custom", "getState") == text("host-getState")
        # state values are kept verbatim: unknown type URL, bytes the node cannot parse
        odd = (COUNT_URL, b"\x08\x07\xfa\x01\x03abc")  # n=7 plus an unknown field 31
        assert await proxy.value("counter", "checkpoint", odd) is not None
        got = json_of(await proxy.invoke("counter", "whoami"))["state"]
        assert got == [COUNT_URL, base64.b64encode(odd[1]).decode()]
        assert await proxy.value("counter", "get") == odd


async def _turns_of(host: HostProc, actor: str) -> list[dict[str, Any]]:
    return of(await host.turns(), actor)


async def test_context_metadata_caller_and_errors(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:
        seen = json_of(await proxy.invoke("echo", "whoami", metadata={"trace": "t-1"}))
        assert seen["metadata"] == {"trace": "t-1"}
        assert seen["self"] == [SYSTEM, "echo", ""] and seen["caller"] is None
        seen = json_of(await proxy.invoke("echo", "whoami", caller="counter"))
        assert seen["caller"] == [SYSTEM, "counter"]
        before = await proxy.value("counter", "get")
        # a failing action: HTTP 500 and an InvocationResponse with status ERROR, as Spawn
        failed = await proxy.invoke("counter", "fail", expect=500)
        assert failed.status.message.startswith("actor_failed:")
        assert "boom: failed on purpose" in failed.status.message
        assert await proxy.value("counter", "get") == before  # the state did not change
        missing = await proxy.invoke("nobody", "get", expect=500)
        assert missing.status.message.startswith("actor_not_found:")
        wrong = await proxy.invoke("counter", "no_such_action", expect=500)
        assert wrong.status.message.startswith("action_not_found:")
        status, body = await proxy.post(f"/api/v1/system/{SYSTEM}/actors/x/invoke", b"\xff\x01")
        assert status == 500
        assert pb.InvocationResponse.FromString(body).status.status == pb.ERROR
        status, body = await proxy.post("/api/v1/system", b"\x12\x03abc")  # no actors
        reg = pb.RegistrationResponse.FromString(body)
        assert status == 500 and reg.status.status == pb.ERROR, reg
        # the health routes of Spawn's proxy
        pool = HttpPool("127.0.0.1", proxy.port)
        try:
            for path in ("/health", "/health/liveness", "/health/readiness"):
                assert await pool.post(path, b"") == (200, b'{"status": "up"}')
        finally:
            pool.close()


async def test_request_timeout_metadata_bounds_a_call_and_the_connection_goes_on(
    spawn_host: HostProc,
) -> None:
    """Spawn's ``request-timeout`` metadata (ms) bounds a call: past it the caller gets HTTP
    500 with an InvocationResponse ERROR (code ``timeout``), the turn is abandoned, the
    actor takes the next call, and the keep-alive connection carries on (twice, so a bound
    that fired leaves none behind)."""
    async with spawn_node(spawn_host) as proxy:
        before = await proxy.value("counter", "get")
        opened = proxy.pool.connections_opened_total
        for _ in range(2):
            t0 = trio.current_time()
            late = await proxy.invoke(
                "counter", "slow", i64(3_000), metadata={"request-timeout": "200"}, expect=500
            )
            took = trio.current_time() - t0
            assert late.status.message.startswith("timeout:"), late
            assert "200 ms" in late.status.message, late
            assert 0.19 <= took < 2.0, took
            assert await proxy.value("counter", "get") == before  # the actor took the next call
        ok = await proxy.invoke("counter", "slow", i64(10), metadata={"request-timeout": "5000"})
        assert value_of(ok) == i64(10)
        assert proxy.pool.connections_opened_total == opened  # one keep-alive connection


async def test_a_call_still_running_when_the_node_stops_is_answered_503(
    spawn_host: HostProc,
) -> None:
    """A call whose turn outlives the node's drain grace is cut when the node stops: its
    caller gets HTTP 503 with an InvocationResponse ERROR (``shutting_down``: it may have
    run), not a connection closed without an answer."""
    req = pb.InvocationRequest(action_name="slow")
    req.system.name = SYSTEM
    req.actor.id.name, req.actor.id.system = "counter", SYSTEM
    req.value.type_url, req.value.value = i64(5_000)
    answer: list[tuple[int, bytes]] = []

    async def call(port: int) -> None:
        caller = HttpPool("127.0.0.1", port)  # its connection outlives the node
        answer.append(await caller.post(
            f"/api/v1/system/{SYSTEM}/actors/counter/invoke", req.SerializeToString()
        ))

    async def started() -> bool:
        return any(t["action"] == "slow" for t in await _turns_of(spawn_host, "counter"))

    with trio.fail_after(20):
        # the node closes first (drained for 200 ms, then its services cancelled), then the
        # nursery waits for the caller's answer
        async with (
            trio.open_nursery() as nursery,
            spawn_node(spawn_host, **{"actors.shutdown_grace_ms": 200}) as proxy,
        ):
            nursery.start_soon(call, proxy.port)
            await wait_until(started, "the slow turn to start at the host")
    [(status, body)] = answer
    resp = pb.InvocationResponse.FromString(body)
    assert status == 503, (status, resp)
    assert resp.status.status == pb.ERROR
    assert resp.status.message.startswith("shutting_down:"), resp
    assert "may have run" in resp.status.message


async def test_workflows_effects_broadcast_pipe_forward_checkpoint(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:
        store = proxy.node.store
        await proxy.invoke("counter", "effect", i64(3), metadata={"trace": "t-2"})
        # the side effect ran on sink with the turn's metadata under its own
        await wait_until(lambda: _sink_is(proxy, 3), "the side effect on sink")
        sink_turns = [t for t in await spawn_host.turns() if t["actor"] == "sink"]
        assert sink_turns[-1]["action"] == "add"
        assert sink_turns[-1]["metadata"] == {"trace": "t-2", "effect": "1"}
        assert sink_turns[-1]["caller"] == f"{SYSTEM}/counter"
        # broadcast: sink subscribes to "news" with its heard action
        await proxy.invoke("counter", "broadcast", i64(4))
        await wait_until(lambda: _sink_is(proxy, 7), "the broadcast to sink")
        assert [t["action"] for t in await _turns_of(spawn_host, "sink")][-1] == "heard"
        # pipe: counter's output (2 * 10) goes to echo (+1); forward: its input (2) does
        assert await proxy.value("counter", "pipe", i64(2)) == i64(21)
        assert await proxy.value("counter", "forward", i64(2)) == i64(3)
        # checkpoint: durable before the reply although counter writes behind every 60 s
        await proxy.invoke("counter", "checkpoint", count(42))
        stored = await store.load((SYSTEM, "counter"))
        assert stored is not None and count(42)[1] in stored.blob


async def _sink_is(proxy: Proxy, n: int) -> bool:
    return await proxy.value("sink", "get") == count(n)


async def test_unnamed_and_pooled_actors(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:
        spawned = await proxy.spawn("c1", parent="cart")
        assert spawned.status.status == pb.OK and spawned.status.message == "Accepted"
        assert await proxy.value("c1", "add", i64(2)) == count(2)
        # register_ref: spawned lazily by the invocation itself
        assert await proxy.value("c2", "add", i64(5), register_ref="cart") == count(5)
        assert await proxy.value("c2", "add", i64(1)) == count(6)  # by name from now on
        seen = json_of(await proxy.invoke("c1", "whoami"))
        assert seen["self"] == [SYSTEM, "c1", "cart"]  # turns carry the parent
        cart_turns = [t for t in await spawn_host.turns() if t["parent"] == "cart"]
        assert {t["actor"] for t in cart_turns} == {"c1", "c2"}
        # an unknown template is refused
        refused = await proxy.spawn("c9", parent="nope", expect=500)
        assert refused.status.status == pb.ERROR
        # a pool's instances carry the pool as parent
        work = json_of(await proxy.invoke("pool", "work"))
        assert work["parent"] == "pool" and work["name"].startswith("pool#")


async def test_async_invocations_in_order_and_scheduled(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:
        letters = "abcdefghijklmnopqrst"
        for ch in letters:
            resp = await proxy.invoke("log", "append", text(ch), is_async=True)
            assert resp.WhichOneof("payload") is None  # replied at once, no payload
        want = (
            "type.googleapis.com/spawntck.Log",
            wr.StringValue(value=letters).SerializeToString(),
        )
        await wait_until(lambda: _value_is(proxy, "log", want), "20 async appends in order")
        # scheduled_to is Unix epoch milliseconds
        at = wall_ms() + 600
        resp = await proxy.invoke("log", "append", text("!"), scheduled_to=at)
        assert resp.WhichOneof("payload") is None
        early = await proxy.value("log", "get")
        if wall_ms() < at - 50:  # (a heavily loaded machine may have got past it already)
            assert early == want  # not yet
        want2 = (want[0], wr.StringValue(value=letters + "!").SerializeToString())
        await wait_until(lambda: _value_is(proxy, "log", want2), "the scheduled append")
        assert wall_ms() >= at


async def _value_is(proxy: Proxy, actor: str, want: Parts) -> bool:
    return await proxy.value(actor, "get") == want


async def test_async_and_scheduled_invocations_of_an_unknown_actor_answer_error(
    spawn_host: HostProc,
) -> None:
    """Spawn's proxy looks the actor up before it queues a fire-and-forget invocation (eigr/spawn
    ``caller_consumer.ex``): an unknown actor is an ERROR InvocationResponse, as for a call,
    and so is a template of unnamed actors; known actors (named, a spawned instance, one
    named by ``register_ref``) are queued and answered OK."""
    async with spawn_node(spawn_host) as proxy:
        ways: list[dict[str, Any]] = [{"is_async": True}, {"scheduled_to": wall_ms() + 60_000}]
        for kw in ways:
            missing = await proxy.invoke("nobody", "x", expect=500, **kw)
            assert missing.status.message.startswith("actor_not_found:"), missing
            template = await proxy.invoke("cart", "add", i64(1), expect=500, **kw)
            assert template.status.message.startswith("invalid_argument:"), template
        await proxy.spawn("c7", parent="cart")
        await proxy.invoke("c7", "add", i64(2), is_async=True)
        await proxy.invoke("c8", "add", i64(3), is_async=True, register_ref="cart")
        await proxy.invoke("log", "append", text("x"), scheduled_to=wall_ms() + 50)
        await wait_until(lambda: _value_is(proxy, "c7", count(2)), "the async add on c7")
        await wait_until(lambda: _value_is(proxy, "c8", count(3)), "the async add on c8")
        want = ("type.googleapis.com/spawntck.Log", wr.StringValue(value="x").SerializeToString())
        await wait_until(lambda: _value_is(proxy, "log", want), "the scheduled append")


async def test_timer_actions_repeat_every_interval_in_ms(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:
        # ticker was activated at registration; its timer (100 "seconds") runs every 100 ms:
        # six ticks come within seconds (not 100 s apart), and never more often than the
        # interval allows (not every 100 us)
        t0 = trio.current_time()
        await wait_until(lambda: _ticks(spawn_host, 6), "six ticks")
        await trio.sleep(0.3)
        n = len(await _turns_of(spawn_host, "ticker"))
        assert n <= (trio.current_time() - t0) / 0.1 + 5, n
        assert await proxy.value("ticker", "get") is not None


async def _ticks(host: HostProc, n: int) -> bool:
    return len(await _turns_of(host, "ticker")) >= n


async def test_reregistration_merges_and_keeps_live_state(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:
        assert await proxy.value("counter", "add", i64(1)) == count(106)
        await proxy.spawn("c1", parent="cart")
        assert await proxy.value("c1", "add", i64(7)) == count(7)
        outcome = await spawn_host.register(proxy.port, variant="v2")
        assert outcome["status"] == "OK"
        assert await proxy.value("late", "hello") == text("late")  # the new actor
        assert await proxy.value("counter", "add", i64(1)) == count(107)  # state kept
        assert await proxy.value("c1", "add", i64(1)) == count(8)  # instance kept
        inits = [t for t in await _turns_of(spawn_host, "counter") if t["action"] == "init"]
        assert len(inits) == 1  # the live activation was not restarted


async def test_spawn_with_revision_restores_that_revision(
    spawn_host: HostProc, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    async with spawn_node(
        spawn_host,
        **{
            "statestore.url": url,
            "statestore.allow_plaintext": True,
            "statestore.history_keep": 10,
        },
    ) as proxy:
        store = proxy.node.store
        await proxy.spawn("c5", parent="cart")
        for n in (1, 2, 3):  # cart checkpoints every turn: revisions 1, 2, 3
            await proxy.invoke("c5", "add", i64(n))
        assert await proxy.value("c5", "get") == count(6)
        history = await store.history((SYSTEM, "c5"))  # type: ignore[attr-defined]
        assert [h.revision for h in history] == [1, 2, 3]
        resp = await proxy.spawn("c5", parent="cart", revision=2)
        assert resp.status.status == pb.OK
        assert await proxy.value("c5", "get") == count(3)  # 1 + 2, as at revision 2
        assert await proxy.value("c5", "add", i64(10)) == count(13)
        bad = await proxy.spawn("c5", parent="cart", revision=99, expect=500)
        assert "revision 99" in bad.status.message


async def test_nested_call_from_an_action_joins_the_call_chain(spawn_host: HostProc) -> None:
    async with spawn_node(spawn_host) as proxy:

        def call(actor: str, action: str, value: Parts, system: str = SYSTEM) -> Parts:
            return json_parts(
                {
                    "system": system,
                    "actor": actor,
                    "action": action,
                    "type_url": value[0],
                    "value": base64.b64encode(value[1]).decode(),
                }
            )

        # counter asks echo from inside its action (caller = counter)
        assert await proxy.value("counter", "call", call("echo", "echo", i64(1))) == i64(2)
        seen = json_of(await proxy.invoke("counter", "call", call("echo", "whoami", i64(0))))
        assert seen["caller"] == [SYSTEM, "counter"]
        # calling back into itself is a cycle, reported at once instead of a deadlock
        with trio.fail_after(5):
            back = json_of(await proxy.invoke("counter", "call", call("counter", "get", i64(0))))
        assert back["error"].startswith("call_cycle:")


async def test_spawn_and_grpc_hosted_actors_call_each_other(spawn_host: HostProc) -> None:
    from spawnmesh.host.convert import from_any
    from spawnmesh.host.gen.spawnmesh.tck.v1 import Value
    from spawnmesh.testing.host_conformance import open_host_harness

    grpc_host = [sys.executable, str(ROOT / "examples/hosts/grpclib_host.py")]
    overrides = {
        "spawn.enabled": True,
        "spawn.port": 0,
        "spawn.user_function_port": spawn_host.port,
    }
    async with open_host_harness(grpc_host, overrides=overrides) as h:
        proxy = Proxy(h.node, h.node.spawn_proxy.port)
        try:
            await spawn_host.reset()
            outcome = await spawn_host.register(proxy.port, extra="tck")
            assert outcome["status"] == "OK" and outcome["extra"] == "OK", outcome
            # a gRPC-hosted actor (tck/counter, over a Connect stream) calls a Spawn actor
            # (tck/spawnee) from inside its turn: its tck.Value goes there and back
            got = await h.ref("counter").invoke("call", Value(n=3, text="spawnee"))
            assert from_any(got, Value) == Value(n=3, text="nested")
            turn = [t for t in await spawn_host.turns() if t["actor"] == "spawnee"][-1]
            assert turn["caller"] == "tck/counter" and turn["system"] == "tck"
            # a Spawn actor calls a gRPC-hosted one (tck/echo) from inside its turn
            url = "type.googleapis.com/spawnmesh.tck.v1.Value"
            spec = {
                "system": "tck",
                "actor": "echo",
                "action": "echo",
                "type_url": url,
                "value": base64.b64encode(bytes(Value(n=4, text="hi"))).decode(),
            }
            echoed = await proxy.value("counter", "call", json_parts(spec))
            assert echoed is not None and echoed[0] == url
            assert Value.parse(echoed[1]) == Value(n=4, text="echo:hi")
            # and a Spawn client reaches the gRPC-hosted actor directly
            direct = await proxy.value(
                "echo", "echo", (url, bytes(Value(n=5, text="x"))), system="tck"
            )
            assert direct is not None and Value.parse(direct[1]) == Value(n=5, text="echo:x")
        finally:
            proxy.pool.close()
