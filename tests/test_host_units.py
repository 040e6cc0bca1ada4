"""Host API pieces without processes: the error table, value conversion, registration
validation (property-tested: any registration either builds valid definitions or is refused
with at least one violation, never anything else), and the configuration rules."""

from __future__ import annotations

from typing import Any

import pytest
from grpclib.const import Status
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.config import HostConfig
from spawnmesh.errors import (
    ERRORS_BY_CODE,
    ActorFailed,
    CallCycle,
    ConfigError,
    HostUnavailable,
    InvalidArgument,
    SpawnmeshError,
    StateCorrupt,
    from_wire,
)
from spawnmesh.host import registration
from spawnmesh.host.convert import AnyCodec, from_any, to_any
from spawnmesh.host.gen import spawn
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.spawn import actors as pb
from spawnmesh.host.gen.spawnmesh.tck.v1 import Cart, Value
from spawnmesh.host.registration import RegistrationInvalid
from spawnmesh.host.status import STATUS_OF, RichStatusCodec, error_from_status, grpc_error

# ------------------------------------------------------------------------------ errors


def test_every_error_code_has_a_grpc_status() -> None:
    for code, cls in ERRORS_BY_CODE.items():
        assert STATUS_OF[code] is Status[cls.grpc_status]
    assert STATUS_OF["host_unavailable"] is Status.UNAVAILABLE
    assert STATUS_OF["unauthenticated"] is Status.UNAUTHENTICATED
    assert STATUS_OF["frame_too_large"] is Status.RESOURCE_EXHAUSTED


def _sample(cls: type[SpawnmeshError]) -> SpawnmeshError:
    boxed = {
        "code": cls.code,
        "message": "m",
        "actor": "s/a",
        "error_type": "T",
        "error_message": "em",
        "chain": ["s/a", "s/b"],
        "owner": "n2",
        "setting": "x",
    }
    return from_wire(boxed)


@pytest.mark.parametrize("code", sorted(ERRORS_BY_CODE))
def test_errors_survive_the_trip_through_grpc_status_details(code: str) -> None:
    err = _sample(ERRORS_BY_CODE[code])
    g = grpc_error(err, [("f", "d")])
    codec = RichStatusCodec()
    details = codec.decode(g.status, g.message, codec.encode(g.status, g.message, g.details))
    back = error_from_status(g.status, g.message or "", details)
    assert type(back) is type(err) and back.code == code
    assert back.details() == err.details()
    assert any(getattr(d, "field_violations", None) for d in details)


def test_status_without_details_maps_by_code() -> None:
    assert isinstance(error_from_status(Status.UNAVAILABLE, "x"), SpawnmeshError)
    assert isinstance(error_from_status(Status.NOT_FOUND, "x"), SpawnmeshError)
    chained = grpc_error(CallCycle("cycle", ["a", "b"]))
    assert chained.status is Status.FAILED_PRECONDITION
    assert grpc_error(HostUnavailable("gone")).status is Status.UNAVAILABLE
    assert grpc_error(ActorFailed("a", "T", "m")).status is Status.UNKNOWN


# ------------------------------------------------------------------------------ values

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(json_values)
def test_plain_values_travel_as_json(value: Any) -> None:
    packed = to_any(value)
    assert from_any(packed, None) == value


@given(st.integers(-(2**63), 2**63 - 1), st.text(max_size=30))
def test_protobuf_values_travel_byte_for_byte(n: int, text: str) -> None:
    v = Value(n=n, text=text)
    packed = to_any(v)
    assert packed is not None and packed.value == bytes(v)
    assert packed.type_url == "type.googleapis.com/spawnmesh.tck.v1.Value"
    assert from_any(packed, Value) == v
    assert to_any(packed) is packed  # an Any passes through untouched
    with pytest.raises(InvalidArgument):
        from_any(packed, Cart)


@given(st.text(max_size=80), st.binary(max_size=200))
def test_host_state_codec_matches_betterproto2_and_round_trips(url: str, data: bytes) -> None:
    """Host actors' state is encoded with upb: the very bytes betterproto2 would store."""
    codec = AnyCodec()
    value = AnyMsg(type_url=url, value=data)
    blob = codec.encode(value)
    assert blob == bytes(value)
    assert codec.decode(blob) == value


@given(st.binary(min_size=1, max_size=64))
def test_host_state_codec_refuses_garbage_with_a_typed_error(blob: bytes) -> None:
    """Any bytes decode to an Any that re-encodes stably, or fail with StateCorrupt, never
    another error. (upb keeps a field of the wrong wire type as an unknown field, as protobuf
    specifies; betterproto2 raises a KeyError on some of those, so it is no oracle here.)"""
    codec = AnyCodec()
    try:
        got = codec.decode(blob)
    except StateCorrupt:
        return
    assert codec.decode(codec.encode(got)) == got


def test_host_state_codec_refuses_truncated_bytes() -> None:
    for blob in (b"\x0a\xff", b"\x12\x05ab", b"\x0a"):  # lengths past the end, no length
        with pytest.raises(StateCorrupt):
            AnyCodec().decode(blob)


# ------------------------------------------------------------------------------ registration


def _forward(action: str) -> Any:
    async def handler(ctx: Any, payload: Any) -> Any:
        return None

    return handler


kinds = st.sampled_from(list(pb.Kind))
names = st.text(alphabet="abc_-.#/ ", min_size=0, max_size=6)
actors = st.builds(
    lambda kind, stateful, actions, timers, channels, snap, deact, pool: pb.Actor(
        settings=pb.ActorSettings(
            kind=kind,
            stateful=stateful,
            max_pool_size=pool,
            snapshot_strategy=None
            if snap is None
            else pb.ActorSnapshotStrategy(timeout=pb.TimeoutStrategy(timeout=snap)),
            deactivation_strategy=None
            if deact is None
            else pb.ActorDeactivationStrategy(timeout=pb.TimeoutStrategy(timeout=deact)),
        ),
        actions=[pb.Action(name=a) for a in actions],
        timer_actions=[pb.FixedTimerAction(seconds=s, action=pb.Action(name=a)) for a, s in timers],
        metadata=pb.Metadata(channel_group=[pb.Channel(topic=t, action=a) for t, a in channels]),
    ),
    kinds,
    st.booleans(),
    st.lists(names, max_size=3),
    st.lists(st.tuples(names, st.integers(-5, 500)), max_size=2),
    st.lists(st.tuples(names, names), max_size=2),
    st.none() | st.integers(-5, 10_000),
    st.none() | st.integers(-5, 10_000),
    st.integers(-2, 4),
)


@settings(max_examples=300, deadline=None)
@given(names, st.dictionaries(names, actors, max_size=3), st.integers(-1, 3))
def test_any_registration_builds_valid_definitions_or_lists_its_problems(
    system: str, registry: dict[str, pb.Actor], major: int
) -> None:
    req = spawn.RegistrationRequest(
        service_info=spawn.ServiceInfo(protocol_major_version=major),
        actor_system=pb.ActorSystem(name=system, registry=pb.Registry(actors=registry)),
    )
    try:
        reg = registration.build(req, _forward)
    except RegistrationInvalid as exc:
        assert exc.violations and all(f and d for f, d in exc.violations)
        assert exc.code == "invalid_definition"
        return
    assert reg.system == system and len(reg.defs) == len(registry)
    for adef in reg.defs:
        adef.validate()
        assert set(adef.actions) >= {t.action for t in adef.timers}


def test_a_bad_registration_reports_every_problem() -> None:
    req = spawn.RegistrationRequest(
        actor_system=pb.ActorSystem(
            name="s",
            registry=pb.Registry(
                actors={
                    "a": pb.Actor(actions=[pb.Action(name="x"), pb.Action(name="x")]),
                    "b": pb.Actor(
                        settings=pb.ActorSettings(kind=pb.Kind.POOLED, stateful=True),
                        actions=[pb.Action(name="y")],
                    ),
                    "c": pb.Actor(settings=pb.ActorSettings(kind=pb.Kind.PROXY)),
                }
            ),
        )
    )
    with pytest.raises(RegistrationInvalid) as info:
        registration.build(req, _forward)
    fields = [f for f, _ in info.value.violations]
    assert fields == [
        "actor_system.registry.actors[a].actions[1].name",
        "actor_system.registry.actors[b].settings.stateful",
        "actor_system.registry.actors[c].settings.kind",
        "actor_system.registry.actors[c].actions",
    ]


def test_protocol_versions() -> None:
    assert registration.check_version(None) is None
    assert registration.check_version(spawn.ServiceInfo(protocol_major_version=1)) is None
    bad = registration.check_version(spawn.ServiceInfo(protocol_major_version=2))
    assert bad is not None and "speaks 1.0" in bad[1]


# ------------------------------------------------------------------------------ configuration


def test_binding_beyond_loopback_needs_a_token_or_mutual_tls() -> None:
    HostConfig(enabled=True, host="127.0.0.1")
    HostConfig(enabled=False, host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"requires host\.token or mutual TLS"):
        HostConfig(enabled=True, host="0.0.0.0")
    with pytest.raises(ConfigError):
        HostConfig(enabled=True, host="10.0.0.1", tls_cert_file="c", tls_key_file="k")
    HostConfig(enabled=True, host="0.0.0.0", token="t")
    HostConfig(
        enabled=True, host="0.0.0.0", tls_cert_file="c", tls_key_file="k", tls_client_ca_file="ca"
    )


def test_the_documented_error_table_matches_the_code() -> None:
    """docs/host-protocol.md lists every error code with its class, status and retryability."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "host-protocol.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \| ([A-Z_]+) \| (yes|no) \|$", doc, re.M)
    documented = {code: (cls, status, retry == "yes") for code, cls, status, retry in rows}
    actual = {code: (c.__name__, c.grpc_status, c.retryable) for code, c in ERRORS_BY_CODE.items()}
    assert documented == actual


async def test_an_async_call_made_by_a_host_actor_during_its_turn_names_it_as_caller(
    make_node,  # type: ignore[no-untyped-def]
) -> None:
    """A host's actor casting from inside its turn (the usual case) is the caller of the
    turn it starts, as it is outside one."""
    import trio

    from spawnmesh import ActorSystem, Context, action
    from spawnmesh.actors.runtime import _Turn
    from spawnmesh.host.hosts import HostRegistry
    from spawnmesh.ids import ActorId
    from spawnmesh.pb.gen.spawn.actors import protocol_pb2 as proto

    system = ActorSystem("s")
    seen: list[str] = []

    @system.actor("sink")
    class Sink:
        @action
        async def hit(self, ctx: Context[None]) -> None:
            seen.append(str(ctx.caller))

    def cast_from_host_actor() -> Any:
        r = proto.InvocationRequest(action_name="hit")
        r.system.name = "s"
        r.actor.id.name, r.actor.id.system = "sink", "s"
        r.caller.name, r.caller.system = "hostactor", "s"
        setattr(r, "async", True)
        return r

    async with make_node(system) as node:
        hosts = HostRegistry(node.runtime)
        await hosts.invoke(cast_from_host_actor(), 1000)  # not in a turn
        hosts._inflight[("s", "hostactor")] = _Turn(
            ("s", "hostactor"), ActorId("s", "hostactor"), ()
        )
        await hosts.invoke(cast_from_host_actor(), 1000)  # during its turn
        with trio.fail_after(5):
            while len(seen) < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
    assert seen == ["s/hostactor", "s/hostactor"]
