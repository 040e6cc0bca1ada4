"""Two activations of one actor on two nodes (split brain, as during a network partition): the
statestore's fencing must keep every acknowledged update, whatever the interleaving.

Two embedded nodes with clustering off share one store, so each believes it owns every actor;
clients invoke the same write-through actor through both at once. Every reply acknowledges an
update that must be in the stored state at the end. (A call may fail with ``StaleActivation``
when its retry on a fresh activation is fenced again: that is allowed, it was not acknowledged.)

The regression: when a write was fenced and the activation dropped, the invocations already
queued on it still ran on the dropped activation, concurrently with the fresh activation of the
same actor; two writes of one actor then met in one writer batch, only one was written and both
were acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import trio

from spawnmesh import ActorSystem, Context, WriteThrough, action
from spawnmesh.errors import StaleActivation
from spawnmesh.statestore import MemoryStateStore
from tests.conftest import NodeFactory

app = ActorSystem("split")


@dataclass
class Ops:
    ops: list[str] = field(default_factory=list)


@app.actor("log", state=Ops, snapshot=WriteThrough())
class Log:
    @action
    async def record(self, ctx: Context[Ops], op: str) -> int:
        ctx.state = Ops([*ctx.state.ops, op])
        return len(ctx.state.ops)

    @action
    async def slow_record(self, ctx: Context[Ops], op: str) -> int:
        await trio.sleep(0.001)  # a turn that yields: the queue behind it grows
        ctx.state = Ops([*ctx.state.ops, op])
        return len(ctx.state.ops)


async def test_no_acknowledged_update_is_lost_between_two_owners(make_node: NodeFactory) -> None:
    store = MemoryStateStore()
    off = {"cluster.enabled": False}
    acked: list[str] = []
    fenced = 0
    async with (
        make_node(app, store=store, name="a", **off) as a,
        make_node(app, store=store, name="b", **off) as b,
    ):

        async def client(node: object, tag: str, action_name: str) -> None:
            nonlocal fenced
            ref = node.ref("split", "log")  # type: ignore[attr-defined]
            for i in range(40):
                op = f"{tag}.{i}"
                try:
                    await ref.invoke(action_name, op)
                except StaleActivation:
                    fenced += 1
                    continue
                acked.append(op)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(client, a, f"a{i}", "record")
                    nursery.start_soon(client, b, f"b{i}", "slow_record")
        stale = a.metrics.stale_activations_total + b.metrics.stale_activations_total
    row = await store.load(("split", "log"))
    assert row is not None
    stored = msgspec.msgpack.decode(row.blob)["ops"]
    lost = [op for op in acked if op not in stored]
    assert lost == [], f"{len(lost)} acknowledged updates lost: {lost[:10]}"
    assert len(stored) == len(set(stored))  # and none applied twice
    assert stale > 0  # the two owners really fenced each other
    print(f"\nacked {len(acked)}, failed after a fenced retry {fenced}, stale activations {stale}")
