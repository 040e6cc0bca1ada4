"""The ops HTTP server over real sockets: routes, error mapping, limits and robustness.

The server runs for real on 127.0.0.1 (ephemeral port) in the test's nursery; the node side is a
fake :class:`OpsBackend` (the system boundary). Clients are real: trio streams speaking HTTP/1.1
through h11, or raw bytes for the malformed cases.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import h11
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from spawnmesh import errors
from spawnmesh.errors import SpawnmeshError
from spawnmesh.ops.http import GRPC_TO_HTTP, METRICS_CONTENT_TYPE, http_status_for, serve_ops
from spawnmesh.ops.metrics import Metrics

# --------------------------------------------------------------------------- fake backend


@dataclass
class InvokeCall:
    system: str
    actor: str
    action: str
    payload: object
    metadata: dict[str, str]
    timeout_ms: int | None
    is_async: bool
    delay_ms: int | None
    parent: str | None


ERROR_ACTIONS: dict[str, SpawnmeshError] = {
    "not_found": errors.ActorNotFound("no actor counter/x"),
    "no_action": errors.ActionNotFound("no action frob"),
    "bad_arg": errors.InvalidArgument("payload must be an int"),
    "timeout": errors.InvocationTimeout("deadline passed"),
    "overloaded": errors.Overloaded("mailbox full"),
    "shutting_down": errors.NodeShuttingDown("draining"),
    "cycle": errors.CallCycle("cycle", ["a", "b", "a"]),
    "stale": errors.StaleActivation("fenced"),
    "failed": errors.ActorFailed("counter/x", "ZeroDivisionError", "division by zero", "tb", "n1"),
    "corrupt": errors.StateCorrupt("cannot decrypt"),
    "generic": SpawnmeshError("something"),
}


@dataclass
class FakeBackend:
    """Implements OpsBackend; records invocations and fails on request."""

    node_name: str = "node-a"
    ready: tuple[bool, list[str]] = (True, [])
    alive: tuple[bool, list[str]] = (True, [])
    metrics: Metrics = field(default_factory=lambda: Metrics("node-a"))
    calls: list[InvokeCall] = field(default_factory=list)
    invoke_gate: trio.Event | None = None
    calls_wanted: int = 0
    calls_reached: trio.Event = field(default_factory=trio.Event)

    def readiness(self) -> tuple[bool, list[str]]:
        return self.ready

    def liveness(self) -> tuple[bool, list[str]]:
        return self.alive

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def node_info(self) -> dict[str, object]:
        return {"name": self.node_name, "systems": ["demo"], "members": 3}

    async def admin_invoke(
        self,
        system: str,
        actor: str,
        action: str,
        payload: object,
        *,
        metadata: dict[str, str],
        timeout_ms: int | None,
        is_async: bool,
        delay_ms: int | None,
        parent: str | None,
    ) -> object:
        self.calls.append(
            InvokeCall(
                system, actor, action, payload, metadata, timeout_ms, is_async, delay_ms, parent
            )
        )
        if len(self.calls) == self.calls_wanted:
            self.calls_reached.set()
        if action in ERROR_ACTIONS:
            raise ERROR_ACTIONS[action]
        if action == "crash":
            raise RuntimeError("bug in the node")
        if action == "unserializable":
            return {"x": object()}
        if action == "wait" and self.invoke_gate is not None:
            await self.invoke_gate.wait()
        return {"echo": payload, "actor": actor}


# --------------------------------------------------------------------------- HTTP client


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A keep-alive HTTP/1.1 client over one trio TCP stream, built on h11."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> Reply:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [("host", "127.0.0.1"), *headers]
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            data += self.conn.send(h11.Data(data=body))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.read_reply()

    async def read_reply(self) -> Reply:
        with trio.fail_after(10):
            response: h11.Response | None = None
            chunks: list[bytes] = []
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    headers = {k.decode(): v.decode() for k, v in response.headers}
                    return Reply(response.status_code, headers, b"".join(chunks))
                elif isinstance(event, h11.InformationalResponse):
                    continue
                else:
                    raise AssertionError(f"unexpected {event!r}")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def fetch(port: int, method: str, target: str, body: bytes | None = None, **kw: Any) -> Reply:
    client = await Client.connect(port)
    try:
        return await client.request(method, target, body, **kw)
    finally:
        await client.aclose()


async def read_until_eof(stream: trio.SocketStream, within_s: float = 10) -> bytes:
    out = bytearray()
    with trio.fail_after(within_s):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break  # reset: the server closed without reading everything
            if not chunk:
                break
            out += chunk
    return bytes(out)


async def raw_exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send raw bytes, optionally half-close, return everything the server sends until EOF."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        try:
            await stream.send_all(data)
            if half_close:
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the server may already have rejected and closed
        return await read_until_eof(stream)
    finally:
        await stream.aclose()


def status_of(raw: bytes) -> int | None:
    if not raw:
        return None
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw[9:12])


# --------------------------------------------------------------------------- fixtures


@dataclass
class Server:
    backend: FakeBackend
    port: int


async def start_server(
    nursery: trio.Nursery, backend: FakeBackend | None = None, **kw: Any
) -> Server:
    backend = backend or FakeBackend()
    kw.setdefault("idle_timeout_s", 5.0)
    port = await nursery.start(partial(serve_ops, backend, "127.0.0.1", 0, **kw))
    return Server(backend, port)


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    yield await start_server(nursery, max_body_bytes=4096)


def invoke_path(system: str = "demo", actor: str = "counter", action: str = "add") -> str:
    return f"/v1/systems/{system}/actors/{actor}/actions/{action}"


# --------------------------------------------------------------------------- routes


async def test_healthz_ok_and_failing(server: Server) -> None:
    r = await fetch(server.port, "GET", "/healthz")
    assert (r.status, r.json()) == (200, {"status": "ok"})
    assert r.headers["content-type"] == "application/json"
    server.backend.alive = (False, ["event loop stalled"])
    r = await fetch(server.port, "GET", "/healthz")
    assert (r.status, r.json()) == (503, {"status": "failing", "reasons": ["event loop stalled"]})


async def test_readyz_ok_and_failing(server: Server) -> None:
    r = await fetch(server.port, "GET", "/readyz")
    assert (r.status, r.json()) == (200, {"status": "ok"})
    server.backend.ready = (False, ["joining cluster", "statestore down"])
    r = await fetch(server.port, "GET", "/readyz")
    assert r.status == 503
    assert r.json() == {"status": "failing", "reasons": ["joining cluster", "statestore down"]}


async def test_probe_that_raises_is_failing_not_fatal(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    def boom() -> tuple[bool, list[str]]:
        raise RuntimeError("probe bug")

    server.backend.readiness = boom  # type: ignore[method-assign]
    r = await fetch(server.port, "GET", "/readyz")
    assert r.status == 503
    assert r.json()["reasons"] == ["readiness check raised RuntimeError"]
    assert (await fetch(server.port, "GET", "/healthz")).status == 200


async def test_head_healthz_has_no_body(server: Server) -> None:
    r = await fetch(server.port, "HEAD", "/healthz")
    assert r.status == 200
    assert r.body == b""
    assert int(r.headers["content-length"]) == len(b'{"status":"ok"}')


async def test_metrics_route_serves_prometheus_text(server: Server) -> None:
    m = server.backend.metrics
    m.observe_invocation("ok", 0.0003)
    m.observe_invocation("timeout", 2.0)
    m.activations_total += 2
    m.add_gauge_source(
        lambda: [("spawnmesh_active_actors", "Activated actors", {"system": "demo"}, 7.0)]
    )
    r = await fetch(server.port, "GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"] == METRICS_CONTENT_TYPE
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    inv = {s.labels["outcome"]: s.value for s in families["spawnmesh_invocations"].samples}
    assert inv == {"ok": 1.0, "timeout": 1.0}
    assert families["spawnmesh_invocation_duration_seconds"].type == "histogram"
    assert families["spawnmesh_activations"].samples[0].value == 2.0
    (active,) = families["spawnmesh_active_actors"].samples
    assert active.labels == {"system": "demo", "node": "node-a"}
    assert active.value == 7.0


async def test_node_info(server: Server) -> None:
    r = await fetch(server.port, "GET", "/v1/node")
    assert r.status == 200
    assert r.json() == {"name": "node-a", "systems": ["demo"], "members": 3}


async def test_unknown_route_is_404_json(server: Server) -> None:
    for target in ("/", "/nope", "/healthz/", "/v1", "/v1/systems/demo/actors/c/actions"):
        r = await fetch(server.port, "GET", target)
        assert r.status == 404, target
        assert r.json()["error"]["code"] == "not_found"
    r = await fetch(server.port, "POST", "/v1/systems//actors/c/actions/add", b"{}")
    assert r.status == 404


async def test_wrong_method_is_405_with_allow(server: Server) -> None:
    r = await fetch(server.port, "POST", "/healthz", b"")
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = await fetch(server.port, "GET", invoke_path())
    assert r.status == 405
    assert r.headers["allow"] == "POST"
    r = await fetch(server.port, "DELETE", "/metrics")
    assert r.status == 405


async def test_query_string_is_ignored(server: Server) -> None:
    r = await fetch(server.port, "GET", "/healthz?verbose=1")
    assert r.status == 200


# --------------------------------------------------------------------------- invoke


async def test_invoke_passes_every_field(server: Server) -> None:
    body = {
        "payload": {"n": 5, "tags": ["x"]},
        "metadata": {"trace": "abc"},
        "timeout_ms": 1500,
        "async": False,
        "delay_ms": None,
        "parent": "parent-1",
    }
    r = await fetch(server.port, "POST", invoke_path(), json.dumps(body).encode())
    assert r.status == 200
    assert r.json() == {"value": {"echo": {"n": 5, "tags": ["x"]}, "actor": "counter"}}
    assert server.backend.calls == [
        InvokeCall(
            "demo",
            "counter",
            "add",
            {"n": 5, "tags": ["x"]},
            {"trace": "abc"},
            1500,
            False,
            None,
            "parent-1",
        )
    ]


async def test_invoke_empty_body_uses_defaults(server: Server) -> None:
    r = await fetch(server.port, "POST", invoke_path(action="get"), b"")
    assert r.status == 200
    assert r.json() == {"value": {"echo": None, "actor": "counter"}}
    assert server.backend.calls == [
        InvokeCall("demo", "counter", "get", None, {}, None, False, None, None)
    ]


async def test_invoke_async_and_delay(server: Server) -> None:
    body = json.dumps({"async": True, "delay_ms": 250}).encode()
    r = await fetch(server.port, "POST", invoke_path(), body)
    assert r.status == 200
    call = server.backend.calls[0]
    assert (call.is_async, call.delay_ms) == (True, 250)


async def test_invoke_path_parts_are_url_decoded(server: Server) -> None:
    target = invoke_path("my%20system", "user%2F42", "caf%C3%A9")
    r = await fetch(server.port, "POST", target, b"{}")
    assert r.status == 200
    call = server.backend.calls[0]
    assert (call.system, call.actor, call.action) == ("my system", "user/42", "café")


async def test_invoke_path_with_bad_utf8_is_400(server: Server) -> None:
    r = await fetch(server.port, "POST", invoke_path(actor="%FF"), b"{}")
    assert r.status == 400
    assert r.json()["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize(
    ("action", "status"),
    [
        ("not_found", 404),
        ("no_action", 404),
        ("bad_arg", 400),
        ("timeout", 504),
        ("overloaded", 429),
        ("shutting_down", 503),
        ("cycle", 409),
        ("stale", 409),
        ("failed", 500),
        ("corrupt", 500),
        ("generic", 500),
    ],
)
async def test_invoke_error_mapping(server: Server, action: str, status: int) -> None:
    r = await fetch(server.port, "POST", invoke_path(action=action), b"{}")
    assert r.status == status
    assert r.json() == {"error": ERROR_ACTIONS[action].to_wire()}


def test_every_error_class_has_an_http_status() -> None:
    stack: list[type[SpawnmeshError]] = [SpawnmeshError]
    seen = []
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
        assert cls.grpc_status in GRPC_TO_HTTP, cls
    assert len(seen) > 10
    assert http_status_for(errors.Overloaded("x")) == 429


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'"just a string"',
        b"\xff\xfe garbage",
        b'{"payload": NaN}',
        b"[" * 100_000,
        b'{"metadata": "x"}',
        b'{"metadata": {"k": 1}}',
        b'{"timeout_ms": "100"}',
        b'{"timeout_ms": true}',
        b'{"timeout_ms": 0}',
        b'{"timeout_ms": 1.5}',
        b'{"delay_ms": -1}',
        b'{"async": "yes"}',
        b'{"parent": 7}',
        b'{"payloda": 1}',
    ],
)
async def test_invoke_bad_body_is_400(nursery: trio.Nursery, body: bytes) -> None:
    srv = await start_server(nursery)  # default 1 MiB body limit for the deep-nesting case
    r = await fetch(srv.port, "POST", invoke_path(), body)
    assert r.status == 400, r.body
    err = r.json()["error"]
    assert err["code"] == "invalid_argument"
    assert isinstance(err["message"], str) and err["message"]
    assert srv.backend.calls == []


async def test_handler_exception_is_500_and_server_survives(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="spawnmesh.ops.http"):
        r = await fetch(server.port, "POST", invoke_path(action="crash"), b"{}")
    assert r.status == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal error"}}
    assert any("failed" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    r = await fetch(server.port, "POST", invoke_path(action="unserializable"), b"{}")
    assert r.status == 500
    assert (await fetch(server.port, "GET", "/healthz")).status == 200


# --------------------------------------------------------------------------- limits


async def test_body_too_large_by_content_length_is_413_without_reading(server: Server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = (
        f"POST {invoke_path()} HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n"
    ).encode()
    await stream.send_all(head + b"{" * 1000)  # only a sliver of the announced 100 MB
    raw = await read_until_eof(stream)
    await stream.aclose()
    assert status_of(raw) == 413
    assert b"connection: close" in raw.lower()
    assert b'"payload_too_large"' in raw
    assert server.backend.calls == []
    assert (await fetch(server.port, "GET", "/healthz")).status == 200


async def test_chunked_body_too_large_is_413(server: Server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = f"POST {invoke_path()} HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    await stream.send_all(head.encode() + chunk + chunk)
    raw = await read_until_eof(stream)
    await stream.aclose()
    assert status_of(raw) == 413
    assert server.backend.calls == []


async def test_body_at_limit_is_accepted(server: Server) -> None:
    payload = "x" * (4096 - len('{"payload":""}'))
    body = json.dumps({"payload": payload}, separators=(",", ":")).encode()
    assert len(body) == 4096
    r = await fetch(server.port, "POST", invoke_path(), body)
    assert r.status == 200


async def test_expect_100_continue(server: Server) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = (
        f"POST {invoke_path()} HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
        "expect: 100-continue\r\nconnection: close\r\n\r\n"
    )
    await stream.send_all(head.encode())
    with trio.fail_after(5):
        first = await stream.receive_some(65536)
    assert first.startswith(b"HTTP/1.1 100 ")
    await stream.send_all(b"{}")
    raw = await read_until_eof(stream)
    await stream.aclose()
    rest = first[first.index(b"\r\n\r\n") + 4 :] + raw
    assert status_of(rest) == 200


async def test_oversized_head_is_rejected(server: Server) -> None:
    raw = await raw_exchange(
        server.port, b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
    )
    assert status_of(raw) in (400, 431)


async def test_malformed_request_is_400_and_closed_then_server_serves(server: Server) -> None:
    for junk in (
        b"this is not http\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n",
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(junk)  # no half-close: the server itself must close
        raw = await read_until_eof(stream)
        await stream.aclose()
        assert status_of(raw) == 400, (junk, raw)
        assert b"connection: close" in raw.lower()
    assert (await fetch(server.port, "GET", "/healthz")).status == 200


async def test_unknown_http_version_is_505(server: Server) -> None:
    raw = await raw_exchange(server.port, b"GET /healthz HTTP/9.9\r\n\r\n", half_close=False)
    assert status_of(raw) == 505
    assert (await fetch(server.port, "GET", "/healthz")).status == 200


async def test_http10_request_is_answered_and_closed(server: Server) -> None:
    raw = await raw_exchange(server.port, b"GET /healthz HTTP/1.0\r\n\r\n", half_close=False)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b'{"status":"ok"}')


async def test_keep_alive_serves_many_requests_on_one_connection(server: Server) -> None:
    client = await Client.connect(server.port)
    try:
        for i in range(5):
            r = await client.request("GET", "/healthz")
            assert r.status == 200
            body = json.dumps({"payload": i}).encode()
            r = await client.request("POST", invoke_path(), body)
            assert r.json()["value"]["echo"] == i
        r = await client.request("GET", "/nope")  # errors keep the connection too
        assert r.status == 404
        r = await client.request("GET", "/metrics")
        assert r.status == 200
    finally:
        await client.aclose()
    assert len(server.backend.calls) == 5


async def test_pipelined_requests(server: Server) -> None:
    req = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"
    last = b"GET /v1/node HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    raw = await raw_exchange(server.port, req * 3 + last, half_close=False)
    assert raw.count(b"HTTP/1.1 200 ") == 4
    assert raw.endswith(b'"members":3}')


async def test_fifty_concurrent_clients(server: Server) -> None:
    gate = trio.Event()
    server.backend.invoke_gate = gate
    server.backend.calls_wanted = 50
    results: list[int] = []

    async def one(i: int) -> None:
        body = json.dumps({"payload": i}).encode()
        r = await fetch(server.port, "POST", invoke_path(action="wait"), body)
        assert r.json()["value"]["echo"] == i
        results.append(r.status)

    async with trio.open_nursery() as n:
        for i in range(50):
            n.start_soon(one, i)
        with trio.fail_after(10):
            await server.backend.calls_reached.wait()  # all 50 are in flight at once
        gate.set()
    assert results == [200] * 50


async def test_max_connections_makes_extra_clients_wait(nursery: trio.Nursery) -> None:
    srv = await start_server(nursery, max_connections=2)
    idle = [await trio.open_tcp_stream("127.0.0.1", srv.port) for _ in range(2)]
    await trio.sleep(0.1)  # both accepted and holding their slots
    third = await Client.connect(srv.port)  # queued in the kernel backlog
    got: list[Reply] = []
    answered = trio.Event()

    async def ask() -> None:
        got.append(await third.request("GET", "/healthz"))
        answered.set()

    async with trio.open_nursery() as n:
        n.start_soon(ask)
        await trio.sleep(0.3)
        assert got == []  # not served while two connections are open
        await idle[0].aclose()
        with trio.fail_after(5):
            await answered.wait()
    assert got[0].status == 200
    await idle[1].aclose()
    await third.aclose()


async def test_idle_connection_is_closed_after_timeout(nursery: trio.Nursery) -> None:
    srv = await start_server(nursery, idle_timeout_s=0.2)
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    raw = await read_until_eof(stream, within_s=5)
    assert raw == b""  # closed silently: no request was under way
    await stream.aclose()


async def test_slow_client_gets_408(nursery: trio.Nursery) -> None:
    srv = await start_server(nursery, idle_timeout_s=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    with trio.move_on_after(5):
        await stream.send_all(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(10):  # drip a header every 0.1 s: never completes in time
            await trio.sleep(0.1)
            try:
                await stream.send_all(b"x-drip: 1\r\n")
            except trio.BrokenResourceError:
                break
    raw = await read_until_eof(stream, within_s=5)
    await stream.aclose()
    assert status_of(raw) == 408
    assert (await fetch(srv.port, "GET", "/healthz")).status == 200


async def test_keep_alive_connection_idles_out_between_requests(nursery: trio.Nursery) -> None:
    srv = await start_server(nursery, idle_timeout_s=0.2)
    client = await Client.connect(srv.port)
    assert (await client.request("GET", "/healthz")).status == 200
    assert await read_until_eof(client.stream, within_s=5) == b""
    await client.aclose()


async def test_slow_handler_is_not_cut_by_idle_timeout(nursery: trio.Nursery) -> None:
    backend = FakeBackend()
    backend.invoke_gate = trio.Event()
    srv = await start_server(nursery, backend, idle_timeout_s=0.2)

    async def release() -> None:
        await trio.sleep(0.5)
        assert backend.invoke_gate is not None
        backend.invoke_gate.set()

    nursery.start_soon(release)
    r = await fetch(srv.port, "POST", invoke_path(action="wait"), b"{}")
    assert r.status == 200


async def test_cancelling_serve_ops_closes_the_listener() -> None:
    backend = FakeBackend()
    async with trio.open_nursery() as n:
        port = await n.start(partial(serve_ops, backend, "127.0.0.1", 0))
        client = await Client.connect(port)  # an open keep-alive connection
        assert (await client.request("GET", "/healthz")).status == 200
        n.cancel_scope.cancel()
    assert await read_until_eof(client.stream) == b""
    await client.aclose()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


async def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        await serve_ops(FakeBackend(), "127.0.0.1", 0, max_connections=0)


# --------------------------------------------------------------------------- property


@settings(
    max_examples=75,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    junk=st.lists(
        st.one_of(
            st.binary(max_size=300),
            # Bytes that start like HTTP, so h11 gets past the request line more often.
            st.builds(
                lambda m, rest: m + rest,
                st.sampled_from(
                    [
                        b"GET / HTTP/1.1\r\n",
                        b"POST /v1/systems/a/actors/b/actions/c HTTP/1.1\r\n",
                        b"GET /healthz HTTP/1.0\r\n",
                        b"PUT /metrics HTTP/1.1\r\nhost: x\r\n",
                    ]
                ),
                st.binary(max_size=200),
            ),
        ),
        min_size=1,
        max_size=3,
    )
)
async def test_arbitrary_bytes_never_break_the_server(junk: list[bytes]) -> None:
    backend = FakeBackend()
    errors_logged = _ErrorRecorder()
    logger = logging.getLogger("spawnmesh.ops.http")
    logger.addHandler(errors_logged)
    try:
        await _garbage_then_healthz(backend, junk)
    finally:
        logger.removeHandler(errors_logged)
    assert errors_logged.records == []  # garbage is a client problem, never a server error


class _ErrorRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


async def _garbage_then_healthz(backend: FakeBackend, junk: list[bytes]) -> None:
    async with trio.open_nursery() as n:
        port = await n.start(
            partial(serve_ops, backend, "127.0.0.1", 0, idle_timeout_s=2.0, max_body_bytes=1024)
        )
        for data in junk:
            raw = await raw_exchange(port, data)
            if raw:
                status = status_of(raw)
                assert status is not None and status != 500, raw[:200]
        r = await fetch(port, "GET", "/healthz")
        assert (r.status, r.json()) == (200, {"status": "ok"})
        n.cancel_scope.cancel()
