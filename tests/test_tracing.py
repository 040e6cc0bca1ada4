"""OpenTelemetry tracing of invocations: one trace spans two nodes (in process with the memory
exporter, and across two ``spawnmesh run`` processes with the file exporter), a caller's
``traceparent`` is continued, a host turn hands its context to the host, failures mark spans,
tracing off costs no span and sends no context, and the peer envelope's ``trace`` field keeps
the wire append-only."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh import Node, open_node
from spawnmesh.errors import ActorFailed, ConfigError
from spawnmesh.ops.tracing import span_record
from spawnmesh.wire import messages as m
from tests.conftest import test_config
from tests.e2e import NodeProcess, http_post_json, killing, start_node, wait_for
from tests.test_mesh import converged, mesh, ref

ROOT = Path(__file__).resolve().parents[1]
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
"""A caller's W3C context (the example of the W3C trace-context spec)."""


def traced_config(name: str, seeds: tuple[str, ...] = (), **extra: Any) -> Any:
    return test_config(
        name=name,
        **{"cluster.seeds": ",".join(seeds), "cluster.preset": "local",
           "actors.default_timeout_ms": 10_000, "tracing.enabled": True,
           "tracing.exporter": "memory", **extra},
    )  # fmt: skip


@asynccontextmanager
async def traced_pair() -> AsyncIterator[list[Node]]:
    from spawnmesh.statestore import MemoryStateStore

    store = MemoryStateStore()
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_node(traced_config("a"), mesh, store=store))
        assert a.membership is not None
        seed = f"127.0.0.1:{a.membership.addr[1]}"
        b = await stack.enter_async_context(
            open_node(traced_config("b", (seed,)), mesh, store=store)
        )
        await converged([a, b])
        yield [a, b]


def spans(*nodes: Node) -> list[dict[str, Any]]:
    out = []
    for node in nodes:
        assert node.tracing is not None
        out += [span_record(s) for s in node.tracing.exporter.get_finished_spans()]
    return out


def clear(*nodes: Node) -> None:
    for node in nodes:
        assert node.tracing is not None
        node.tracing.exporter.clear()


def owned_by(node: Node, nodes: list[Node], prefix: str = "t") -> str:
    """An actor name the placement gives to ``node``."""
    router = nodes[0].router
    assert router is not None
    for i in range(1000):
        name = f"{prefix}{i}"
        if router.placement.owner("mesh/counter", name) == node.name:
            return name
    raise AssertionError("no key lands on " + node.name)


def check_chain(trace: list[dict[str, Any]], chain: list[tuple[str, str, str]]) -> None:
    """``trace`` holds spans ``(service, name, kind)`` in ``chain``, each one the parent of
    the next."""
    by_id = {s["span_id"]: s for s in trace}
    found = []
    for service, name, kind in chain:
        match = [s for s in trace if (s["service"], s["name"], s["kind"]) == (service, name, kind)]
        assert len(match) == 1, (service, name, kind, trace)
        found.append(match[0])
    for parent, child in itertools.pairwise(found):
        assert child["parent_id"] == parent["span_id"], (parent, child)
        assert child["remote_parent"] == (parent["service"] != child["service"])
    assert len(by_id) == len(trace)


async def test_one_trace_spans_two_nodes_in_process() -> None:
    async with traced_pair() as (a, b):
        clear(a, b)
        name = owned_by(b, [a, b])
        assert await ref(a, name).invoke("add", 2) == 2
        got = spans(a, b)
        traces = {s["trace_id"] for s in got}
        assert len(traces) == 1, got
        check_chain(got, [
            ("a", "spawnmesh.invoke", "server"),
            ("a", "spawnmesh.peer.call", "client"),
            ("b", "spawnmesh.peer.handle", "server"),
            ("b", "spawnmesh.turn", "internal"),
        ])  # fmt: skip
        root = next(s for s in got if s["name"] == "spawnmesh.invoke")
        assert root["parent_id"] == "" and root["status"] == "unset"
        assert root["attributes"]["spawnmesh.actor"] == f"mesh/{name}<counter>"
        assert root["attributes"]["spawnmesh.action"] == "add"
        turn = next(s for s in got if s["name"] == "spawnmesh.turn")
        assert turn["attributes"]["spawnmesh.node"] == "b"
        # the spans nest in time too
        handle = next(s for s in got if s["name"] == "spawnmesh.peer.handle")
        assert root["start_ns"] <= handle["start_ns"] <= turn["start_ns"]
        assert turn["end_ns"] <= handle["end_ns"] <= root["end_ns"]


async def test_a_callers_traceparent_is_continued_and_failures_are_marked() -> None:
    async with traced_pair() as (a, b):
        clear(a, b)
        name = owned_by(b, [a, b], "f")
        await a.admin_invoke("mesh", name, "add", 1, metadata={"traceparent": TRACEPARENT},
                             timeout_ms=None, is_async=False, delay_ms=None,
                             parent="counter")  # fmt: skip
        got = spans(a, b)
        assert {s["trace_id"] for s in got} == {TRACEPARENT.split("-")[1]}
        root = next(s for s in got if s["name"] == "spawnmesh.invoke")
        assert root["parent_id"] == TRACEPARENT.split("-")[2] and root["remote_parent"]

        clear(a, b)
        with pytest.raises(ActorFailed):
            await ref(a, name).invoke("boom")
        got = spans(a, b)
        assert len({s["trace_id"] for s in got}) == 1
        failed = {(s["service"], s["name"]) for s in got if s["status"] == "error"}
        assert failed == {
            ("a", "spawnmesh.invoke"),
            ("a", "spawnmesh.peer.call"),
            ("b", "spawnmesh.peer.handle"),
            ("b", "spawnmesh.turn"),
        }


async def test_nested_calls_across_nodes_stay_in_one_trace() -> None:
    async with traced_pair() as (a, b):
        clear(a, b)
        # ping x on one node calls ping y (wherever it lives), which calls x back: a cycle,
        # refused at once; every hop is in the caller's trace
        router = a.router
        assert router is not None
        x = next(
            f"p{i}" for i in range(1000) if router.placement.owner("mesh/ping", f"p{i}") == "a"
        )
        y = next(f"p{i}" for i in range(1000)
                 if router.placement.owner("mesh/ping", f"p{i}") == "b")  # fmt: skip
        with pytest.raises(Exception, match="cycle"):
            await ref(a, x, "ping").invoke("call", y)
        got = spans(a, b)
        assert len({s["trace_id"] for s in got}) == 1
        turns = sorted((s["service"], s["attributes"]["spawnmesh.actor"]) for s in got
                       if s["name"] == "spawnmesh.turn")  # fmt: skip
        assert turns == [("a", f"mesh/{x}<ping>"), ("b", f"mesh/{y}<ping>")]


async def test_tracing_off_records_nothing_and_sends_no_context() -> None:
    from spawnmesh.statestore import MemoryStateStore

    store = MemoryStateStore()
    seen: list[dict[str, str]] = []
    async with open_node(test_config(name="a", **{"cluster.preset": "local"}), mesh,
                         store=store) as a:  # fmt: skip
        assert a.tracing is None and a.runtime.tracer is None
        assert a.membership is not None
        seed = f"127.0.0.1:{a.membership.addr[1]}"
        async with open_node(test_config(name="b", **{"cluster.preset": "local",
                                                      "cluster.seeds": seed}),
                             mesh, store=store) as b:  # fmt: skip
            await converged([a, b])
            inner = b._peer_request

            async def spy(req: Any, origin: str) -> bytes | None:
                seen.append(dict(req.trace))
                return await inner(req, origin)

            assert b.peers is not None
            b.peers._handler = spy
            name = owned_by(b, [a, b])
            assert await ref(a, name).invoke("add", 1) == 1
    assert seen and all(t == {} for t in seen)


async def test_a_host_turn_carries_the_trace_to_the_host() -> None:
    from spawnmesh.host.convert import from_any
    from spawnmesh.testing.host_conformance import open_host_harness

    host = [sys.executable, str(ROOT / "examples/hosts/grpclib_host.py")]
    overrides = {"tracing.enabled": True, "tracing.exporter": "memory", "name": "h"}
    async with open_host_harness(host, overrides=overrides) as h:
        node = h.node
        assert node.tracing is not None
        node.tracing.exporter.clear()
        seen = from_any(await h.ref("counter").invoke("whoami"), None)
        got = spans(node)
        host_turn = next(s for s in got if s["name"] == "spawnmesh.host.turn")
        assert host_turn["kind"] == "client"
        tp = seen.metadata["traceparent"]
        _v, trace_id, parent_id, _flags = tp.split("-")
        assert trace_id == host_turn["trace_id"] and parent_id == host_turn["span_id"]
        check_chain(got, [
            ("h", "spawnmesh.invoke", "server"),
            ("h", "spawnmesh.turn", "internal"),
            ("h", "spawnmesh.host.turn", "client"),
        ])  # fmt: skip
        assert node.metrics.host_turns_total >= 1


def test_tracing_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"tracing\.file"):
        test_config(**{"tracing.enabled": True, "tracing.exporter": "file"})
    with pytest.raises(ConfigError):
        test_config(**{"tracing.sample_ratio": 1.5})


# ------------------------------------------------------------------ the peer envelope


@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate"]), st.text(max_size=80)))
def test_request_trace_round_trips(trace: dict[str, str]) -> None:
    req = m.Request(7, "sys", "name", trace=trace)
    assert m.decode(m.encode(req)) == req


def test_a_request_from_an_older_node_has_no_trace() -> None:
    """An older sender's Request ends at ``hops``: it decodes with an empty trace."""
    old = msgspec.msgpack.encode([9, 3, "sys", "n", None, "act", b"", {}, None, [], None, 0, 0, 0])
    req = m.decode(old)
    assert isinstance(req, m.Request) and req.trace == {} and req.action == "act"
    too_many = m.Request(1, "s", "n", trace={f"k{i}": "v" for i in range(9)})
    with pytest.raises(Exception, match="malformed"):
        m.decode(m.encode(too_many))


# ------------------------------------------------------------------ two real processes


def test_one_trace_spans_two_node_processes(tmp_path: Path) -> None:
    """Two ``spawnmesh run`` processes, each appending its spans to its own JSON-lines file:
    an HTTP invoke with a traceparent on node a, for an actor b owns, yields one trace whose
    spans come from both processes and chain a -> b."""
    fast = ["--statestore", "memory://", "--set", "cluster.preset=local",
            "--set", "cluster.probe_interval_ms=500", "--set", "cluster.join_retry_min_ms=200",
            "--set", "cluster.join_retry_max_ms=1000", "--set", "tracing.enabled=true",
            "--set", "tracing.exporter=file"]  # fmt: skip
    files = {n: tmp_path / f"spans-{n}.jsonl" for n in ("a", "b")}
    a = start_node(tmp_path / "a", "--name", "a", *fast, "--set",
                   f"tracing.file={files['a']}", key=None, url="memory://")  # fmt: skip
    nodes: list[NodeProcess] = [a]
    with killing(*nodes):
        seed = json.loads(a.get("/v1/members")[1])["gossip_address"]
        b = start_node(tmp_path / "b", "--name", "b", *fast, "--set",
                       f"tracing.file={files['b']}", "--set", f"cluster.seeds={seed}",
                       key=None, url="memory://")  # fmt: skip
        nodes.append(b)
        with killing(b):

            def cart_on_b() -> str | None:
                for i in range(200):
                    status, body = a.get(f"/v1/placement/examples/cart-{i}?parent=cart")
                    doc = json.loads(body)
                    if status != 200 or sorted(doc["members"]) != ["a", "b"]:
                        return None
                    if doc["owner"] == "b":
                        return f"cart-{i}"
                return None

            cart = wait_for(cart_on_b, "a cart that b owns, in a's converged view", 30)
            status, reply = http_post_json(
                f"{a.url}/v1/systems/examples/actors/{cart}/actions/add_item",
                {"payload": {"sku": "x"}, "parent": "cart",
                 "metadata": {"traceparent": TRACEPARENT}},
            )  # fmt: skip
            assert status == 200, reply
            trace_id = TRACEPARENT.split("-")[1]

            def traced() -> list[dict[str, Any]] | None:
                rows = []
                for path in files.values():
                    if path.exists():
                        rows += [json.loads(line) for line in path.read_text().splitlines()]
                ours = [r for r in rows if r["trace_id"] == trace_id]
                names = {(r["service"], r["name"]) for r in ours}
                return ours if ("b", "spawnmesh.turn") in names else None

            ours = wait_for(traced, "b's turn span in the file", 15)
            check_chain([s for s in ours if s["name"] != "spawnmesh.peer.broadcast"
                         and not (s["service"] == "b" and s["name"] == "spawnmesh.turn"
                                  and s["attributes"]["spawnmesh.action"] != "add_item")], [
                ("a", "spawnmesh.invoke", "server"),
                ("a", "spawnmesh.peer.call", "client"),
                ("b", "spawnmesh.peer.handle", "server"),
                ("b", "spawnmesh.turn", "internal"),
            ])  # fmt: skip
            assert {r["service"] for r in ours} >= {"a", "b"}
            assert os.path.getsize(files["a"]) > 0 and os.path.getsize(files["b"]) > 0
