"""The member table and the precedence rules of membership news, as one table.

``PRECEDENCE[(news, current, cmp)]`` says what to do when news of kind ``news`` (alive, suspect,
dead, left) with incarnation ``i`` arrives about a member whose current record is ``current``
(unknown, alive, suspect, dead, left, or this node itself) at incarnation ``c``; ``cmp`` is
``i`` compared with ``c``. spec/swim.md mirrors this table; a test walks every cell.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from spawnmesh.cluster.messages import Addr


class Status(enum.IntEnum):
    """A member's state as seen by one node (wire values; append-only)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class News(enum.IntEnum):
    """Kind of incoming membership news."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class Current(enum.IntEnum):
    """What the receiving node currently holds about the subject of the news."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3
    UNKNOWN = 4
    SELF = 5
    """The news is about the receiving node itself (which is alive)."""
    SELF_LEAVING = 6
    """The news is about the receiving node, which is leaving gracefully."""


class Cmp(enum.IntEnum):
    """Incoming incarnation compared with the current one (UNKNOWN rows use ``GT``)."""

    LT = 0
    EQ = 1
    GT = 2


class Action(enum.Enum):
    """Outcome of one table cell."""

    IGNORE = "ignore"
    """Stale or redundant: drop, do not re-broadcast."""
    ACCEPT = "accept"
    """Apply the news (state and incarnation) and re-broadcast it."""
    CONFIRM = "confirm"
    """Already suspected: count an independent confirmation (Lifeguard), keep the state."""
    REFUTE = "refute"
    """News about ourselves: bump incarnation above it and broadcast alive."""
    REFUTE_IF_CHANGED = "refute_if_changed"
    """Alive news about ourselves at our incarnation: refute only if address or meta differ."""


_I, _A, _C, _F = Action.IGNORE, Action.ACCEPT, Action.CONFIRM, Action.REFUTE
_FC = Action.REFUTE_IF_CHANGED


def _rows() -> dict[tuple[News, Current, Cmp], Action]:
    lt, eq, gt = Cmp.LT, Cmp.EQ, Cmp.GT
    spec: dict[tuple[News, Current], tuple[Action, Action, Action]] = {
        # news ALIVE                      (<,  =,  >)
        (News.ALIVE, Current.UNKNOWN): (_A, _A, _A),
        (News.ALIVE, Current.ALIVE): (_I, _I, _A),
        (News.ALIVE, Current.SUSPECT): (_I, _I, _A),
        (News.ALIVE, Current.DEAD): (_I, _I, _A),
        (News.ALIVE, Current.LEFT): (_I, _I, _A),
        (News.ALIVE, Current.SELF): (_I, _FC, _F),
        (News.ALIVE, Current.SELF_LEAVING): (_I, _I, _I),
        # news SUSPECT
        (News.SUSPECT, Current.UNKNOWN): (_I, _I, _I),
        (News.SUSPECT, Current.ALIVE): (_I, _A, _A),
        (News.SUSPECT, Current.SUSPECT): (_I, _C, _A),
        (News.SUSPECT, Current.DEAD): (_I, _I, _I),
        (News.SUSPECT, Current.LEFT): (_I, _I, _I),
        (News.SUSPECT, Current.SELF): (_I, _F, _F),
        (News.SUSPECT, Current.SELF_LEAVING): (_I, _I, _I),
        # news DEAD
        (News.DEAD, Current.UNKNOWN): (_I, _I, _I),
        (News.DEAD, Current.ALIVE): (_I, _A, _A),
        (News.DEAD, Current.SUSPECT): (_I, _A, _A),
        (News.DEAD, Current.DEAD): (_I, _I, _I),
        (News.DEAD, Current.LEFT): (_I, _I, _I),
        (News.DEAD, Current.SELF): (_I, _F, _F),
        (News.DEAD, Current.SELF_LEAVING): (_I, _I, _I),
        # news LEFT
        (News.LEFT, Current.UNKNOWN): (_I, _I, _I),
        (News.LEFT, Current.ALIVE): (_I, _A, _A),
        (News.LEFT, Current.SUSPECT): (_I, _A, _A),
        (News.LEFT, Current.DEAD): (_I, _A, _A),
        (News.LEFT, Current.LEFT): (_I, _I, _I),
        (News.LEFT, Current.SELF): (_I, _F, _F),
        (News.LEFT, Current.SELF_LEAVING): (_I, _I, _I),
    }
    table: dict[tuple[News, Current, Cmp], Action] = {}
    for (news, cur), actions in spec.items():
        for cmp, action in zip((lt, eq, gt), actions, strict=True):
            table[(news, cur, cmp)] = action
    return table


PRECEDENCE: Final[dict[tuple[News, Current, Cmp], Action]] = _rows()
"""The whole rule set: (news, current, incarnation comparison) -> action."""

_GRID: Final[list[list[list[Action]]]] = [
    [[PRECEDENCE[(news, cur, cmp)] for cmp in Cmp] for cur in Current] for news in News
]
"""``PRECEDENCE`` as nested lists indexed by the int values (no hashing on the hot path)."""


def decide(news: News, current: Current, incoming: int, held: int) -> Action:
    """Look up the action for news at incarnation ``incoming`` vs ``held``."""
    if current == Current.UNKNOWN or incoming > held:
        return _GRID[news][current][2]
    return _GRID[news][current][0 if incoming < held else 1]


def current_of(status: Status) -> Current:
    """Table column for a member record in ``status`` (the int values coincide)."""
    return Current(int(status))


@dataclass(slots=True)
class Member:
    """One row of the member table (mutable, owned by the core)."""

    name: str
    addr: Addr
    meta: bytes
    incarnation: int
    status: Status
    since_ms: int
    """When ``status`` last changed (ms)."""


@dataclass(frozen=True, slots=True)
class MemberView:
    """Read-only snapshot of a member for callers of the core."""

    name: str
    addr: Addr
    meta: bytes
    incarnation: int
    status: Status


class MemberTable:
    """Members by name, with a count of live (alive or suspect) ones kept up to date."""

    __slots__ = ("_live", "by_name")

    def __init__(self) -> None:
        self.by_name: dict[str, Member] = {}
        self._live = 0

    def __len__(self) -> int:
        return len(self.by_name)

    def get(self, name: str) -> Member | None:
        """The record for ``name`` or None."""
        return self.by_name.get(name)

    def add(self, member: Member) -> None:
        """Insert a new member record."""
        self.by_name[member.name] = member
        if member.status <= Status.SUSPECT:
            self._live += 1

    def set_status(self, member: Member, status: Status, now_ms: int) -> None:
        """Change a member's status, keeping the live count."""
        if (member.status <= Status.SUSPECT) != (status <= Status.SUSPECT):
            self._live += 1 if status <= Status.SUSPECT else -1
        member.status = status
        member.since_ms = now_ms

    def remove(self, name: str) -> None:
        """Forget a member."""
        member = self.by_name.pop(name, None)
        if member is not None and member.status <= Status.SUSPECT:
            self._live -= 1

    @property
    def live_count(self) -> int:
        """Members alive or suspect (including this node)."""
        return self._live

    def view(self, name: str) -> MemberView | None:
        """Snapshot of one member."""
        m = self.by_name.get(name)
        if m is None:
            return None
        return MemberView(m.name, m.addr, m.meta, m.incarnation, m.status)
