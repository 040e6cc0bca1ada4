"""Node metrics: plain-Python counters on the hot path, Prometheus rendering at scrape time.

The actor runtime updates these on every invocation (target: >100,000 invocations/s in one
process), so an update is a few attribute, dict and list operations with no locks, no
``prometheus_client`` objects and no label lookups. Only :meth:`Metrics.render` (once per
scrape) turns the numbers into Prometheus metric families, through a custom collector on a
private :class:`~prometheus_client.CollectorRegistry`.

Everything runs on the trio thread, so no locking is needed: a scrape reads the plain numbers
between two hot-path updates.
"""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # prometheus_client is imported at the first scrape (~2 MB of idle RSS)
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )

from spawnmesh.clock import wall_ms

CONTENT_TYPE_PLAIN_0_0_4: Final = "text/plain; version=0.0.4; charset=utf-8"
"""prometheus_client's content type of the text format 0.0.4 (spelled out: see above)."""

__all__ = [
    "BATCH_BUCKETS",
    "DURATION_BUCKETS",
    "CounterSource",
    "GaugeSample",
    "GaugeSource",
    "Histogram",
    "Metrics",
]

log = logging.getLogger(__name__)

GaugeSample = tuple[str, str, dict[str, str], float]
"""``(metric name, help text, labels, value)`` produced by a gauge source at scrape time."""

GaugeSource = Callable[[], Iterable[GaugeSample]]
"""A callable the runtime registers to report point-in-time values (queue depths, actor counts)."""

CounterSource = Callable[[], Iterable[GaugeSample]]
"""A callable reporting running totals kept elsewhere (gossip bytes, probes): the same tuples as
a gauge source, but every name ends in ``_total`` and the family is rendered as a counter."""

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Finite upper bounds (seconds) of the invocation duration histogram; ``+Inf`` is implied."""

BATCH_BUCKETS: Final[tuple[float, ...]] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Finite upper bounds (rows) of the statestore write batch size histogram."""

RTT_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0,
)
"""Finite upper bounds (seconds) of the gossip probe round-trip histogram (the membership
core's clock counts whole milliseconds: a LAN round trip is mostly 0 or 1 ms)."""

RECENT_ERRORS_MAX: Final = 64
"""Failed invocations kept for the dashboard and ``GET /v1/errors`` (the newest ones)."""


class Histogram:
    """A histogram of plain numbers: one non-cumulative count per bucket plus a sum.

    ``observe`` is one bisect over a constant tuple, one list-slot increment and one float add
    (the hot path); cumulative buckets are built only at scrape time."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        """A histogram with finite upper bounds ``bounds`` (sorted); ``+Inf`` is implied."""
        self.bounds: tuple[float, ...] = tuple(bounds)
        self.counts: list[int] = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one value (Prometheus ``le`` buckets are inclusive: ``bisect_left``)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        """``(cumulative (upper bound, count) pairs, count, sum)``."""
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return cumulative, running, self.total

    def family(self, name: str, doc: str, node: str) -> HistogramMetricFamily:
        """This histogram as a Prometheus family with the ``node`` label."""
        from prometheus_client.core import HistogramMetricFamily

        fam = HistogramMetricFamily(name, doc, labels=("node",))
        cumulative, _count, total = self.snapshot()
        fam.add_metric(
            (node,),
            [("+Inf" if math.isinf(b) else _bound_label(b), float(n)) for b, n in cumulative],
            total,
        )
        return fam


def _bound_label(bound: float) -> str:
    """``le`` label of a finite bound: ``repr`` of the float (``1.0``, ``2.5e-05``)."""
    return repr(float(bound))


_BUCKET_LABELS: Final[tuple[str, ...]] = (
    *(repr(b) for b in DURATION_BUCKETS),
    "+Inf",
)

# Names a gauge source may use: the classic (0.0.4) Prometheus grammar, so the text we serve
# with ``version=0.0.4`` is valid for every scraper.
_METRIC_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

# (attribute, metric name without ``_total``, help). The attribute is the plain int the runtime
# increments; the order here is the order of the rendered families.
_COUNTERS: Final[tuple[tuple[str, str, str], ...]] = (
    ("activations_total", "spawnmesh_activations", "Actor activations (state loaded)."),
    ("passivations_total", "spawnmesh_passivations", "Actor passivations (idle or drained)."),
    (
        "turn_failures_total",
        "spawnmesh_turn_failures",
        "Actor turns whose handler raised (the invocation failed with actor_failed).",
    ),
    (
        "stale_activations_total",
        "spawnmesh_stale_activations",
        "Activations fenced off because another activation wrote a newer state revision.",
    ),
    ("state_writes_total", "spawnmesh_state_writes", "Actor state rows written to the statestore."),
    (
        "state_write_batches_total",
        "spawnmesh_state_write_batches",
        "Statestore write batches (one round trip each).",
    ),
    (
        "state_write_failures_total",
        "spawnmesh_state_write_failures",
        "Statestore write batches that failed.",
    ),
    (
        "overloaded_total",
        "spawnmesh_overloaded",
        "Invocations rejected because a bounded queue was full.",
    ),
    ("timers_fired_total", "spawnmesh_timers_fired", "Actor timer ticks delivered."),
    (
        "scheduled_fired_total",
        "spawnmesh_scheduled_fired",
        "Delayed (scheduled) invocations delivered.",
    ),
    (
        "schedules_adopted_total",
        "spawnmesh_schedules_adopted",
        "Kept schedules taken over from cluster members that died or left.",
    ),
    ("broadcasts_total", "spawnmesh_broadcasts", "Broadcast messages published."),
    (
        "handoffs_total",
        "spawnmesh_handoffs",
        "Activations handed off to a new owner (queued turns finished, state flushed).",
    ),
    (
        "remote_invocations_total",
        "spawnmesh_remote_invocations",
        "Invocations and casts sent to the owning node over the peer wire.",
    ),
    (
        "forwarded_invocations_total",
        "spawnmesh_forwarded_invocations",
        "Invocations received for an actor this node does not own, forwarded to its owner.",
    ),
    (
        "not_owner_retries_total",
        "spawnmesh_not_owner_retries",
        "Remote invocations retried because ownership moved (NotOwner or a lost peer).",
    ),
    (
        "peer_sent_payload_bytes_total",
        "spawnmesh_peer_sent_payload_bytes",
        "Invocation payload bytes sent to peers in requests and replies (msgpack).",
    ),
    (
        "peer_received_payload_bytes_total",
        "spawnmesh_peer_received_payload_bytes",
        "Invocation payload bytes received from peers in requests and replies (msgpack).",
    ),
    ("host_turns_total", "spawnmesh_host_turns", "Actor turns sent to host processes."),
    (
        "host_registrations_total",
        "spawnmesh_host_registrations",
        "Actor systems registered by hosts over the host API.",
    ),
)

# (attribute, metric name without ``_total``, help, label names): dict counters the hot path
# bumps with ``d[key] = d.get(key, 0) + 1``; a key is the label value (a tuple for several).
_LABELLED: Final[tuple[tuple[str, str, str, tuple[str, ...]], ...]] = (
    (
        "peer_requests_sent",
        "spawnmesh_peer_requests_sent",
        "Peer-wire requests sent, by kind (call, cast, release, broadcast, spawn, ...).",
        ("kind",),
    ),
    (
        "peer_requests_received",
        "spawnmesh_peer_requests_received",
        "Peer-wire requests received and handled here, by kind.",
        ("kind",),
    ),
    (
        "peer_request_errors",
        "spawnmesh_peer_request_errors",
        "Peer-wire requests that failed, by direction (outbound: our request got an error; "
        "inbound: we answered one) and error code.",
        ("direction", "code"),
    ),
    (
        "host_turn_errors",
        "spawnmesh_host_turn_errors",
        "Host actor turns that failed, by error code.",
        ("code",),
    ),
)

# (attribute, metric name, help): Histogram attributes.
_HISTOGRAMS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "turn_seconds",
        "spawnmesh_turn_duration_seconds",
        "Wall time of actor turns (the handler, with the baton held), in seconds.",
    ),
    (
        "state_write_seconds",
        "spawnmesh_state_write_duration_seconds",
        "Wall time of statestore write batches (one round trip each), in seconds.",
    ),
    (
        "state_write_batch_size",
        "spawnmesh_state_write_batch_size",
        "Actor state rows per statestore write batch.",
    ),
    (
        "probe_rtt_seconds",
        "spawnmesh_cluster_probe_rtt_seconds",
        "Round-trip times of gossip probes answered directly (ping to ack), in seconds.",
    ),
)


_HISTOGRAM_NAME: Final = "spawnmesh_invocation_duration_seconds"
_RESERVED_NAMES: Final[frozenset[str]] = frozenset(
    {
        *(n for _a, base, _d in _COUNTERS for n in (base, base + "_total")),
        *(n for _a, base, _d, _l in _LABELLED for n in (base, base + "_total")),
        *(
            n
            for base in ("spawnmesh_invocations", "spawnmesh_metrics_gauge_source_errors")
            for n in (base, base + "_total")
        ),
        *(
            name + sfx
            for name in (_HISTOGRAM_NAME, *(h for _a, h, _d in _HISTOGRAMS))
            for sfx in ("", "_bucket", "_count", "_sum")
        ),
    }
)


class Metrics:
    """All metrics of one node: hot-path counters plus gauge sources read at scrape time.

    The runtime increments the ``*_total`` int attributes directly (``m.activations_total += 1``)
    and calls :meth:`observe_invocation` once per finished invocation. Every rendered sample
    carries the ``node`` label.
    """

    CONTENT_TYPE: Final[str] = CONTENT_TYPE_PLAIN_0_0_4
    """Content type of :meth:`render`'s output (Prometheus text format 0.0.4)."""

    __slots__ = (
        "_bucket_counts",
        "_counter_sources",
        "_duration_sum",
        "_gauge_sources",
        "_outcomes",
        "_registry",
        "_warned",
        "activations_total",
        "broadcasts_total",
        "forwarded_invocations_total",
        "gauge_source_errors_total",
        "handoffs_total",
        "host_registrations_total",
        "host_turn_errors",
        "host_turns_total",
        "node",
        "not_owner_retries_total",
        "overloaded_total",
        "passivations_total",
        "peer_received_payload_bytes_total",
        "peer_request_errors",
        "peer_requests_received",
        "peer_requests_sent",
        "peer_sent_payload_bytes_total",
        "probe_rtt_seconds",
        "recent_errors",
        "remote_invocations_total",
        "scheduled_fired_total",
        "schedules_adopted_total",
        "stale_activations_total",
        "state_write_batch_size",
        "state_write_batches_total",
        "state_write_failures_total",
        "state_write_seconds",
        "state_writes_total",
        "timers_fired_total",
        "turn_failures_total",
        "turn_seconds",
    )

    def __init__(self, node: str) -> None:
        """Create the metrics of node ``node`` (the value of every sample's ``node`` label)."""
        self.node = node
        self._outcomes: dict[str, int] = {"ok": 0}
        # One slot per finite bound plus +Inf; non-cumulative (cumulated at scrape time).
        self._bucket_counts: list[int] = [0] * (len(DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self.activations_total = 0
        self.passivations_total = 0
        self.turn_failures_total = 0
        self.stale_activations_total = 0
        self.state_writes_total = 0
        self.state_write_batches_total = 0
        self.state_write_failures_total = 0
        self.overloaded_total = 0
        self.timers_fired_total = 0
        self.scheduled_fired_total = 0
        self.schedules_adopted_total = 0
        self.broadcasts_total = 0
        self.handoffs_total = 0
        self.remote_invocations_total = 0
        self.forwarded_invocations_total = 0
        self.not_owner_retries_total = 0
        self.peer_sent_payload_bytes_total = 0
        self.peer_received_payload_bytes_total = 0
        self.host_turns_total = 0
        self.host_registrations_total = 0
        self.peer_requests_sent: dict[str, int] = {}
        self.peer_requests_received: dict[str, int] = {}
        self.peer_request_errors: dict[tuple[str, str], int] = {}
        self.host_turn_errors: dict[str, int] = {}
        self.turn_seconds = Histogram(DURATION_BUCKETS)
        self.state_write_seconds = Histogram(DURATION_BUCKETS)
        self.state_write_batch_size = Histogram(BATCH_BUCKETS)
        self.probe_rtt_seconds = Histogram(RTT_BUCKETS)
        self.recent_errors: deque[dict[str, object]] = deque(maxlen=RECENT_ERRORS_MAX)
        """The newest failed invocations (dicts: at_ms, actor, action, code, message)."""
        self.gauge_source_errors_total = 0
        self._gauge_sources: list[GaugeSource] = []
        self._counter_sources: list[CounterSource] = []
        self._warned: set[str] = set()  # invalid samples already logged (log once, not per scrape)
        self._registry: Any = None
        """prometheus_client's registry, made at the first scrape."""

    def observe_invocation(self, outcome: str, seconds: float) -> None:
        """Count one finished invocation: its outcome (``"ok"`` or an error code) and duration.

        Hot path: one dict update, one bisect over a constant tuple, one list slot and one float
        add. Prometheus ``le`` buckets are inclusive, which is exactly ``bisect_left``.
        """
        outcomes = self._outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self._bucket_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    def observe_failure(
        self, code: str, seconds: float, actor: str, action: str, message: str
    ) -> None:
        """Count one failed invocation (as :meth:`observe_invocation`) and keep it among the
        :attr:`recent_errors` (a cold path: only failures come here)."""
        self.observe_invocation(code, seconds)
        self.recent_errors.append({
            "at_ms": wall_ms(),
            "actor": actor,
            "action": action,
            "code": code,
            "message": message[:500],
        })

    def add_counter_source(self, fn: CounterSource) -> None:
        """Register ``fn``, called at every scrape to report running totals kept elsewhere (a
        transport's byte counts, a core's probe counts) as counters. Every sample's name must
        end in ``_total``; invalid samples are handled as for gauge sources."""
        self._counter_sources.append(fn)

    def add_gauge_source(self, fn: GaugeSource) -> None:
        """Register ``fn``, called at every scrape to report gauges as :data:`GaugeSample` tuples.

        A source that raises, or yields an invalid name, label or value, is logged and skipped
        (counted in ``spawnmesh_metrics_gauge_source_errors_total``); the scrape still succeeds.
        """
        self._gauge_sources.append(fn)

    def render(self) -> bytes:
        """Render every metric in the Prometheus text format 0.0.4 (see :attr:`CONTENT_TYPE`)."""
        from prometheus_client import CollectorRegistry, generate_latest

        if self._registry is None:
            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_MetricsCollector(self))
        return generate_latest(self._registry)

    # -- read-only views, for tests and the node's JSON status ---------------------------------

    def invocation_counts(self) -> dict[str, int]:
        """A copy of the per-outcome invocation counts."""
        return dict(self._outcomes)

    def duration_snapshot(self) -> tuple[list[tuple[float, int]], int, float]:
        """Duration histogram as ``(cumulative (upper bound, count) pairs, count, sum)``."""
        cumulative: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*DURATION_BUCKETS, math.inf), self._bucket_counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return cumulative, running, self._duration_sum

    # -- scrape-time rendering -----------------------------------------------------------------

    def _collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        node = self.node
        inv = CounterMetricFamily(
            "spawnmesh_invocations",
            "Finished invocations by outcome (ok or the error code).",
            labels=("node", "outcome"),
        )
        for outcome, n in sorted(self._outcomes.items()):
            inv.add_metric((node, outcome), n)
        yield inv

        hist = HistogramMetricFamily(
            _HISTOGRAM_NAME,
            "Wall time of finished invocations, from acceptance to reply, in seconds.",
            labels=("node",),
        )
        cumulative, _count, total = self.duration_snapshot()
        hist.add_metric(
            (node,),
            [(label, float(n)) for label, (_b, n) in zip(_BUCKET_LABELS, cumulative, strict=True)],
            total,
        )
        yield hist

        for attr, name, doc in _COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=("node",))
            fam.add_metric((node,), getattr(self, attr))
            yield fam

        for attr, name, doc, label_names in _LABELLED:
            fam = CounterMetricFamily(name, doc, labels=("node", *label_names))
            values: dict[object, int] = getattr(self, attr)
            for key, n in sorted(values.items()):
                labels = key if isinstance(key, tuple) else (key,)
                fam.add_metric((node, *map(str, labels)), n)
            yield fam

        for attr, name, doc in _HISTOGRAMS:
            h: Histogram = getattr(self, attr)
            yield h.family(name, doc, node)

        yield from self._collect_sources(node)

        errs = CounterMetricFamily(
            "spawnmesh_metrics_gauge_source_errors",
            "Gauge sources that raised or reported an invalid sample during a scrape.",
            labels=("node",),
        )
        errs.add_metric((node,), self.gauge_source_errors_total)
        yield errs

    def _collect_sources(self, node: str) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.samples import Sample

        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        # (name, sorted labels) -> index into the family's samples: the last value of a
        # duplicated series wins, so the exposition never repeats a series.
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        sources = [(s, False) for s in self._gauge_sources]
        sources += [(s, True) for s in self._counter_sources]
        for source, is_counter in sources:
            try:
                samples = list(source())
            except Exception:
                self.gauge_source_errors_total += 1
                log.exception("metrics source %r raised; skipped", source)
                continue
            for sample in samples:
                checked = _check_gauge_sample(sample)
                if checked is not None and is_counter:
                    checked = _as_counter_sample(checked)
                if checked is not None and checked[0] in families and (
                    isinstance(families[checked[0]], CounterMetricFamily) is not is_counter
                ):
                    checked = None  # one name, two types: keep the first
                if checked is None:
                    self.gauge_source_errors_total += 1
                    what = repr(sample)[:200]
                    if what not in self._warned and len(self._warned) < 1000:
                        self._warned.add(what)
                        log.warning("metrics gauge source %r: invalid sample %s", source, what)
                    continue
                name, doc, labels, value = checked
                labels["node"] = node
                fam = families.get(name)
                if fam is None:
                    kind = CounterMetricFamily if is_counter else GaugeMetricFamily
                    fam = families[name] = kind(name, doc)
                series = name + "_total" if is_counter else name
                key = (series, tuple(sorted(labels.items())))
                out = Sample(series, labels, value)
                idx = seen.get(key)
                if idx is None:
                    seen[key] = len(fam.samples)
                    fam.samples.append(out)
                else:
                    fam.samples[idx] = out
        yield from families.values()


def _check_gauge_sample(sample: object) -> tuple[str, str, dict[str, str], float] | None:
    """Validate one gauge sample; ``None`` if it would break the exposition."""
    if not isinstance(sample, tuple) or len(sample) != 4:
        return None
    name, doc, labels, value = sample
    if not isinstance(name, str) or not _METRIC_NAME_RE.match(name):
        return None
    if name in _RESERVED_NAMES:
        return None  # would collide with a built-in family or series
    if not isinstance(labels, dict):
        return None
    clean: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str) or not _LABEL_NAME_RE.match(k) or k.startswith("__"):
            return None
        if k == "node":
            continue  # always this node's name
        clean[k] = str(v)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return name, str(doc), clean, float(value)


def _as_counter_sample(
    checked: tuple[str, str, dict[str, str], float],
) -> tuple[str, str, dict[str, str], float] | None:
    """A counter source's sample with the family name (``_total`` stripped); ``None`` if the
    name does not end in ``_total``, collides with a built-in, or the value is negative."""
    name, doc, labels, value = checked
    base = name.removesuffix("_total")
    if base == name or not base or base in _RESERVED_NAMES or value < 0:
        return None
    return base, doc, labels, value


class _MetricsCollector:
    """Adapter between :class:`Metrics` and the prometheus_client registry (duck-typed: a
    registry with ``auto_describe=False`` only calls ``collect``)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics._collect())
