"""Spawn's messages: one source of truth in spec/spawn/, matching Spawn's own field numbers.

``spec/spawn/actors/*.proto`` feed both the betterproto2 code of the gRPC host API
(``spawnmesh/host/gen``, checked by test_host_codegen.py) and the Google protobuf modules of the
node's hot paths (``spawnmesh/pb/gen``, checked here); ``make proto`` writes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from spawnmesh.pb import codegen
from spawnmesh.pb.gen.spawn.actors import actor_pb2, protocol_pb2
from spawnmesh.pb.gen.spawnmesh.tck.v1 import tck_pb2
from spawnmesh.pb.gen.spawnmesh.v1 import host_pb2

SPAWN_FIELDS: dict[str, dict[str, int]] = {
    # Transcribed from eigr/spawn priv/protos/spawn/actors/actor.proto and protocol.proto
    # (the `spawn` / `spawn.actors` packages). Messages SDKs exchange over HTTP only.
    "spawn.actors.Registry": {"actors": 1},
    "spawn.actors.ActorSystem": {"name": 1, "registry": 2},
    "spawn.actors.ActorSnapshotStrategy": {"timeout": 1},
    "spawn.actors.ActorDeactivationStrategy": {"timeout": 1},
    "spawn.actors.TimeoutStrategy": {"timeout": 1},
    "spawn.actors.Action": {"name": 1},
    "spawn.actors.FixedTimerAction": {"seconds": 1, "action": 2},
    "spawn.actors.ActorState": {"tags": 1, "state": 2},
    "spawn.actors.Metadata": {"channel_group": 1, "tags": 2},
    "spawn.actors.Channel": {"topic": 1, "action": 2},
    "spawn.actors.ActorSettings": {
        "kind": 1,
        "stateful": 2,
        "snapshot_strategy": 3,
        "deactivation_strategy": 4,
        "min_pool_size": 5,
        "max_pool_size": 6,
        "state_type": 8,
    },
    "spawn.actors.ActorId": {"name": 1, "system": 2, "parent": 3},
    "spawn.actors.Actor": {
        "id": 1,
        "state": 2,
        "metadata": 6,
        "settings": 3,
        "actions": 4,
        "timer_actions": 5,
    },
    "spawn.Context": {"state": 1, "metadata": 4, "tags": 5, "caller": 2, "self": 3},
    "spawn.Noop": {},
    "spawn.JSONType": {"content": 1},
    "spawn.RegistrationRequest": {"service_info": 1, "actor_system": 2},
    "spawn.RegistrationResponse": {"status": 1, "proxy_info": 2},
    "spawn.ServiceInfo": {
        "service_name": 1,
        "service_version": 2,
        "service_runtime": 3,
        "support_library_name": 4,
        "support_library_version": 5,
        "protocol_major_version": 6,
        "protocol_minor_version": 7,
    },
    "spawn.SpawnRequest": {"actors": 1},
    "spawn.SpawnResponse": {"status": 1},
    "spawn.ProxyInfo": {
        "protocol_major_version": 1,
        "protocol_minor_version": 2,
        "proxy_name": 3,
        "proxy_version": 4,
    },
    "spawn.SideEffect": {"request": 1},
    "spawn.Broadcast": {"channel_group": 1, "value": 3, "noop": 4},
    "spawn.Pipe": {"actor": 1, "action_name": 2, "register_ref": 3},
    "spawn.Forward": {"actor": 1, "action_name": 2, "register_ref": 3},
    "spawn.Workflow": {"broadcast": 2, "effects": 1, "pipe": 3, "forward": 4},
    "spawn.InvocationRequest": {
        "system": 1,
        "actor": 2,
        "action_name": 3,
        "value": 4,
        "noop": 7,
        "async": 5,
        "caller": 6,
        "metadata": 8,
        "scheduled_to": 9,
        "pooled": 10,
        "register_ref": 11,
    },
    "spawn.ActorInvocation": {
        "actor": 1,
        "action_name": 2,
        "current_context": 3,
        "value": 4,
        "noop": 5,
        "caller": 6,
    },
    "spawn.ActorInvocationResponse": {
        "actor_name": 1,
        "actor_system": 2,
        "updated_context": 3,
        "value": 4,
        "noop": 6,
        "workflow": 5,
        "checkpoint": 7,
    },
    "spawn.InvocationResponse": {"status": 1, "system": 2, "actor": 3, "value": 4, "noop": 5},
    "spawn.RequestStatus": {"status": 1, "message": 2},
}
SPAWN_ENUMS = {
    "spawn.Status": {"UNKNOWN": 0, "OK": 1, "ACTOR_NOT_FOUND": 2, "ERROR": 3},
    "spawn.actors.Kind": {
        "UNKNOW_KIND": 0,
        "NAMED": 1,
        "UNNAMED": 2,
        "POOLED": 3,
        "PROXY": 4,
        "TASK": 5,
        "PROJECTION": 6,
    },
}


def _messages() -> dict[str, dict[str, int]]:
    out = {}
    for module in (actor_pb2, protocol_pb2, host_pb2, tck_pb2):
        for desc in module.DESCRIPTOR.message_types_by_name.values():
            out[desc.full_name] = {f.name: f.number for f in desc.fields}
    return out


def test_spawns_messages_keep_spawns_field_numbers() -> None:
    ours = _messages()
    for name, fields in SPAWN_FIELDS.items():
        assert name in ours, f"{name} is missing from spec/spawn/"
        for field, number in fields.items():
            assert ours[name].get(field) == number, f"{name}.{field} is not field {number}"
        extra = {f: n for f, n in ours[name].items() if f not in fields}
        assert all(n >= 100 for n in extra.values()), f"{name}: additions below 100: {extra}"


def test_spawns_enums_keep_spawns_values() -> None:
    enums = {
        **{e.full_name: e for e in actor_pb2.DESCRIPTOR.enum_types_by_name.values()},
        **{e.full_name: e for e in protocol_pb2.DESCRIPTOR.enum_types_by_name.values()},
    }
    for name, values in SPAWN_ENUMS.items():
        assert {v.name: v.number for v in enums[name].values} == values


def test_the_check_can_fail() -> None:
    """A renumbered field is caught (the table is compared, not merely read)."""
    ours = _messages()
    ours["spawn.ActorInvocation"]["caller"] = 7
    with pytest.raises(AssertionError):
        for name, fields in SPAWN_FIELDS.items():
            for field, number in fields.items():
                assert ours[name].get(field) == number


def _normal(fd: descriptor_pb2.FileDescriptorProto) -> bytes:
    """A file descriptor without what only some protoc outputs carry (json_name)."""

    def strip(messages: Any) -> None:
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)

    strip(fd.message_type)
    return fd.SerializeToString(deterministic=True)


def _committed_set() -> dict[str, bytes]:
    out = {}
    for module in (actor_pb2, protocol_pb2, host_pb2, tck_pb2):
        fd = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fd)
        out[fd.name] = _normal(fd)
    return out


def _fresh_set(spec: Path = codegen.SPEC) -> dict[str, bytes]:
    fds = descriptor_pb2.FileDescriptorSet.FromString(codegen.descriptor_set(spec))
    return {fd.name: _normal(fd) for fd in fds.file}


def test_generated_modules_match_spec() -> None:
    """The committed modules were generated from the .proto files as they are now (compared
    as descriptors, so a newer protoc's cosmetic changes do not matter): else `make proto`."""
    pytest.importorskip("grpc_tools", reason="needs the dev extra (grpcio-tools)")
    assert _committed_set() == _fresh_set(), "spawnmesh/pb/gen is stale: make proto"


def test_staleness_is_detected(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="needs the dev extra (grpcio-tools)")
    for rel in codegen.PROTOS:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((codegen.SPEC / rel).read_text())
    proto = tmp_path / "spawn/actors/protocol.proto"
    proto.write_text(proto.read_text().replace("message Noop {}", "message Noop { int32 x = 1; }"))
    assert _committed_set() != _fresh_set(tmp_path)


def test_generated_imports_stay_inside_spawnmesh() -> None:
    for path in codegen.OUT.rglob("*.py*"):
        text = path.read_text()
        assert "from spawn." not in text and "import spawn." not in text, path
        assert text.startswith("# DO NOT EDIT: generated by `make proto`"), path
