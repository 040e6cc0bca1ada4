"""Actor identity: which actor system, which actor, and for spawned instances which template."""

from __future__ import annotations

from typing import NamedTuple


class ActorId(NamedTuple):
    """Identifies one virtual actor (Spawn's ``ActorId``).

    ``name`` is unique within ``system``. A named actor's name is its definition's name; an
    unnamed actor's instance has its own name and names its template in ``parent``; a pooled
    actor's instance is ``name`` with ``parent`` set to the pool definition.
    """

    system: str
    name: str
    parent: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The key activations and stored state are indexed by: (system, name)."""
        return (self.system, self.name)

    def __str__(self) -> str:
        base = f"{self.system}/{self.name}"
        return f"{base}<{self.parent}>" if self.parent else base


def key_str(key: tuple[str, str]) -> str:
    """Human form of an activation key, used in logs and error messages."""
    return f"{key[0]}/{key[1]}"
