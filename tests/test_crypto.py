"""Statestore encryption: AES-256-GCM round trips, tamper detection, keyring parsing."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.errors import ConfigError, StateCorrupt
from spawnmesh.statestore.crypto import (
    NONCE_BYTES,
    Keyring,
    derived_key_id,
    load_keyring,
    state_aad,
)

K1 = bytes(range(32))
K2 = bytes(range(50, 82))
B1 = base64.b64encode(K1).decode()
B2 = base64.b64encode(K2).decode()
RING = Keyring([("a", K1), ("b", K2)])

names = st.text(min_size=1, max_size=40)
revisions = st.integers(min_value=1, max_value=2**62)


@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=4096), system=names, name=names, rev=revisions)
def test_round_trip(blob: bytes, system: str, name: str, rev: int) -> None:
    aad = state_aad(system, name, rev)
    sealed = RING.seal(blob, aad)
    assert sealed.key_id == "b"
    assert len(sealed.data) == NONCE_BYTES + len(blob) + 16
    assert RING.open(sealed.key_id, sealed.data, aad) == blob
    if len(blob) >= 8:
        assert blob not in sealed.data


@settings(max_examples=100, deadline=None)
@given(blob=st.binary(max_size=512), pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(blob: bytes, pos: int, bit: int) -> None:
    aad = state_aad("s", "n", 1)
    data = bytearray(RING.seal(blob, aad).data)
    data[pos % len(data)] ^= 1 << bit  # nonce, ciphertext or tag
    with pytest.raises(StateCorrupt, match="authentication failed"):
        RING.open("b", bytes(data), aad)


@settings(max_examples=100, deadline=None)
@given(
    a=st.tuples(names, names, revisions),
    b=st.tuples(names, names, revisions),
)
def test_other_actor_or_revision_fails(
    a: tuple[str, str, int], b: tuple[str, str, int]
) -> None:
    sealed = RING.seal(b"state", state_aad(*a))
    if a == b:
        assert RING.open("b", sealed.data, state_aad(*b)) == b"state"
    else:
        with pytest.raises(StateCorrupt):
            RING.open("b", sealed.data, state_aad(*b))


def test_aad_framing_is_unambiguous() -> None:
    assert state_aad("ab", "c", 1) != state_aad("a", "bc", 1)
    assert state_aad("a", "b", 1) != state_aad("a", "b", 2)


def test_nonces_are_fresh() -> None:
    aad = state_aad("s", "n", 1)
    nonces = {RING.seal(b"same", aad).data[:NONCE_BYTES] for _ in range(1000)}
    assert len(nonces) == 1000


def test_wrong_key_unknown_id_truncated() -> None:
    aad = state_aad("s", "n", 1)
    sealed = RING.seal(b"x", aad)
    with pytest.raises(StateCorrupt, match="authentication failed"):
        Keyring([("b", K1)]).open("b", sealed.data, aad)
    with pytest.raises(StateCorrupt, match="'zz'"):
        RING.open("zz", sealed.data, aad)
    with pytest.raises(StateCorrupt, match="too short"):
        RING.open("b", sealed.data[:20], aad)


def test_older_key_still_opens() -> None:
    aad = state_aad("s", "n", 3)
    old = Keyring([("a", K1)]).seal(b"old", aad)
    assert old.key_id == "a"
    assert RING.open("a", old.data, aad) == b"old"


def test_parse_key_string() -> None:
    ring = Keyring.parse(B1)
    assert ring.key_ids == [derived_key_id(K1)] and ring.newest_id.startswith("k")
    assert Keyring.parse(f"  {B1}\n").newest_id == ring.newest_id  # stable id, whitespace ok
    urlsafe = base64.urlsafe_b64encode(K2).decode()
    assert Keyring.parse(urlsafe).key_ids == [derived_key_id(K2)]
    two = Keyring.parse(f"old:{B1}, new:{B2}")
    assert two.key_ids == ["old", "new"] and two.newest_id == "new"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty key"),
        ("not base64 !!", "not valid base64"),
        (base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
        (base64.b64encode(bytes(64)).decode(), "decodes to 64 bytes"),
        (f"bad id:{B1}", "key id 'bad id'"),
        (f"plain:{B1}", "reserved"),
        (f"x:{B1},x:{B2}", "appears twice"),
        (f"{'i' * 33}:{B1}", "1-32 characters"),
    ],
)
def test_parse_errors_are_config_errors(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        Keyring.parse(text)
    assert err.value.setting == "statestore.key"
    assert B1 not in str(err.value) and B2 not in str(err.value)  # never echo key material


def test_key_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# rotated 2026-11\n\nold:{B1}\n  new:{B2}  \n")
    ring = Keyring.from_file(f)
    assert ring.key_ids == ["old", "new"] and ring.newest_id == "new"
    assert load_keyring(key_file=str(f)).newest_id == "new"  # type: ignore[union-attr]
    assert load_keyring() is None
    assert load_keyring(key=B1) is not None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("# only a comment\n", "holds no keys"),
        (f"{B1}\n", r"keys:1: expected 'id:base64key'"),
        ("a:@@@@\n", r"keys:1: not valid base64"),
        (f"a:{B1}\nb:{base64.b64encode(bytes(16)).decode()}\n", r"keys:2: key decodes to 16"),
    ],
)
def test_key_file_errors(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "keys"
    f.write_text(content)
    with pytest.raises(ConfigError, match=match) as err:
        Keyring.from_file(f)
    assert err.value.setting == "statestore.key_file"


def test_missing_key_file_and_both_sources(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read key file"):
        Keyring.from_file(tmp_path / "nope")
    with pytest.raises(ConfigError, match="not both"):
        load_keyring(key=B1, key_file=str(tmp_path / "keys"))
    with pytest.raises(ConfigError, match="at least one key"):
        Keyring([])
