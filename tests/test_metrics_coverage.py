"""Metrics coverage: what a busy clustered node exposes, checked against the docs and the
Prometheus conventions, plus the pieces behind it (histograms, labelled counters, counter
sources, the recent-errors buffer).

A cluster of three embedded nodes (real gossip, real peer wire) runs local and remote calls,
casts, a broadcast, failing turns and a passivation; then every node's ``GET /metrics`` is
parsed with prometheus-client's own parser, and every family must be documented in
``docs/observability.md``, follow the naming rules, carry the ``node`` label, and the families
of each area (membership, placement, actors, peer protocol, statestore, host API) must be there
with the values the traffic implies.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from spawnmesh.errors import ActorFailed
from spawnmesh.ops.metrics import BATCH_BUCKETS, RECENT_ERRORS_MAX, Histogram, Metrics
from spawnmesh.statestore import MemoryStateStore
from tests.e2e import http_get
from tests.test_mesh import cluster, ref

DOC = Path(__file__).resolve().parents[1] / "docs" / "observability.md"

# Families every clustered node must expose, by area (the list).
REQUIRED = {
    "membership": ["spawnmesh_cluster_members", "spawnmesh_cluster_suspicions",
                   "spawnmesh_cluster_refutes", "spawnmesh_cluster_probes",
                   "spawnmesh_cluster_sent_bytes", "spawnmesh_cluster_received_bytes"],
    "placement": ["spawnmesh_placement_info", "spawnmesh_placement_changes",
                  "spawnmesh_handoffs", "spawnmesh_stale_activations"],
    "actors": ["spawnmesh_active_actors", "spawnmesh_activations", "spawnmesh_passivations",
               "spawnmesh_turn_duration_seconds", "spawnmesh_queued_invocations",
               "spawnmesh_max_actor_queue_depth"],
    "peer": ["spawnmesh_peer_requests_sent", "spawnmesh_peer_requests_received",
             "spawnmesh_peer_request_errors", "spawnmesh_peer_sent_payload_bytes",
             "spawnmesh_peer_received_payload_bytes", "spawnmesh_peer_connections",
             "spawnmesh_peer_dials"],
    "statestore": ["spawnmesh_state_writes", "spawnmesh_state_write_batch_size",
                   "spawnmesh_state_write_duration_seconds", "spawnmesh_state_write_failures"],
    "host": ["spawnmesh_host_turns", "spawnmesh_host_turn_errors",
             "spawnmesh_host_registrations"],
}  # fmt: skip


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """family name -> (type, samples), through prometheus-client's parser (which raises on
    anything it cannot read)."""
    out: dict[str, tuple[str, list[Sample]]] = {}
    for fam in text_string_to_metric_families(text):
        assert fam.name not in out, f"family {fam.name} rendered twice"
        out[fam.name] = (fam.type, list(fam.samples))
    return out


def exposed_name(name: str, typ: str) -> str:
    """The name a user writes in a query: counters with ``_total``."""
    return name + "_total" if typ == "counter" else name


def value(fams: dict[str, tuple[str, list[Sample]]], series: str, **labels: str) -> float:
    """Sum of the samples named ``series`` whose labels include ``labels``."""
    total = 0.0
    for _typ, samples in fams.values():
        for s in samples:
            if s.name == series and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def scrape(port: int) -> str:
    status, body = await trio.to_thread.run_sync(http_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body


async def test_every_family_of_a_busy_clustered_node_is_documented_and_conventional() -> None:
    store = MemoryStateStore()
    async with cluster(["a", "b", "c"], store) as nodes:
        for i in range(30):  # calls through every node: most of them remote
            for node in nodes:
                await ref(node, f"k{i}").invoke("add", 1)
        for node in nodes:  # failing turns, local or remote
            with pytest.raises(ActorFailed):
                await ref(node, "k0").invoke("boom")
        await nodes[0].broadcast("mesh", "news", "hello")
        for node in nodes:
            node.runtime.cast_nowait(ref(node, "k1").id, "add", 1)
        await trio.sleep(0.2)
        for node in nodes:
            await node.runtime.passivate_idle(everything=True)
        for i in range(10):  # some actors active again at scrape time
            await ref(nodes[0], f"k{i}").invoke("add", 1)

        # the first probe comes one probe interval after the start, which a fast run
        # (or a slow machine's scheduling) can beat: wait for it rather than race it
        async def probes() -> float:
            return sum(
                [value(parse(await scrape(n.ops_port)), "spawnmesh_cluster_probes_total")
                 for n in nodes]
            )  # fmt: skip

        with trio.fail_after(15):
            while not await probes():  # noqa: ASYNC110 - polling a scrape, not an event
                await trio.sleep(0.05)

        docs = DOC.read_text()
        documented = set(re.findall(r"`(spawnmesh_[a-z0-9_]+)`", docs))
        per_node = {}
        for node in nodes:
            fams = parse(await scrape(node.ops_port))
            per_node[node.name] = fams
            for name, (typ, samples) in fams.items():
                shown = exposed_name(name, typ)
                assert shown in documented, f"{shown} ({typ}) is not in docs/observability.md"
                assert name.startswith("spawnmesh_"), name
                assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
                if typ == "counter":
                    assert all(s.name.endswith(("_total", "_created")) for s in samples), name
                else:
                    assert not name.endswith("_total"), f"gauge {name} named like a counter"
                if typ == "histogram":
                    assert {s.name.removeprefix(name) for s in samples} == {
                        "_bucket", "_count", "_sum"}, name  # fmt: skip
                if "duration" in name or "latency" in name:
                    assert name.endswith("_seconds"), f"{name}: base unit seconds"
                if "bytes" in name:
                    assert name.endswith("_bytes"), f"{name}: the unit goes last"
                for s in samples:
                    assert s.labels.get("node") == node.name, (name, s)
                    assert not math.isnan(s.value), (name, s)
            for area, names in REQUIRED.items():
                missing = [n for n in names if n not in fams]
                assert not missing, f"{node.name}: {area} families missing: {missing}"

        # values the traffic implies, summed over the cluster
        def total(series: str, **labels: str) -> float:
            return sum(value(f, series, **labels) for f in per_node.values())

        assert total("spawnmesh_peer_requests_sent_total", kind="call") > 0
        assert total("spawnmesh_peer_requests_received_total", kind="call") == total(
            "spawnmesh_peer_requests_sent_total", kind="call")  # fmt: skip
        assert total("spawnmesh_peer_requests_sent_total", kind="broadcast") >= 2
        assert total("spawnmesh_peer_request_errors_total", direction="inbound",
                     code="actor_failed") >= 1  # fmt: skip
        assert total("spawnmesh_peer_sent_payload_bytes_total") > 0
        assert total("spawnmesh_peer_received_payload_bytes_total") > 0
        assert total("spawnmesh_turn_duration_seconds_count") >= 90
        assert total("spawnmesh_state_write_batch_size_count") >= 1
        assert total("spawnmesh_state_write_batch_size_sum") == total(
            "spawnmesh_state_writes_total")  # fmt: skip
        assert total("spawnmesh_passivations_total") >= 30
        assert total("spawnmesh_cluster_probes_total") > 0
        assert total("spawnmesh_cluster_sent_bytes_total", channel="udp") > 0
        assert total("spawnmesh_invocations_total", outcome="actor_failed") >= 3
        for name, fams in per_node.items():
            assert value(fams, "spawnmesh_cluster_members", status="alive") == 3, name
            assert value(fams, "spawnmesh_placement_members", type="mesh/counter") == 3, name
            assert value(fams, "spawnmesh_ready") == 1, name
        versions = {
            s.labels["version"] for f in per_node.values() for s in f["spawnmesh_placement_info"][1]
        }
        assert len(versions) == 1, f"converged nodes disagree on placement: {versions}"


def test_every_documented_family_exists() -> None:
    """The reverse direction for the built-in families: the docs name nothing that a fresh
    Metrics does not render (families from sources are checked by the clustered test)."""
    fams = parse(Metrics("n").render().decode())
    docs = DOC.read_text()
    for name, (typ, _s) in fams.items():
        assert f"`{exposed_name(name, typ)}`" in docs, name


# ------------------------------------------------------------------------------ the pieces


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=200))
def test_histogram_counts_are_cumulative_and_consistent(values: list[float]) -> None:
    h = Histogram(BATCH_BUCKETS)
    for v in values:
        h.observe(v)
    cumulative, count, total = h.snapshot()
    assert count == len(values)
    assert math.isclose(total, math.fsum(values), rel_tol=1e-9, abs_tol=1e-9)
    assert [b for b, _n in cumulative] == [*BATCH_BUCKETS, math.inf]
    counts = [n for _b, n in cumulative]
    assert counts == sorted(counts) and counts[-1] == count
    for bound, n in cumulative:  # le is inclusive
        assert n == sum(1 for v in values if v <= bound)


def test_labelled_counters_render_one_series_per_key() -> None:
    m = Metrics("n1")
    m.peer_requests_sent["call"] = 3
    m.peer_requests_sent["cast"] = 1
    m.peer_request_errors[("outbound", "not_owner")] = 2
    m.host_turn_errors["actor_failed"] = 5
    fams = parse(m.render().decode())
    assert value(fams, "spawnmesh_peer_requests_sent_total", kind="call") == 3
    assert value(fams, "spawnmesh_peer_requests_sent_total", kind="cast") == 1
    assert value(fams, "spawnmesh_peer_request_errors_total", direction="outbound",
                 code="not_owner") == 2  # fmt: skip
    assert value(fams, "spawnmesh_host_turn_errors_total", code="actor_failed") == 5


def test_counter_sources_render_counters_and_reject_bad_samples() -> None:
    m = Metrics("n1")
    m.add_counter_source(lambda: [
        ("spawnmesh_x_bytes_total", "bytes", {"channel": "udp"}, 10),
        ("spawnmesh_no_suffix", "not a total", {}, 1),  # invalid: counters end in _total
        ("spawnmesh_negative_total", "negative", {}, -1),  # invalid: counters only grow
        ("spawnmesh_activations_total", "built-in", {}, 1),  # invalid: collides
    ])  # fmt: skip
    m.add_gauge_source(lambda: [("spawnmesh_x_bytes", "clash", {}, 1)])  # gauge first wins
    fams = parse(m.render().decode())
    assert fams["spawnmesh_x_bytes"][0] == "gauge"  # the gauge source came first
    assert "spawnmesh_no_suffix" not in fams and "spawnmesh_negative" not in fams
    assert m.gauge_source_errors_total == 4

    m2 = Metrics("n2")
    m2.add_counter_source(lambda: [("spawnmesh_y_total", "y", {"k": "v"}, 7)])
    fams2 = parse(m2.render().decode())
    assert fams2["spawnmesh_y"] == (
        "counter", [Sample("spawnmesh_y_total", {"k": "v", "node": "n2"}, 7.0)])  # fmt: skip


def test_recent_errors_keep_the_newest_failures_only() -> None:
    m = Metrics("n1")
    for i in range(RECENT_ERRORS_MAX + 10):
        m.observe_failure("timeout", 0.5, f"demo/a{i}", "get", "x" * 1000)
    assert len(m.recent_errors) == RECENT_ERRORS_MAX
    newest = m.recent_errors[-1]
    assert newest["actor"] == f"demo/a{RECENT_ERRORS_MAX + 9}"
    assert newest["code"] == "timeout" and len(str(newest["message"])) == 500
    assert m.invocation_counts()["timeout"] == RECENT_ERRORS_MAX + 10


def test_turn_histogram_observe_is_plain_python() -> None:
    """The hot-path observation touches only plain data (no prometheus objects, no locks)."""
    names = set(Histogram.observe.__code__.co_names)
    assert names <= {"counts", "bisect_left", "bounds", "total"}, names
