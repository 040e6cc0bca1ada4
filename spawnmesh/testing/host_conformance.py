"""Conformance kit for actor hosts (in the spirit of Cloudstate's TCK).

A host under test implements the "tck" actor system (spec/spawnmesh/tck/v1/tck.proto; the
actors and their behaviour are in docs/host-protocol.md, "Conformance") and is started as a
separate process with ``SPAWNMESH_NODE_ADDRESS`` (and ``SPAWNMESH_HOST_TOKEN`` when set) in
its environment. The kit runs a node, waits for the registration, and checks registration,
state round trips (byte for byte), context (metadata, caller, tags), errors, every workflow
kind, timers, pools, the shopping cart, passivation and reactivation with state, deadlines and
checkpoints, all through the node as any caller would.

From pytest::

    async with open_host_harness([sys.executable, "my_host.py"]) as h:
        report = await run_checks(h)
    assert report.ok, report.text()

From a shell: ``python -m spawnmesh.testing.host_conformance -- <host command...>``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from spawnmesh.actors.definition import Kind, WriteThrough
from spawnmesh.config import load_config
from spawnmesh.errors import ActionNotFound, ActorFailed, InvocationTimeout
from spawnmesh.host.convert import from_any
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.spawnmesh.tck.v1 import LineItem, Receipt, Seen, Value
from spawnmesh.node import Node, open_node
from spawnmesh.refs import ActorRef
from spawnmesh.system import ActorSystem

SYSTEM = "tck"
VALUE_URL = "type.googleapis.com/spawnmesh.tck.v1.Value"

relay_system = ActorSystem("tck-sdk")
"""An SDK actor that calls the host's counter, so a turn sees a caller."""


_relay = relay_system.define("relay")


@_relay.action
async def whoami(ctx: Any) -> Any:
    """Call tck/counter.whoami from inside a turn (the host must see this actor as caller)."""
    return await ctx.ref("counter", system=SYSTEM).invoke("whoami")


@dataclass
class Harness:
    """A node with the host under test attached."""

    node: Node
    process: trio.Process
    system: str = SYSTEM

    def ref(self, name: str, *, parent: str | None = None) -> ActorRef:
        return self.node.ref(self.system, name, parent=parent)

    def attached(self) -> bool:
        hs = self.node.host_api.hosts.systems.get(self.system) if self.node.host_api else None
        return hs is not None and bool(hs.sessions or hs.callback)


async def wait_until(pred: Callable[[], Any], what: str, within_s: float = 10.0) -> Any:
    """Poll ``pred`` every 20 ms until truthy; AssertionError naming ``what`` after
    ``within_s`` (polling: the kit observes the node from outside, there is no event)."""
    with trio.move_on_after(within_s):
        while True:
            value = pred()
            if value:
                return value
            await trio.sleep(0.02)
    raise AssertionError(f"timed out after {within_s} s waiting for {what}")


@asynccontextmanager
async def open_host_harness(
    command: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
    startup_timeout: float = 30.0,
) -> AsyncIterator[Harness]:
    """Run a node with the host API on a free loopback port, start ``command`` with
    ``SPAWNMESH_NODE_ADDRESS`` set, and wait until it registered the tck system."""
    cfg = load_config(
        env={},
        overrides={
            "statestore.url": "memory://",
            "ops.port": 0,
            "host.enabled": True,
            "host.port": 0,
            "cluster.enabled": False,  # one node: no gossip port to collide on
            "actors.sweep_interval_ms": 100,
            **(overrides or {}),
        },
    )
    async with open_node(cfg, relay_system) as node:
        child_env = {
            **os.environ,
            **(env or {}),
            "SPAWNMESH_NODE_ADDRESS": f"127.0.0.1:{node.host_api.port}",
        }
        if cfg.host.token:
            child_env["SPAWNMESH_HOST_TOKEN"] = cfg.host.token
        proc = await trio.lowlevel.open_process(list(command), env=child_env)
        try:
            h = Harness(node, proc)
            with trio.move_on_after(startup_timeout):
                while not h.attached():
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"host exited with {proc.returncode} before registering"
                        )
                    await trio.sleep(0.05)
            if not h.attached():
                raise AssertionError(f"host did not register {SYSTEM!r} in {startup_timeout} s")
            yield h
        finally:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()


def _value(any_value: Any) -> Value:
    v = from_any(any_value, None) if isinstance(any_value, AnyMsg) else any_value
    assert isinstance(v, Value), f"expected a tck Value, got {any_value!r}"
    return v


async def _get(h: Harness, name: str) -> Value:
    st = await h.ref(name).get_state()
    assert isinstance(st, AnyMsg), f"state of {name} is not an Any: {st!r}"
    if not st.type_url:
        return Value()
    assert st.type_url == VALUE_URL, st.type_url
    return Value.parse(st.value)


# ------------------------------------------------------------------------------ the checks


async def check_registration(h: Harness) -> None:
    """The whole system is registered with its kinds, strategies, timers and channels."""
    rt = h.node.runtime
    kinds = {
        n: rt.definition(h.system, n) for n in ("counter", "sink", "echo", "ticker", "pool", "cart")
    }
    missing = [n for n, d in kinds.items() if d is None]
    assert not missing, f"not registered: {missing}"
    d = {n: v for n, v in kinds.items() if v is not None}
    assert d["cart"].kind is Kind.UNNAMED and d["pool"].kind is Kind.POOLED
    assert d["pool"].pool_size == 2 and not d["pool"].stateful and not d["echo"].stateful
    assert isinstance(d["sink"].snapshot, WriteThrough)
    assert d["sink"].channels == {"tck-news": "heard"}
    assert [(t.action, t.every_ms) for t in d["ticker"].timers] == [("tick", 100)]
    assert d["counter"].tags == {"suite": "tck"}
    assert d["counter"].deactivate_after_ms == 400


async def check_state_round_trip(h: Harness) -> None:
    """State goes to the host and back as an Any, byte for byte, type URL included."""
    c = h.ref("counter")
    base = (await _get(h, "counter")).n
    assert _value(await c.invoke("add", Value(n=2))).n == base + 2
    assert _value(await c.invoke("add", Value(n=3))).n == base + 5
    st = await c.get_state()
    assert st.type_url == VALUE_URL and st.value == bytes(Value(n=base + 5)), st
    seen = from_any(await c.invoke("whoami"), None)
    assert isinstance(seen, Seen) and seen.had_state and seen.state_type_url == VALUE_URL


async def check_context(h: Harness) -> None:
    """A turn sees its own id, the caller's metadata, the definition's tags and the caller."""
    seen = from_any(await h.ref("counter").invoke("whoami", metadata={"x-tck": "1"}), None)
    assert isinstance(seen, Seen)
    assert (seen.self_system, seen.self_name) == (h.system, "counter")
    assert seen.metadata.get("x-tck") == "1" and seen.tags == {"suite": "tck"}
    assert seen.caller == ""
    via = await h.node.ref("tck-sdk", "relay").invoke("whoami")
    seen2 = from_any(via, None)
    assert isinstance(seen2, Seen) and seen2.caller == "tck-sdk/relay", seen2


async def check_errors(h: Harness) -> None:
    """A failing host handler is ActorFailed (type and message kept), state untouched; an
    undeclared action is ActionNotFound without reaching the host."""
    c = h.ref("counter")
    before = await _get(h, "counter")
    try:
        await c.invoke("fail", Value(text="nope"))
    except ActorFailed as exc:
        assert exc.error_type == "TckError" and "nope" in exc.error_message, exc
    else:
        raise AssertionError("fail did not fail")
    assert await _get(h, "counter") == before
    try:
        await c.invoke("no_such_action")
    except ActionNotFound:
        pass
    else:
        raise AssertionError("an undeclared action did not raise ActionNotFound")


async def check_side_effect(h: Harness) -> None:
    """A side effect runs after the turn, on another host actor."""
    before = (await _get(h, "sink")).n
    assert _value(await h.ref("counter").invoke("effect", Value(n=4))).n == 4

    async def grown() -> bool:
        return (await _get(h, "sink")).n >= before + 4

    await _await_true(grown, "the side effect on sink")


async def check_broadcast(h: Harness) -> None:
    """A broadcast reaches the channel's subscriber on its mapped action."""
    before = await _get(h, "sink")
    await h.ref("counter").invoke("broadcast", Value(n=7))

    async def heard() -> bool:
        now = await _get(h, "sink")
        return now.n >= before.n + 7 and now.text.count("h") > before.text.count("h")

    await _await_true(heard, "the broadcast on tck-news")


async def check_pipe_and_forward(h: Harness) -> None:
    """Pipe sends the turn's output on, forward its input; the caller gets echo's reply."""
    c = h.ref("counter")
    assert _value(await c.invoke("pipe", Value(n=3))) == Value(n=30, text="echo:")
    assert _value(await c.invoke("forward", Value(n=5, text="f"))) == Value(n=5, text="echo:f")


async def check_timers(h: Harness) -> None:
    """The ticker's timer action runs every 100 ms while it is active."""
    first = (await _get(h, "ticker")).n

    async def ticked() -> bool:
        return (await _get(h, "ticker")).n >= first + 2

    await _await_true(ticked, "two ticks of tck/ticker")


async def check_pool(h: Harness) -> None:
    """Calls to a pooled actor spread over its instances pool#0 and pool#1."""
    names: set[str] = set()

    async def work(i: int) -> None:
        names.add(_value(await h.ref("pool").invoke("work", Value(n=i))).text)

    async with trio.open_nursery() as n:
        for i in range(8):
            n.start_soon(work, i)
    assert names <= {"pool#0", "pool#1"} and names, names


async def check_shopping_cart(h: Harness) -> None:
    """Unnamed carts spawned explicitly and lazily; checkout; a closed cart refuses items."""
    a = await h.node.spawn(h.system, "cart-a", "cart")
    assert _value(await a.invoke("add_item", LineItem(sku="apple", qty=2, price_cents=50))).n == 1
    assert _value(await a.invoke("add_item", LineItem(sku="pear", qty=1, price_cents=80))).n == 2
    receipt = from_any(await a.invoke("checkout"), None)
    assert receipt == Receipt(cart="cart-a", lines=2, total_cents=180), receipt
    try:
        await a.invoke("add_item", LineItem(sku="plum", qty=1))
    except ActorFailed as exc:
        assert "checked out" in exc.error_message
    else:
        raise AssertionError("a checked-out cart accepted an item")
    b = h.ref("cart-b", parent="cart")
    assert _value(await b.invoke("add_item", LineItem(sku="tea", qty=3, price_cents=4))).n == 1


async def check_passivation(h: Harness) -> None:
    """An idle counter is passivated (state flushed) and reactivated with its state."""
    c = h.ref("counter")
    n = _value(await c.invoke("add", Value(n=1))).n
    key = (h.system, "counter")
    await wait_until(
        lambda: all(a.key != key for a in h.node.runtime.activations()),
        "counter to be passivated (deactivation timeout 400 ms)",
    )
    stored = await h.node.store.load(key)
    assert stored is not None and AnyMsg.parse(stored.blob).value == bytes(Value(n=n))
    seen = from_any(await c.invoke("whoami"), None)
    assert isinstance(seen, Seen) and seen.had_state
    assert (await _get(h, "counter")).n == n


async def check_deadline(h: Harness) -> None:
    """The caller's deadline bounds a slow host turn; the host is usable right after."""
    c = h.ref("counter")
    t0 = trio.current_time()
    try:
        await c.invoke("slow", Value(n=5000), timeout_ms=200)
    except InvocationTimeout:
        pass
    else:
        raise AssertionError("a 5 s turn finished within a 200 ms deadline")
    assert trio.current_time() - t0 < 2.0
    assert _value(await c.invoke("add", Value(n=0))).n >= 0


async def check_checkpoint(h: Harness) -> None:
    """checkpoint=true makes the state durable before the reply (counter is write-behind
    every 60 s, so only the checkpoint can have written it)."""
    await h.ref("counter").invoke("checkpoint", Value(n=4242))
    stored = await h.node.store.load((h.system, "counter"))
    assert stored is not None and AnyMsg.parse(stored.blob).value == bytes(Value(n=4242))


async def _await_true(
    pred: Callable[[], Awaitable[bool]], what: str, within_s: float = 10.0
) -> None:
    with trio.move_on_after(within_s):
        while not await pred():  # noqa: ASYNC110 (observed from outside: no event)
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {within_s} s waiting for {what}")


CHECKS: list[Callable[[Harness], Awaitable[None]]] = [
    check_registration,
    check_state_round_trip,
    check_context,
    check_errors,
    check_side_effect,
    check_broadcast,
    check_pipe_and_forward,
    check_timers,
    check_pool,
    check_shopping_cart,
    check_deadline,
    check_checkpoint,
    check_passivation,
]


@dataclass
class Report:
    """The outcome of every check: name -> None (passed) or the failure text."""

    results: dict[str, str | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(v is None for v in self.results.values())

    def text(self) -> str:
        lines = []
        for name, err in self.results.items():
            lines.append(
                f"{'PASS' if err is None else 'FAIL'} {name}"
                + ("" if err is None else f"\n    {err}")
            )
        passed = sum(v is None for v in self.results.values())
        lines.append(f"{passed} passed, {len(self.results) - passed} failed")
        return "\n".join(lines)


async def run_checks(
    h: Harness,
    checks: Sequence[Callable[[Harness], Awaitable[None]]] = CHECKS,
    *,
    per_check_timeout: float = 20.0,
) -> Report:
    """Run ``checks`` in order against the attached host; never raises for a failed check."""
    report = Report()
    for check in checks:
        name = check.__name__.removeprefix("check_")
        try:
            with trio.fail_after(per_check_timeout):
                await check(h)
        except Exception as exc:
            report.results[name] = "".join(traceback.format_exception_only(exc)).strip()
        else:
            report.results[name] = None
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m spawnmesh.testing.host_conformance -- <host command...>``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print(
            "usage: python -m spawnmesh.testing.host_conformance -- <host command...>",
            file=sys.stderr,
        )
        return 2

    async def go() -> Report:
        async with open_host_harness(args) as h:
            return await run_checks(h)

    report = trio.run(go)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
