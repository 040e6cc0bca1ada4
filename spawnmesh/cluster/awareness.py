"""Lifeguard local health multiplier: a slow node stretches its own probe timeouts.

Score in ``0 .. max_multiplier - 1``: +1 per missed nack / refutation of our own suspicion,
-1 per successful probe; probe interval and timeout are multiplied by ``score + 1``.
"""

from __future__ import annotations


class Awareness:
    """The node's own health score (pure, no clock)."""

    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        """Add ``delta`` and clamp to ``0 .. max_multiplier - 1``."""
        self.score = min(self.max_multiplier - 1, max(0, self.score + delta))

    @property
    def multiplier(self) -> int:
        """Factor applied to probe interval and timeout (``score + 1``)."""
        return self.score + 1

    def scale_ms(self, timeout_ms: int) -> int:
        """``timeout_ms`` stretched by the current health multiplier."""
        return timeout_ms * (self.score + 1)
