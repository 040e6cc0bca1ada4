"""The SDK's way to define actors: an :class:`ActorSystem` of decorated classes or functions.

Class style::

    demo = ActorSystem("demo")

    @demo.actor("counter", state=Counter)
    class CounterActor:
        @action
        async def add(self, ctx: Context[Counter], n: int) -> int:
            ctx.state = Counter(ctx.state.value + n)
            return ctx.state.value

Function style::

    counter = demo.define("counter", state=Counter)

    @counter.action
    async def add(ctx: Context[Counter], n: int) -> int: ...

The class is instantiated once per node; per-actor data belongs in the state.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any, TypeVar, overload

from spawnmesh.actors.definition import (
    DEFAULT_CHANNEL_ACTION,
    ActionDef,
    ActorDef,
    Handler,
    Kind,
    SnapshotStrategy,
    TimerDef,
    WriteBehind,
)
from spawnmesh.errors import DefinitionError

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C", bound=type)

_MARK = "__spawnmesh_action__"


def _payload_type(fn: Callable[..., Any], skip: int) -> Any:
    """The annotated type of the payload parameter (after ctx, and self for methods)."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if len(params) < 2:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        return None
    return hints.get(params[1].name)


def _reply_type(fn: Callable[..., Any]) -> Any:
    """The annotated return type if it describes the reply value (not a Reply, None or Any)."""
    try:
        hint = typing.get_type_hints(fn).get("return")
    except Exception:
        return None
    if hint is None or hint is type(None) or hint is Any:
        return None
    from spawnmesh.actors.context import Reply

    return None if hint is Reply else hint


def _as_handler(fn: Callable[..., Any], *, takes_payload: bool, has_default: bool) -> Handler:
    """Normalise a user function to ``async (ctx, payload) -> result``; a payload parameter
    with a default gets its default when the caller sends no payload (None)."""
    if inspect.iscoroutinefunction(fn):
        if not takes_payload:
            return functools.wraps(fn)(lambda ctx, payload: fn(ctx))
        if has_default:
            return functools.wraps(fn)(
                lambda ctx, payload: fn(ctx) if payload is None else fn(ctx, payload)
            )
        return fn

    async def call(ctx: Any, payload: Any) -> Any:
        if not takes_payload or (has_default and payload is None):
            return fn(ctx)
        return fn(ctx, payload)

    return functools.wraps(fn)(call)


def _payload_has_default(fn: Callable[..., Any], skip: int) -> bool:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return len(params) >= 2 and params[1].default is not inspect.Parameter.empty


def _takes_payload(fn: Callable[..., Any], skip: int) -> bool:
    params = list(inspect.signature(fn).parameters.values())[skip:]
    if not params:
        raise DefinitionError(f"{fn.__qualname__}: an action takes (ctx) or (ctx, payload)")
    return len(params) >= 2


@overload
def action(fn: F, /) -> F: ...
@overload
def action(*, name: str | None = None, timer_ms: int | None = None) -> Callable[[F], F]: ...


def action(
    fn: Any = None, /, *, name: str | None = None, timer_ms: int | None = None
) -> Any:
    """Mark a method of an actor class as an action (``timer_ms``: also fire it periodically)."""

    def mark(f: F) -> F:
        setattr(f, _MARK, (name or f.__name__, timer_ms))
        return f

    return mark(fn) if fn is not None else mark


def timer(every_ms: int, *, name: str | None = None) -> Callable[[F], F]:
    """Mark a method as a timer action, delivered every ``every_ms`` as an ordinary turn."""
    return action(name=name, timer_ms=every_ms)


class ActorBuilder:
    """Collects one actor's definition; usable as a class decorator or for functions."""

    def __init__(self, adef: ActorDef) -> None:
        self.definition = adef

    def __call__(self, cls: C) -> C:
        """Class decorator: register every ``@action``/``@timer`` method of ``cls``."""
        instance = cls()
        for attr in dir(cls):
            member = getattr(cls, attr, None)
            mark = getattr(member, _MARK, None)
            if mark is None:
                continue
            bound = getattr(instance, attr)
            self._add(mark[0], bound, mark[1], skip=0)
        self.definition.validate()
        return cls

    def _add(self, name: str, fn: Callable[..., Any], timer_ms: int | None, skip: int) -> None:
        adef = self.definition
        if name in adef.actions:
            raise DefinitionError(f"actor {adef.system}/{adef.name}: action {name!r} twice")
        takes = _takes_payload(fn, skip)
        optional = _payload_has_default(fn, skip)
        handler = _as_handler(fn, takes_payload=takes, has_default=optional)
        adef.actions[name] = ActionDef(name, handler, _payload_type(fn, skip) if takes else None,
                                       _reply_type(fn), optional or not takes)
        if timer_ms is not None:
            adef.timers.append(TimerDef(name, timer_ms))

    @overload
    def action(self, fn: F, /) -> F: ...
    @overload
    def action(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def action(self, fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Function style: register ``fn(ctx[, payload])`` as an action."""

        def add(f: F) -> F:
            self._add(name or f.__name__, f, None, skip=0)
            return f

        return add(fn) if fn is not None else add

    def timer(self, every_ms: int, *, name: str | None = None) -> Callable[[F], F]:
        """Function style: register a timer action fired every ``every_ms``."""

        def add(f: F) -> F:
            self._add(name or f.__name__, f, every_ms, skip=0)
            return f

        return add


class ActorSystem:
    """A named set of actor definitions (Spawn's actor system)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._builders: dict[str, ActorBuilder] = {}

    def actor(
        self,
        name: str,
        *,
        kind: Kind | str = Kind.NAMED,
        state: Any = None,
        initial_state: Callable[[], Any] | None = None,
        stateful: bool | None = None,
        snapshot: SnapshotStrategy | None = None,
        deactivate_after_ms: int | None = None,
        channels: dict[str, str] | list[str] | None = None,
        pool_size: int = 1,
        tags: dict[str, str] | None = None,
    ) -> ActorBuilder:
        """Define actor ``name``: kind (named, unnamed template, pooled), state type,
        persistence (write-behind by default), deactivation timeout, channel subscriptions
        (topic -> action, or a list of topics delivered to ``receive``)."""
        if name in self._builders:
            raise DefinitionError(f"actor {self.name}/{name} is defined twice")
        k = Kind(kind) if isinstance(kind, str) else kind
        if isinstance(channels, list):
            channels = {topic: DEFAULT_CHANNEL_ACTION for topic in channels}
        adef = ActorDef(
            system=self.name,
            name=name,
            kind=k,
            state_type=state,
            stateful=(state is not None or initial_state is not None)
            if stateful is None
            else stateful,
            initial_state=initial_state,
            channels=dict(channels or {}),
            snapshot=snapshot or WriteBehind(),
            deactivate_after_ms=deactivate_after_ms,
            pool_size=pool_size,
            tags=dict(tags or {}),
        )
        builder = ActorBuilder(adef)
        self._builders[name] = builder
        return builder

    define = actor
    """Alias used for the function style: ``counter = system.define("counter", ...)``."""

    def definitions(self) -> list[ActorDef]:
        """Every actor definition of this system, validated."""
        out = []
        for b in self._builders.values():
            b.definition.validate()
            out.append(b.definition)
        return out
