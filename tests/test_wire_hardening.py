"""Peer-wire edge cases over real loopback sockets (plus decoder properties): the frame limit
switches exactly at the frame that opens the session, frames before an oversized header are
still delivered, a reset discards what was queued for the peer, and a protocol error inside a
session is logged and counted."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnmesh.errors import FrameTooLarge, PeerUnavailable, ProtocolError, SpawnmeshError
from spawnmesh.wire import messages as m
from spawnmesh.wire.codec import FrameDecoder, encode_frame
from spawnmesh.wire.handshake import HANDSHAKE_MAX_FRAME_BYTES, HandshakeConfig, ServerHandshake
from tests.test_wire_peer import KEY, RawPeer, eventually, node, req, serving

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- decoder (sans-IO)


def test_frames_before_an_oversized_header_are_returned_then_the_next_call_raises() -> None:
    dec = FrameDecoder(max_frame_bytes=1024)
    data = encode_frame(b"one") + encode_frame(b"two") + (1025).to_bytes(4, "big") + b"xx"
    assert dec.feed(data) == [b"one", b"two"]
    assert dec.failed and dec.buffered == 0
    with pytest.raises(FrameTooLarge, match="1025 bytes exceeds the maximum of 1024"):
        dec.feed(b"")
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(b"ok"))


def test_feed_one_leaves_the_next_header_to_the_limit_set_in_between() -> None:
    big = b"x" * 20_000
    dec = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
    stream = encode_frame(b"ready") + encode_frame(big) + encode_frame(b"tail")[:3]
    assert dec.feed_one(stream) == b"ready"
    dec.max_frame_bytes = 1 << 20  # the session opened
    assert dec.feed(b"") == [big]
    assert dec.feed(encode_frame(b"tail")[3:]) == [b"tail"]
    strict = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
    assert strict.feed_one(stream) == b"ready"
    with pytest.raises(FrameTooLarge):
        strict.feed_one()


@FAST
@given(
    st.lists(st.binary(max_size=300), max_size=12),
    st.lists(st.binary(max_size=40), max_size=8),
    st.integers(1, 400),
)
def test_feed_and_feed_one_agree_on_any_bytes(
    bodies: list[bytes], junk: list[bytes], max_frame: int
) -> None:
    """Same bodies, then the same error (or none), whichever way the stream is taken."""
    stream = b"".join(encode_frame(b) for b in bodies) + b"".join(junk)

    def run(one: bool) -> tuple[list[bytes], type[Exception] | None]:
        dec = FrameDecoder(max_frame)
        got: list[bytes] = []
        try:
            for i in range(0, len(stream) + 1, 37):
                chunk = stream[i : i + 37]
                if one:
                    body = dec.feed_one(chunk)
                    while body is not None:
                        got.append(body)
                        body = dec.feed_one()
                else:
                    got.extend(dec.feed(chunk))
                    if dec.failed:
                        dec.feed(b"")
        except ProtocolError as exc:
            return got, type(exc)
        return got, None

    assert run(True) == run(False)


# ---------------------------------------------------------------- handshake race


async def accept_handshaken(
    port_box: list[int], ready: trio.Event, after_ready: bytes = b"", rcvbuf: int = 0
) -> tuple[trio.SocketStream, list[trio.SocketListener], FrameDecoder]:
    """Listen (with a receive buffer of ``rcvbuf`` bytes if given), accept one dial and run
    the server handshake by hand, sending ``after_ready`` in the same write as Ready; the
    stream, its listeners and a decoder at the session limit."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    if rcvbuf:
        listeners[0].socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    port_box.append(listeners[0].socket.getsockname()[1])
    ready.set()
    stream = await listeners[0].accept()
    dec = FrameDecoder(HANDSHAKE_MAX_FRAME_BYTES)
    machine = ServerHandshake(HandshakeConfig("c", "b", 1, KEY), os.urandom(32))
    while not machine.done:
        for body in dec.feed(await stream.receive_some(65536)):
            out = b"".join(encode_frame(b) for b in machine.receive(body))
            await stream.send_all(out + after_ready if machine.done else out)
    dec.max_frame_bytes = 1 << 22
    return stream, listeners, dec


async def raw_acceptor(
    port_box: list[int], ready: trio.Event, after_ready: bytes, got: list[m.Message]
) -> None:
    """Accept one dial (:func:`accept_handshaken`), then answer the dialer's echo requests and
    record everything else it sends."""
    stream, listeners, dec = await accept_handshaken(port_box, ready, after_ready)
    try:
        while data := await stream.receive_some(65536):
            for body in dec.feed(data):
                msg = m.decode(body)
                if isinstance(msg, m.Request) and msg.action == "echo":
                    await stream.send_all(encode_frame(m.encode(m.Reply(msg.id, msg.payload))))
                elif msg is not None and not isinstance(msg, m.Ping):
                    got.append(msg)
    except (trio.BrokenResourceError, ProtocolError):
        pass
    finally:
        await stream.aclose()
        for listener in listeners:
            await listener.aclose()


async def test_a_large_request_right_after_ready_does_not_fail_the_dial() -> None:
    """The acceptor may send up to the dialer's session limit right after Ready: the dialer
    takes the bytes after Ready under that limit even when they share one read."""
    a = node("a")
    big = m.Request(1, "sys", "actor", None, "big", b"20000")  # answered with 20 KB
    big_in = m.Request(2, "sys", "actor", None, "echo", b"y" * 20_000)  # a 20 KB frame to a
    after_ready = encode_frame(m.encode(big_in)) + encode_frame(m.encode(big))
    assert len(after_ready) > HANDSHAKE_MAX_FRAME_BYTES
    port_box: list[int] = []
    ready = trio.Event()
    got: list[m.Message] = []
    async with serving(a), trio.open_nursery() as nursery:
        nursery.start_soon(raw_acceptor, port_box, ready, after_ready, got)
        await ready.wait()
        assert await a.request("b", ("127.0.0.1", port_box[0]), req("echo", b"hi")) == b"hi"
        await eventually(lambda: len(got) == 2)
        replies = {x.id: x for x in got if isinstance(x, m.Reply)}
        assert replies[2].payload == b"y" * 20_000 and replies[1].payload == b"x" * 20_000
        assert a.stats.dial_failures == 0
        a.disconnect("b")


async def first_requests_both_ways() -> dict[str, object]:
    """a dials b; b sends a 20 KB request on the inbound connection the moment it exists."""
    a, b = node("a"), node("b")
    results: dict[str, object] = {}
    async with serving(a, b) as (pa, pb):

        async def b_side() -> None:
            while b.connection("a") is None:  # as soon as it is registered
                await trio.lowlevel.checkpoint()
            results["b"] = await b.request("a", ("127.0.0.1", pa), req("echo", b"z" * 20_000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(b_side)
            results["a"] = await a.request("b", ("127.0.0.1", pb), req("echo", b"hi"))
    results["dial_failures"] = a.stats.dial_failures
    return results


async def test_two_nodes_exchange_large_requests_as_soon_as_they_connect() -> None:
    """The audit's race between two real nodes (it failed 18 times in 20)."""
    for _ in range(10):
        assert await first_requests_both_ways() == {
            "a": b"hi", "b": b"z" * 20_000, "dial_failures": 0
        }


# ---------------------------------------------------------------- frames before a bad header


async def test_a_reply_read_with_an_oversized_header_still_reaches_its_caller() -> None:
    a = node("a")
    port_box: list[int] = []
    ready = trio.Event()

    async def acceptor() -> None:
        stream, listeners, dec = await accept_handshaken(port_box, ready)
        while True:
            bodies = dec.feed(await stream.receive_some(65536))
            reqs = [x for x in map(m.decode, bodies) if isinstance(x, m.Request)]
            if reqs:
                break
        bad_header = (64 << 20).to_bytes(4, "big")
        await stream.send_all(encode_frame(m.encode(m.Reply(reqs[0].id, b"made it"))) + bad_header)
        rest = b""
        with trio.move_on_after(5):
            while data := await stream.receive_some(65536):
                rest += data
        msgs = [m.decode(b) for b in FrameDecoder(1 << 22).feed(rest)]
        assert any(isinstance(x, m.Reject) and x.code == "frame_too_large" for x in msgs), msgs
        await stream.aclose()
        for listener in listeners:
            await listener.aclose()

    async with serving(a), trio.open_nursery() as nursery:
        nursery.start_soon(acceptor)
        await ready.wait()
        assert await a.request("b", ("127.0.0.1", port_box[0]), req("x")) == b"made it"
        await eventually(lambda: a.open_connections == 0)
        assert a.stats.protocol_errors == 1


# ---------------------------------------------------------------- reset discards the queue


async def test_disconnect_discards_frames_queued_for_a_peer_that_stopped_reading() -> None:
    """Membership declares a peer dead while megabytes of requests wait for it; when it reads
    again (the partition heals), those requests, already failed over, must not arrive."""
    total, size = 800, 10_000  # 8 MB: more than the kernel buffers (4 MB send, 64 KB receive)
    a = node("a")
    port_box: list[int] = []
    ready, resume = trio.Event(), trio.Event()
    read_after: list[int] = []

    async def stalled_peer() -> None:
        stream, listeners, dec = await accept_handshaken(port_box, ready, rcvbuf=32_768)
        await resume.wait()  # stop reading until a has disconnected
        n = 0
        with trio.move_on_after(5):
            try:
                while data := await stream.receive_some(65536):
                    n += sum(isinstance(m.decode(b), m.Request) for b in dec.feed(data))
            except trio.BrokenResourceError:
                pass  # the reset
        read_after.append(n)
        await stream.aclose()
        for listener in listeners:
            await listener.aclose()

    errors: list[SpawnmeshError] = []

    async def call() -> None:
        try:
            await a.request("b", ("127.0.0.1", port_box[0]), req("x", b"p" * size))
        except SpawnmeshError as exc:
            errors.append(exc)

    def all_queued() -> bool:
        conn = a.connection("b")
        return conn is not None and conn.in_flight == total

    async with serving(a), trio.open_nursery() as nursery:
        nursery.start_soon(stalled_peer)
        await ready.wait()
        async with trio.open_nursery() as callers:
            for _ in range(total):
                callers.start_soon(call)
            await eventually(all_queued)
            await trio.sleep(0.2)  # the writer fills the kernel buffers and waits
            a.disconnect("b", "declared dead")
        assert len(errors) == total
        assert all(isinstance(e, PeerUnavailable) for e in errors)
        resume.set()  # at once: the reset must not wait for the writer (flush_timeout_s 1 s)
        await eventually(lambda: read_after != [])
        assert a.open_connections == 0
    # Only what the kernel buffers held before the reset can have arrived.
    assert read_after[0] < total // 2, read_after


# ---------------------------------------------------------------- protocol errors in a session


async def test_a_protocol_error_in_a_session_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "spawnmesh.wire")
    a, b = node("a"), node("b")
    async with serving(a, b) as (_, pb):
        for peer_id in ("raw1", "raw2"):
            raw = await RawPeer.connect(pb, node_id=peer_id)
            await raw.send_raw(encode_frame(b"\xc1garbage"))
            await raw.expect_reject("protocol")
        await eventually(lambda: b.stats.protocol_errors == 2)
        lines = [r.getMessage() for r in caplog.records if "protocol error" in r.getMessage()]
        assert len(lines) == 1, lines  # rate-limited per reason
        assert "peer raw1 at 127.0.0.1:" in lines[0] and "malformed frame" in lines[0]
        assert b.stats.handshake_failures == 0
        assert await a.request("b", ("127.0.0.1", pb), req("echo", b"fine")) == b"fine"
        assert a.stats.protocol_errors == 0
