"""What a handler sees and returns: the turn :class:`Context` and the :class:`Reply` builder.

A reply carries the value for the caller, optionally the actor's new state, and a workflow run
after the turn commits: side effects, broadcasts, and at most one of forward or pipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from spawnmesh.errors import DefinitionError
from spawnmesh.ids import ActorId

if TYPE_CHECKING:
    from spawnmesh.actors.runtime import Runtime
    from spawnmesh.refs import ActorRef

S = TypeVar("S")
_UNSET: Any = object()

Target = "ActorRef | ActorId | str"


@dataclass(frozen=True, slots=True)
class Effect:
    """A fire-and-forget invocation issued after the turn commits; failures never reach the
    caller of the turn that produced it."""

    target: ActorId
    action: str
    payload: Any = None
    metadata: Mapping[str, str] | None = None
    delay_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Deliver ``payload`` to every subscriber of ``channel`` (on its mapped action, or
    ``action`` when given)."""

    channel: str
    payload: Any = None
    action: str | None = None


@dataclass(frozen=True, slots=True)
class Next:
    """Forward (the turn's input goes on) or pipe (its output goes on) to ``target.action``;
    the caller receives that actor's reply."""

    target: ActorId
    action: str
    pipe: bool


class Reply:
    """The result of a turn: value, optional new state, and the workflow (built fluently)."""

    __slots__ = ("broadcasts", "checkpoint", "effects", "next", "state", "value")

    def __init__(self, value: Any = None, state: Any = _UNSET) -> None:
        self.value = value
        self.state = state
        self.effects: list[Effect] | None = None
        self.broadcasts: list[Broadcast] | None = None
        self.next: Next | None = None
        self.checkpoint = False
        """Make this turn's state durable before replying, whatever the snapshot strategy."""

    def effect(
        self,
        target: ActorRef | ActorId,
        action: str,
        payload: Any = None,
        *,
        metadata: Mapping[str, str] | None = None,
        delay_ms: int | None = None,
    ) -> Reply:
        """Add a side effect: ``target.action(payload)`` cast after the turn commits."""
        if self.effects is None:
            self.effects = []
        self.effects.append(Effect(_actor_id(target), action, payload, metadata, delay_ms))
        return self

    def broadcast(self, channel: str, payload: Any = None, *, action: str | None = None) -> Reply:
        """Add a broadcast of ``payload`` to the channel group ``channel``."""
        if self.broadcasts is None:
            self.broadcasts = []
        self.broadcasts.append(Broadcast(channel, payload, action))
        return self

    def forward(self, target: ActorRef | ActorId, action: str) -> Reply:
        """Send this turn's *input* on to ``target.action``; the caller gets that reply."""
        return self._set_next(Next(_actor_id(target), action, pipe=False))

    def pipe(self, target: ActorRef | ActorId, action: str) -> Reply:
        """Send this turn's *output* (the reply value) on to ``target.action``; the caller gets
        that reply."""
        return self._set_next(Next(_actor_id(target), action, pipe=True))

    def _set_next(self, nxt: Next) -> Reply:
        if self.next is not None:
            raise DefinitionError("a reply can forward or pipe once, not both")
        self.next = nxt
        return self


def _actor_id(target: Any) -> ActorId:
    if isinstance(target, ActorId):
        return target
    aid = getattr(target, "id", None)
    if isinstance(aid, ActorId):
        return aid
    raise DefinitionError(f"not an actor reference: {target!r}")


class Context(Generic[S]):
    """One turn's view: the current state, metadata, caller and this actor's id.

    Assign ``ctx.state`` (or return ``ctx.reply(value, state=new)``) to change the state;
    mutating it in place also works: the runtime re-encodes the state at the end of every
    successful turn, and resets it to the last committed state when the handler raises.
    """

    __slots__ = ("_runtime", "caller", "metadata", "self_id", "state")

    def __init__(
        self,
        runtime: Runtime,
        self_id: ActorId,
        state: S,
        metadata: Mapping[str, str],
        caller: ActorId | None,
    ) -> None:
        self._runtime = runtime
        self.self_id = self_id
        self.state = state
        self.metadata = metadata
        self.caller = caller

    def reply(self, value: Any = None, *, state: Any = _UNSET) -> Reply:
        """Build a reply with ``value`` and, when given, the new ``state``."""
        return Reply(value, state)

    def ref(self, name: str, *, system: str | None = None, parent: str | None = None) -> ActorRef:
        """A reference to another actor (same system by default) to invoke from this turn."""
        from spawnmesh.refs import ActorRef

        return ActorRef(self._runtime, ActorId(system or self.self_id.system, name, parent))

    @property
    def node_id(self) -> str:
        """The node running this turn (in a cluster: the actor's current owner)."""
        return self._runtime.node_id

    @property
    def self_ref(self) -> ActorRef:
        """A reference to this actor (a synchronous self-call is a CallCycle; cast instead)."""
        from spawnmesh.refs import ActorRef

        return ActorRef(self._runtime, self.self_id)
