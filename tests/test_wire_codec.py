"""Peer-wire frame codec and messages (sans-IO): round trips, hostile input, versioning rules."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnmesh.errors import (
    FrameTooLarge,
    NotOwner,
    ProtocolError,
    SpawnmeshError,
)
from spawnmesh.ids import ActorId
from spawnmesh.wire import messages as m
from spawnmesh.wire.codec import (
    HEADER_BYTES,
    FrameDecoder,
    append_frame,
    encode_frame,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NESTED = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given (sorted, deduplicated) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


# ---------------------------------------------------------------- framing


@FAST
@given(st.lists(st.binary(max_size=300), max_size=20), st.lists(st.integers(0, 10_000)))
def test_frames_round_trip_whatever_the_chunking(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    dec = FrameDecoder(max_frame_bytes=300)
    got: list[bytes] = []
    for chunk in chunked(stream, cuts):
        got.extend(dec.feed(chunk))
    assert got == bodies
    assert dec.buffered == 0


@FAST
@given(st.lists(st.binary(max_size=200), max_size=10), st.integers(1, 64))
def test_any_bytes_decode_or_raise_protocol_error_with_bounded_buffer(
    chunks: list[bytes], max_frame: int
) -> None:
    dec = FrameDecoder(max_frame_bytes=max_frame)
    for chunk in chunks:
        try:
            bodies = dec.feed(chunk)
        except ProtocolError:
            with pytest.raises(ProtocolError):  # a failed decoder stays failed
                dec.feed(b"\x00\x00\x00\x00")
            return
        assert all(isinstance(b, bytes) and len(b) <= max_frame for b in bodies)
        assert dec.buffered <= HEADER_BYTES + max_frame - 1


def test_oversized_header_fails_before_its_body_arrives() -> None:
    dec = FrameDecoder(max_frame_bytes=1024)
    assert dec.feed(encode_frame(b"ok")) == [b"ok"]
    with pytest.raises(FrameTooLarge, match="1025 bytes exceeds the maximum of 1024"):
        dec.feed((1025).to_bytes(4, "big") + b"x")  # only one body byte sent
    assert dec.buffered == 0
    with pytest.raises(ProtocolError):
        dec.feed(encode_frame(b"ok"))


def test_largest_allowed_frame_passes_and_a_partial_header_waits() -> None:
    dec = FrameDecoder(max_frame_bytes=5)
    assert dec.feed(b"\x00\x00") == []
    assert dec.feed(b"\x00\x05abc") == []
    assert dec.feed(b"de\x00") == [b"abcde"]
    assert dec.buffered == 1


@pytest.mark.parametrize("bad", [0, -1, 2**32])
def test_max_frame_must_fit_the_header(bad: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_bytes=bad)


def test_append_frame_refuses_an_oversized_message_and_leaves_the_buffer_intact() -> None:
    out = bytearray(encode_frame(b"first"))
    before = bytes(out)
    with pytest.raises(FrameTooLarge):
        append_frame(out, m.encode_into, m.Reply(1, b"x" * 100), 50)
    assert bytes(out) == before
    size = append_frame(out, m.encode_into, m.Reply(2, b"y"), 50)
    dec = FrameDecoder()
    first, second = dec.feed(out)
    assert first == b"first" and len(second) == size
    assert m.decode(second) == m.Reply(2, b"y")


def test_append_frame_leaves_the_buffer_intact_when_encoding_fails() -> None:
    out = bytearray(encode_frame(b"first"))
    before = bytes(out)
    with pytest.raises(TypeError):
        append_frame(out, m.encode_into, m.Error(1, {"x": object()}, "n"), 1 << 20)
    assert bytes(out) == before


# ---------------------------------------------------------------- messages

names = st.text(max_size=20)
u63 = st.integers(0, 2**63 - 1)
nonces = st.binary(min_size=16, max_size=64)
actor_ids = st.builds(ActorId, names, names, st.none() | names)
boxed = st.fixed_dictionaries(
    {"code": st.sampled_from(["timeout", "not_owner", "internal", "nope"]), "message": names}
)

MESSAGES: dict[type[Any], st.SearchStrategy[Any]] = {
    m.Hello: st.builds(
        m.Hello,
        st.integers(0, 65535),
        st.integers(0, 65535),
        names,
        names,
        u63,
        nonces,
        names,
        u63,
        u63,
    ),
    m.Welcome: st.builds(
        m.Welcome, st.integers(0, 65535), names, names, u63, nonces, names, u63, u63
    ),
    m.Proof: st.builds(m.Proof, names, st.binary(max_size=256)),
    m.Ready: st.builds(m.Ready),
    m.Reject: st.builds(m.Reject, names, names),
    m.GoAway: st.builds(m.GoAway, names, names),
    m.Ping: st.builds(m.Ping, u63),
    m.Pong: st.builds(m.Pong, u63),
    m.Request: st.builds(
        m.Request,
        u63,
        names,
        names,
        st.none() | names,
        names,
        st.binary(max_size=100),
        st.dictionaries(names, names, max_size=3),
        st.none() | actor_ids,
        st.lists(st.tuples(names, names), max_size=3),
        st.none() | u63,
        st.sampled_from(list(m.Kind)),
        u63,
        st.integers(0, 255),
    ),
    m.Reply: st.builds(m.Reply, u63, st.none() | st.binary(max_size=100)),
    m.Error: st.builds(m.Error, u63, boxed, names),
    m.Cancel: st.builds(m.Cancel, u63),
}


def test_every_message_type_has_a_strategy() -> None:
    assert set(MESSAGES) == set(m.MESSAGE_TYPES.values())


@FAST
@given(st.one_of(*MESSAGES.values()))
def test_every_message_round_trips(msg: m.Message) -> None:
    assert m.decode(m.encode(msg)) == msg


def test_type_codes_are_pinned() -> None:
    """Append-only: a renumbered or reused code breaks every deployed peer."""
    assert {c: t.__name__ for c, t in m.MESSAGE_TYPES.items()} == {
        1: "Hello",
        2: "Welcome",
        3: "Proof",
        4: "Ready",
        5: "Reject",
        6: "GoAway",
        7: "Ping",
        8: "Pong",
        9: "Request",
        10: "Reply",
        11: "Error",
        12: "Cancel",
    }
    for code, tp in m.MESSAGE_TYPES.items():
        assert tp.__struct_config__.tag == code
    kinds = {k.name: k.value for k in m.Kind}
    assert list(kinds.values()) == list(range(len(kinds)))  # dense, append-only
    assert {n: v for n, v in kinds.items() if v < 7} == {
        "CALL": 0,
        "CAST": 1,
        "DELAYED": 2,
        "SCHEDULED": 3,
        "RELEASE": 4,
        "BROADCAST": 5,
        "SPAWN": 6,
    }


def test_request_field_order_is_pinned() -> None:
    assert m.Request.__struct_fields__ == (
        "id",
        "system",
        "name",
        "parent",
        "action",
        "payload",
        "metadata",
        "caller",
        "chain",
        "deadline_ms",
        "kind",
        "when_ms",
        "hops",
        "trace",
    )


def test_unknown_newer_type_is_skipped_and_extra_trailing_fields_ignored() -> None:
    assert m.decode(msgspec.msgpack.encode([m.MAX_KNOWN_CODE + 1, "anything", [1, 2]])) is None
    assert m.decode(msgspec.msgpack.encode([200])) is None
    newer_reply = msgspec.msgpack.encode([10, 7, b"v", "a field from a newer version"])
    assert m.decode(newer_reply) == m.Reply(7, b"v")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgspec.msgpack.encode([]),
        msgspec.msgpack.encode([0]),
        msgspec.msgpack.encode([-5, 1]),
        msgspec.msgpack.encode(["9", 1]),
        msgspec.msgpack.encode({"id": 1}),
        msgspec.msgpack.encode([9, -1, "s", "n"]),  # negative id
        msgspec.msgpack.encode([9, 1, "s"]),  # missing required field
        msgspec.msgpack.encode([10, 2**64 - 1, None]),  # id beyond int64
        msgspec.msgpack.encode([9, 1, "s", "n", None, "a", b"", {}, None, [], None, 9]),  # kind
        msgspec.msgpack.encode([11, 1, "not a dict"]),
        b"\x91" * 100_000,  # deep nesting
        msgspec.msgpack.encode([10, 1, b"x"])[:-1],  # truncated
    ],
)
def test_malformed_bodies_raise_protocol_error(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode(body)


@FAST
@given(st.binary(max_size=300))
def test_any_body_decodes_skips_or_raises_protocol_error(body: bytes) -> None:
    try:
        msg = m.decode(body)
    except ProtocolError:
        return
    assert msg is None or isinstance(msg, tuple(m.MESSAGE_TYPES.values()))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | names
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12,
)


@NESTED
@given(st.integers(-5, 20), st.lists(msgpack_values, max_size=14))
def test_any_msgpack_array_decodes_skips_or_raises_protocol_error(
    code: int, fields: list[Any]
) -> None:
    body = msgspec.msgpack.encode([code, *fields])
    try:
        msg = m.decode(body)
    except ProtocolError:
        return
    if code > m.MAX_KNOWN_CODE:
        assert msg is None
    else:
        assert isinstance(msg, m.MESSAGE_TYPES[code])


def test_head_reads_code_and_id_of_a_malformed_request_reply_or_error() -> None:
    assert m.head(msgspec.msgpack.encode([9, 4, "s", "n", None, "a", b"", {"k": 1}])) == (9, 4)
    assert m.head(msgspec.msgpack.encode([10, 7, 42])) == (10, 7)
    assert m.head(msgspec.msgpack.encode([11, 8])) == (11, 8)
    assert m.head(msgspec.msgpack.encode([12, 8])) is None  # Cancel: nothing to salvage
    assert m.head(msgspec.msgpack.encode([9, -1, "s"])) is None
    assert m.head(msgspec.msgpack.encode([9])) is None
    assert m.head(b"\xc1") is None


def test_error_boxes_rebuild_typed_errors_with_their_origin() -> None:
    err = m.unbox(m.Error(3, NotOwner("moved", owner="n3").to_wire(), "n2"))
    assert isinstance(err, NotOwner)
    assert (err.owner, err.origin, err.retryable, str(err)) == ("n3", "n2", True, "moved")


@NESTED
@given(st.dictionaries(names, msgpack_values, max_size=5), names)
def test_hostile_error_boxes_still_give_a_spawnmesh_error(box: dict[str, Any], origin: str) -> None:
    err = m.unbox(m.Error(1, box, origin))
    assert isinstance(err, SpawnmeshError)
    assert err.origin == origin
