"""The generic keyring (spawnmesh.keyring): rotation, grammar, its error type, and the statestore's
subclass keeping its own settings and StateCorrupt."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.errors import ConfigError, ProtocolError, StateCorrupt
from spawnmesh.keyring import Keyring, derived_key_id
from spawnmesh.statestore import crypto

K1 = bytes(range(32))
K2 = bytes(range(50, 82))
B1 = base64.b64encode(K1).decode()
B2 = base64.b64encode(K2).decode()


def test_newest_seals_any_known_opens() -> None:
    old = Keyring([("a", K1)])
    both = Keyring([("a", K1), ("b", K2)])
    sealed = old.seal(b"hello", b"aad")
    assert sealed.key_id == "a"
    assert both.open(sealed.key_id, sealed.data, b"aad") == b"hello"
    newer = both.seal(b"x", b"aad")
    assert newer.key_id == "b" and both.newest_id == "b"
    assert both.has("a") and not both.has("c") and both.key_ids == ["a", "b"]
    with pytest.raises(ProtocolError, match="'b'"):
        old.open(newer.key_id, newer.data, b"aad")


@settings(max_examples=100, deadline=None)
@given(key_id=st.text(max_size=40), data=st.binary(max_size=200), aad=st.binary(max_size=40))
def test_open_of_anything_returns_or_raises_its_error(key_id: str, data: bytes, aad: bytes) -> None:
    ring = Keyring([("a", K1)])
    with pytest.raises(ProtocolError):
        ring.open(key_id, data, aad)


def test_grammar_and_settings_are_named(tmp_path: Path) -> None:
    ring = Keyring.parse(f"x:{B1}, {B2}", setting="cluster.key")
    assert ring.key_ids == ["x", derived_key_id(K2)]
    with pytest.raises(ConfigError, match=r"^cluster\.key: key #1: not valid base64"):
        Keyring.parse("nope!", setting="cluster.key")
    with pytest.raises(ConfigError, match=r"^key: "):
        Keyring.parse("")
    f = tmp_path / "keys"
    f.write_text(f"# comment\n\nold:{B1}\nnew:{B2}\n")
    assert Keyring.from_file(f).newest_id == "new"
    with pytest.raises(ConfigError, match=r"^cluster\.key_file: .*expected 'id:base64key'"):
        f.write_text(B1)
        Keyring.from_file(f, setting="cluster.key_file")
    with pytest.raises(ConfigError, match="not both"):
        Keyring.load(B1, str(f))
    assert Keyring.load() is None
    with pytest.raises(ConfigError, match="reserved"):
        Keyring.parse(f"plain:{B1}")


def test_statestore_subclass_keeps_its_error_and_settings() -> None:
    ring = crypto.load_keyring(B1)
    assert isinstance(ring, crypto.Keyring) and isinstance(ring, Keyring)
    with pytest.raises(StateCorrupt):
        ring.open(ring.newest_id, b"\0" * 40, b"")
    with pytest.raises(ConfigError, match=r"^statestore\.key: "):
        crypto.Keyring.parse("")
