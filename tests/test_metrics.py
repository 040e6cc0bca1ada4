"""Node metrics: hot-path counters, the duration histogram, gauge sources and the rendered text."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from spawnmesh.ops.metrics import DURATION_BUCKETS, GaugeSample, Metrics

COUNTER_ATTRS = [
    "activations_total",
    "passivations_total",
    "turn_failures_total",
    "stale_activations_total",
    "state_writes_total",
    "state_write_batches_total",
    "state_write_failures_total",
    "overloaded_total",
    "timers_fired_total",
    "scheduled_fired_total",
    "schedules_adopted_total",
    "broadcasts_total",
    "handoffs_total",
    "remote_invocations_total",
    "forwarded_invocations_total",
    "not_owner_retries_total",
    "peer_sent_payload_bytes_total",
    "peer_received_payload_bytes_total",
    "host_turns_total",
    "host_registrations_total",
]

# Counters with labels beyond ``node``: rendered without samples until something is counted.
LABELLED = ["spawnmesh_peer_requests_sent", "spawnmesh_peer_requests_received",
            "spawnmesh_peer_request_errors", "spawnmesh_host_turn_errors"]
HISTOGRAMS = ["spawnmesh_turn_duration_seconds", "spawnmesh_state_write_duration_seconds",
              "spawnmesh_state_write_batch_size", "spawnmesh_cluster_probe_rtt_seconds"]

HIST = "spawnmesh_invocation_duration_seconds"


def families(m: Metrics) -> dict[str, list[Sample]]:
    """Parse ``m.render()`` with prometheus_client's own parser: family name -> samples."""
    out: dict[str, list[Sample]] = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        assert fam.name not in out, f"family {fam.name} rendered twice"
        out[fam.name] = list(fam.samples)
        types[fam.name] = fam.type
    return out


def test_buckets_are_the_documented_ones() -> None:
    assert DURATION_BUCKETS == (
        25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
        0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    )  # fmt: skip
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_fresh_metrics_render_every_family_with_node_label() -> None:
    m = Metrics("node-a")
    fams = families(m)
    expected = {
        "spawnmesh_invocations",
        HIST,
        "spawnmesh_metrics_gauge_source_errors",
        *(f"spawnmesh_{a.removesuffix('_total')}" for a in COUNTER_ATTRS),
        *LABELLED,
        *HISTOGRAMS,
    }
    assert set(fams) == expected
    for name, samples in fams.items():
        assert samples or name in LABELLED, name
        for s in samples:
            assert s.labels["node"] == "node-a", (name, s)
    assert fams["spawnmesh_invocations"] == [
        Sample("spawnmesh_invocations_total", {"node": "node-a", "outcome": "ok"}, 0.0)
    ]


def test_content_type_is_text_format_0_0_4() -> None:
    assert Metrics.CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    text = Metrics("n").render().decode()
    assert "# TYPE spawnmesh_invocations_total counter" in text
    assert "# TYPE spawnmesh_invocation_duration_seconds histogram" in text


@pytest.mark.parametrize("attr", COUNTER_ATTRS)
def test_plain_int_counters_are_rendered(attr: str) -> None:
    m = Metrics("n1")
    setattr(m, attr, getattr(m, attr) + 3)
    m.activations_total += 0  # the runtime's idiom: plain += on an int attribute
    assert isinstance(getattr(m, attr), int)
    name = "spawnmesh_" + attr.removesuffix("_total")
    (sample,) = families(m)[name]
    assert sample.name == name + "_total"
    assert sample.value == 3.0
    assert sample.labels == {"node": "n1"}


def test_invocations_by_outcome() -> None:
    m = Metrics("n1")
    for outcome in ["ok", "ok", "timeout", "overloaded", "ok", "actor_failed"]:
        m.observe_invocation(outcome, 0.001)
    got = {s.labels["outcome"]: s.value for s in families(m)["spawnmesh_invocations"]}
    assert got == {"ok": 3.0, "timeout": 1.0, "overloaded": 1.0, "actor_failed": 1.0}
    assert m.invocation_counts() == {"ok": 3, "timeout": 1, "overloaded": 1, "actor_failed": 1}


def test_bucket_boundaries_are_inclusive() -> None:
    m = Metrics("n1")
    m.observe_invocation("ok", 25e-6)  # exactly on the first bound: le="2.5e-05"
    m.observe_invocation("ok", 0.1)  # exactly on a middle bound
    m.observe_invocation("ok", 10.0)  # the last finite bound
    m.observe_invocation("ok", 11.0)  # only in +Inf
    buckets = {
        float(s.labels["le"]): s.value for s in families(m)[HIST] if s.name.endswith("_bucket")
    }
    assert buckets[25e-6] == 1
    assert buckets[0.05] == 1
    assert buckets[0.1] == 2
    assert buckets[10.0] == 3
    assert buckets[math.inf] == 4


durations = st.floats(min_value=0.0, max_value=100.0, allow_nan=False, allow_infinity=False)


@settings(max_examples=200, deadline=None)
@given(observations=st.lists(st.tuples(st.sampled_from(["ok", "timeout", "x"]), durations)))
def test_histogram_is_consistent(observations: list[tuple[str, float]]) -> None:
    m = Metrics("n1")
    for outcome, seconds in observations:
        m.observe_invocation(outcome, seconds)
    samples = families(m)[HIST]
    buckets = [(float(s.labels["le"]), s.value) for s in samples if s.name.endswith("_bucket")]
    count = next(s.value for s in samples if s.name.endswith("_count"))
    total = next(s.value for s in samples if s.name.endswith("_sum"))
    values = [v for _o, v in observations]

    assert [b for b, _n in buckets] == [*DURATION_BUCKETS, math.inf]
    counts = [n for _b, n in buckets]
    assert counts == sorted(counts)  # cumulative
    for bound, n in buckets:
        assert n == sum(1 for v in values if v <= bound), bound
    assert count == len(values) == buckets[-1][1]
    assert total == pytest.approx(math.fsum(values), rel=1e-9, abs=1e-9)
    invocations = sum(s.value for s in families(m)["spawnmesh_invocations"])
    assert invocations == len(values)
    snap_buckets, snap_count, snap_sum = m.duration_snapshot()
    assert (snap_count, snap_sum) == (len(values), total)
    assert [n for _b, n in snap_buckets] == counts


def _sources(m: Metrics, *fns: object) -> None:
    for fn in fns:
        m.add_gauge_source(fn)  # type: ignore[arg-type]


def test_gauge_sources_are_read_at_scrape_time() -> None:
    m = Metrics("n1")
    active = {"counter": 12.0}

    def actors() -> Iterable[GaugeSample]:
        for actor, n in active.items():
            yield (
                "spawnmesh_active_actors",
                "Activated actors",
                {"system": "demo", "actor": actor},
                n,
            )

    def peers() -> list[GaugeSample]:
        return [
            ("spawnmesh_cluster_members", "Live members", {}, 3),
            ("spawnmesh_active_actors", "ignored help", {"system": "demo", "actor": "cart"}, 2.0),
        ]

    _sources(m, actors, peers)
    fams = families(m)
    got = {s.labels["actor"]: s.value for s in fams["spawnmesh_active_actors"]}
    assert got == {"counter": 12.0, "cart": 2.0}
    assert fams["spawnmesh_cluster_members"] == [
        Sample("spawnmesh_cluster_members", {"node": "n1"}, 3.0)
    ]
    active["counter"] = 13.0
    active["timer"] = 1.0
    got = {s.labels["actor"]: s.value for s in families(m)["spawnmesh_active_actors"]}
    assert got == {"counter": 13.0, "timer": 1.0, "cart": 2.0}
    text = m.render().decode()
    assert "# TYPE spawnmesh_active_actors gauge" in text
    assert "# HELP spawnmesh_active_actors Activated actors" in text


def test_gauge_node_label_is_always_this_node() -> None:
    m = Metrics("n1")
    _sources(m, lambda: [("spawnmesh_x", "x", {"node": "other", "peer": "n2"}, 1.0)])
    (s,) = families(m)["spawnmesh_x"]
    assert s.labels == {"node": "n1", "peer": "n2"}


def test_duplicate_gauge_series_last_value_wins() -> None:
    m = Metrics("n1")
    _sources(
        m, lambda: [("spawnmesh_q", "q", {"a": "1"}, 1.0), ("spawnmesh_q", "q", {"a": "1"}, 2.0)]
    )
    assert families(m)["spawnmesh_q"] == [Sample("spawnmesh_q", {"a": "1", "node": "n1"}, 2.0)]


def test_bad_gauge_sources_are_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics("n1")

    def raises() -> list[GaugeSample]:
        raise RuntimeError("source bug")

    bad_samples = [
        ("bad name", "h", {}, 1.0),
        ("spawnmesh_ok", "h", {"bad-label": "x"}, 1.0),
        ("spawnmesh_ok", "h", {"__reserved": "x"}, 1.0),
        ("spawnmesh_ok", "h", {}, "12"),
        ("spawnmesh_ok", "h", {}, True),
        ("spawnmesh_ok", "h", ["not", "a", "dict"], 1.0),
        ("spawnmesh_activations_total", "collides with a counter", {}, 1.0),
        (HIST + "_count", "collides with the histogram", {}, 1.0),
        ("too", "short"),
    ]
    _sources(m, raises, lambda: [*bad_samples, ("spawnmesh_ok", "fine", {"k": "v"}, 4)])
    with caplog.at_level(logging.WARNING, logger="spawnmesh.ops.metrics"):
        fams = families(m)
    assert fams["spawnmesh_ok"] == [Sample("spawnmesh_ok", {"k": "v", "node": "n1"}, 4.0)]
    (errs,) = fams["spawnmesh_metrics_gauge_source_errors"]
    assert errs.value == 1 + len(bad_samples)
    assert fams["spawnmesh_activations"][0].value == 0.0  # not overwritten by the bad gauge
    assert any(r.exc_info for r in caplog.records)  # the raising source is logged with traceback


def test_label_values_are_escaped() -> None:
    m = Metrics('node "quoted"\n')
    _sources(m, lambda: [("spawnmesh_x", "x", {"actor": 'a"b\\c\nd'}, 1.0)])
    (s,) = families(m)["spawnmesh_x"]
    assert s.labels == {"actor": 'a"b\\c\nd', "node": 'node "quoted"\n'}


def test_observe_invocation_is_cheap_pure_python() -> None:
    """No timing assertions: check the hot path is a plain function touching only plain data."""
    fn = Metrics.observe_invocation
    assert inspect.isfunction(fn)
    assert not inspect.iscoroutinefunction(fn)
    names = set(fn.__code__.co_names)
    assert names <= {"_outcomes", "get", "_bucket_counts", "bisect_left", "DURATION_BUCKETS",
                     "_duration_sum"}, names  # fmt: skip
    assert not any("lock" in n.lower() or n in {"acquire", "release"} for n in names)
    m = Metrics("n1")
    assert not hasattr(m, "__dict__")  # __slots__: attribute access without a dict lookup
    assert type(m._outcomes) is dict
    assert type(m._bucket_counts) is list
    assert type(DURATION_BUCKETS) is tuple
    for attr in COUNTER_ATTRS:
        assert type(getattr(m, attr)) is int
