"""A host's RegistrationRequest -> validated spawnmesh ActorDefs (or every problem found).

Host actors are ordinary :class:`ActorDef`s: their state is a ``google.protobuf.Any`` (kept byte
for byte, type URL included) and each action's handler forwards the turn to the host (the
``forward`` factory). So placement, strategies, timers, channels, workflows and deadlines are
the runtime's, exactly as for SDK actors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from spawnmesh.actors.definition import (
    DEFAULT_CHANNEL_ACTION,
    ActionDef,
    ActorDef,
    Handler,
    Kind,
    SnapshotStrategy,
    TimerDef,
    WriteBehind,
    WriteThrough,
)
from spawnmesh.errors import DefinitionError
from spawnmesh.host.convert import AnyCodec
from spawnmesh.host.gen import spawn
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.spawn import actors as pb

PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
"""The host protocol version this node speaks (docs/host-protocol.md, "Versioning")."""

_KINDS = {
    pb.Kind.UNKNOW_KIND: Kind.NAMED,
    pb.Kind.NAMED: Kind.NAMED,
    pb.Kind.UNNAMED: Kind.UNNAMED,
    pb.Kind.POOLED: Kind.POOLED,
}

Violation = tuple[str, str]
"""(field path, description), as in google.rpc.BadRequest.FieldViolation."""


@dataclass
class Registration:
    """A validated registration: the system name and its definitions."""

    system: str
    defs: list[ActorDef]
    host_address: str


class RegistrationInvalid(DefinitionError):
    """A registration with one or more problems; ``violations`` lists each."""

    def __init__(self, violations: list[Violation]) -> None:
        lines = "; ".join(f"{f}: {d}" for f, d in violations)
        super().__init__(f"invalid registration ({len(violations)} problems): {lines}")
        self.violations = violations


def _new_state() -> AnyMsg:
    return AnyMsg()


def build(
    req: spawn.RegistrationRequest,
    forward: Callable[[str], Handler],
    taken: Callable[[str, str], bool] = lambda system, name: False,
) -> Registration:
    """Validate ``req`` and build its definitions; ``forward(action)`` makes an action's
    handler; ``taken(system, name)`` says a name is already defined by something else.
    Raises RegistrationInvalid listing every problem."""
    bad: list[Violation] = []
    system_pb = req.actor_system
    name = system_pb.name if system_pb is not None else ""
    if system_pb is None or not name:
        bad.append(("actor_system.name", "an actor system needs a name"))
    actors = system_pb.registry.actors if system_pb is not None and system_pb.registry else {}
    if not actors:
        bad.append(("actor_system.registry.actors", "registers no actors"))
    defs = []
    for key in sorted(actors):
        adef = _actor(name or "?", key, actors[key], forward, bad)
        if adef is not None and taken(adef.system, adef.name):
            bad.append(
                (
                    f"actor_system.registry.actors[{key}]",
                    f"{adef.system}/{adef.name} is already defined on this node by "
                    "something other than this host",
                )
            )
        elif adef is not None:
            defs.append(adef)
    if bad:
        raise RegistrationInvalid(bad)
    return Registration(name, defs, req.host_address)


def _actor(
    system: str,
    key: str,
    actor: pb.Actor,
    forward: Callable[[str], Handler],
    bad: list[Violation],
) -> ActorDef | None:
    where = f"actor_system.registry.actors[{key}]"
    n_bad = len(bad)
    aid = actor.id
    name = aid.name if aid is not None and aid.name else key
    if name != key:
        bad.append((f"{where}.id.name", f"{name!r} differs from its registry key {key!r}"))
    if aid is not None and aid.system and aid.system != system:
        bad.append((f"{where}.id.system", f"{aid.system!r} is not the system {system!r}"))
    settings = actor.settings or pb.ActorSettings()
    kind = _KINDS.get(settings.kind)
    if kind is None:
        bad.append(
            (
                f"{where}.settings.kind",
                f"{settings.kind.name} actors are not supported (NAMED, UNNAMED, POOLED)",
            )
        )
        kind = Kind.NAMED
    stateful = settings.stateful and kind is not Kind.POOLED
    if settings.stateful and kind is Kind.POOLED:
        bad.append((f"{where}.settings.stateful", "POOLED actors are stateless"))
    pool_size = max(settings.max_pool_size, settings.min_pool_size, 1)
    snapshot = _snapshot(settings.snapshot_strategy, f"{where}.settings.snapshot_strategy", bad)
    deactivate = _deactivation(
        settings.deactivation_strategy, f"{where}.settings.deactivation_strategy", bad
    )
    actions: dict[str, ActionDef] = {}
    for i, a in enumerate(actor.actions):
        _add_action(actions, a.name, f"{where}.actions[{i}]", forward, bad)
    timers = []
    for i, t in enumerate(actor.timer_actions):
        tname = t.action.name if t.action is not None else ""
        if tname not in actions:
            _add_action(actions, tname, f"{where}.timer_actions[{i}].action", forward, bad)
        if t.seconds <= 0:
            bad.append(
                (f"{where}.timer_actions[{i}].seconds", "the interval (milliseconds) must be > 0")
            )
        timers.append(TimerDef(tname, max(t.seconds, 1)))
    meta = actor.metadata or pb.Metadata()
    channels = {}
    for i, ch in enumerate(meta.channel_group):
        action = ch.action or DEFAULT_CHANNEL_ACTION
        if not ch.topic:
            bad.append((f"{where}.metadata.channel_group[{i}].topic", "a channel needs a topic"))
        elif action not in actions:
            bad.append(
                (
                    f"{where}.metadata.channel_group[{i}].action",
                    f"maps to {action!r}, which is not one of the actor's actions",
                )
            )
        channels[ch.topic] = action
    if not actions:
        bad.append((f"{where}.actions", "an actor needs at least one action"))
    if len(bad) > n_bad:
        return None
    adef = ActorDef(
        system=system,
        name=name,
        kind=kind,
        state_type=AnyMsg if stateful else None,
        stateful=stateful,
        initial_state=_new_state if stateful else None,
        actions=actions,
        timers=timers,
        channels=channels,
        snapshot=snapshot,
        deactivate_after_ms=deactivate,
        pool_size=pool_size,
        tags=dict(meta.tags),
    )
    try:
        adef.validate()
    except DefinitionError as exc:
        bad.append((where, str(exc)))
        return None
    if stateful:
        adef.codec = AnyCodec()
    return adef


def _add_action(
    actions: dict[str, ActionDef],
    name: str,
    where: str,
    forward: Callable[[str], Handler],
    bad: list[Violation],
) -> None:
    if not name:
        bad.append((f"{where}.name", "an action needs a name"))
    elif name in actions:
        bad.append((f"{where}.name", f"action {name!r} is defined twice"))
    else:
        actions[name] = ActionDef(name, forward(name), None)


def _snapshot(
    s: pb.ActorSnapshotStrategy | None, where: str, bad: list[Violation]
) -> SnapshotStrategy:
    if s is None:
        return WriteBehind()
    if s.write_through is not None:
        return WriteThrough()
    if s.timeout is not None:
        if s.timeout.timeout <= 0:
            bad.append((f"{where}.timeout.timeout", "the write-behind interval must be > 0 ms"))
            return WriteBehind()
        return WriteBehind(every_ms=s.timeout.timeout)
    return WriteBehind()


def _deactivation(
    s: pb.ActorDeactivationStrategy | None, where: str, bad: list[Violation]
) -> int | None:
    if s is None or s.timeout is None:
        return None
    if s.timeout.timeout < 0:
        bad.append((f"{where}.timeout.timeout", "must be >= 0 ms (0: never passivate)"))
        return None
    return s.timeout.timeout


def check_version(info: spawn.ServiceInfo | None) -> Violation | None:
    """A problem with the host's protocol version, if any (major 0 means unspecified)."""
    major = info.protocol_major_version if info is not None else 0
    if major not in (0, PROTOCOL_MAJOR):
        return (
            "service_info.protocol_major_version",
            f"the host speaks protocol {major}.x; this node speaks "
            f"{PROTOCOL_MAJOR}.{PROTOCOL_MINOR}",
        )
    return None


def names(defs: Iterable[ActorDef]) -> list[str]:
    """``system/name`` of each definition (for logs)."""
    return [f"{d.system}/{d.name}" for d in defs]
