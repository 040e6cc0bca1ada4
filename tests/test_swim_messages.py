"""Tier 1: SWIM message codec round trips, garbage, versioning and the size budget."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.cluster import messages as m
from spawnmesh.errors import ProtocolError

names = st.text(max_size=20)
incs = st.integers(0, m.MAX_INCARNATION)
addrs = st.tuples(st.ip_addresses().map(str), st.integers(1, 65535))
seqs = st.integers(0, 2**64 - 1)

message_st = st.one_of(
    st.builds(m.Ping, seqs, names, names, addrs),
    st.builds(m.PingReq, seqs, names, addrs, names, addrs, st.booleans()),
    st.builds(m.Ack, seqs),
    st.builds(m.Nack, seqs),
    st.builds(m.Alive, names, incs, addrs, st.binary(max_size=64)),
    st.builds(m.Suspect, names, incs, names),
    st.builds(m.Dead, names, incs, names),
    st.builds(m.Left, names, incs),
    st.builds(
        m.PushPull,
        st.booleans(),
        names,
        st.lists(
            st.builds(m.MemberState, names, incs, addrs, st.binary(max_size=8), st.integers(0, 3)),
            max_size=4,
        ),
    ),
)


@given(st.lists(message_st, max_size=20))
def test_round_trip(msgs: list[m.Message]) -> None:
    assert m.decode(m.encode(msgs)) == msgs
    assert m.decode(m.pack([m.encode_message(x) for x in msgs])) == msgs


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    try:
        out = m.decode(data)
    except ProtocolError:
        return
    assert isinstance(out, list)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(st.integers(-3, 5), st.lists(msgpack_values, max_size=5))
def test_structured_garbage_only_raises_protocol_error(version: int, body: list[object]) -> None:
    data = msgspec.msgpack.encode([version, body])
    try:
        out = m.decode(data)
    except ProtocolError:
        return
    assert all(isinstance(x, m.Message) for x in out)


def test_unknown_newer_type_is_skipped() -> None:
    future = msgspec.msgpack.encode([m.MAX_KNOWN_CODE + 7, "x", 1, {"new": True}])
    data = m.pack([m.encode_message(m.Ack(1)), future, m.encode_message(m.Nack(2))])
    assert m.decode(data) == [m.Ack(1), m.Nack(2)]


def test_newer_trailing_fields_are_ignored() -> None:
    data = msgspec.msgpack.encode([2, [[3, 42, "field-from-the-future"]]])
    assert m.decode(data) == [m.Ack(42)]


def test_malformed_known_type_is_an_error() -> None:
    with pytest.raises(ProtocolError):
        m.decode(msgspec.msgpack.encode([1, [[3, "not-an-int"]]]))
    with pytest.raises(ProtocolError):
        m.decode(msgspec.msgpack.encode([0, [[3, 1]]]))  # version too old
    with pytest.raises(ProtocolError):
        m.decode(b"")


def test_codes_are_append_only() -> None:
    # Changing this mapping breaks mixed-version clusters: only ever append.
    assert {c: t.__name__ for c, t in m.MESSAGE_TYPES.items()} == {
        1: "Ping",
        2: "PingReq",
        3: "Ack",
        4: "Nack",
        5: "Alive",
        6: "Suspect",
        7: "Dead",
        8: "Left",
        9: "PushPull",
    }
    for code, typ in m.MESSAGE_TYPES.items():
        assert typ.__struct_config__.tag == code


def test_packet_overhead() -> None:
    for n in (0, 1, 15, 16, 300):
        msgs = [m.encode_message(m.Ack(i)) for i in range(n)]
        assert len(m.pack(msgs)) == m.packet_overhead(n) + sum(map(len, msgs))


def test_node_meta_round_trip() -> None:
    meta = m.NodeMeta(("10.0.0.1", 7000), ["counter", "cart"], 1, 2, {"zone": "a"})
    assert m.decode_meta(m.encode_meta(meta)) == meta
    with pytest.raises(ProtocolError):
        m.decode_meta(b"\xc1")


@pytest.mark.parametrize(
    "data",
    [
        b"\x92\x01" + b"\x91" * 200_000,  # nesting deeper than any decoder recursion limit
        b"\x92\x01\x91" + b"\x91" * 100_000 + b"\x03",
        b"\x92\x01\xdd\xff\xff\xff\xff",  # array claims 4 G elements
        b"\x92\x01\x91\x92\x03\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max seq (valid)
        b"\x92\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x90",  # huge version, no messages
        b"\x92\x01\x91\x93\xcf\xff\xff\xff\xff\xff\xff\xff\xff\x01\x02",  # huge unknown code
        b"\x92\x01\x91\x93\xd3\x80\x00\x00\x00\x00\x00\x00\x00\x01\x02",  # negative code
    ],
)
def test_hostile_packets(data: bytes) -> None:
    try:
        out = m.decode(data)
    except ProtocolError:
        return
    assert isinstance(out, list)


def test_incarnation_bounds() -> None:
    top = m.MAX_INCARNATION
    assert m.decode(m.encode([m.Suspect("a", top, "b")])) == [m.Suspect("a", top, "b")]
    for bad in (m.MAX_INCARNATION + 1, -1):
        with pytest.raises(ProtocolError):
            m.decode(msgspec.msgpack.encode([1, [[6, "a", bad, "b"]]]))
