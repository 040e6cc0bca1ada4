"""SWIM + Lifeguard configuration: every knob with its unit, default and formula, plus presets.

The presets take hashicorp/memberlist's ``DefaultLANConfig`` / ``DefaultWANConfig`` /
``DefaultLocalConfig`` timings; ``lan`` re-tunes suspicion (``suspicion_mult`` 1, ``suspicion_k``
3: derivation in spec/swim.md section 5.3, figures in docs/membership.md). All durations are
integer milliseconds (names end in ``_ms``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from spawnmesh.errors import ConfigError


@dataclass(frozen=True, slots=True)
class SwimConfig:
    """Tunables of the membership core (immutable; build variants with ``dataclasses.replace``)."""

    probe_interval_ms: int = 1_000
    """Time between two probes of one member (ms). Scaled by the awareness score: x (score+1)."""

    probe_timeout_ms: int = 500
    """Wait for a direct ack before indirect probes (ms); ~p99 RTT. Scaled like the interval."""

    indirect_checks: int = 3
    """Members asked to ping-req a target whose direct ping timed out (each one's failure is an
    independent witness: see ``suspicion_k``)."""

    retransmit_mult: int = 4
    """Each update is sent ``retransmit_mult * ceil(log10(n + 1))`` times."""

    suspicion_mult: int = 1
    """Min suspicion timeout = ``suspicion_mult * max(1, log10(max(1, n))) * probe_interval``."""

    suspicion_max_timeout_mult: int = 6
    """Max suspicion timeout = ``suspicion_max_timeout_mult * min``; Lifeguard starts there."""

    suspicion_k: int = 3
    """k: independent confirmations that shrink a suspicion from max to min, ``min(k, n - 2)``;
    lan sets it to ``indirect_checks`` (the failed probe's helpers confirm at once)."""

    push_pull_interval_ms: int = 30_000
    """Full-state TCP sync with one random member (ms); 0 disables. x ``ceil(n / 32)`` above 32
    members, so its bytes per node stay constant in n."""

    gossip_interval_ms: int = 200
    """Time between gossip rounds of queued updates (ms); 0 disables. News spreads about
    ``gossip_nodes + 1``-fold per round."""

    gossip_nodes: int = 3
    """Members each gossip round sends to."""

    gossip_to_the_dead_ms: int = 30_000
    """Dead members still receive gossip for this long (ms), so they learn and refute."""

    awareness_max_multiplier: int = 8
    """Lifeguard health score is bounded to ``0 .. awareness_max_multiplier - 1``; probe interval
    and timeout are multiplied by ``score + 1``."""

    tcp_timeout_ms: int = 10_000
    """Time the shell allows a TCP fallback ping or a push-pull exchange (ms)."""

    tcp_ping: bool = True
    """Ask the shell for a TCP fallback ping when the direct UDP ping times out."""

    udp_buffer_bytes: int = 1_400
    """Datagram size budget (bytes); piggybacked updates are packed to fit."""

    meta_max_bytes: int = 512
    """Upper bound on a member's metadata blob (bytes)."""

    reconnect_interval_ms: int = 30_000
    """Push-pull attempt to one random dead (not left) member (ms), to heal partitions; 0 off."""

    dead_reap_ms: int = 24 * 3_600_000
    """Dead/left members are forgotten after this long (ms); until then stale news is refused."""

    ring_probe: bool = True
    """Also probe the ring successor every period (each member is then probed at least once
    per period by its ring predecessor; costs one more probe per period)."""

    lifeguard: bool = True
    """Lifeguard on: awareness, nacks, dynamic suspicion timeout, evidence confirmations, buddy
    rule and direct notice, stall discount (tolerance ``probe_timeout_ms / 2``) and grace,
    answers to stale news. Off: plain SWIM with a fixed ``min`` suspicion timeout."""

    def validate(self) -> SwimConfig:
        """Raise ``ConfigError`` naming the first invalid setting; return self."""
        positive = (
            "probe_interval_ms",
            "probe_timeout_ms",
            "retransmit_mult",
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "awareness_max_multiplier",
            "tcp_timeout_ms",
            "udp_buffer_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        for name in (
            "indirect_checks",
            "suspicion_k",
            "push_pull_interval_ms",
            "gossip_interval_ms",
            "gossip_nodes",
            "gossip_to_the_dead_ms",
            "meta_max_bytes",
            "reconnect_interval_ms",
            "dead_reap_ms",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        if self.probe_timeout_ms > self.probe_interval_ms:
            raise ConfigError("probe_timeout_ms", "must not exceed probe_interval_ms")
        if self.udp_buffer_bytes < 576:
            raise ConfigError("udp_buffer_bytes", "must be >= 576")
        return self

    def replace(self, **changes: object) -> SwimConfig:
        """A copy with ``changes`` applied, validated."""
        return dataclasses.replace(self, **changes).validate()  # type: ignore[arg-type]

    # -- formulas ---------------------------------------------------------------------------

    def retransmit_limit(self, n: int) -> int:
        """Transmissions per update in a cluster of ``n`` members."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def suspicion_min_ms(self, n: int) -> int:
        """Lifeguard min suspicion timeout (ms) for ``n`` members (memberlist's formula)."""
        scale = max(1.0, math.log10(max(1, n)))
        return int(self.suspicion_mult * scale * self.probe_interval_ms)

    def suspicion_max_ms(self, n: int) -> int:
        """Lifeguard max suspicion timeout (ms), where a fresh suspicion starts."""
        return self.suspicion_max_timeout_mult * self.suspicion_min_ms(n)

    def suspicion_confirmations(self, n: int) -> int:
        """k for ``n`` members: ``min(suspicion_k, n - 2)`` (members other than the subject and
        the first suspector); 0 with Lifeguard off."""
        return max(0, min(self.suspicion_k, n - 2)) if self.lifeguard else 0

    def stall_tolerance_ms(self) -> int:
        """A call this late after the core's deadline means the node stalled (Lifeguard):
        ``probe_timeout_ms // 2``, so a stall that could fail a probe is always noticed."""
        return self.probe_timeout_ms // 2

    def push_pull_scaled_ms(self, n: int) -> int:
        """Push-pull interval for ``n`` members: x ``ceil(n / 32)``, so the bytes a node spends
        on anti-entropy (a table of n rows per exchange) stay constant in n."""
        if n <= 32:
            return self.push_pull_interval_ms
        return self.push_pull_interval_ms * math.ceil(n / 32)


def lan() -> SwimConfig:
    """memberlist DefaultLANConfig timings (1 s probes, 500 ms timeout) with spawnmesh's tuned
    suspicion: mult 1 (memberlist: 4) and k 3, measured in bench/membership.py."""
    return SwimConfig().validate()


def wan() -> SwimConfig:
    """memberlist DefaultWANConfig: 5 s probes, 3 s timeout, suspicion mult 6 (k 4 = mult - 2),
    4 gossip nodes. Not re-tuned: spawnmesh measured only the lan preset."""
    return SwimConfig(
        tcp_timeout_ms=30_000,
        suspicion_mult=6,
        suspicion_k=4,
        push_pull_interval_ms=60_000,
        probe_timeout_ms=3_000,
        probe_interval_ms=5_000,
        gossip_nodes=4,
        gossip_interval_ms=500,
        gossip_to_the_dead_ms=60_000,
    ).validate()


def local() -> SwimConfig:
    """memberlist DefaultLocalConfig: loopback; 200 ms timeout, 1 indirect check, mult 3 (k 1 =
    mult - 2). Not re-tuned: spawnmesh measured only the lan preset."""
    return SwimConfig(
        tcp_timeout_ms=1_000,
        indirect_checks=1,
        suspicion_k=1,
        retransmit_mult=2,
        suspicion_mult=3,
        push_pull_interval_ms=15_000,
        probe_timeout_ms=200,
        probe_interval_ms=1_000,
        gossip_interval_ms=100,
        gossip_to_the_dead_ms=15_000,
    ).validate()


PRESETS = {"lan": lan, "wan": wan, "local": local}
