"""Spawn compatibility, piece by piece: values across the wire, the turn's messages (built and
read, garbage included), the pooled HTTP client against the proxy's HTTP server, and the proxy's
routes and refusals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnmesh.codec import codec_for, to_builtins
from spawnmesh.config import load_config
from spawnmesh.errors import ConfigError, HostUnavailable, InvalidArgument
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.spawnmesh.tck.v1 import Value
from spawnmesh.ids import ActorId
from spawnmesh.mesh.router import decode_reply, decode_value, encode_value
from spawnmesh.node import open_node
from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as pb
from spawnmesh.spawn_compat.http_client import HttpPool
from spawnmesh.spawn_compat.http_server import Request, Response, serve_http, split_target
from spawnmesh.spawn_compat.turns import build_invocation, read_response
from spawnmesh.spawn_compat.values import (
    RawAny,
    SpawnState,
    any_parts,
    initial_state,
    raw_from_builtins,
    type_url_for,
)
from tests.conftest import test_config

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
urls = st.text(max_size=60)
blobs = st.binary(max_size=200)
maps = st.dictionaries(names, names, max_size=4)
ids = st.builds(
    ActorId, names.filter(bool), names.filter(bool), st.one_of(st.none(), names.filter(bool))
)


# ---------------------------------------------------------------------------- values


@given(urls, blobs)
def test_raw_any_crosses_the_wire_byte_for_byte(url: str, data: bytes) -> None:
    raw = RawAny(type_url=url, value=data)
    wire = encode_value(raw)  # what the router sends to a peer
    back = decode_value(wire)  # the owner without a payload type: builtins
    assert raw_from_builtins(back) == (url, data)
    assert any_parts(back) == (url, data)
    typed = decode_reply(wire, RawAny)  # a reply, with the action's reply type
    assert isinstance(typed, RawAny) and (typed.type_url, typed.value) == (url, data)
    assert bytes(raw) == bytes(AnyMsg(type_url=url, value=data))  # still an Any on the wire


@given(
    st.one_of(
        st.none(),
        st.integers(),
        names,
        st.dictionaries(names, st.integers()),
        st.lists(st.integers()),
    )
)
def test_raw_from_builtins_takes_only_its_own_form(value: Any) -> None:
    assert raw_from_builtins(value) is None
    with pytest.raises(InvalidArgument):
        RawAny.from_dict(value)


def test_any_parts_of_every_kind_of_value() -> None:
    assert any_parts(None) is None
    assert any_parts(AnyMsg(type_url="x/y", value=b"\x01")) == ("x/y", b"\x01")
    google_any = pb.InvocationRequest().value
    google_any.type_url, google_any.value = "a/b", b"\x02"
    assert any_parts(google_any) == ("a/b", b"\x02")
    url, data = any_parts(Value(n=3, text="t")) or ("", b"")
    assert url == "type.googleapis.com/spawnmesh.tck.v1.Value"
    assert Value.parse(data) == Value(n=3, text="t")
    url, data = any_parts({"a": 1}) or ("", b"")
    assert url == "type.googleapis.com/spawn.JSONType"
    assert json.loads(pb.JSONType.FromString(data).content) == {"a": 1}
    state = SpawnState(True, "s/t", b"\x09", {"k": "v"})
    assert any_parts(state) == ("s/t", b"\x09")


@given(st.booleans(), urls, blobs, maps)
def test_spawn_state_is_stored_as_msgpack_and_read_back(
    present: bool, url: str, data: bytes, tags: dict[str, str]
) -> None:
    codec = codec_for(SpawnState)
    state = SpawnState(present, url, data, tags)
    assert codec.decode(codec.encode(state)) == state
    assert to_builtins(state)["tags"] == tags  # the CLI and HTTP can show it


def test_spawn_state_updates() -> None:
    s = SpawnState(True, "u", b"1", {"a": "1"})
    assert s.with_any(None, {"a": "1"}) is s  # nothing changed: the same value
    assert s.with_any(("u", b"1"), {"a": "1"}) is s
    t = s.with_any(None, {})  # the host's tags replace the old ones, even when empty
    assert t.any() == ("u", b"1") and t.tags == {}
    u = SpawnState().with_any(("v", b""), {"b": "2", "a": "1"})
    assert u.any() == ("v", b"") and list(u.tags) == ["a", "b"]  # sorted: stable bytes
    assert SpawnState().any() is None


def test_initial_state_from_the_registration() -> None:
    assert initial_state(("u", b"\x08\x05"), "x.Y", {"t": "1"}) == SpawnState(
        True, "u", b"\x08\x05", {"t": "1"}
    )
    # no registered state: an empty message of state_type (zero bytes), as Spawn packs it
    assert initial_state(None, "io.eigr.State", {}).any() == (
        "type.googleapis.com/io.eigr.State",
        b"",
    )
    assert initial_state(None, "", {}).any() is None
    assert type_url_for("my.host/x.Y") == "my.host/x.Y"


# ---------------------------------------------------------------------------- turn messages


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    ids,
    names.filter(bool),
    st.one_of(st.none(), st.tuples(urls, blobs)),
    maps,
    maps,
    st.one_of(st.none(), ids),
    st.one_of(st.none(), st.tuples(urls, blobs)),
)
def test_build_invocation_round_trip(
    sid: ActorId, action: str, state: Any, tags: Any, meta: Any, caller: Any, payload: Any
) -> None:
    inv = pb.ActorInvocation.FromString(
        build_invocation(sid, action, state, tags, meta, caller, payload)
    )
    assert (inv.actor.system, inv.actor.name, inv.actor.parent or None) == sid
    assert (inv.current_context.self.name, inv.current_context.self.parent or None) == (
        sid.name,
        sid.parent,
    )
    assert inv.action_name == action
    ctx = inv.current_context
    assert dict(ctx.metadata) == meta and dict(ctx.tags) == tags
    assert ctx.HasField("state") == (state is not None)
    if state is not None:
        assert (ctx.state.type_url, ctx.state.value) == state
    if caller is None:
        assert not inv.HasField("caller") and not ctx.HasField("caller")
    else:
        assert (inv.caller.name, ctx.caller.name) == (caller.name, caller.name)
    if payload is None:
        assert inv.WhichOneof("payload") == "noop"
    else:
        assert (inv.value.type_url, inv.value.value) == payload


@given(blobs)
def test_read_response_of_garbage_fails_cleanly(data: bytes) -> None:
    sid = ActorId("s", "a")
    try:
        read_response(data, sid, {}, 0)
    except InvalidArgument:
        pass


def test_read_response_maps_spawns_workflow() -> None:
    sid = ActorId("sys", "a")
    resp = pb.ActorInvocationResponse(checkpoint=True)
    resp.updated_context.tags["t"] = "1"
    resp.value.type_url, resp.value.value = "u/v", b"\x01"
    eff = resp.workflow.effects.add().request
    eff.actor.id.name = "b"
    eff.action_name = "go"
    eff.metadata["x"] = "effect"
    eff.metadata["both"] = "effect"
    eff.scheduled_to = 10_500
    eff.register_ref = "tmpl"
    eff.noop.SetInParent()
    resp.workflow.broadcast.channel_group = "news"
    resp.workflow.broadcast.value.type_url = "b/c"
    resp.workflow.forward.actor = "c"
    resp.workflow.forward.action_name = "go"
    res = read_response(resp.SerializeToString(), sid, {"both": "turn", "y": "turn"}, 10_000)
    assert res.has_context and res.state is None and res.tags == {"t": "1"}
    assert res.value == ("u/v", b"\x01") and res.checkpoint
    [e] = res.effects
    assert e.target == ActorId("sys", "b", "tmpl") and e.action == "go" and e.payload is None
    assert e.metadata == {"both": "effect", "x": "effect", "y": "turn"}  # effect's wins
    assert e.delay_ms == 500
    assert res.broadcast == ("news", ("b/c", b""), "")
    assert res.route is not None and not res.route.pipe
    assert res.route.target == ActorId("sys", "c") and res.route.action == "go"
    bare = read_response(b"", sid, {}, 0)  # an empty answer: nothing changes, no value
    assert not bare.has_context and bare.value is None and bare.route is None
    bad = pb.ActorInvocationResponse()
    bad.workflow.pipe.actor = "x"
    with pytest.raises(InvalidArgument):
        read_response(bad.SerializeToString(), sid, {}, 0)


# ---------------------------------------------------------------------------- HTTP


@asynccontextmanager
async def http_server(handler: Any, **kw: Any) -> AsyncIterator[int]:
    """Serve ``handler`` on a free loopback port (bodies up to 1000 bytes) for the block."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            lambda task_status: serve_http(
                handler, "127.0.0.1", 0, max_body_bytes=1000, task_status=task_status, **kw
            )
        )
        yield port
        nursery.cancel_scope.cancel()


async def echo(req: Request) -> Response:
    if req.path == ["slow"]:
        await trio.sleep(5)
    if req.path == ["big"]:
        return Response(200, b"x" * 5000)
    return Response(
        200,
        req.method.encode()
        + b" "
        + "/".join(req.path).encode()
        + b" "
        + req.query.encode()
        + b" "
        + req.body,
    )


async def _read_response(sock: trio.socket.SocketType, ends: bytes) -> bytes:
    got = b""
    while not got.endswith(ends):
        chunk = await sock.recv(4096)
        assert chunk, got
        got += chunk
    return got


async def test_a_handler_running_when_the_server_stops_is_answered_once_by_on_cut() -> None:
    """The server stopping answers ``on_cut`` for a handler still running (then closes); a
    connection whose last request was already answered (here: cut by its limit) just closes."""

    async def handler(req: Request) -> Response:
        if req.path == ["limited"]:
            req.limit(0.05, lambda: Response(504, b"late"))
        await trio.sleep(10)
        return Response(200, b"never")

    def cut(req: Request) -> Response:
        return Response(503, b"cut:" + "/".join(req.path).encode())

    idle, busy = trio.socket.socket(), trio.socket.socket()
    with idle, busy, trio.fail_after(10):
        async with http_server(handler, on_cut=cut) as port:
            for sock, path in ((idle, b"/limited"), (busy, b"/slow")):
                await sock.connect(("127.0.0.1", port))
                await sock.send(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n" % path)
            first = await _read_response(idle, b"late")
            assert first.startswith(b"HTTP/1.1 504 ")
            await trio.sleep(0.1)  # the slow handler runs; the limited connection waits
        # the server is cancelled
        answer = await _read_response(busy, b"cut:slow")
        assert answer.startswith(b"HTTP/1.1 503 ") and b"connection: close" in answer.lower()
        assert await busy.recv(100) == b""
        assert await idle.recv(100) == b""  # no stray answer for the request cut earlier


async def test_pooled_client_keeps_connections_alive_and_retries_a_stale_one() -> None:
    async with http_server(echo, idle_timeout_s=0.3) as port:
        pool = HttpPool("127.0.0.1", port, max_connections=4, max_response_bytes=4000)
        for i in range(10):
            assert await pool.post(f"/a%20b/{i}?q=1", b"hi") == (
                200,
                f"POST a b/{i} q=1 hi".encode(),
            )
        assert pool.connections_opened_total == 1  # one connection, kept alive
        await trio.sleep(0.5)  # the server closes it as idle; the next request notices
        assert (await pool.post("/x", b""))[0] == 200
        assert pool.connections_opened_total == 2
        # concurrent requests open more connections, up to the bound
        results = []

        async def one() -> None:
            results.append(await pool.post("/c", b"."))

        async with trio.open_nursery() as inner:
            for _ in range(10):
                inner.start_soon(one)
        assert len(results) == 10 and pool.open_connections <= 4
        # a request cut short (the caller's deadline) closes its connection: never reused
        opened = pool.open_connections
        with trio.move_on_after(0.1):
            await pool.post("/slow", b"")
        assert pool.open_connections == opened - 1
        with pytest.raises(HostUnavailable, match="more than 4000"):
            await pool.post("/big", b"")
        # the server refuses a body over its bound before reading it
        assert (await pool.post("/x", b"y" * 2000))[0] == 413
        pool.close()
        with pytest.raises(HostUnavailable):
            await pool.post("/x", b"")


async def bounded(req: Request) -> Response:
    """Handlers that bound themselves with ``Request.limit``."""
    late = Response(504, b"too late")
    if req.path == ["late"]:
        req.limit(0.1, lambda: late)
        await trio.sleep(5)
    elif req.path == ["stubborn"]:  # does not stop at the cut
        req.limit(0.1, lambda: late)
        with trio.CancelScope(shield=True):
            await trio.sleep(0.3)
        return Response(200, b"finished anyway")
    elif req.path == ["quick"]:
        req.limit(0.2, lambda: late)
    return Response(200, b"ok")


async def test_a_handler_past_its_limit_is_cut_and_answered_and_the_connection_goes_on() -> None:
    """``Request.limit``: the reaper cuts a handler at its deadline and the server answers
    ``on_timeout()``; one that outlives the cut is answered as timed out too; a limit whose
    handler finished in time never fires later; the keep-alive connection serves on."""
    async with http_server(bounded) as port:
        pool = HttpPool("127.0.0.1", port)
        for path in ("/late", "/stubborn"):
            t0 = trio.current_time()
            assert await pool.post(path, b"") == (504, b"too late")
            assert 0.1 <= trio.current_time() - t0 < 1.0
            assert await pool.post("/x", b"") == (200, b"ok")
        assert await pool.post("/quick", b"") == (200, b"ok")
        await trio.sleep(0.4)  # past the quick one's limit, the connection waiting
        assert await pool.post("/x", b"") == (200, b"ok")
        assert pool.connections_opened_total == 1
        pool.close()


async def test_server_answers_malformed_http_with_400() -> None:
    async with http_server(echo) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(1000)
                if not chunk:
                    break
                data += chunk
        assert data.startswith(b"HTTP/1.1 400")
        await stream.aclose()


async def test_server_bounds_a_stalled_request_with_408_and_an_idle_connection_silently() -> None:
    """The idle reaper: a request that stops half-way gets 408 and is closed; a quiet
    keep-alive connection is closed without an answer; a busy handler is never cut."""
    async with http_server(echo, idle_timeout_s=0.2) as port:

        async def read_all(stream: trio.SocketStream) -> bytes:
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(1000):
                    data += chunk
            return data

        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        await stalled.send_all(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 10\r\n\r\nabc")
        t0 = trio.current_time()
        assert (await read_all(stalled)).startswith(b"HTTP/1.1 408")
        assert 0.2 <= trio.current_time() - t0 < 1.0
        quiet = await trio.open_tcp_stream("127.0.0.1", port)
        await quiet.send_all(b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\n\r\nz")
        answer = await read_all(quiet)  # the answer, then EOF when it idles out
        assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
        slow = await trio.open_tcp_stream("127.0.0.1", port)  # the handler sleeps 5 s
        await slow.send_all(b"POST /slow HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n")
        with trio.move_on_after(0.6):  # three idle bounds: still waiting for the handler
            assert await slow.receive_some(1000) != b""
        for s in (stalled, quiet, slow):
            await s.aclose()


async def test_client_reports_an_unreachable_host() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    pool = HttpPool("127.0.0.1", port)
    with pytest.raises(HostUnavailable, match="cannot connect"):
        await pool.post("/api/v1/actors/actions", b"")


@given(st.one_of(st.binary(max_size=60), st.text("/abc%20?#=&", max_size=30).map(str.encode)))
def test_split_target_never_raises_and_decodes_every_segment(target: bytes) -> None:
    got = split_target(target)
    raw = target.decode("ascii", "replace")
    path, _, query = raw.split("#", 1)[0].partition("?")
    if not path.startswith("/"):
        assert got is None
        return
    try:  # the reference: every segment URL-decoded (the fast path skips it without a "%")
        want = ([unquote(seg, errors="strict") for seg in path[1:].split("/")], query)
    except UnicodeDecodeError:
        assert got is None
        return
    assert got == want


# ---------------------------------------------------------------------------- the proxy


async def test_proxy_routes_and_refusals() -> None:
    cfg = test_config(**{"spawn.enabled": True, "spawn.port": 0})
    async with open_node(cfg) as node:
        proxy = node.spawn_proxy
        pool = HttpPool("127.0.0.1", proxy.port)
        try:
            assert (await pool.post("/nowhere", b""))[0] == 404
            assert (await pool.post("/api/v1/other", b""))[0] == 404
            # a registration with a kind spawnmesh does not run: every problem named
            req = _registration("sys", kind=4)
            status, body = await pool.post("/api/v1/system", req)
            resp = pb.RegistrationResponse.FromString(body)
            assert status == 500 and resp.status.status == pb.ERROR
            assert "PROXY actors are not supported" in resp.status.message
            # another major protocol version
            status, body = await pool.post("/api/v1/system", _registration("sys", major=2))
            assert "version_mismatch" in pb.RegistrationResponse.FromString(body).status.message
            # spawning needs a registered template
            sreq = pb.SpawnRequest()
            sreq.actors.add(name="i1", system="sys", parent="tmpl")
            status, body = await pool.post(
                "/api/v1/system/sys/actors/spawn", sreq.SerializeToString()
            )
            assert status == 500
            status, body = await pool.post(
                "/api/v1/system/sys/actors/spawn?revision=x", sreq.SerializeToString()
            )
            assert b"revision" in body
            # invocations without an action, or with a bad request-timeout
            ireq = pb.InvocationRequest()
            ireq.system.name = "sys"
            ireq.actor.id.name = "a"
            status, body = await pool.post(
                "/api/v1/system/sys/actors/a/invoke", ireq.SerializeToString()
            )
            assert "names no action" in pb.InvocationResponse.FromString(body).status.message
            assert proxy.readiness()[0]
        finally:
            pool.close()


def _registration(system: str, *, kind: int = 1, major: int = 1) -> bytes:
    req = pb.RegistrationRequest()
    req.service_info.protocol_major_version = major
    req.actor_system.name = system
    a = req.actor_system.registry.actors["a"]
    a.id.name = "a"
    a.settings.kind = kind  # type: ignore[assignment]
    a.actions.add(name="go")
    return req.SerializeToString()


def test_spawn_config_guards() -> None:
    with pytest.raises(ConfigError, match="allow_remote"):
        load_config(overrides={"spawn.enabled": True, "spawn.host": "0.0.0.0"}, env={})
    cfg = load_config(
        overrides={"spawn.enabled": True, "spawn.host": "0.0.0.0", "spawn.allow_remote": True},
        env={},
    )
    assert cfg.spawn.host == "0.0.0.0"
    with pytest.raises(ConfigError, match="both use"):
        load_config(overrides={"spawn.enabled": True, "host.enabled": True}, env={})
    cfg = load_config(
        env={
            "PROXY_HTTP_PORT": "9100",
            "USER_FUNCTION_HOST": "app",
            "USER_FUNCTION_PORT": "8091",
            "PROXY_DEPLOYMENT_MODE": "daemon",
        }
    )
    assert (
        cfg.spawn.port,
        cfg.spawn.user_function_host,
        cfg.spawn.user_function_port,
        cfg.spawn.deployment_mode,
    ) == (9100, "app", 8091, "daemon")
