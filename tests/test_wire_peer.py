"""The trio peer layer over real loopback sockets: requests, pipelining, deadlines, cancellation,
typed errors, frame limits, hostile bytes, authentication, backpressure, connection lifecycle."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

from spawnmesh.errors import (
    AuthenticationFailed,
    ClusterMismatch,
    FrameTooLarge,
    InvalidArgument,
    NotOwner,
    Overloaded,
    PeerUnavailable,
    SpawnmeshError,
    VersionMismatch,
)
from spawnmesh.ids import ActorId
from spawnmesh.keyring import Keyring
from spawnmesh.wire import messages as m
from spawnmesh.wire.codec import FrameDecoder, encode_frame
from spawnmesh.wire.handshake import ClientHandshake, HandshakeConfig
from spawnmesh.wire.peer import PeerLimits, PeerNode

KEY = Keyring([("k1", os.urandom(32))])
FAST_LIMITS = PeerLimits(
    backoff_initial_ms=20, backoff_max_ms=200, connect_timeout_ms=5000, drain_timeout_ms=3000
)


async def eventually(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``cond`` until true (generous bound; no fixed sleeps for correctness)."""
    with trio.fail_after(timeout_s):
        while not cond():  # noqa: ASYNC110 - polling state observed from outside
            await trio.sleep(0.01)


class OddError(SpawnmeshError):
    """An error whose details msgpack cannot encode (a handler bug)."""

    code = "odd"

    def details(self) -> dict[str, Any]:
        return {"thing": object()}


class Handler:
    """Test handler: behaviour by action name; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[m.Request] = []
        self.cancelled: list[int] = []
        self.release = trio.Event()
        self.gates = [trio.Event() for _ in range(20)]
        self.started = 0

    async def __call__(self, req: m.Request, origin: str) -> bytes | None:
        self.seen.append(req)
        action = req.action
        if action == "echo":
            return req.payload
        if action == "origin":
            return origin.encode()
        if action == "sleep":
            await trio.sleep(float(req.payload))
            return req.payload
        if action == "deadline":
            d = trio.current_effective_deadline()
            return msgspec.msgpack.encode(None if d == math.inf else d - trio.current_time())
        if action == "gate":
            self.started += 1
            await self.gates[int(req.payload)].wait()
            return req.payload
        if action == "block":
            self.started += 1
            try:
                await self.release.wait()
            except trio.Cancelled:
                self.cancelled.append(req.id)
                raise
            return b"released"
        if action == "not_owner":
            raise NotOwner("not mine", owner="n3")
        if action == "boom":
            raise ValueError("kaboom")
        if action == "big":
            return b"x" * int(req.payload)
        if action == "none":
            return None
        if action == "str":
            return "not bytes"  # type: ignore[return-value]
        if action == "bytearray":
            return bytearray(b"ba")
        if action == "odd_error":
            raise OddError("odd")
        raise AssertionError(f"unknown test action {action}")


def req(action: str, payload: bytes = b"", *, id: int = 0, **kw: Any) -> m.Request:
    return m.Request(id, "sys", "actor", None, action, payload, **kw)


@asynccontextmanager
async def serving(*nodes: PeerNode) -> AsyncIterator[list[int]]:
    """Serve every node on a free loopback port; close them (draining) at the end."""
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(n.serve, "127.0.0.1", 0) for n in nodes]
        yield ports
        for n in nodes:
            await n.close()


def node(name: str, handler: Handler | None = None, **kw: Any) -> PeerNode:
    kw.setdefault("keyring", KEY)
    kw.setdefault("limits", FAST_LIMITS)
    return PeerNode(
        name, kw.pop("incarnation", 1), kw.pop("cluster", "c"), handler or Handler(), **kw
    )


class RawPeer:
    """A hand-driven peer on a real socket: sans-IO handshake, then arbitrary bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.bodies: list[bytes] = []

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        node_id: str = "raw",
        keyring: Keyring | None = KEY,
        handshake: bool = True,
    ) -> RawPeer:
        peer = cls(await trio.open_tcp_stream("127.0.0.1", port))
        if handshake:
            machine = ClientHandshake(HandshakeConfig("c", node_id, 1, keyring), os.urandom(32))
            await peer.send_raw(b"".join(encode_frame(b) for b in machine.start()))
            while not machine.done:
                body = await peer.next_body()
                assert body is not None, "server closed during handshake"
                out = machine.receive(body)
                await peer.send_raw(b"".join(encode_frame(b) for b in out))
        return peer

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        await self.stream.aclose()

    async def expect_reject(self, code: str) -> m.Reject:
        """The next message must be a Reject with ``code``; then close, as a real peer does."""
        msg = await self.next()
        assert isinstance(msg, m.Reject) and msg.code == code, msg
        await self.close()
        return msg

    async def send(self, *msgs: m.Message) -> None:
        await self.send_raw(b"".join(encode_frame(m.encode(x)) for x in msgs))

    async def next_body(self) -> bytes | None:
        while not self.bodies:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self.bodies.extend(self.decoder.feed(data))
        return self.bodies.pop(0)

    async def next(self, skip: tuple[type, ...] = (m.Ping,)) -> m.Message | None:
        """The next message (None at end of stream)."""
        while True:
            body = await self.next_body()
            if body is None:
                return None
            msg = m.decode(body)
            if not isinstance(msg, skip):
                return msg


# ---------------------------------------------------------------- requests


async def test_requests_flow_both_ways_over_one_connection() -> None:
    a, b = node("a"), node("b")
    async with serving(a, b) as (pa, pb):
        assert await a.request("b", ("127.0.0.1", pb), req("origin")) == b"a"
        assert await b.request("a", f"127.0.0.1:{pa}", req("origin")) == b"b"
        assert a.connected_peers == ["b"] and b.connected_peers == ["a"]
        assert (a.stats.dials, b.stats.dials, b.stats.accepted) == (1, 0, 1)
        assert await a.request("b", ("127.0.0.1", pb), req("none")) is None


async def test_pipelined_requests_complete_out_of_order_and_match_their_replies() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    done: list[int] = []
    async with serving(a, b) as (_, pb):

        async def one(i: int) -> None:
            got = await a.request("b", ("127.0.0.1", pb), req("gate", str(i).encode()))
            assert got == str(i).encode()
            done.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(one, i)
            await eventually(lambda: h.started == 20)  # all 20 in flight at once
            for i in reversed(range(20)):  # answer them in reverse order, one by one
                h.gates[i].set()
                await eventually(lambda: len(done) == 20 - i)  # noqa: B023
        assert done == list(reversed(range(20)))
        assert a.stats.dials == 1 and a.open_connections == 1


async def test_request_fields_arrive_intact() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    async with serving(a, b) as (_, pb):
        sent = m.Request(
            0,
            "sys",
            "inst-1",
            "tmpl",
            "echo",
            b"\x81\xa1k\x01",
            {"trace": "t1"},
            ActorId("sys", "caller"),
            [("sys", "caller")],
            None,
            m.Kind.SCHEDULED,
            1_700_000_000_000,
            1,
        )
        assert await a.request("b", ("127.0.0.1", pb), sent) == b"\x81\xa1k\x01"
        got = h.seen[-1]
        assert got == sent  # id and deadline_ms were set on ``sent`` by request()
        assert got.target == ActorId("sys", "inst-1", "tmpl")


async def test_the_callers_deadline_reaches_the_handler() -> None:
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        with trio.fail_after(30):
            remaining = msgspec.msgpack.decode(
                await a.request("b", ("127.0.0.1", pb), req("deadline"))  # type: ignore[arg-type]
            )
        assert 20 < remaining <= 30
        no_deadline = await a.request("b", ("127.0.0.1", pb), req("deadline"))
        assert msgspec.msgpack.decode(no_deadline) is None  # type: ignore[arg-type]


async def test_a_caller_whose_deadline_passed_sends_nothing() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    async with serving(a, b) as (_, pb):
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"1")) == b"1"
        with trio.CancelScope(deadline=trio.current_time() - 1) as scope:
            await a.request("b", ("127.0.0.1", pb), req("echo", b"2"))
        assert scope.cancelled_caught
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"3")) == b"3"
        assert [r.payload for r in h.seen] == [b"1", b"3"]


async def test_cancelling_the_caller_cancels_the_remote_handler() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    async with serving(a, b) as (_, pb):
        with trio.move_on_after(0.2) as scope:
            await a.request("b", ("127.0.0.1", pb), req("block"))
        assert scope.cancelled_caught
        await eventually(lambda: len(h.cancelled) == 1)
        conn = b.connection("a")
        assert conn is not None
        await eventually(lambda: conn.handling == 0)
        # the connection stays usable, and the next handler runs normally
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"after")) == b"after"


async def test_server_answers_timeout_when_the_deadline_passes_there() -> None:
    h = Handler()
    b = node("b", h)
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await raw.send(m.Request(5, "sys", "actor", None, "block", b"", deadline_ms=50))
        msg = await raw.next()
        assert isinstance(msg, m.Error) and msg.id == 5 and msg.origin == "b"
        assert msg.error["code"] == "timeout"
        assert h.cancelled == [5]
        await raw.close()


async def test_typed_errors_cross_with_their_origin() -> None:
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        with pytest.raises(NotOwner) as info:
            await a.request("b", ("127.0.0.1", pb), req("not_owner"))
        assert (info.value.owner, info.value.origin, info.value.retryable) == ("n3", "b", True)
        with pytest.raises(SpawnmeshError, match="ValueError: kaboom") as boom:
            await a.request("b", ("127.0.0.1", pb), req("boom"))
        assert boom.value.code == "internal" and boom.value.origin == "b"


async def test_handler_bugs_fail_the_request_not_the_connection() -> None:
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        addr = ("127.0.0.1", pb)
        with pytest.raises(SpawnmeshError, match="returned str, not bytes") as info:
            await a.request("b", addr, req("str"))
        assert info.value.code == "internal"
        assert await a.request("b", addr, req("bytearray")) == b"ba"
        with pytest.raises(SpawnmeshError, match="cannot be encoded") as info:
            await a.request("b", addr, req("odd_error"))
        assert info.value.code == "internal"
        with pytest.raises(InvalidArgument, match="cannot be encoded"):
            await a.request("b", addr, req("echo", metadata={"k": object()}))
        assert await a.request("b", addr, req("echo", b"still")) == b"still"
        assert a.stats.dials == 1


async def test_a_malformed_request_or_reply_fails_only_that_request() -> None:
    b = node("b")
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        bad_request = msgspec.msgpack.encode([9, 4, "s", "n", None, "echo", b"", {"k": 1}])
        await raw.send_raw(encode_frame(bad_request))
        msg = await raw.next()
        assert isinstance(msg, m.Error) and msg.id == 4 and msg.error["code"] == "protocol"
        await raw.send(m.Request(5, "s", "n", None, "echo", b"fine"))
        assert await raw.next() == m.Reply(5, b"fine")
        # b -> raw over the same connection; raw answers once with a malformed Reply
        addr = ("127.0.0.1", 1)  # not dialed: the connection from raw is used
        async with trio.open_nursery() as nursery:
            failed: list[BaseException] = []

            async def ask() -> None:
                try:
                    await b.request("raw", addr, req("x"))
                except SpawnmeshError as exc:
                    failed.append(exc)

            nursery.start_soon(ask)
            incoming = await raw.next()
            assert isinstance(incoming, m.Request)
            await raw.send_raw(encode_frame(msgspec.msgpack.encode([10, incoming.id, 42])))
        assert len(failed) == 1 and failed[0].code == "protocol"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.request, "raw", addr, req("y"))
            incoming = await raw.next()
            assert isinstance(incoming, m.Request)
            await raw.send(m.Reply(incoming.id, b"ok"))
        await raw.close()


# ---------------------------------------------------------------- frame limits, hostile bytes


async def test_an_oversized_request_fails_locally_and_the_connection_survives() -> None:
    a = node("a")
    b = node("b", limits=PeerLimits(max_frame_bytes=4096))
    async with serving(a, b) as (_, pb):
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"x" * 3000))
        with pytest.raises(FrameTooLarge):
            await a.request("b", ("127.0.0.1", pb), req("echo", b"x" * 5000))
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"ok")) == b"ok"
        assert a.stats.dials == 1


async def test_an_oversized_reply_becomes_a_frame_too_large_error() -> None:
    a = node("a", limits=PeerLimits(max_frame_bytes=4096))
    b = node("b")
    async with serving(a, b) as (_, pb):
        with pytest.raises(FrameTooLarge) as info:
            await a.request("b", ("127.0.0.1", pb), req("big", b"10000"))
        assert info.value.origin == "b"
        assert await a.request("b", ("127.0.0.1", pb), req("big", b"100")) == b"x" * 100


async def test_an_oversized_frame_header_gets_a_reject_and_the_connection_closes() -> None:
    b = node("b", limits=PeerLimits(max_frame_bytes=4096))
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await raw.send_raw((4097).to_bytes(4, "big") + b"\x00" * 10)
        await raw.expect_reject("frame_too_large")
        await eventually(lambda: b.open_connections == 0)


async def test_garbage_before_the_handshake_is_refused_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.wire")
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        raw = await RawPeer.connect(pb, handshake=False)
        await raw.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await raw.expect_reject("frame_too_large")  # "GET " read as a length
        raw2 = await RawPeer.connect(pb, handshake=False)
        await raw2.send_raw(encode_frame(b"\xc1" + os.urandom(63)))
        await raw2.expect_reject("protocol")
        await eventually(lambda: b.stats.handshake_failures == 2)
        assert "peer handshake from 127.0.0.1" in caplog.text
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"fine")) == b"fine"


async def test_unauthenticated_connections_are_bounded() -> None:
    a, b = node("a"), node("b", limits=PeerLimits(max_handshakes=2))
    async with serving(a, b) as (_, pb):
        idle = [await RawPeer.connect(pb, handshake=False) for _ in range(2)]
        await eventually(lambda: b.stats.accepted == 2)
        third = await RawPeer.connect(pb, handshake=False)
        assert await third.next() is None  # closed at once
        for raw in idle:
            await raw.close()
        await eventually(lambda: b.stats.handshake_failures == 2)
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"in")) == b"in"


async def test_garbage_after_the_handshake_gets_a_reject_and_fails_only_that_connection() -> None:
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        raw = await RawPeer.connect(pb)
        await raw.send_raw(encode_frame(b"\xc1garbage"))
        await raw.expect_reject("protocol")
        raw2 = await RawPeer.connect(pb, node_id="raw2")
        await raw2.send(m.Hello(1, 1, "c", "x", 1, b"n" * 16))  # handshake frame in a session
        msg = await raw2.expect_reject("protocol")
        assert "unexpected Hello" in msg.message
        await eventually(lambda: b.open_connections == 0)
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"fine")) == b"fine"


async def test_unknown_types_are_skipped_and_stray_cancels_ignored() -> None:
    b = node("b")
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await raw.send_raw(encode_frame(msgspec.msgpack.encode([99, "from the future"])))
        await raw.send(m.Cancel(12345), m.Pong(3), m.Request(1, "s", "n", None, "echo", b"hi"))
        msg = await raw.next()
        assert msg == m.Reply(1, b"hi")
        await raw.send(m.Ping(77))
        assert await raw.next(skip=()) == m.Pong(77)
        await raw.close()


# ---------------------------------------------------------------- authentication


async def test_wrong_key_is_a_typed_error_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.wire")
    a = node("a", keyring=Keyring([("k1", os.urandom(32))]))
    b = node("b")
    async with serving(a, b) as (_, pb):
        with pytest.raises(AuthenticationFailed):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        await eventually(lambda: b.stats.handshake_failures == 1)
        assert "refused (unauthenticated)" in caplog.text and "cluster key" in caplog.text
        assert a.connected_peers == [] and b.connected_peers == []
        # backing off: fails at once with the same type, without dialing again
        dials = a.stats.dials
        with pytest.raises(AuthenticationFailed, match="next dial"):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        assert a.stats.dials == dials


async def test_missing_key_on_one_side_is_refused() -> None:
    a = node("a", keyring=None)
    b = node("b")
    async with serving(a, b) as (_, pb):
        with pytest.raises(AuthenticationFailed):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        await eventually(lambda: b.stats.handshake_failures == 1)


async def test_wrong_cluster_is_a_typed_error_on_both_sides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.wire")
    a, b = node("a", cluster="prod"), node("b", cluster="staging")
    async with serving(a, b) as (_, pb):
        with pytest.raises(ClusterMismatch):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        await eventually(lambda: b.stats.handshake_failures == 1)
        assert "refused (wrong_cluster)" in caplog.text


async def test_no_common_version_is_a_typed_error_on_both_sides(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.wire")
    a, b = node("a", versions=(2, 3)), node("b", versions=(1, 1))
    async with serving(a, b) as (_, pb):
        with pytest.raises(VersionMismatch):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        await eventually(lambda: b.stats.handshake_failures == 1)
        assert "refused (version_mismatch)" in caplog.text


async def test_a_different_node_at_the_address_is_refused() -> None:
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        with pytest.raises(PeerUnavailable, match="served by node b"):
            await a.request("c", ("127.0.0.1", pb), req("echo"))


# ---------------------------------------------------------------- backpressure


async def test_a_full_in_flight_queue_is_overloaded_at_once() -> None:
    h = Handler()
    a, b = node("a", limits=PeerLimits(max_in_flight=4)), node("b", h)
    async with serving(a, b) as (_, pb), trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(a.request, "b", ("127.0.0.1", pb), req("block"))
        await eventually(lambda: h.started == 4)
        with pytest.raises(Overloaded):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        h.release.set()


async def test_the_peers_handler_limit_bounds_the_callers_in_flight() -> None:
    h = Handler()
    a, b = node("a"), node("b", h, limits=PeerLimits(max_handlers=2))
    async with serving(a, b) as (_, pb), trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(a.request, "b", ("127.0.0.1", pb), req("block"))
        await eventually(lambda: h.started == 2)
        with pytest.raises(Overloaded):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        h.release.set()


async def test_the_server_answers_overloaded_beyond_its_handler_limit() -> None:
    h = Handler()
    b = node("b", h, limits=PeerLimits(max_handlers=2))
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await raw.send(*(m.Request(i, "s", "n", None, "block") for i in (1, 2, 3)))
        msg = await raw.next()
        assert isinstance(msg, m.Error) and msg.id == 3 and msg.error["code"] == "overloaded"
        h.release.set()
        replies = [await raw.next(), await raw.next()]
        assert sorted(replies, key=lambda r: r.id) == [  # type: ignore[union-attr]
            m.Reply(1, b"released"),
            m.Reply(2, b"released"),
        ]
        await raw.close()


# ---------------------------------------------------------------- lifecycle


async def test_a_peer_that_goes_away_fails_in_flight_requests_retryably() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    errors: list[BaseException] = []
    b_scope = trio.CancelScope()

    async def run_b(task_status: trio.TaskStatus[int]) -> None:
        with b_scope:
            await b.serve("127.0.0.1", 0, task_status=task_status)

    async def call(port: int) -> None:
        try:
            await a.request("b", ("127.0.0.1", port), req("block"))
        except SpawnmeshError as exc:
            errors.append(exc)

    async with serving(a), trio.open_nursery() as nursery:
        pb = await nursery.start(run_b)
        async with trio.open_nursery() as callers:
            for _ in range(3):
                callers.start_soon(call, pb)
            await eventually(lambda: h.started == 3)
            b_scope.cancel()  # b vanishes without a GoAway
        assert len(errors) == 3
        assert all(isinstance(e, PeerUnavailable) and e.retryable for e in errors)
        assert a.connected_peers == []
        with pytest.raises(PeerUnavailable):  # refused now
            await a.request("b", ("127.0.0.1", pb), req("echo"))


async def test_disconnect_fails_in_flight_requests_at_once() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    errors: list[SpawnmeshError] = []

    async def call(port: int) -> None:
        try:
            await a.request("b", ("127.0.0.1", port), req("block"))
        except SpawnmeshError as exc:
            errors.append(exc)

    async with serving(a, b) as (_, pb):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, pb)
            await eventually(lambda: h.started == 1)
            a.disconnect("b", "declared dead")
        assert len(errors) == 1 and isinstance(errors[0], PeerUnavailable)
        assert "declared dead" in str(errors[0])
        await eventually(lambda: h.cancelled != [])  # b saw the connection go: handler cancelled
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"again")) == b"again"


async def test_close_drains_in_flight_requests_then_refuses_new_ones() -> None:
    h = Handler()
    a, b = node("a"), node("b", h)
    results: list[bytes | None] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(a.serve, "127.0.0.1", 0)
        pb = await nursery.start(b.serve, "127.0.0.1", 0)

        async def call() -> None:
            results.append(await a.request("b", ("127.0.0.1", pb), req("block")))

        nursery.start_soon(call)
        await eventually(lambda: h.started == 1)
        async with trio.open_nursery() as closing:
            closing.start_soon(b.close)
            conn = a.connection("b")
            await eventually(lambda: a.connection("b") is None)  # GoAway received
            assert conn is not None and not conn.usable
            h.release.set()
        assert results == [b"released"]
        with pytest.raises(PeerUnavailable):
            await a.request("b", ("127.0.0.1", pb), req("echo"))
        await eventually(lambda: a.open_connections == 0)
        await a.close()


async def test_requests_that_arrive_with_a_goaway_are_answered_before_the_close() -> None:
    """A GoAway read in the same batch as requests (say, a peer forwarding its last calls as
    it drains) closes the connection only once they are answered: requests handed to a worker
    that has not started yet count as running. Before, the close came first and the handler
    ran with its answer dropped, so the caller saw a lost connection and retried elsewhere a
    call that had run (an add applied twice in the DNS lab)."""
    b = node("b")
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await raw.send(req("echo", b"warm", id=1))  # leaves one worker parked, idle
        assert await raw.next() == m.Reply(1, b"warm")
        # one request for the idle worker, two for new ones, then the GoAway: one read
        await raw.send(
            req("sleep", b"0.05", id=2), req("sleep", b"0.02", id=3), req("echo", b"e", id=4),
            m.GoAway("shutting_down", "raw is draining"),
        )
        seen: list[m.Message] = []
        with trio.fail_after(10):
            while (msg := await raw.next()) is not None:
                seen.append(msg)
        assert any(isinstance(x, m.GoAway) for x in seen), seen
        replies = {x.id: x.payload for x in seen if isinstance(x, m.Reply)}
        assert replies == {2: b"0.05", 3: b"0.02", 4: b"e"}, seen
        await raw.close()


async def test_a_cancel_for_a_request_not_started_yet_is_honoured() -> None:
    """A Cancel read right after its request (before a worker took it up) cancels it: the
    handler never runs and nothing is answered, as for one cancelled while running."""
    h = Handler()
    b = node("b", h)
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await raw.send(req("echo", b"x", id=1), m.Cancel(1), req("echo", b"y", id=2))
        assert await raw.next() == m.Reply(2, b"y")
        assert [r.id for r in h.seen] == [2]
        await raw.close()


async def test_a_failed_dial_backs_off_then_reconnects() -> None:
    a = node("a")
    b = node("b")
    async with serving(a) as _:
        with trio.socket.socket() as probe:  # a port with nobody listening
            await probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with pytest.raises(PeerUnavailable):
            await a.request("b", ("127.0.0.1", port), req("echo"))
        with pytest.raises(PeerUnavailable, match="next dial"):
            await a.request("b", ("127.0.0.1", port), req("echo"))
        assert a.stats.dials == 1
        async with trio.open_nursery() as nursery:
            await nursery.start(b.serve, "127.0.0.1", port)
            with trio.fail_after(10):
                while True:
                    try:
                        got = await a.request("b", ("127.0.0.1", port), req("echo", b"up"))
                        break
                    except PeerUnavailable:
                        await trio.sleep(0.02)
            assert got == b"up"
            await b.close()


async def test_simultaneous_dials_keep_the_lower_ids_connection_on_both_sides() -> None:
    a, b = node("a"), node("b")
    results: list[bytes | None] = []

    async def call(src: PeerNode, dst: str, port: int) -> None:
        results.append(await src.request(dst, ("127.0.0.1", port), req("origin")))

    async with serving(a, b) as (pa, pb):
        for _ in range(3):
            results.clear()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, a, "b", pb)
                nursery.start_soon(call, b, "a", pa)
            assert sorted(results) == [b"a", b"b"]
            ca, cb = a.connection("b"), b.connection("a")
            assert ca is not None and cb is not None
            await eventually(lambda: a.open_connections == 1 and b.open_connections == 1)
            assert ca.dialer == cb.dialer == "a"  # the lower id's dial won on both sides
        # both dialed at once in round 0 (trio runs both callers before any I/O completes);
        # each side closed the duplicate, and nothing was redialed afterwards
        assert (a.stats.dials, b.stats.dials) == (1, 1)
        assert (a.stats.duplicates_closed, b.stats.duplicates_closed) == (1, 1)


async def test_a_restarted_peer_replaces_the_old_connection() -> None:
    a = node("a")
    b1 = node("b", incarnation=1)
    b2 = node("b", incarnation=2)
    async with serving(a, b1) as (pa, _pb1), serving(b2) as (_pb2,):
        assert await b1.request("a", ("127.0.0.1", pa), req("origin")) == b"b"
        assert await b2.request("a", ("127.0.0.1", pa), req("origin")) == b"b"
        conn = a.connection("b")
        assert conn is not None and conn.peer_incarnation == 2
        await eventually(lambda: a.open_connections == 1)


async def test_a_silent_peer_is_dropped_by_the_ping_timeout() -> None:
    b = node("b", limits=PeerLimits(ping_interval_ms=30, idle_timeout_ms=150))
    async with serving(b) as (pb,):
        raw = await RawPeer.connect(pb)
        await eventually(lambda: b.open_connections == 1)
        ping = await raw.next(skip=())
        assert isinstance(ping, m.Ping)
        await eventually(lambda: b.open_connections == 0)  # never answered
        raw2 = await RawPeer.connect(pb, node_id="raw2")  # answering keeps it open
        with trio.move_on_after(0.5):
            while True:
                msg = await raw2.next(skip=())
                if isinstance(msg, m.Ping):
                    await raw2.send(m.Pong(msg.token))
        assert b.open_connections == 1
        await raw2.close()
        await raw.close()
