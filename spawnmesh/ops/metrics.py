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
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

__all__ = ["DURATION_BUCKETS", "GaugeSample", "GaugeSource", "Metrics"]

log = logging.getLogger(__name__)

GaugeSample = tuple[str, str, dict[str, str], float]
"""``(metric name, help text, labels, value)`` produced by a gauge source at scrape time."""

GaugeSource = Callable[[], Iterable[GaugeSample]]
"""A callable the runtime registers to report point-in-time values (queue depths, actor counts)."""

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
)


_HISTOGRAM_NAME: Final = "spawnmesh_invocation_duration_seconds"
_RESERVED_NAMES: Final[frozenset[str]] = frozenset(
    {
        *(n for _a, base, _d in _COUNTERS for n in (base, base + "_total")),
        *(
            n
            for base in ("spawnmesh_invocations", "spawnmesh_metrics_gauge_source_errors")
            for n in (base, base + "_total")
        ),
        *(_HISTOGRAM_NAME + sfx for sfx in ("", "_bucket", "_count", "_sum")),
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
        "node",
        "not_owner_retries_total",
        "overloaded_total",
        "passivations_total",
        "remote_invocations_total",
        "scheduled_fired_total",
        "stale_activations_total",
        "state_write_batches_total",
        "state_write_failures_total",
        "state_writes_total",
        "timers_fired_total",
        "turn_failures_total",
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
        self.broadcasts_total = 0
        self.handoffs_total = 0
        self.remote_invocations_total = 0
        self.forwarded_invocations_total = 0
        self.not_owner_retries_total = 0
        self.gauge_source_errors_total = 0
        self._gauge_sources: list[GaugeSource] = []
        self._warned: set[str] = set()  # invalid samples already logged (log once, not per scrape)
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_MetricsCollector(self))

    def observe_invocation(self, outcome: str, seconds: float) -> None:
        """Count one finished invocation: its outcome (``"ok"`` or an error code) and duration.

        Hot path: one dict update, one bisect over a constant tuple, one list slot and one float
        add. Prometheus ``le`` buckets are inclusive, which is exactly ``bisect_left``.
        """
        outcomes = self._outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self._bucket_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self._duration_sum += seconds

    def add_gauge_source(self, fn: GaugeSource) -> None:
        """Register ``fn``, called at every scrape to report gauges as :data:`GaugeSample` tuples.

        A source that raises, or yields an invalid name, label or value, is logged and skipped
        (counted in ``spawnmesh_metrics_gauge_source_errors_total``); the scrape still succeeds.
        """
        self._gauge_sources.append(fn)

    def render(self) -> bytes:
        """Render every metric in the Prometheus text format 0.0.4 (see :attr:`CONTENT_TYPE`)."""
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

        yield from self._collect_gauges(node)

        errs = CounterMetricFamily(
            "spawnmesh_metrics_gauge_source_errors",
            "Gauge sources that raised or reported an invalid sample during a scrape.",
            labels=("node",),
        )
        errs.add_metric((node,), self.gauge_source_errors_total)
        yield errs

    def _collect_gauges(self, node: str) -> Iterator[Metric]:
        families: dict[str, GaugeMetricFamily] = {}
        # (name, sorted labels) -> index into the family's samples: the last value of a
        # duplicated series wins, so the exposition never repeats a series.
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        for source in list(self._gauge_sources):
            try:
                samples = list(source())
            except Exception:
                self.gauge_source_errors_total += 1
                log.exception("metrics gauge source %r raised; skipped", source)
                continue
            for sample in samples:
                checked = _check_gauge_sample(sample)
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
                    fam = families[name] = GaugeMetricFamily(name, doc)
                key = (name, tuple(sorted(labels.items())))
                out = Sample(name, labels, value)
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


class _MetricsCollector(Collector):
    """Adapter between :class:`Metrics` and the prometheus_client registry."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self._metrics._collect())
