"""Lifeguard suspicion timeout: starts at max and shrinks toward min as confirmations arrive.

timeout(c) = max(min, max - (max - min) * log(c + 1) / log(k + 1)), with c independent
confirmations out of k expected (memberlist's formula). With k < 1 the timeout is min.
"""

from __future__ import annotations

import math


def suspicion_timeout_ms(confirmations: int, k: int, min_ms: int, max_ms: int) -> int:
    """Timeout (ms, from the start of the suspicion) after ``confirmations`` of ``k``."""
    if k < 1 or max_ms <= min_ms:
        return min_ms
    frac = math.log(confirmations + 1) / math.log(k + 1)
    raw = max_ms - frac * (max_ms - min_ms)
    return max(min_ms, math.floor(raw))


class Suspicion:
    """One suspicion of one member: who confirmed it, and when it expires (pure)."""

    __slots__ = ("confirmers", "incarnation", "k", "max_ms", "min_ms", "start_ms")

    def __init__(
        self, sender: str, incarnation: int, k: int, min_ms: int, max_ms: int, start_ms: int
    ) -> None:
        self.confirmers: set[str] = {sender}
        self.incarnation = incarnation
        self.k = k
        self.min_ms = min_ms
        self.max_ms = max_ms
        self.start_ms = start_ms

    @property
    def confirmations(self) -> int:
        """Independent confirmations beyond the first suspicion."""
        return len(self.confirmers) - 1

    def confirm(self, sender: str) -> bool:
        """Count ``sender``'s suspicion; True if it is new (the deadline may have moved)."""
        if self.confirmations >= self.k or sender in self.confirmers:
            return False
        self.confirmers.add(sender)
        return True

    def deadline_ms(self) -> int:
        """Absolute time (ms) at which the member is declared dead if not refuted."""
        return self.start_ms + suspicion_timeout_ms(
            self.confirmations, self.k, self.min_ms, self.max_ms
        )
