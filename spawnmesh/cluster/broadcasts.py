"""Retransmit-limited piggyback queue of encoded membership news.

Each item is sent up to ``limit`` times (``retransmit_mult * ceil(log10(n + 1))``), the least
transmitted first and, among equals, the most recently queued (or sent) first. Queuing news
about a member drops any older queued news about the same member.

Items live in one stack per transmit count; a replaced or re-levelled item leaves a stale entry
behind that is skipped when reached and swept when stale entries outnumber live ones, so
``get`` costs O(items taken), not O(queue) (dicts with many deletions would be scanned whole).
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

    __slots__ = ("_counts", "_items", "_levels")

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._levels: list[list[_Item]] = [[]]
        self._counts: list[int] = [0]
        """Live items per level (the stacks also hold stale entries)."""

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def _live(self, item: _Item, level: int) -> bool:
        return item.transmits == level and self._items.get(item.key) is item

    def _push(self, item: _Item) -> None:
        t = item.transmits
        while t >= len(self._levels):
            self._levels.append([])
            self._counts.append(0)
        stack = self._levels[t]
        stack.append(item)
        self._counts[t] += 1
        if len(stack) > 2 * self._counts[t] + 32:  # sweep stale entries
            self._levels[t] = [x for x in stack if self._live(x, t)]

    def queue(self, key: str, data: bytes) -> None:
        """Queue ``data`` (one encoded message) about member ``key``, replacing older news."""
        self.drop(key)
        item = _Item(key, data)
        self._items[key] = item
        self._push(item)

    def refresh(self, key: str, data: bytes) -> None:
        """Replace the data of news still queued about ``key``, keeping its transmit count (the
        newer data, e.g. another confirmation of the same suspicion, rides the remaining sends);
        nothing if none is queued."""
        item = self._items.get(key)
        if item is not None:
            item.data = data

    def drop(self, key: str) -> None:
        """Forget queued news about ``key``."""
        old = self._items.pop(key, None)
        if old is not None:
            self._counts[old.transmits] -= 1

    def transmits(self, key: str) -> int | None:
        """How often the queued news about ``key`` was sent, or None if none is queued."""
        item = self._items.get(key)
        return None if item is None else item.transmits

    def get(self, budget_bytes: int, limit: int, max_items: int = 1 << 30) -> list[bytes]:
        """Take items fitting in ``budget_bytes``, count a transmission, drop those at ``limit``."""
        if not self._items or budget_bytes <= 0:
            return []
        items = self._items
        chosen: list[_Item] = []
        remaining = budget_bytes
        misses = 0  # stop scanning after a run of items that do not fit (keeps get() O(fit))
        for level, stack in enumerate(self._levels):
            if not self._counts[level]:
                stack.clear()
                continue
            skipped: list[_Item] = []
            while stack:
                item = stack.pop()
                if item.transmits != level or items.get(item.key) is not item:
                    continue  # stale entry
                size = len(item.data)
                if size <= remaining:
                    chosen.append(item)
                    self._counts[level] -= 1
                    remaining -= size
                    misses = 0
                    if remaining < 8 or len(chosen) >= max_items:
                        break
                else:
                    skipped.append(item)
                    misses += 1
                    if misses >= _MAX_MISSES:
                        break
            stack.extend(reversed(skipped))
            if remaining < 8 or len(chosen) >= max_items or misses >= _MAX_MISSES:
                break
        for item in chosen:
            item.transmits += 1
            if item.transmits >= limit:
                del items[item.key]
            else:
                self._push(item)
        return [item.data for item in chosen]

    def prune(self, limit: int) -> None:
        """Drop items already sent ``limit`` times (after the cluster shrank)."""
        for level in range(limit, len(self._levels)):
            for item in self._levels[level]:
                if self._live(item, level):
                    del self._items[item.key]
            self._levels[level].clear()
            self._counts[level] = 0
