"""The Spawn port's HTTP/1.1 codec (spawnmesh/spawn_compat/http11.py) against h11 as the oracle:
whatever h11 writes, split anywhere, reads back the same; what the codec writes, h11 reads;
garbage only ever raises ProtocolError; bounds and connection semantics hold."""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh.spawn_compat.http11 import (
    MessageReader,
    ProtocolError,
    request_bytes,
    response_bytes,
)

tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30)
targets = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/-._~%?=&", max_size=40).map(
    lambda s: "/" + s
)
bodies = st.binary(max_size=300)
extra_headers = st.lists(
    st.tuples(
        tokens.filter(
            lambda t: (
                t not in {"content-length", "transfer-encoding", "connection", "host", "expect"}
            )
        ),
        values,
    ),
    max_size=4,
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


def read_all(reader: MessageReader, pieces: list[bytes]) -> list[Any]:
    out = []
    for piece in pieces:
        reader.feed(piece)
        while (msg := reader.next()) is not None:
            out.append(msg)
    return out


def h11_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes, chunked: bool
) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    hs = [("host", "x"), *headers]
    hs.append(("transfer-encoding", "chunked") if chunked else ("content-length", str(len(body))))
    data = conn.send(h11.Request(method=method, target=target, headers=hs))
    if chunked:  # several chunks, to cross chunk boundaries too
        for i in range(0, len(body), 7):
            data += conn.send(h11.Data(data=body[i : i + 7]))
    elif body:
        data += conn.send(h11.Data(data=body))
    return data + conn.send(h11.EndOfMessage())


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["POST", "GET", "PUT"]), targets, extra_headers, bodies, st.booleans()
        ),
        min_size=1,
        max_size=3,
    ),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_requests_written_by_h11_read_back_the_same(reqs: list[Any], cuts: list[int]) -> None:
    stream = b"".join(h11_request(*r) for r in reqs)  # pipelined
    msgs = read_all(MessageReader(is_request=True, max_body_bytes=10_000), split(stream, cuts))
    assert len(msgs) == len(reqs)
    for msg, (method, target, headers, body, _) in zip(msgs, reqs, strict=True):
        assert (msg.method, msg.target, msg.body) == (method.encode(), target.encode(), body)
        for name, value in headers:
            assert msg.header(name.encode()) is not None
            assert (name.encode(), value.encode()) in msg.headers
        assert msg.keep_alive


@given(
    st.integers(min_value=100, max_value=599).filter(
        lambda s: s not in (101, 204, 304) and not 100 <= s < 200
    ),
    extra_headers,
    bodies,
    st.booleans(),
)
def test_responses_written_here_are_read_by_h11(
    status: int, headers: list[Any], body: bytes, close: bool
) -> None:
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")])
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(response_bytes(status, body, headers, close=close))
    resp = conn.next_event()
    assert isinstance(resp, h11.Response) and resp.status_code == status
    got = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        assert isinstance(event, h11.Data)
        got += event.data
    assert got == body
    assert (b"connection", b"close") in resp.headers or not close


@given(targets, extra_headers, bodies)
def test_requests_written_here_are_read_by_h11(
    target: str, headers: list[Any], body: bytes
) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request_bytes("POST", target, "127.0.0.1:8090", body, headers))
    req = conn.next_event()
    assert isinstance(req, h11.Request) and req.target == target.encode()
    got = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        got += event.data
    assert got == body


@given(
    st.integers(min_value=200, max_value=599).filter(lambda s: s not in (204, 304)),
    bodies,
    st.booleans(),
    st.sampled_from(["length", "chunked", "eof"]),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=6),
)
def test_responses_written_by_h11_read_back_the_same(
    status: int, body: bytes, close: bool, framing: str, cuts: list[int]
) -> None:
    server = h11.Connection(h11.SERVER)
    http10 = framing == "eof"
    server.receive_data(
        b"POST / HTTP/1.0\r\n\r\n"
        if http10
        else b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
    )
    server.next_event()
    server.next_event()
    headers = [("connection", "close")] if close else []
    if framing == "length":
        headers.append(("content-length", str(len(body))))
    data = server.send(h11.Response(status_code=status, headers=headers))
    for i in range(0, len(body), 11):
        data += server.send(h11.Data(data=body[i : i + 11]))
    data += server.send(h11.EndOfMessage())
    reader = MessageReader(is_request=False, max_body_bytes=10_000)
    msgs = read_all(reader, split(data, cuts))
    if framing == "eof":  # the body ends where the connection does
        assert msgs == []
        reader.feed(b"")
        msgs = [reader.next()]
    [msg] = msgs
    assert (msg.status, msg.body) == (status, body)
    assert msg.keep_alive == (not close and not http10)


@given(
    st.lists(st.tuples(targets, bodies), min_size=1, max_size=3),
    st.binary(min_size=1, max_size=60),
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_garbage_after_pipelined_requests_loses_none_of_them(
    reqs: list[Any], garbage: bytes, cuts: list[int]
) -> None:
    stream = b"".join(h11_request("POST", t, [], b, False) for t, b in reqs) + garbage + b"\r\n\r\n"
    reader = MessageReader(is_request=True, max_body_bytes=10_000)
    msgs: list[Any] = []
    try:
        for piece in [*split(stream, cuts), b""]:
            reader.feed(piece)
            while (msg := reader.next()) is not None:
                msgs.append(msg)
    except ProtocolError as exc:
        assert 400 <= exc.status < 600
    # every request before the garbage is read whole, in order, whatever the garbage does
    assert [(m.target, m.body) for m in msgs[: len(reqs)]] == [
        (t.encode(), b) for t, b in reqs
    ]


@given(st.binary(max_size=300), st.booleans())
def test_garbage_only_raises_protocol_error(data: bytes, is_request: bool) -> None:
    reader = MessageReader(is_request=is_request, max_body_bytes=100)
    try:
        read_all(reader, [data, b""])
    except ProtocolError as exc:
        assert 400 <= exc.status < 600


def test_bounds_and_connection_semantics() -> None:
    def first(data: bytes, **kw: Any) -> Any:
        reader = MessageReader(is_request=True, max_body_bytes=kw.pop("max_body", 100), **kw)
        reader.feed(data)
        return reader.next()

    with pytest.raises(ProtocolError) as big:
        first(b"POST / HTTP/1.1\r\ncontent-length: 101\r\n\r\n")
    assert big.value.status == 413  # refused from the head alone
    with pytest.raises(ProtocolError) as head:
        first(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n", max_head_bytes=100)
    assert head.value.status == 431
    with pytest.raises(ProtocolError) as chunked:  # refused as soon as it passes the bound
        first(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n65\r\n" + b"a" * 101)
    assert chunked.value.status == 413
    endless = MessageReader(is_request=True, max_body_bytes=100, max_head_bytes=100)
    endless.feed(b"GET / HTTP/1.1\r\nx-long: ")
    for _ in range(10):  # one header line that never ends, fed in pieces
        endless.feed(b"v" * 30)
    with pytest.raises(ProtocolError) as long_line:
        endless.next()
    assert long_line.value.status == 431
    with pytest.raises(ProtocolError):
        first(b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
    with pytest.raises(ProtocolError):
        first(b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n")
    for v in (b"2.0", b"1.2"):
        with pytest.raises(ProtocolError) as version:
            first(b"GET / HTTP/" + v + b"\r\n\r\n")
        assert version.value.status == 505
    assert not first(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n").keep_alive
    assert not first(b"GET / HTTP/1.0\r\n\r\n").keep_alive
    assert first(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").keep_alive
    reader = MessageReader(is_request=True, max_body_bytes=100)
    reader.feed(b"POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n")
    assert reader.next() is None and reader.wants_continue
    reader.feed(b"abc")
    msg = reader.next()
    assert msg is not None and msg.body == b"abc" and not reader.wants_continue
    reader.feed(b"POST / HTTP/1.1\r\ncontent-length: 3\r\n\r\nab")
    reader.feed(b"")
    with pytest.raises(ProtocolError, match="closed in the middle"):
        reader.next()
    resp = MessageReader(is_request=False, max_body_bytes=100)  # an interim 100 is skipped
    resp.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    got = resp.next()
    assert got is not None and got.status == 204 and got.body == b""


def test_pipelining_upgrades_trailers_and_held_errors() -> None:
    reader = MessageReader(is_request=True, max_body_bytes=100)
    reader.feed(
        b"POST /a HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n"
        b"GET /b HTTP/1.1\r\nx-v: padded  \r\n\r\n"
        b"NOT HTTP\r\n\r\n"
    )
    a, b = reader.next(), reader.next()  # the messages before the error come first
    assert a is not None and (a.target, a.body) == (b"/a", b"abcde")
    assert a.header(b"x-trailer") is None  # trailers are not headers
    assert b is not None and b.target == b"/b" and b.header(b"x-v") == b"padded"
    with pytest.raises(ProtocolError) as bad:
        reader.next()
    assert bad.value.status == 400
    with pytest.raises(ProtocolError):  # and it stays raised
        reader.next()
    # Connection: upgrade (curl --http2 on cleartext) is answered over HTTP/1.1, then closed
    up = MessageReader(is_request=True, max_body_bytes=100)
    up.feed(
        b"POST /u HTTP/1.1\r\nconnection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\n"
        b"content-length: 2\r\n\r\nhi\x00\x01binary"
    )
    msg = up.next()
    assert msg is not None and msg.body == b"hi" and not msg.keep_alive
    assert up.next() is None and up.idle
    up = MessageReader(is_request=True, max_body_bytes=100)  # its body in later pieces
    up.feed(b"POST /u HTTP/1.1\r\nconnection: upgrade\r\nupgrade: x\r\ncontent-length: 3\r\n\r\n")
    for piece in (b"a", b"bc"):
        assert up.next() is None and not up.idle
        up.feed(piece)
    msg = up.next()
    assert msg is not None and msg.body == b"abc" and not msg.keep_alive
    resp = MessageReader(is_request=False, max_body_bytes=100)
    resp.feed(b"HTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n")
    got = resp.next()
    assert got is not None and got.status == 304 and got.keep_alive and resp.idle
    resp.feed(b"HTTP/1.1 200 OK\r\n\r\npart")  # no length: the body ends at EOF
    assert resp.next() is None and not resp.idle
    resp.feed(b"")
    got = resp.next()
    assert got is not None and got.body == b"part" and not got.keep_alive


trailer_fields = st.lists(
    st.tuples(tokens, st.integers(min_value=0, max_value=300).map(lambda n: "v" * n)),
    max_size=6,
)


@given(
    trailer_fields,
    bodies,
    st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
)
def test_trailers_are_bounded_like_a_head_however_they_are_split(
    fields: list[tuple[str, str]], body: bytes, cuts: list[int]
) -> None:
    """A chunked body's trailer section counts against the head bound: over it, 431 wherever
    the bytes are cut; well within it (half: a field cut across feeds may count twice), the
    request reads back as h11 wrote it."""
    conn = h11.Connection(h11.CLIENT)
    data = conn.send(
        h11.Request(
            method="POST",
            target="/t",
            headers=[("host", "x"), ("transfer-encoding", "chunked")],
        )
    )
    for i in range(0, len(body), 7):
        data += conn.send(h11.Data(data=body[i : i + 7]))
    data += conn.send(h11.EndOfMessage(headers=fields))
    size = sum(len(k) + len(v) + 4 for k, v in fields)
    limit = 400
    reader = MessageReader(is_request=True, max_body_bytes=1000, max_head_bytes=limit)
    try:
        msgs = read_all(reader, split(data, cuts))
    except ProtocolError as exc:
        assert exc.status == 431, exc
        assert 2 * size + 64 > limit, (size, exc)  # refused only near or over the bound
        return
    assert size <= limit  # anything over the bound is refused
    [msg] = msgs
    assert (msg.target, msg.body) == (b"/t", body)


def test_an_endless_trailer_field_or_chunk_extension_is_refused_with_431() -> None:
    """The audit's case: after the last chunk, one trailer field that never ends, fed a
    piece at a time (llhttp would buffer it all); and a chunk extension without end."""
    for start in (
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\nx-trailer: ",
        b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;ext=",
    ):
        reader = MessageReader(is_request=True, max_body_bytes=100, max_head_bytes=1000)
        reader.feed(start)
        fed = 0
        with pytest.raises(ProtocolError) as exc:
            while fed < 100_000:
                reader.feed(b"a" * 100)
                fed += 100
                reader.next()
        assert exc.value.status == 431 and fed <= 1100, (fed, exc.value)
    # a long chunked body in small pieces is not a trailer: no bound but the body's
    reader = MessageReader(is_request=True, max_body_bytes=100_000, max_head_bytes=1000)
    reader.feed(b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(2000):
        for piece in (b"5\r\n", b"abcde", b"\r\n"):
            reader.feed(piece)
    reader.feed(b"0\r\n\r\n")
    msg = reader.next()
    assert msg is not None and len(msg.body) == 10_000


def test_eof_without_a_whole_response_is_an_error_a_reader_never_waits_after_eof() -> None:
    """EOF before any byte of a response, or in the middle of one, is ConnectionClosed (the
    client reports the host closed without an answer instead of reading EOF for ever); a
    request reader at EOF between requests is idle and answers None."""
    from spawnmesh.spawn_compat.http11 import ConnectionClosed

    for data, partial in ((b"", False), (b"HTTP/1.1 200 OK\r\ncontent-len", True),
                          (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", True)):
        reader = MessageReader(is_request=False, max_body_bytes=100)
        if data:
            reader.feed(data)
        assert reader.next() is None
        reader.feed(b"")
        for _ in range(2):  # and it stays raised
            with pytest.raises(ConnectionClosed) as exc:
                reader.next()
            assert exc.value.partial == partial
    reader = MessageReader(is_request=False, max_body_bytes=100)  # a whole one, then EOF
    reader.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    reader.feed(b"")
    got = reader.next()
    assert got is not None and got.body == b"ok"
    with pytest.raises(ConnectionClosed):
        reader.next()
    requests = MessageReader(is_request=True, max_body_bytes=100)
    requests.feed(b"GET / HTTP/1.1\r\n\r\n")
    requests.feed(b"")
    assert requests.next() is not None
    assert requests.next() is None and requests.idle
