"""Retransmit-limited piggyback queue of encoded membership news.

Each item is sent up to ``limit`` times (``retransmit_mult * ceil(log10(n + 1))``), the least
transmitted first and, among equals, the most recently queued first. Queuing news about a member
drops any older queued news about the same member.
"""

from __future__ import annotations

_MAX_MISSES = 16
"""Consecutive non-fitting items after which :meth:`BroadcastQueue.get` stops looking."""


class _Item:
    __slots__ = ("data", "key", "transmits")

    def __init__(self, key: str, data: bytes) -> None:
        self.key = key
        self.data = data
        self.transmits = 0


class BroadcastQueue:
    """Pending news keyed by member name; at most one item per member (pure)."""

    __slots__ = ("_items", "_levels")

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._levels: list[dict[str, _Item]] = [{}]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def queue(self, key: str, data: bytes) -> None:
        """Queue ``data`` (one encoded message) about member ``key``, replacing older news."""
        old = self._items.pop(key, None)
        if old is not None:
            del self._levels[old.transmits][key]
        item = _Item(key, data)
        self._items[key] = item
        self._levels[0][key] = item

    def drop(self, key: str) -> None:
        """Forget queued news about ``key``."""
        old = self._items.pop(key, None)
        if old is not None:
            del self._levels[old.transmits][key]

    def transmits(self, key: str) -> int | None:
        """How often the queued news about ``key`` was sent, or None if none is queued."""
        item = self._items.get(key)
        return None if item is None else item.transmits

    def get(self, budget_bytes: int, limit: int, max_items: int = 1 << 30) -> list[bytes]:
        """Take items fitting in ``budget_bytes``, count a transmission, drop those at ``limit``."""
        if not self._items or budget_bytes <= 0:
            return []
        chosen: list[_Item] = []
        remaining = budget_bytes
        misses = 0  # stop scanning after a run of items that do not fit (keeps get() O(fit))
        for level in self._levels:
            if not level:
                continue
            for item in reversed(level.values()):
                size = len(item.data)
                if size <= remaining:
                    chosen.append(item)
                    remaining -= size
                    misses = 0
                    if remaining < 8 or len(chosen) >= max_items:
                        break
                else:
                    misses += 1
                    if misses >= _MAX_MISSES:
                        break
            if remaining < 8 or len(chosen) >= max_items or misses >= _MAX_MISSES:
                break
        levels = self._levels
        for item in chosen:
            del levels[item.transmits][item.key]
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
                continue
            if item.transmits == len(levels):
                levels.append({})
            levels[item.transmits][item.key] = item
        return [item.data for item in chosen]

    def prune(self, limit: int) -> None:
        """Drop items already sent ``limit`` times (after the cluster shrank)."""
        for level in self._levels[limit:]:
            for key in level:
                del self._items[key]
            level.clear()
