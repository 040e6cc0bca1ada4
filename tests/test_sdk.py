"""The SDK beyond the examples: function style, sync handlers, payload conversion at the edges,
protobuf state, state codecs, definition errors and spawning by reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import betterproto2
import pytest
import trio
import trio.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spawnmesh import (
    ActionNotFound,
    ActorFailed,
    ActorNotFound,
    ActorSystem,
    Context,
    InvalidArgument,
    Kind,
    Node,
    Reply,
    WriteBehind,
    WriteThrough,
    action,
    timer,
)
from spawnmesh.codec import codec_for
from spawnmesh.errors import DefinitionError, StateCorrupt
from spawnmesh.statestore import MemoryStateStore

# ------------------------------------------------------------------ types (module level, so
# typing.get_type_hints resolves them for payload conversion)


@dataclass
class Tally:
    total: int = 0
    seen: list[str] = field(default_factory=list)


@dataclass
class Line:
    sku: str
    qty: int = 1


@dataclass
class Order:
    customer: str
    lines: list[Line] = field(default_factory=list)
    note: str | None = None


@dataclass(eq=False, repr=False)
class Note(betterproto2.Message):
    text: str = betterproto2.field(1, betterproto2.TYPE_STRING)
    n: int = betterproto2.field(2, betterproto2.TYPE_INT64)


@dataclass
class Nested:
    name: str = ""
    tags: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    child: Line | None = None
    flag: bool = False
    blob: bytes = b""


async def admin(node: Node, system: str, actor: str, act: str, payload: object = None,
                **kw: Any) -> object:
    """``Node.admin_invoke`` (what the CLI and HTTP use) with the defaults filled in."""
    args: dict[str, Any] = {"metadata": {}, "timeout_ms": None, "is_async": False,
                            "delay_ms": None, "parent": None}
    args.update(kw)
    return await node.admin_invoke(system, actor, act, payload, **args)


# ------------------------------------------------------------------ function style


def function_system() -> ActorSystem:
    sys_ = ActorSystem("fn")
    tally = sys_.define("tally", state=Tally)

    @tally.action
    async def add(ctx: Context[Tally], n: int) -> int:
        ctx.state.total += n
        return ctx.state.total

    @tally.action(name="total")
    def read_total(ctx: Context[Tally]) -> int:
        return ctx.state.total

    @tally.action
    def remember(ctx: Context[Tally], word: str) -> Reply:
        return ctx.reply(len(word), state=Tally(ctx.state.total, [*ctx.state.seen, word]))

    @tally.action
    def explode(ctx: Context[Tally], n: int) -> None:
        ctx.state.total += n
        ctx.state.seen.append("never")
        raise KeyError("sync handlers fail like async ones")

    ticker = sys_.define("ticker", state=Tally, deactivate_after_ms=0)

    @ticker.timer(1000)
    async def tick(ctx: Context[Tally]) -> None:
        ctx.state.total += 1
        ctx.state.seen.append(str(ctx.caller))

    return sys_


def test_function_style_definition_shape() -> None:
    (tally, ticker) = function_system().definitions()
    assert sorted(tally.actions) == ["add", "explode", "remember", "total"]
    assert tally.actions["add"].payload_type is int
    assert tally.actions["total"].payload_type is None
    assert [(t.action, t.every_ms) for t in ticker.timers] == [("tick", 1000)]


async def test_function_style_and_sync_handlers(make_node) -> None:
    async with make_node(function_system()) as node:
        t = node.ref("fn", "tally")
        assert await t.invoke("add", 4) == 4
        assert await t.invoke("total") == 4
        assert await t.invoke("remember", "hello") == 5
        with pytest.raises(ActorFailed) as info:
            await t.invoke("explode", 100)
        assert info.value.error_type == "KeyError"
        assert "explode" in info.value.traceback_text
        assert await t.get_state() == Tally(4, ["hello"])  # reset, in-place edits included


async def test_function_style_timer(make_node, autojump_clock: trio.testing.MockClock) -> None:
    async with make_node(function_system()) as node:
        await trio.sleep(5.5)
        state = await node.ref("fn", "ticker").get_state()
        assert state.total == 5
        assert set(state.seen) == {"fn/ticker"}  # a timer turn's caller is the actor itself


async def test_class_style_sync_handlers_and_timer_decorator(
    make_node, autojump_clock: trio.testing.MockClock
) -> None:
    sys_ = ActorSystem("cls")

    @sys_.actor("box", state=Tally)
    class Box:
        @action
        def put(self, ctx: Context[Tally], word: str) -> int:
            ctx.state.seen.append(word)
            return len(ctx.state.seen)

        @action(name="size")
        def how_many(self, ctx: Context[Tally]) -> int:
            return len(ctx.state.seen)

        @timer(every_ms=500, name="beat")
        def heartbeat(self, ctx: Context[Tally]) -> None:
            ctx.state.total += 1

    async with make_node(sys_) as node:
        box = node.ref("cls", "box")
        assert await box.invoke("put", "a") == 1
        assert await box.invoke("size") == 1
        with pytest.raises(ActionNotFound):
            await box.invoke("how_many")
        await trio.sleep(2.25)
        assert (await box.get_state()).total == 4


# ------------------------------------------------------------------ payloads at the edges


def order_system(calls: list[object]) -> ActorSystem:
    sys_ = ActorSystem("conv")

    @sys_.actor("orders", state=Tally, snapshot=WriteThrough())
    class Orders:
        @action
        async def place(self, ctx: Context[Tally], order: Order) -> Order:
            calls.append(order)
            ctx.state.total += sum(line.qty for line in order.lines)
            ctx.state.seen.append(order.customer)
            return order

        @action
        async def count(self, ctx: Context[Tally], n: int) -> int:
            calls.append(n)
            return n * 2

    return sys_


async def test_admin_invoke_converts_json_to_the_annotated_type(make_node) -> None:
    calls: list[object] = []
    async with make_node(order_system(calls)) as node:
        reply = await admin(node, "conv", "orders", "place", {
            "customer": "ada", "note": "x",
            "lines": [{"sku": "a", "qty": "2"}, {"sku": "b", "qty": 1}],
        })
        assert calls == [Order("ada", [Line("a", 2), Line("b", 1)], "x")]
        assert type(calls[0]) is Order and type(calls[0].lines[0]) is Line
        assert reply == {"customer": "ada", "note": "x",  # the reply is JSON-able again
                         "lines": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 1}]}
        assert await admin(node, "conv", "orders", "count", "21") == 42  # lenient: "21" -> 21
        assert await admin(node, "conv", "orders", "get_state") == {"total": 3, "seen": ["ada"]}


async def test_admin_reply_keeps_defaulted_fields_the_payload_omitted(make_node) -> None:
    calls: list[object] = []
    async with make_node(order_system(calls)) as node:
        reply = await admin(node, "conv", "orders", "place", {"customer": "ada",
                                                               "lines": [{"sku": "b"}]})
        assert calls == [Order("ada", [Line("b", 1)], None)]  # the objects are right
    assert reply == {"customer": "ada", "note": None, "lines": [{"sku": "b", "qty": 1}]}


@pytest.mark.parametrize("payload", [
    {"lines": []},  # missing required field
    {"customer": "ada", "lines": [{"qty": 1}]},  # nested field missing
    {"customer": "ada", "lines": "not a list"},
    "a string",
    None,
])
async def test_admin_invoke_bad_payload_is_invalid_argument(make_node, payload: object) -> None:
    calls: list[object] = []
    async with make_node(order_system(calls)) as node:
        with pytest.raises(InvalidArgument, match="does not fit Order"):
            await admin(node, "conv", "orders", "place", payload)
        assert calls == []  # rejected before any turn ran
        with pytest.raises(ActionNotFound):
            await admin(node, "conv", "orders", "nope", {})


async def test_admin_invoke_async_converts_too(make_node) -> None:
    calls: list[object] = []
    async with make_node(order_system(calls)) as node:
        assert await admin(node, "conv", "orders", "place", {"customer": "bo"},
                           is_async=True) is None
        await trio.sleep(0.05)
        assert calls == [Order("bo")]


async def test_in_process_payloads_are_passed_as_is(make_node) -> None:
    calls: list[object] = []
    async with make_node(order_system(calls)) as node:
        order = Order("cy", [Line("x", 1)])
        assert await node.ref("conv", "orders").invoke("place", order) is order
        assert calls[0] is order  # no conversion and no copy in-process


# ------------------------------------------------------------------ protobuf state


def note_system() -> ActorSystem:
    sys_ = ActorSystem("pb")

    @sys_.actor("note", state=Note, snapshot=WriteThrough())
    class NoteActor:
        @action
        async def append(self, ctx: Context[Note], text: str) -> int:
            ctx.state.text += text
            ctx.state.n += 1
            return ctx.state.n

        @action
        async def append_then_fail(self, ctx: Context[Note], text: str) -> None:
            ctx.state.text += text
            ctx.state.n += 100
            raise RuntimeError("no")

        @action
        async def replace(self, ctx: Context[Note], note: Note) -> Reply:
            return ctx.reply(note.n, state=note)

    return sys_


async def test_betterproto_message_as_state(make_node, store: MemoryStateStore) -> None:
    async with make_node(note_system(), store=store) as node:
        note = node.ref("pb", "note")
        assert await note.invoke("append", "ab") == 1
        assert await note.invoke("append", "c") == 2
        with pytest.raises(ActorFailed):
            await note.invoke("append_then_fail", "zzz")
        state = await note.get_state()
        assert isinstance(state, Note) and (state.text, state.n) == ("abc", 2)
        row = await store.load(("pb", "note"))
        assert row is not None and row.blob == bytes(Note(text="abc", n=2))  # protobuf bytes
        assert await admin(node, "pb", "note", "get_state") == {"text": "abc", "n": "2"}
        assert await admin(node, "pb", "note", "replace", {"text": "new", "n": "7"}) == 7
        with pytest.raises(InvalidArgument):
            await admin(node, "pb", "note", "replace", ["not", "an", "object"])
    async with make_node(note_system(), store=store) as node:  # survives a restart
        state = await node.ref("pb", "note").get_state()
        assert (state.text, state.n) == ("new", 7)


# ------------------------------------------------------------------ codecs

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_lines = st.builds(Line, sku=st.text(), qty=_INT64)
_nested = st.builds(
    Nested,
    name=st.text(),
    tags=st.lists(st.text(), max_size=5),
    scores=st.dictionaries(st.text(), st.floats(allow_nan=False), max_size=5),
    child=st.none() | _lines,
    flag=st.booleans(),
    blob=st.binary(max_size=32),
)
_json_like = st.recursive(
    st.none() | st.booleans() | _INT64 | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_nested)
def test_dataclass_codec_round_trip(value: Nested) -> None:
    codec = codec_for(Nested)
    assert codec.decode(codec.encode(value)) == value


@settings(max_examples=200, deadline=None)
@given(_json_like)
def test_untyped_codec_round_trip(value: object) -> None:
    codec = codec_for(None)
    assert codec.decode(codec.encode(value)) == value


@settings(max_examples=200, deadline=None)
@given(st.text(), _INT64)
def test_protobuf_codec_round_trip(text: str, n: int) -> None:
    codec = codec_for(Note)
    back = codec.decode(codec.encode(Note(text=text, n=n)))
    assert (back.text, back.n) == (text, n)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64))
def test_bytes_codec_round_trip(value: bytes) -> None:
    codec = codec_for(bytes)
    assert codec.decode(codec.encode(value)) == value


def _decodes_or_state_corrupt(tp: type | None, blob: bytes) -> None:
    try:
        codec_for(tp).decode(blob)
    except StateCorrupt:
        pass


@pytest.mark.parametrize("tp", [Note, bytes, Tally], ids=["protobuf", "bytes", "dataclass"])
@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=64))
def test_garbage_decodes_or_raises_state_corrupt(tp: type, blob: bytes) -> None:
    _decodes_or_state_corrupt(tp, blob)


@pytest.mark.parametrize(("tp", "blob"), [
    (None, b"\xa1\xff"),  # untyped state: the string "\xff"
    (Nested, b"\x81\xa4tags\x91\xa1\xff"),  # {"tags": ["\xff"]}
], ids=["untyped", "dataclass"])
def test_invalid_utf8_state_raises_state_corrupt(tp: type | None, blob: bytes) -> None:
    _decodes_or_state_corrupt(tp, blob)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=64))
@example(blob=b"\x91\xa1\xff")
def test_garbage_untyped_state_raises_state_corrupt(blob: bytes) -> None:
    _decodes_or_state_corrupt(None, blob)


# ------------------------------------------------------------------ definition errors


def _no_actions() -> None:
    s = ActorSystem("d")
    s.define("a", state=Tally)
    s.definitions()


def _duplicate_actor() -> None:
    s = ActorSystem("d")
    s.define("a")
    s.define("a")


def _duplicate_class_action() -> None:
    s = ActorSystem("d")

    @s.actor("a", state=Tally)
    class A:
        @action(name="x")
        async def one(self, ctx: Context[Tally]) -> None: ...

        @action(name="x")
        async def two(self, ctx: Context[Tally]) -> None: ...


def _duplicate_function_action() -> None:
    b = ActorSystem("d").define("a", state=Tally)

    @b.action(name="x")
    async def one(ctx: Context[Tally]) -> None: ...

    @b.action(name="x")
    def two(ctx: Context[Tally]) -> None: ...


def _with(**kw: Any) -> Any:
    """A one-action actor defined with ``kw``; returns a thunk that builds it."""

    def build() -> None:
        opts = dict(kw)
        s = ActorSystem(opts.pop("system", "d"))
        b = s.define(opts.pop("name", "a"), **opts)

        @b.action
        async def go(ctx: Context[Any]) -> None: ...

        s.definitions()

    return build


def _timer_interval(ms: int) -> Any:
    def build() -> None:
        s = ActorSystem("d")
        b = s.define("a", state=Tally)

        @b.timer(ms)
        def tick(ctx: Context[Tally]) -> None: ...

        s.definitions()

    return build


def _no_ctx() -> None:
    s = ActorSystem("d")

    @s.actor("a", state=Tally)
    class A:
        @action
        async def bad(self) -> None: ...


@dataclass
class NeedsArgs:
    x: int


DEFINITION_ERRORS: dict[str, tuple[Any, str]] = {
    "no actions": (_no_actions, "defines no actions"),
    "duplicate actor": (_duplicate_actor, "defined twice"),
    "duplicate class action": (_duplicate_class_action, "action 'x' twice"),
    "duplicate function action": (_duplicate_function_action, "action 'x' twice"),
    "bad actor name": (_with(name="bad name!"), "must be 1-200 characters"),
    "bad system name": (_with(system=""), "must be 1-200 characters"),
    "long name": (_with(name="x" * 201), "must be 1-200 characters"),
    "timer 0": (_timer_interval(0), "interval must be > 0"),
    "timer negative": (_timer_interval(-5), "interval must be > 0"),
    "channel to unknown action": (_with(channels={"t": "nope"}), "unknown action 'nope'"),
    "list channel without receive": (_with(channels=["t"]), "unknown action 'receive'"),
    "pooled with state": (_with(kind=Kind.POOLED, state=Tally), "stateless"),
    "pool size 0": (_with(kind="pooled", pool_size=0), "pool_size"),
    "negative deactivation": (_with(deactivate_after_ms=-1), "deactivate_after_ms"),
    "negative write-behind": (_with(state=Tally, snapshot=WriteBehind(-1)), "write-behind"),
    "state needs args": (_with(state=NeedsArgs), "initial_state"),
    "handler without ctx": (_no_ctx, r"\(ctx\)"),
}


@pytest.mark.parametrize("name", sorted(DEFINITION_ERRORS))
def test_bad_definitions_raise_definition_error(name: str) -> None:
    build, match = DEFINITION_ERRORS[name]
    with pytest.raises(DefinitionError, match=match):
        build()


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError):
        ActorSystem("d").define("a", kind="singleton")


def test_initial_state_makes_an_argument_needing_type_usable() -> None:
    s = ActorSystem("d")
    b = s.define("a", state=NeedsArgs, initial_state=lambda: NeedsArgs(3))
    b.action(lambda ctx: ctx.state.x)
    (adef,) = s.definitions()
    assert adef.new_state() == NeedsArgs(3)


def test_reply_forwards_or_pipes_once() -> None:
    from spawnmesh.ids import ActorId

    target = ActorId("d", "b")
    with pytest.raises(DefinitionError, match="once"):
        Reply(1).forward(target, "x").pipe(target, "y")
    with pytest.raises(DefinitionError, match="not an actor reference"):
        Reply(1).effect("d/b", "x")  # type: ignore[arg-type]


def test_write_behind_zero_interval_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="write-behind"):
        _with(state=Tally, snapshot=WriteBehind(every_ms=0))()


async def test_same_actor_from_two_systems_is_a_definition_error(make_node) -> None:
    first, second = ActorSystem("dup"), ActorSystem("dup")
    for s in (first, second):
        s.define("a").action(lambda ctx: None, name="go")
    with pytest.raises(DefinitionError):
        async with make_node(first, second):
            pass


# ------------------------------------------------------------------ payload defaults


async def test_payload_parameter_default_is_used_without_payload(make_node) -> None:
    s = ActorSystem("d")
    b = s.define("c", state=Tally)

    @b.action
    async def add(ctx: Context[Tally], n: int = 1) -> int:
        ctx.state.total += int(n)
        return ctx.state.total

    async with make_node(s) as node:
        try:
            got: object = await node.ref("d", "c").invoke("add")
        except ActorFailed as exc:
            got = exc
    assert got == 1, got


async def test_exception_in_open_node_body_is_not_wrapped(make_node) -> None:
    with pytest.raises(KeyError):
        async with make_node(ActorSystem("x")):
            raise KeyError("from the body")


# ------------------------------------------------------------------ spawning by reference


def cart_system() -> ActorSystem:
    s = ActorSystem("shop")
    b = s.define("cart", kind=Kind.UNNAMED, state=Tally)

    @b.action
    def whoami(ctx: Context[Tally]) -> str:
        return str(ctx.self_id)

    named = s.define("registry", state=Tally)
    named.action(lambda ctx: None, name="noop")
    return s


async def test_ref_spawn(make_node) -> None:
    async with make_node(cart_system()) as node:
        ref = await node.ref("shop", "c1", parent="cart").spawn()
        assert await ref.spawn() is ref  # idempotent
        assert await node.ref("shop", "c1").invoke("whoami") == "shop/c1<cart>"
        with pytest.raises(InvalidArgument, match="names no template"):
            await node.ref("shop", "c2").spawn()
        with pytest.raises(ActorNotFound):
            await node.ref("shop", "c3", parent="registry").spawn()  # not a template
        with pytest.raises(ActorNotFound):
            await node.ref("shop", "c4", parent="nothing").spawn()
        with pytest.raises(InvalidArgument, match="registered actor"):
            await node.ref("shop", "registry", parent="cart").spawn()
        with pytest.raises(ActorNotFound):
            await node.ref("shop", "c2").invoke("whoami")  # never spawned, no parent


async def test_an_instance_whose_state_never_changed_is_found_by_name_after_a_restart(
    make_node, store: MemoryStateStore
) -> None:
    """An instance's first activation writes its initial state, whose row names its template:
    after a restart (or a hand-off, or on another node) it is found by its name alone, and a
    node forgets the instances it passivated (memory bounded by the active ones)."""
    async with make_node(cart_system(), store=store) as node:
        for i in range(50):
            ref = await node.spawn("shop", f"c{i}", "cart")
            assert await ref.invoke("whoami") == f"shop/c{i}<cart>"  # the state never changes
        assert await node.runtime.passivate_idle(everything=True) == 50
        assert not node.runtime._spawned  # nothing remembered: the rows name the template
        assert await node.ref("shop", "c7").invoke("whoami") == "shop/c7<cart>"
    row = await store.load(("shop", "c3"))
    assert row is not None and row.parent == "cart" and row.revision == 1
    async with make_node(cart_system(), store=store) as node:  # a restart
        assert await node.ref("shop", "c3").invoke("whoami") == "shop/c3<cart>"
        assert (await node.ref("shop", "c3").get_state()).total == 0


async def test_stateless_actor_has_no_get_state(make_node) -> None:
    s = ActorSystem("d")
    s.define("w", kind="pooled").action(lambda ctx: "ok", name="work")
    async with make_node(s) as node:
        assert await node.ref("d", "w").invoke("work") == "ok"
        with pytest.raises(ActionNotFound):
            await node.ref("d", "w").get_state()
