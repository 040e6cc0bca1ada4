"""Actor definitions: what an actor kind is (Spawn's ``Actor`` with its settings).

A definition is data: a name, a kind, the state type and its codec, the actions, timers and
channel subscriptions, and the persistence and deactivation strategies. The runtime reads it;
the SDK (:mod:`spawnmesh.system`) builds it from decorated classes or functions.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from spawnmesh.codec import Codec, codec_for
from spawnmesh.errors import DefinitionError

Handler = Callable[[Any, Any], Awaitable[Any]]
"""An action: ``async def action(ctx, payload) -> value | Reply``."""

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@\-]{0,199}$")
DEFAULT_CHANNEL_ACTION = "receive"
STATE_ACTIONS = ("get_state", "getState", "get", "get_actor_state", "getActorState")
"""Actions answered with the actor's current state unless the definition defines them."""


class Kind(enum.Enum):
    """Spawn's actor kinds."""

    NAMED = "named"
    """One well-known instance whose name is the definition's name."""
    UNNAMED = "unnamed"
    """A template: instances with their own names are spawned at run time."""
    POOLED = "pooled"
    """Stateless workers: several instances, calls spread over them."""


@dataclass(frozen=True, slots=True)
class WriteThrough:
    """Persist state before the reply is sent (group-committed with concurrent writes)."""


@dataclass(frozen=True, slots=True)
class WriteBehind:
    """Persist changed state at most every ``every_ms`` (None: the node default), coalesced."""

    every_ms: int | None = None


SnapshotStrategy = WriteThrough | WriteBehind


@dataclass(frozen=True, slots=True)
class ActionDef:
    """One action: its name, handler and the payload type external callers' data converts to."""

    name: str
    fn: Handler
    payload_type: Any = None
    reply_type: Any = None
    """The annotated return type, when it is a plain value type: a reply that crossed the
    wire (as builtins) is converted back to it for the caller."""
    payload_optional: bool = False
    """The handler's payload parameter has a default: no payload (None) means that default."""


@dataclass(frozen=True, slots=True)
class TimerDef:
    """A timer action, delivered as an ordinary turn every ``every_ms`` while active."""

    action: str
    every_ms: int


@dataclass(slots=True)
class ActorDef:
    """The definition of one actor kind within an actor system."""

    system: str
    name: str
    kind: Kind = Kind.NAMED
    state_type: Any = None
    stateful: bool = True
    initial_state: Callable[[], Any] | None = None
    actions: dict[str, ActionDef] = field(default_factory=dict)
    timers: list[TimerDef] = field(default_factory=list)
    channels: dict[str, str] = field(default_factory=dict)
    """Channel (topic) -> the action that receives its broadcasts."""
    snapshot: SnapshotStrategy = field(default_factory=WriteBehind)
    deactivate_after_ms: int | None = None
    """Idle time before passivation; None: the node default; 0: never passivate."""
    pool_size: int = 1
    tags: dict[str, str] = field(default_factory=dict)
    codec: Codec = field(init=False)

    def __post_init__(self) -> None:
        self.codec = codec_for(self.state_type if self.stateful else None)

    def new_state(self) -> Any:
        """The state of an actor that has none stored yet."""
        if self.initial_state is not None:
            return self.initial_state()
        if self.state_type is None or not self.stateful:
            return None
        try:
            return self.state_type()
        except TypeError as exc:
            raise DefinitionError(
                f"{self.system}/{self.name}: state type {self.state_type!r} cannot be built "
                "without arguments; give initial_state="
            ) from exc

    def validate(self) -> None:
        """Raise DefinitionError naming the first thing wrong with this definition."""
        where = f"actor {self.system}/{self.name}"
        for n in (self.system, self.name):
            if not _NAME.match(n):
                raise DefinitionError(
                    f"{where}: name {n!r} must be 1-200 characters of letters, digits, _.:@-"
                )
        if not self.actions and not self.channels:
            raise DefinitionError(f"{where}: defines no actions")
        for t in self.timers:
            if t.action not in self.actions:
                raise DefinitionError(f"{where}: timer names unknown action {t.action!r}")
            if t.every_ms <= 0:
                raise DefinitionError(f"{where}: timer {t.action!r} interval must be > 0 ms")
        for topic, action in self.channels.items():
            if action not in self.actions:
                raise DefinitionError(
                    f"{where}: channel {topic!r} maps to unknown action {action!r}"
                )
        if self.kind is Kind.POOLED:
            if self.stateful:
                raise DefinitionError(f"{where}: pooled actors are stateless")
            if self.pool_size < 1:
                raise DefinitionError(f"{where}: pool_size must be >= 1")
        every = self.snapshot.every_ms if isinstance(self.snapshot, WriteBehind) else None
        if every is not None and every <= 0:
            raise DefinitionError(f"{where}: write-behind interval must be > 0 ms")
        if self.deactivate_after_ms is not None and self.deactivate_after_ms < 0:
            raise DefinitionError(f"{where}: deactivate_after_ms must be >= 0")
        if self.stateful:
            self.new_state()
