"""An actor host written with Google's grpcio (grpc.aio) and protobuf, with stubs generated from
spec/ by grpcio-tools; it shares no code with spawnmesh.

It implements the conformance model (the "tck" actor system: counter, sink, echo, ticker, pool
and the shopping cart, docs/host-protocol.md) and holds one Connect stream to the node:

    python examples/hosts/grpcio_host.py --node 127.0.0.1:9001

It prints "registered <system>" once the node accepted the registration, and reconnects when
the stream breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpcio_stubs

pb = grpcio_stubs.load()
A, P, H, T = pb.actor, pb.protocol, pb.host, pb.tck


class TckError(Exception):
    """What counter.fail raises (reported as ActorFailed, type TckError)."""


def pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def unpack(value: any_pb2.Any, tp: Any, present: bool) -> Any:
    msg = tp()
    if present:
        msg.ParseFromString(value.value)
    return msg


def reply(
    inv: Any, value: Any = None, state: Any = None, workflow: Any = None, checkpoint: bool = False
) -> Any:
    resp = P.ActorInvocationResponse(
        actor_name=inv.actor.name, actor_system=inv.actor.system, checkpoint=checkpoint
    )
    if workflow is not None:
        resp.workflow.CopyFrom(workflow)
    if state is not None:
        resp.updated_context.state.CopyFrom(pack(state))
    if value is None:
        resp.noop.SetInParent()
    else:
        resp.value.CopyFrom(pack(value))
    return resp


def state_of(inv: Any, tp: Any) -> Any:
    return unpack(inv.current_context.state, tp, inv.current_context.HasField("state"))


def arg_of(inv: Any, tp: Any) -> Any:
    return unpack(inv.value, tp, inv.HasField("value"))


async def counter(inv: Any) -> Any:
    st, arg, a = state_of(inv, T.Value), arg_of(inv, T.Value), inv.action_name
    if a == "add":
        new = T.Value(n=st.n + arg.n, text=st.text)
        return reply(inv, T.Value(n=new.n), new)
    if a == "fail":
        raise TckError(arg.text or "failed on purpose")
    if a == "whoami":
        ctx = inv.current_context
        caller = f"{ctx.caller.system}/{ctx.caller.name}" if ctx.HasField("caller") else ""
        has = ctx.HasField("state")
        return reply(
            inv,
            T.Seen(
                self_system=ctx.self.system,
                self_name=ctx.self.name,
                caller=caller,
                metadata=dict(ctx.metadata),
                tags=dict(ctx.tags),
                had_state=has,
                state_type_url=ctx.state.type_url if has else "",
            ),
        )
    if a == "slow":
        await asyncio.sleep(arg.n / 1000)
        return reply(inv, T.Value(n=arg.n))
    if a == "effect":
        wf = P.Workflow()
        req = wf.effects.add().request
        req.actor.id.name = "sink"
        req.action_name = "add"
        req.value.CopyFrom(pack(T.Value(n=arg.n)))
        return reply(inv, T.Value(n=arg.n), workflow=wf)
    if a == "broadcast":
        wf = P.Workflow(
            broadcast=P.Broadcast(channel_group="tck-news", value=pack(T.Value(n=arg.n)))
        )
        return reply(inv, T.Value(n=arg.n), workflow=wf)
    if a == "pipe":
        wf = P.Workflow(pipe=P.Pipe(actor="echo", action_name="echo"))
        return reply(inv, T.Value(n=arg.n * 10), workflow=wf)
    if a == "forward":
        return reply(
            inv, None, workflow=P.Workflow(forward=P.Forward(actor="echo", action_name="echo"))
        )
    if a == "checkpoint":
        return reply(inv, T.Value(n=arg.n), T.Value(n=arg.n), checkpoint=True)
    raise TckError(f"counter has no action {a}")


async def sink(inv: Any) -> Any:
    st, arg = state_of(inv, T.Value), arg_of(inv, T.Value)
    new = T.Value(n=st.n + arg.n, text=st.text + ("h" if inv.action_name == "heard" else "a"))
    return reply(inv, T.Value(n=new.n), new)


async def echo(inv: Any) -> Any:
    arg = arg_of(inv, T.Value)
    return reply(inv, T.Value(n=arg.n, text="echo:" + arg.text))


async def ticker(inv: Any) -> Any:
    new = T.Value(n=state_of(inv, T.Value).n + 1)
    return reply(inv, T.Value(n=new.n), new)


async def pool_worker(inv: Any) -> Any:
    return reply(inv, T.Value(n=arg_of(inv, T.Value).n, text=inv.actor.name))


async def cart(inv: Any) -> Any:
    st = state_of(inv, T.Cart)
    if inv.action_name == "add_item":
        item = arg_of(inv, T.LineItem)
        if st.checked_out:
            raise TckError("cart is checked out")
        for line in st.items:
            if line.sku == item.sku:
                line.qty += item.qty
                break
        else:
            st.items.append(item)
        return reply(inv, T.Value(n=len(st.items)), st)
    if inv.action_name == "checkout":
        if not st.items:
            raise TckError("cart is empty")
        st.checked_out = True
        total = sum(i.qty * i.price_cents for i in st.items)
        return reply(
            inv, T.Receipt(cart=inv.actor.name, lines=len(st.items), total_cents=total), st
        )
    raise TckError(f"cart has no action {inv.action_name}")


ACTORS = {
    "counter": counter,
    "sink": sink,
    "echo": echo,
    "ticker": ticker,
    "pool": pool_worker,
    "cart": cart,
}


def actor_system(name: str) -> Any:
    """The registration of the tck system (docs/host-protocol.md, "Conformance")."""
    system = A.ActorSystem(name=name)

    def actor(
        actor_name: str, actions: list[str], kind: int = A.NAMED, stateful: bool = True
    ) -> Any:
        a = system.registry.actors[actor_name]
        a.id.name, a.id.system = actor_name, name
        a.settings.kind, a.settings.stateful = kind, stateful
        for act in actions:
            a.actions.add().name = act
        return a

    c = actor(
        "counter",
        ["add", "fail", "whoami", "slow", "effect", "broadcast", "pipe", "forward", "checkpoint"],
    )
    c.metadata.tags["suite"] = "tck"
    c.settings.snapshot_strategy.timeout.timeout = 60_000
    c.settings.deactivation_strategy.timeout.timeout = 400
    s = actor("sink", ["add", "heard"])
    s.metadata.channel_group.add(topic="tck-news", action="heard")
    s.settings.snapshot_strategy.write_through.SetInParent()
    actor("echo", ["echo"], stateful=False)
    t = actor("ticker", [])
    t.timer_actions.add(seconds=100).action.name = "tick"
    actor("pool", ["work"], kind=A.POOLED, stateful=False).settings.max_pool_size = 2
    actor("cart", ["add_item", "checkout"], kind=A.UNNAMED)
    return system


async def run_turn(inv: Any) -> Any:
    name = inv.actor.parent or inv.actor.name
    fn = ACTORS.get(name) or ACTORS.get(name.split("#")[0])
    if fn is None:
        raise TckError(f"no actor {inv.actor.name}")
    return await fn(inv)


async def session(stub: Any, system: str, metadata: Any) -> None:
    """One Connect stream: register, then answer turns (concurrently) until it ends."""
    call = stub.Connect(metadata=metadata)
    reg = P.RegistrationRequest(actor_system=actor_system(system))
    reg.service_info.service_name = system
    reg.service_info.support_library_name = "grpcio-example-host"
    reg.service_info.protocol_major_version = 1
    await call.write(H.HostMessage(register=reg))
    first = await call.read()
    if first is grpc.aio.EOF or not first.HasField("registered"):
        raise RuntimeError("the node did not confirm the registration")
    print(f"registered {system}", flush=True)
    tasks: dict[int, asyncio.Task[None]] = {}
    lock = asyncio.Lock()

    async def answer(turn: Any) -> None:
        try:
            timeout = turn.timeout_ms / 1000 if turn.timeout_ms else None
            out = H.TurnResult(
                id=turn.id, response=await asyncio.wait_for(run_turn(turn.invocation), timeout)
            )
        except asyncio.CancelledError:
            return
        except Exception as exc:
            out = H.TurnResult(
                id=turn.id,
                error=H.TurnError(
                    type=type(exc).__name__,
                    message=str(exc),
                    traceback="".join(traceback.format_exception(exc)),
                ),
            )
        finally:
            tasks.pop(turn.id, None)
        async with lock:
            await call.write(H.HostMessage(result=out))

    try:
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.HasField("turn"):
                tasks[msg.turn.id] = asyncio.create_task(answer(msg.turn))
            elif msg.HasField("cancel") and msg.cancel.id in tasks:
                tasks[msg.cancel.id].cancel()
    finally:
        for task in tasks.values():
            task.cancel()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node", default=os.environ.get("SPAWNMESH_NODE_ADDRESS", "127.0.0.1:9001"))
    p.add_argument("--system", default="tck")
    p.add_argument("--token", default=os.environ.get("SPAWNMESH_HOST_TOKEN", ""))
    args = p.parse_args()
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    async with grpc.aio.insecure_channel(args.node) as channel:
        stub = pb.host_grpc.NodeServiceStub(channel)
        while True:
            try:
                await session(stub, args.system, metadata)
            except grpc.aio.AioRpcError as exc:
                print(f"stream ended: {exc.code().name}: {exc.details()}", flush=True)
                if exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ):
                    raise SystemExit(2) from None
            await asyncio.sleep(0.2)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
