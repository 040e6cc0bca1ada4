"""Peer-wire handshake: two sans-IO ends pumped by hand (no sockets), plus properties."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spawnmesh.errors import (
    AuthenticationFailed,
    ClusterMismatch,
    PeerUnavailable,
    ProtocolError,
    SpawnmeshError,
    VersionMismatch,
)
from spawnmesh.keyring import Keyring
from spawnmesh.wire import messages as m
from spawnmesh.wire.handshake import (
    ClientHandshake,
    HandshakeConfig,
    ServerHandshake,
    negotiate,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
K1, K2, K3 = os.urandom(32), os.urandom(32), os.urandom(32)


def ring(*keys: tuple[str, bytes]) -> Keyring:
    return Keyring(list(keys))


def cfg(
    node: str,
    keyring: Keyring | None = None,
    *,
    cluster: str = "c",
    lo: int = 1,
    hi: int = 1,
    incarnation: int = 7,
) -> HandshakeConfig:
    return HandshakeConfig(cluster, node, incarnation, keyring, version_min=lo, version_max=hi)


class Outcome:
    """What each end ended with: a session or the error it raised."""

    def __init__(self, client: ClientHandshake, server: ServerHandshake) -> None:
        self.client = client
        self.server = server
        self.client_error: SpawnmeshError | None = None
        self.server_error: SpawnmeshError | None = None


def pump(
    client: ClientHandshake, server: ServerHandshake, tamper: tuple[int, int, int] | None = None
) -> Outcome:
    """Carry frames between the two ends, including a Reject after a failure (as the shell
    does). ``tamper=(frame_index, byte_index, xor)`` corrupts one frame in flight."""
    out = Outcome(client, server)
    to_server = client.start()
    to_client: list[bytes] = []
    sent = 0

    def corrupt(body: bytes) -> bytes:
        nonlocal sent
        index = sent
        sent += 1
        if tamper is None or tamper[0] != index or not body:
            return body
        b = bytearray(body)
        b[tamper[1] % len(b)] ^= tamper[2]
        return bytes(b)

    for _ in range(10):
        if not to_server and not to_client:
            break
        for body in to_server:
            if out.server_error is not None or server.done:
                break
            try:
                to_client += server.receive(corrupt(body))
            except SpawnmeshError as exc:
                out.server_error = exc
                if server.reject is not None:
                    to_client.append(server.reject)
        to_server = []
        for body in to_client:
            if out.client_error is not None or client.done:
                break
            try:
                to_server += client.receive(corrupt(body))
            except SpawnmeshError as exc:
                out.client_error = exc
                if client.reject is not None:
                    to_server.append(client.reject)
        to_client = []
    return out


def handshake(
    client_cfg: HandshakeConfig, server_cfg: HandshakeConfig, expect: str | None = "b", **kw: object
) -> Outcome:
    client = ClientHandshake(client_cfg, os.urandom(32), expect)
    server = ServerHandshake(server_cfg, os.urandom(32))
    return pump(client, server, **kw)  # type: ignore[arg-type]


def test_authenticated_handshake_opens_both_sessions() -> None:
    k = ring(("k1", K1))
    o = handshake(cfg("a", k, incarnation=3), cfg("b", k, incarnation=9))
    assert o.client_error is None and o.server_error is None
    cs, ss = o.client.session, o.server.session
    assert cs is not None and ss is not None
    assert (cs.peer_node_id, cs.peer_incarnation, cs.peer_key_id, cs.version) == ("b", 9, "k1", 1)
    assert (ss.peer_node_id, ss.peer_incarnation, ss.peer_key_id, ss.version) == ("a", 3, "k1", 1)
    assert cs.peer_max_frame_bytes == 4 * 1024 * 1024 and ss.peer_max_in_flight == 1024


def test_unauthenticated_handshake_when_neither_side_has_a_key() -> None:
    o = handshake(cfg("a"), cfg("b"))
    assert o.client.done and o.server.done
    assert o.client.session is not None and o.client.session.peer_key_id == ""


def test_wrong_key_fails_on_both_sides() -> None:
    o = handshake(cfg("a", ring(("k1", K1))), cfg("b", ring(("k1", K2))))
    assert isinstance(o.client_error, AuthenticationFailed)  # the server's proof fails first
    assert isinstance(o.server_error, AuthenticationFailed)  # ... and the Reject tells it
    assert not o.client.done and not o.server.done


def test_unknown_key_id_fails_on_both_sides() -> None:
    o = handshake(cfg("a", ring(("k1", K1))), cfg("b", ring(("k2", K2))))
    assert isinstance(o.client_error, AuthenticationFailed)
    assert "k2" in str(o.client_error)
    assert isinstance(o.server_error, AuthenticationFailed)


@pytest.mark.parametrize("keyed", ["client", "server"])
def test_a_key_on_one_side_only_fails_on_both(keyed: str) -> None:
    k = ring(("k1", K1))
    o = handshake(
        cfg("a", k if keyed == "client" else None), cfg("b", k if keyed == "server" else None)
    )
    assert isinstance(o.client_error, AuthenticationFailed)
    assert isinstance(o.server_error, AuthenticationFailed)


def test_rotation_works_while_every_node_knows_both_keys() -> None:
    """Phase 2 of a rotation: some nodes seal with the new key, others still with the old."""
    old_newest = ring(("k2", K2), ("k1", K1))
    new_newest = ring(("k1", K1), ("k2", K2))
    for a, b in [(old_newest, new_newest), (new_newest, old_newest)]:
        o = handshake(cfg("a", a), cfg("b", b))
        assert o.client.done and o.server.done
    o = handshake(cfg("a", ring(("k1", K1))), cfg("b", new_newest))  # skipped phase 1
    assert isinstance(o.client_error, AuthenticationFailed)


def test_wrong_cluster_fails_on_both_sides() -> None:
    o = handshake(cfg("a", cluster="prod"), cfg("b", cluster="staging"))
    assert isinstance(o.server_error, ClusterMismatch)
    assert isinstance(o.client_error, ClusterMismatch)
    assert "staging" in str(o.client_error)


def test_no_common_version_fails_on_both_sides() -> None:
    o = handshake(cfg("a", lo=3, hi=4), cfg("b", lo=1, hi=2))
    assert isinstance(o.server_error, VersionMismatch)
    assert isinstance(o.client_error, VersionMismatch)


@SETTINGS
@given(st.integers(1, 8), st.integers(0, 4), st.integers(1, 8), st.integers(0, 4))
def test_version_negotiation_picks_the_highest_common_version(
    a_lo: int, a_span: int, b_lo: int, b_span: int
) -> None:
    a_hi, b_hi = a_lo + a_span, b_lo + b_span
    o = handshake(cfg("a", lo=a_lo, hi=a_hi), cfg("b", lo=b_lo, hi=b_hi))
    common = set(range(a_lo, a_hi + 1)) & set(range(b_lo, b_hi + 1))
    if common:
        assert o.client.session is not None and o.server.session is not None
        assert o.client.session.version == o.server.session.version == max(common)
        assert negotiate(a_lo, a_hi, b_lo, b_hi) == max(common)
    else:
        assert isinstance(o.client_error, VersionMismatch)
        assert isinstance(o.server_error, VersionMismatch)


def test_client_refuses_a_different_node_at_the_address() -> None:
    o = handshake(cfg("a"), cfg("b"), expect="c")
    assert isinstance(o.client_error, PeerUnavailable)
    assert o.client_error.retryable
    assert o.server_error is not None  # told by the Reject


def test_a_node_refuses_to_talk_to_itself() -> None:
    o = handshake(cfg("a"), cfg("a"), expect=None)
    assert isinstance(o.server_error, ProtocolError)


def test_replayed_server_frames_do_not_authenticate() -> None:
    """A recorded Welcome + Proof is bound to the old client nonce (and Hello)."""
    k = ring(("k1", K1))
    client1 = ClientHandshake(cfg("a", k), os.urandom(32), "b")
    server = ServerHandshake(cfg("b", k), os.urandom(32))
    recorded = server.receive(client1.start()[0])
    client2 = ClientHandshake(cfg("a", k), os.urandom(32), "b")
    client2.start()
    client2.receive(recorded[0])
    with pytest.raises(AuthenticationFailed):
        client2.receive(recorded[1])


@SETTINGS
@given(st.integers(0, 4), st.integers(0, 10_000), st.integers(1, 255))
def test_any_corrupted_frame_fails_an_authenticated_handshake(
    frame: int, at: int, xor: int
) -> None:
    """Flipping bits anywhere in any handshake frame never yields two open sessions that
    disagree: the transcript binds every byte, so it fails (typed) on at least one side."""
    k = ring(("k1", K1))
    o = handshake(cfg("a", k), cfg("b", k), tamper=(frame, at, xor))
    both = o.client.session is not None and o.server.session is not None
    if both:  # the flip landed in an ignored spot: sessions must still agree
        assert o.client.session is not None and o.server.session is not None
        assert o.client.session.peer_node_id == "b" and o.server.session.peer_node_id == "a"
    else:
        errors = [e for e in (o.client_error, o.server_error) if e is not None]
        assert errors and all(isinstance(e, ProtocolError | PeerUnavailable) for e in errors)


@SETTINGS
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=4), st.booleans())
def test_garbage_into_a_handshake_raises_only_typed_errors(
    bodies: list[bytes], server_side: bool
) -> None:
    k = ring(("k1", K1))
    machine: ClientHandshake | ServerHandshake
    if server_side:
        machine = ServerHandshake(cfg("b", k), os.urandom(32))
    else:
        machine = ClientHandshake(cfg("a", k), os.urandom(32), "b")
        machine.start()
    for body in bodies:
        try:
            machine.receive(body)
        except SpawnmeshError:
            assert not machine.done
            return


def test_a_finished_handshake_refuses_more_frames() -> None:
    o = handshake(cfg("a"), cfg("b"))
    with pytest.raises(ProtocolError):
        o.server.receive(m.encode(m.Ready()))
    with pytest.raises(ProtocolError):
        o.client.receive(m.encode(m.Ready()))


def test_unexpected_message_is_a_protocol_error_with_a_reject() -> None:
    server = ServerHandshake(cfg("b"), os.urandom(32))
    with pytest.raises(ProtocolError, match="expected Hello, got Request"):
        server.receive(m.encode(m.Request(1, "s", "n")))
    assert server.reject is not None
    reject = m.decode(server.reject)
    assert isinstance(reject, m.Reject) and reject.code == "protocol"


def test_a_reject_from_the_peer_becomes_its_typed_error_and_is_not_answered() -> None:
    client = ClientHandshake(cfg("a"), os.urandom(32), "b")
    client.start()
    with pytest.raises(ClusterMismatch, match="other cluster"):
        client.receive(m.encode(m.Reject("wrong_cluster", "other cluster")))
    assert client.reject is None and client.rejected_by_peer


def test_nonce_length_is_checked() -> None:
    with pytest.raises(ValueError):
        ClientHandshake(cfg("a"), b"short")
    rnd = random.Random(1)
    ClientHandshake(cfg("a"), rnd.randbytes(16))
