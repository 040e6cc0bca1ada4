"""Packet security of the membership transport: round trips, every rejection reason, rotation,
and the open path over arbitrary bytes (hypothesis): a packet opens or raises PacketRejected."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.cluster.seal import MAX_OVERHEAD, Channel, PacketSealer, Reason
from spawnmesh.errors import PacketRejected
from spawnmesh.keyring import Keyring

K1 = bytes(range(32))
K2 = bytes(range(50, 82))
K3 = bytes(range(100, 132))
OLD = Keyring([("old", K1)])
BOTH = Keyring([("old", K1), ("new", K2)])
SEALED = PacketSealer("prod", BOTH)
PLAIN = PacketSealer("prod", None)


def reason_of(sealer: PacketSealer, data: bytes, channel: Channel = Channel.UDP) -> str:
    with pytest.raises(PacketRejected) as info:
        sealer.open(data, channel)
    assert info.value.code == "packet_rejected"
    return info.value.reason


@settings(max_examples=100, deadline=None)
@given(packet=st.binary(max_size=1500), channel=st.sampled_from(Channel))
def test_round_trip_and_overhead(packet: bytes, channel: Channel) -> None:
    for sealer in (SEALED, PLAIN):
        wrapped = sealer.seal(packet, channel)
        assert sealer.open(wrapped, channel) == packet
        assert len(wrapped) - len(packet) <= MAX_OVERHEAD
    if len(packet) >= 8:
        assert packet not in SEALED.seal(packet, channel)  # encrypted, not just signed


def test_rotation_newest_seals_any_known_opens() -> None:
    old_node = PacketSealer("prod", OLD)
    assert SEALED.open(old_node.seal(b"x", Channel.UDP), Channel.UDP) == b"x"
    new = SEALED.seal(b"y", Channel.UDP)
    assert reason_of(old_node, new) == Reason.UNKNOWN_KEY_ID.value


def test_each_rejection_reason() -> None:
    packet = b"\x92\x01\x90"
    sealed = SEALED.seal(packet, Channel.UDP)
    other_cluster = PacketSealer("staging", BOTH)
    assert reason_of(other_cluster, sealed) == Reason.WRONG_CLUSTER.value
    assert reason_of(PacketSealer("staging", None), PLAIN.seal(packet, Channel.UDP)) == (
        Reason.WRONG_CLUSTER.value
    )
    wrong_key = PacketSealer("prod", Keyring([("new", K3)]))
    assert reason_of(wrong_key, sealed) == Reason.BAD_TAG.value
    assert reason_of(SEALED, sealed, Channel.TCP) == Reason.BAD_TAG.value  # channel bound
    assert reason_of(SEALED, PLAIN.seal(packet, Channel.UDP)) == Reason.NOT_ENCRYPTED.value
    assert reason_of(PLAIN, sealed) == Reason.UNEXPECTED_ENCRYPTION.value
    assert reason_of(SEALED, b"sM\x02" + sealed[3:]) == Reason.UNSUPPORTED_VERSION.value
    assert reason_of(SEALED, b"\x92\x01\x90") == Reason.MALFORMED.value
    assert reason_of(SEALED, sealed[:20]) == Reason.MALFORMED.value


def test_same_tag_other_name_fails_when_sealed() -> None:
    """The tag is only 4 bytes, but the whole cluster name is authenticated."""
    forged = PacketSealer("prod", BOTH)
    forged._name = b"prod-but-not-really"  # same header tag, another name in the AAD
    assert reason_of(SEALED, forged.seal(b"x", Channel.UDP)) == Reason.BAD_TAG.value


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), channel=st.sampled_from(Channel))
def test_any_bytes_open_or_raise_one_error(data: bytes, channel: Channel) -> None:
    for sealer in (SEALED, PLAIN):
        try:
            sealer.open(data, channel)
        except PacketRejected as exc:
            assert exc.reason in {r.value for r in Reason}


@settings(max_examples=200, deadline=None)
@given(
    packet=st.binary(max_size=100),
    pos=st.integers(min_value=0),
    bit=st.integers(0, 7),
)
def test_any_flipped_bit_of_a_sealed_packet_is_rejected(packet: bytes, pos: int, bit: int) -> None:
    data = bytearray(SEALED.seal(packet, Channel.UDP))
    data[pos % len(data)] ^= 1 << bit
    with pytest.raises(PacketRejected):
        SEALED.open(bytes(data), Channel.UDP)
