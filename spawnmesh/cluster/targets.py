"""Who a node probes and gossips to: shuffled round-robin, the ring successor, random picks.

Pure bookkeeping over the names of the other members (the core owns the statuses):

* **round-robin** (SWIM): every live member once per round, in an order reshuffled at each wrap;
  a new member goes to a random position of the rest of the round;
* **ring successor** (spawnmesh): the next live member after this node on a hash ring of all
  names. Every node probes its successor every period as well, so each member is probed by its
  ring predecessor at a regular interval instead of at Poisson-distributed times (with random
  probing alone the time until a crashed member is first probed is ~exponential: p99 ~ 4.6
  periods; with the ring it is at most one period);
* **random picks**: up to k distinct members passing a predicate, for ping-req helpers and
  gossip targets, in bounded time.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable


def ring_key(name: str) -> tuple[int, str]:
    """A member's position on the probe ring: stable across processes (not ``hash()``)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big"), name


class Targets:
    """The other members' names, ordered for probing and sampled for helpers and gossip."""

    __slots__ = ("_index", "_order", "_pos", "_ring", "_self_key", "others", "rng")

    def __init__(self, self_name: str, rng: random.Random) -> None:
        self.rng = rng
        self.others: list[str] = []
        self._index: dict[str, int] = {}
        self._order: list[str] = []
        self._pos = 0
        self._ring: list[tuple[int, str]] = []
        self._self_key = ring_key(self_name)

    def __len__(self) -> int:
        return len(self.others)

    def add(self, name: str) -> None:
        """A member became known."""
        self._index[name] = len(self.others)
        self.others.append(name)
        bisect.insort(self._ring, ring_key(name))
        self.insert_probe(name)

    def remove(self, name: str) -> None:
        """A member was forgotten (reaped)."""
        i = self._index.pop(name)
        last = self.others.pop()
        if last != name:
            self.others[i] = last
            self._index[last] = i
        key = ring_key(name)
        j = bisect.bisect_left(self._ring, key)
        if j < len(self._ring) and self._ring[j] == key:
            del self._ring[j]

    def insert_probe(self, name: str) -> None:
        """Put ``name`` at a random position of the rest of the current round."""
        order = self._order
        lo = min(self._pos, len(order))
        order.insert(lo + int(self.rng.random() * (len(order) - lo + 1)), name)

    def next_probe(self, live: Callable[[str], bool]) -> str | None:
        """The next round-robin target passing ``live``; reshuffles at the end of a round."""
        for _ in range(2):
            order = self._order
            while self._pos < len(order):
                name = order[self._pos]
                self._pos += 1
                if live(name):
                    return name
            self._order = [n for n in self.others if live(n)]
            self.rng.shuffle(self._order)
            self._pos = 0
            if not self._order:
                return None
        return None

    def successor(self, live: Callable[[str], bool]) -> str | None:
        """The first member after this node on the ring that passes ``live`` (None if none)."""
        ring = self._ring
        n = len(ring)
        start = bisect.bisect_right(ring, self._self_key)
        for step in range(n):
            name = ring[(start + step) % n][1]
            if live(name):
                return name
        return None

    def sample(self, k: int, ok: Callable[[str], bool], exclude: str = "") -> list[str]:
        """Up to ``k`` distinct random members passing ``ok`` (bounded attempts when many)."""
        others = self.others
        if not others or k <= 0:
            return []
        chosen: list[str] = []
        n = len(others)
        attempts = 3 * k + 8
        if n <= attempts:
            cands = others[:]
            self.rng.shuffle(cands)
            for name in cands:
                if name != exclude and ok(name):
                    chosen.append(name)
                    if len(chosen) >= k:
                        break
            return chosen
        seen: set[str] = set()
        rand = self.rng.random
        for _ in range(attempts):
            name = others[int(rand() * n)]
            if name in seen or name == exclude:
                continue
            seen.add(name)
            if ok(name):
                chosen.append(name)
                if len(chosen) >= k:
                    break
        return chosen
