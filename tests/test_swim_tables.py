"""Tier 1: the precedence table, Lifeguard maths, the broadcast queue and config presets."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh.cluster import config as cfgmod
from spawnmesh.cluster.awareness import Awareness
from spawnmesh.cluster.broadcasts import BroadcastQueue
from spawnmesh.cluster.state import PRECEDENCE, Action, Cmp, Current, News, decide
from spawnmesh.cluster.suspicion import Suspicion, suspicion_timeout_ms
from spawnmesh.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec" / "swim.md"
DOCS = ROOT / "docs" / "membership.md"


def oracle(news: News, cur: Current, cmp: Cmp) -> Action:
    """The rules in prose form, written independently of the table."""
    if cur is Current.SELF_LEAVING:
        return Action.IGNORE
    if cur is Current.UNKNOWN:
        return Action.ACCEPT if news is News.ALIVE else Action.IGNORE
    if cmp is Cmp.LT:
        return Action.IGNORE
    if cur is Current.SELF:
        if news is News.ALIVE:
            return Action.REFUTE if cmp is Cmp.GT else Action.REFUTE_IF_CHANGED
        return Action.REFUTE
    if news is News.ALIVE:
        return Action.ACCEPT if cmp is Cmp.GT else Action.IGNORE
    if news is News.SUSPECT:
        if cur is Current.ALIVE:
            return Action.ACCEPT
        if cur is Current.SUSPECT:  # a newer suspicion restarts the timer; never inherit one
            return Action.CONFIRM if cmp is Cmp.EQ else Action.ACCEPT
        return Action.IGNORE
    if news is News.DEAD:
        return Action.ACCEPT if cur in (Current.ALIVE, Current.SUSPECT) else Action.IGNORE
    return Action.IGNORE if cur is Current.LEFT else Action.ACCEPT


CELLS = [(n, c, k) for n in News for c in Current for k in Cmp]


def test_table_is_complete() -> None:
    assert set(PRECEDENCE) == set(CELLS)
    assert len(PRECEDENCE) == 4 * 7 * 3


@pytest.mark.parametrize(("news", "cur", "cmp"), CELLS)
def test_every_cell(news: News, cur: Current, cmp: Cmp) -> None:
    assert PRECEDENCE[(news, cur, cmp)] is oracle(news, cur, cmp)
    held = 5
    incoming = {Cmp.LT: 4, Cmp.EQ: 5, Cmp.GT: 6}[cmp]
    if cur is not Current.UNKNOWN:
        assert decide(news, cur, incoming, held) is PRECEDENCE[(news, cur, cmp)]


def test_unknown_column_ignores_incarnation() -> None:
    for news in News:
        for inc in (0, 1, 99):
            assert (
                decide(news, Current.UNKNOWN, inc, 0) is PRECEDENCE[(news, Current.UNKNOWN, Cmp.GT)]
            )


def test_spec_table_mirrors_code() -> None:
    text = SPEC.read_text()
    rows = re.findall(
        r"^\|\s*(alive|suspect|dead|left)\s*\|\s*(\w+)\s*\|\s*(\w+)\s*\|\s*(\w+)\s*\|\s*(\w+)\s*\|",
        text,
        flags=re.M,
    )
    seen = set()
    for news, cur, lt, eq, gt in rows:
        n, c = News[news.upper()], Current[cur.upper()]
        for cmp, word in zip(Cmp, (lt, eq, gt), strict=True):
            assert PRECEDENCE[(n, c, cmp)].value == word, (news, cur, cmp)
            seen.add((n, c, cmp))
    assert seen == set(CELLS)


# -- suspicion ----------------------------------------------------------------------------


@given(
    k=st.integers(0, 10),
    lo=st.integers(1, 100_000),
    mult=st.integers(1, 10),
    c=st.integers(0, 12),
)
def test_suspicion_timeout_bounds_and_monotone(k: int, lo: int, mult: int, c: int) -> None:
    hi = lo * mult
    t = suspicion_timeout_ms(c, k, lo, hi)
    assert lo <= t <= hi
    assert suspicion_timeout_ms(c + 1, k, lo, hi) <= t
    if k >= 1:
        assert suspicion_timeout_ms(0, k, lo, hi) == hi
        assert suspicion_timeout_ms(k, k, lo, hi) == lo
    else:
        assert t == lo


def test_suspicion_formula_matches_memberlist() -> None:
    # k=3, min=2 s, max=30 s -> 30 s, 16 s, 7.8 s, 2 s (memberlist suspicion_test.go values).
    lo, hi, k = 2_000, 30_000, 3
    want = [hi - (hi - lo) * math.log(c + 1) / math.log(k + 1) for c in range(4)]
    got = [suspicion_timeout_ms(c, k, lo, hi) for c in range(4)]
    assert got == [max(lo, math.floor(w)) for w in want]
    assert got[:2] == [30_000, 16_000] and 7_800 <= got[2] <= 7_900
    assert got[-1] == lo


def test_suspicion_confirmations_are_independent() -> None:
    s = Suspicion("a", 3, k=2, min_ms=1000, max_ms=6000, start_ms=100)
    assert s.deadline_ms() == 6100
    assert not s.confirm("a")  # the original suspector does not count twice
    assert s.confirm("b")
    assert not s.confirm("b")
    d1 = s.deadline_ms()
    assert 1100 < d1 < 6100
    assert s.confirm("c")
    assert s.deadline_ms() == 1100
    assert not s.confirm("d")  # k reached


def test_config_suspicion_formulas() -> None:
    c = cfgmod.lan()
    assert c.suspicion_min_ms(1) == 1_000  # log10 floored at 1
    assert c.suspicion_min_ms(20) == 1_301
    assert c.suspicion_min_ms(100) == 2_000
    assert c.suspicion_max_ms(100) == 12_000
    assert c.suspicion_confirmations(100) == 3  # k is its own knob, not suspicion_mult - 2
    assert c.suspicion_confirmations(4) == 2  # at most n - 2 members can confirm
    assert c.suspicion_confirmations(2) == 0
    assert c.replace(lifeguard=False).suspicion_confirmations(100) == 0
    assert c.stall_tolerance_ms() == 250
    assert c.retransmit_limit(1) == 4
    assert c.retransmit_limit(9) == 4
    assert c.retransmit_limit(10) == 8
    assert c.retransmit_limit(1000) == 16
    assert c.push_pull_scaled_ms(32) == 30_000
    assert c.push_pull_scaled_ms(64) == 60_000  # x ceil(n / 32): rows per second stay constant
    assert c.push_pull_scaled_ms(1000) == 30_000 * 32


# -- awareness ----------------------------------------------------------------------------


@given(st.lists(st.integers(-5, 5), max_size=60), st.integers(1, 10))
def test_awareness_bounds(deltas: list[int], mx: int) -> None:
    a = Awareness(mx)
    for d in deltas:
        a.apply_delta(d)
        assert 0 <= a.score <= mx - 1
        assert a.scale_ms(500) == 500 * (a.score + 1)
        assert 1 <= a.multiplier <= mx


def test_awareness_steps() -> None:
    a = Awareness(8)
    a.apply_delta(-1)
    assert a.score == 0
    for _ in range(20):
        a.apply_delta(1)
    assert a.score == 7 and a.scale_ms(1000) == 8000
    a.apply_delta(-1)
    assert a.score == 6


# -- broadcast queue ----------------------------------------------------------------------


def test_queue_retransmit_limit() -> None:
    q = BroadcastQueue()
    q.queue("a", b"x" * 10)
    sent = 0
    for _ in range(10):
        sent += len(q.get(1000, limit=3))
    assert sent == 3 and len(q) == 0


def test_queue_newer_news_invalidates() -> None:
    q = BroadcastQueue()
    q.queue("a", b"old")
    q.get(1000, limit=5)
    q.queue("a", b"new")
    assert len(q) == 1 and q.transmits("a") == 0
    assert q.get(1000, limit=5) == [b"new"]


def test_queue_fewest_transmitted_first_and_budget() -> None:
    q = BroadcastQueue()
    q.queue("a", b"a" * 100)
    q.get(1000, limit=9)
    q.queue("b", b"b" * 100)
    q.queue("c", b"c" * 100)
    assert q.get(250, limit=9) == [b"c" * 100, b"b" * 100]  # fresh first, newest first
    assert q.get(50, limit=9) == []  # nothing fits
    assert q.get(300, limit=9) == [b"b" * 100, b"c" * 100, b"a" * 100]  # all sent once
    q.queue("d", b"d" * 10)
    assert q.get(10, limit=9) == [b"d" * 10]


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(1, 300)), max_size=40),
    st.integers(1, 6),
    st.integers(0, 1400),
)
def test_queue_properties(ops: list[tuple[str, int]], limit: int, budget: int) -> None:
    q = BroadcastQueue()
    counts: dict[bytes, int] = {}
    for i, (key, size) in enumerate(ops):
        q.queue(key, (f"{key}{i}:".encode()).ljust(size, b"."))
        assert key in q
        assert len(q) <= len({k for k, _ in ops[: i + 1]})
        out = q.get(budget, limit)
        assert sum(map(len, out)) <= budget
        for item in out:
            counts[item] = counts.get(item, 0) + 1
            assert counts[item] <= limit
    q.prune(0)
    assert len(q) == 0


def test_queue_refresh_keeps_the_transmit_count() -> None:
    q = BroadcastQueue()
    q.refresh("a", b"nothing queued")
    assert "a" not in q
    q.queue("a", b"suspect by x")
    q.get(1000, limit=4)
    q.refresh("a", b"suspect by y")
    assert q.transmits("a") == 1
    assert q.get(1000, limit=4) == [b"suspect by y"]


_queue_op = st.one_of(
    st.tuples(
        st.sampled_from(["queue", "refresh", "drop"]),
        st.sampled_from("abcdef"),
        st.integers(1, 200),
    ),
    st.tuples(st.just("get"), st.just(""), st.integers(0, 1400)),
)


@given(st.lists(_queue_op, max_size=80), st.integers(1, 5))
def test_queue_matches_a_model(ops: list[tuple[str, str, int]], limit: int) -> None:
    q = BroadcastQueue()
    model: dict[str, tuple[bytes, int]] = {}  # key -> (data, transmits)
    for i, (op, key, size) in enumerate(ops):
        if op == "queue":
            model[key] = (f"{key}{i}".encode().ljust(size, b"."), 0)
            q.queue(key, model[key][0])
        elif op == "refresh":
            data = f"{key}{i}r".encode().ljust(size, b".")
            q.refresh(key, data)
            if key in model:
                model[key] = (data, model[key][1])
        elif op == "drop":
            q.drop(key)
            model.pop(key, None)
        else:
            fewest = min((t for _, t in model.values()), default=0)
            fits = [k for k, (d, _) in model.items() if len(d) <= size]
            out = q.get(size, limit)
            assert sum(map(len, out)) <= size
            by_data = {d: k for k, (d, _) in model.items()}
            keys = [by_data[d] for d in out]
            assert len(set(keys)) == len(keys)
            if fits:
                assert keys, "something that fits is always taken"
            if keys and all(len(d) <= size for d, _ in model.values()):
                assert min(model[k][1] for k in keys) == fewest  # least transmitted first
            for k in keys:
                data, t = model[k]
                model[k] = (data, t + 1)
                if t + 1 >= limit:
                    del model[k]
        assert len(q) == len(model)
        for k, (_, t) in model.items():
            assert q.transmits(k) == t


# -- presets ------------------------------------------------------------------------------


def test_presets_mirror_memberlist() -> None:
    lan, wan, local = cfgmod.lan(), cfgmod.wan(), cfgmod.local()
    assert (lan.probe_interval_ms, lan.probe_timeout_ms, lan.indirect_checks) == (1000, 500, 3)
    assert (lan.retransmit_mult, lan.suspicion_max_timeout_mult) == (4, 6)
    assert (lan.suspicion_mult, lan.suspicion_k) == (1, 3)  # spawnmesh's tuning (memberlist: 4, 2)
    assert (lan.push_pull_interval_ms, lan.awareness_max_multiplier) == (30_000, 8)
    assert (lan.gossip_interval_ms, lan.gossip_nodes, lan.udp_buffer_bytes) == (200, 3, 1400)
    assert (wan.probe_interval_ms, wan.probe_timeout_ms, wan.suspicion_mult) == (5000, 3000, 6)
    assert (wan.gossip_nodes, wan.gossip_interval_ms, wan.push_pull_interval_ms) == (4, 500, 60_000)
    assert (local.probe_timeout_ms, local.indirect_checks, local.retransmit_mult) == (200, 1, 2)
    assert (local.suspicion_mult, local.gossip_interval_ms) == (3, 100)
    # memberlist's k = suspicion_mult - 2 where the preset was not re-tuned
    assert (wan.suspicion_k, local.suspicion_k) == (4, 1)
    assert lan.ring_probe and wan.ring_probe and local.ring_probe


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="probe_interval_ms"):
        cfgmod.lan().replace(probe_interval_ms=0)
    with pytest.raises(ConfigError, match="probe_timeout_ms"):
        cfgmod.lan().replace(probe_timeout_ms=2000)


# -- docs/membership.md settings table ------------------------------------------------------


def _unit(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "on/off"
    if name.endswith("_ms"):
        return "ms"
    if name.endswith("_bytes"):
        return "bytes"
    return "factor" if "mult" in name else "count"


def settings_table() -> str:
    """The settings table of docs/membership.md, generated from ``SwimConfig`` and the presets
    (field docstrings read from config.py's source)."""
    tree = ast.parse((ROOT / "spawnmesh" / "cluster" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SwimConfig")
    docs: dict[str, str] = {}
    for node, after in zip(cls.body, cls.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    presets = [cfgmod.lan(), cfgmod.wan(), cfgmod.local()]
    rows = [
        "| setting | unit | lan | wan | local | meaning and formula |",
        "|---|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(cfgmod.SwimConfig):
        values = [getattr(p, f.name) for p in presets]
        cells = " | ".join(f"{v:_}".replace("_", ",") if type(v) is int else str(v) for v in values)
        text = docs[f.name].replace("|", "\\|")
        rows.append(f"| `{f.name}` | {_unit(f.name, values[0])} | {cells} | {text} |")
    return "\n".join(rows)


def test_docs_settings_table_is_current() -> None:
    text = DOCS.read_text()
    begin, end = "<!-- settings:begin -->\n", "\n<!-- settings:end -->"
    assert begin in text and end in text, "docs/membership.md lost its settings markers"
    current = text.split(begin, 1)[1].split(end, 1)[0]
    want = settings_table()
    assert current == want, f"regenerate the table in docs/membership.md:\n{want}"
