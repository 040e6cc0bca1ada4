"""An actor host written with betterproto2 and grpclib, on plain asyncio, in its own process.

It implements the conformance model (the "tck" actor system of spec/spawnmesh/tck/v1/tck.proto:
a counter, a sink, an echo, a ticker, a pool and the shopping cart) and attaches to a node:

    python examples/hosts/grpclib_host.py --node 127.0.0.1:9001            # turns over Connect
    python examples/hosts/grpclib_host.py --node 127.0.0.1:9001 --serve 127.0.0.1:0  # callback

With ``--serve`` it serves HostService itself and registers its address (the node calls it
per turn); otherwise it holds one Connect stream open and needs no inbound port. It prints
"registered <system>" once the node accepted it, and reconnects when the stream breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import grpclib.client
import grpclib.const
import grpclib.server
from grpclib.exceptions import GRPCError, StreamTerminatedError

from spawnmesh.host.gen import spawn
from spawnmesh.host.gen.google import rpc
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.message_pool import default_message_pool as pool
from spawnmesh.host.gen.spawn import actors as pb
from spawnmesh.host.gen.spawnmesh import v1
from spawnmesh.host.gen.spawnmesh.tck.v1 import Cart, LineItem, Receipt, Seen, Value
from spawnmesh.host.status import RichStatusCodec

Turn = Callable[[spawn.ActorInvocation], Awaitable[spawn.ActorInvocationResponse]]
NODE: v1.NodeServiceStub | None = None
"""The node's API, for calls made from inside a turn (counter.call)."""


class TckError(Exception):
    """What counter.fail raises (the node reports it as ActorFailed, type TckError)."""


# ---------------------------------------------------------------------------- the actors


def pack(msg: Any) -> AnyMsg:
    return AnyMsg.pack(msg, pool)


def unpack(value: AnyMsg | None, tp: Any) -> Any:
    return tp() if value is None or not value.value else tp.parse(value.value)


def reply(
    inv: spawn.ActorInvocation,
    value: Any = None,
    state: Any = None,
    workflow: spawn.Workflow | None = None,
    checkpoint: bool = False,
) -> spawn.ActorInvocationResponse:
    """A response: ``state`` None keeps the state; ``value`` None is a Noop."""
    resp = spawn.ActorInvocationResponse(
        actor_name=inv.actor.name,
        actor_system=inv.actor.system,
        workflow=workflow,
        checkpoint=checkpoint,
    )
    if state is not None:
        resp.updated_context = spawn.Context(state=pack(state))
    if value is None:
        resp.noop = spawn.Noop()
    else:
        resp.value = pack(value)
    return resp


def state_of(inv: spawn.ActorInvocation, tp: Any) -> Any:
    ctx = inv.current_context
    return unpack(ctx.state if ctx is not None else None, tp)


def effect(target: str, action: str, value: Any) -> spawn.SideEffect:
    return spawn.SideEffect(
        request=spawn.InvocationRequest(
            actor=pb.Actor(id=pb.ActorId(name=target)), action_name=action, value=pack(value)
        )
    )


async def counter(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    st: Value = state_of(inv, Value)
    arg: Value = unpack(inv.value, Value)
    a = inv.action_name
    if a == "add":
        new = Value(n=st.n + arg.n, text=st.text)
        return reply(inv, Value(n=new.n), new)
    if a == "fail":
        raise TckError(arg.text or "failed on purpose")
    if a == "whoami":
        ctx = inv.current_context or spawn.Context()
        me = ctx.self or pb.ActorId()
        caller = f"{ctx.caller.system}/{ctx.caller.name}" if ctx.caller else ""
        return reply(
            inv,
            Seen(
                self_system=me.system,
                self_name=me.name,
                caller=caller,
                metadata=dict(ctx.metadata),
                tags=dict(ctx.tags),
                had_state=ctx.state is not None,
                state_type_url=ctx.state.type_url if ctx.state else "",
            ),
        )
    if a == "slow":
        await asyncio.sleep(arg.n / 1000)
        return reply(inv, Value(n=arg.n))
    if a == "effect":
        return reply(
            inv,
            Value(n=arg.n),
            workflow=spawn.Workflow(effects=[effect("sink", "add", Value(n=arg.n))]),
        )
    if a == "broadcast":
        return reply(
            inv,
            Value(n=arg.n),
            workflow=spawn.Workflow(
                broadcast=spawn.Broadcast(channel_group="tck-news", value=pack(Value(n=arg.n)))
            ),
        )
    if a == "pipe":
        return reply(
            inv,
            Value(n=arg.n * 10),
            workflow=spawn.Workflow(pipe=spawn.Pipe(actor="echo", action_name="echo")),
        )
    if a == "forward":
        return reply(
            inv,
            None,
            workflow=spawn.Workflow(forward=spawn.Forward(actor="echo", action_name="echo")),
        )
    if a == "checkpoint":
        return reply(inv, Value(n=arg.n), Value(n=arg.n), checkpoint=True)
    if a == "call" and NODE is not None:  # a nested call, made as this actor (its caller)
        me = inv.actor or pb.ActorId()
        action = "echo" if arg.text == "echo" else "whoami"
        resp = await NODE.invoke(
            spawn.InvocationRequest(
                system=pb.ActorSystem(name=me.system),
                action_name=action,
                caller=me,
                actor=pb.Actor(id=pb.ActorId(name=arg.text, system=me.system)),
                value=pack(Value(n=arg.n, text="nested")),
            )
        )
        return reply(inv, unpack(resp.value, Value))
    raise TckError(f"counter has no action {a}")


async def sink(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    st: Value = state_of(inv, Value)
    arg: Value = unpack(inv.value, Value)
    text = st.text + ("h" if inv.action_name == "heard" else "a")
    new = Value(n=st.n + arg.n, text=text)
    return reply(inv, Value(n=new.n), new)


async def echo(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    arg: Value = unpack(inv.value, Value)
    return reply(inv, Value(n=arg.n, text="echo:" + arg.text))


async def ticker(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    st: Value = state_of(inv, Value)
    new = Value(n=st.n + 1)
    return reply(inv, Value(n=new.n), new)


async def pool_worker(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    arg: Value = unpack(inv.value, Value)
    return reply(inv, Value(n=arg.n, text=inv.actor.name))


async def cart(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    st: Cart = state_of(inv, Cart)
    if inv.action_name == "add_item":
        item: LineItem = unpack(inv.value, LineItem)
        if st.checked_out:
            raise TckError("cart is checked out")
        for line in st.items:
            if line.sku == item.sku:
                line.qty += item.qty
                break
        else:
            st.items.append(item)
        return reply(inv, Value(n=len(st.items)), st)
    if inv.action_name == "checkout":
        if not st.items:
            raise TckError("cart is empty")
        st.checked_out = True
        total = sum(i.qty * i.price_cents for i in st.items)
        return reply(inv, Receipt(cart=inv.actor.name, lines=len(st.items), total_cents=total), st)
    raise TckError(f"cart has no action {inv.action_name}")


ACTORS: dict[str, Turn] = {
    "counter": counter,
    "sink": sink,
    "echo": echo,
    "ticker": ticker,
    "pool": pool_worker,
    "cart": cart,
}


def actor_system(name: str) -> pb.ActorSystem:
    """The registration of the tck system (see docs/host-protocol.md, "Conformance")."""

    def actor(
        actor_name: str,
        actions: list[str],
        *,
        kind: pb.Kind = pb.Kind.NAMED,
        stateful: bool = True,
        **extra: Any,
    ) -> pb.Actor:
        return pb.Actor(
            id=pb.ActorId(name=actor_name, system=name),
            settings=pb.ActorSettings(
                kind=kind,
                stateful=stateful,
                snapshot_strategy=extra.get("snapshot"),
                deactivation_strategy=extra.get("deactivation"),
                max_pool_size=extra.get("pool", 0),
            ),
            actions=[pb.Action(name=a) for a in actions],
            timer_actions=extra.get("timers", []),
            metadata=pb.Metadata(
                channel_group=extra.get("channels", []), tags=extra.get("tags", {})
            ),
        )

    actors = [
        actor(
            "counter",
            [
                "add",
                "fail",
                "whoami",
                "slow",
                "effect",
                "broadcast",
                "pipe",
                "forward",
                "checkpoint",
                "call",
            ],
            tags={"suite": "tck"},
            snapshot=pb.ActorSnapshotStrategy(timeout=pb.TimeoutStrategy(timeout=60_000)),
            deactivation=pb.ActorDeactivationStrategy(timeout=pb.TimeoutStrategy(timeout=400)),
        ),
        actor(
            "sink",
            ["add", "heard"],
            channels=[pb.Channel(topic="tck-news", action="heard")],
            snapshot=pb.ActorSnapshotStrategy(write_through=pb.WriteThroughStrategy()),
        ),
        actor("echo", ["echo"], stateful=False),
        actor(
            "ticker", [], timers=[pb.FixedTimerAction(seconds=100, action=pb.Action(name="tick"))]
        ),
        actor("pool", ["work"], kind=pb.Kind.POOLED, stateful=False, pool=2),
        actor("cart", ["add_item", "checkout"], kind=pb.Kind.UNNAMED),
    ]
    return pb.ActorSystem(
        name=name, registry=pb.Registry(actors={a.id.name: a for a in actors if a.id is not None})
    )


async def run_turn(inv: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
    aid = inv.actor or pb.ActorId()
    fn = ACTORS.get(aid.parent or aid.name) or ACTORS.get(aid.name.split("#")[0])
    if fn is None:
        raise TckError(f"no actor {aid.name}")
    return await fn(inv)


# ---------------------------------------------------------------------------- the session


def registration(system: str, host_address: str = "") -> spawn.RegistrationRequest:
    return spawn.RegistrationRequest(
        service_info=spawn.ServiceInfo(
            service_name=system,
            service_version="1.0",
            service_runtime=f"python {sys.version}",
            support_library_name="grpclib-example-host",
            support_library_version="1.0",
            protocol_major_version=1,
            protocol_minor_version=0,
        ),
        actor_system=actor_system(system),
        host_address=host_address,
    )


def error_of(exc: BaseException) -> v1.TurnError:
    """A failed turn; a spawnmesh error from a nested call keeps its code (e.g. call_cycle)."""
    code, message = "", str(exc)
    if isinstance(exc, GRPCError):
        code = next((d.reason for d in exc.details or () if isinstance(d, rpc.ErrorInfo)), "")
        message = exc.message or exc.status.name
    return v1.TurnError(
        code=code,
        type=type(exc).__name__,
        message=message,
        traceback="".join(traceback.format_exception(exc)),
    )


async def session(channel: grpclib.client.Channel, system: str, metadata: Any) -> None:
    """One Connect stream: register, then answer turns until the stream ends."""
    async with channel.request(
        "/spawnmesh.v1.NodeService/Connect",
        grpclib.const.Cardinality.STREAM_STREAM,
        v1.HostMessage,
        v1.NodeMessage,
        metadata=metadata,
    ) as stream:
        await stream.send_message(v1.HostMessage(register=registration(system)))
        first = await stream.recv_message()
        if first is None or first.registered is None:
            raise RuntimeError("the node did not confirm the registration")
        print(f"registered {system}", flush=True)
        tasks: dict[int, asyncio.Task[None]] = {}
        send_lock = asyncio.Lock()

        async def answer(turn: v1.Turn) -> None:
            inv = turn.invocation or spawn.ActorInvocation()
            try:
                if turn.timeout_ms:
                    async with asyncio.timeout(turn.timeout_ms / 1000):
                        out = v1.TurnResult(id=turn.id, response=await run_turn(inv))
                else:
                    out = v1.TurnResult(id=turn.id, response=await run_turn(inv))
            except asyncio.CancelledError:
                return  # the node cancelled it and no longer waits
            except Exception as exc:
                out = v1.TurnResult(id=turn.id, error=error_of(exc))
            finally:
                tasks.pop(turn.id, None)
            async with send_lock:
                await stream.send_message(v1.HostMessage(result=out))

        try:
            async for msg in stream:
                if msg.turn is not None:
                    tasks[msg.turn.id] = asyncio.create_task(answer(msg.turn))
                elif msg.cancel is not None and msg.cancel.id in tasks:
                    tasks[msg.cancel.id].cancel()
        finally:
            for t in tasks.values():
                t.cancel()


class HostService(v1.HostServiceBase):
    """The callback transport: the node calls HandleTurn for each turn."""

    async def handle_turn(self, message: spawn.ActorInvocation) -> spawn.ActorInvocationResponse:
        try:
            return await run_turn(message)
        except Exception as exc:  # UNKNOWN + ErrorInfo: the node reports ActorFailed
            info = rpc.ErrorInfo(
                reason="actor_failed",
                domain="spawnmesh",
                metadata={
                    "error_type": type(exc).__name__,
                    "error_message": str(exc),
                    "traceback": "".join(traceback.format_exception(exc)),
                },
            )
            raise GRPCError(grpclib.const.Status.UNKNOWN, str(exc), [info]) from exc


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node", default=os.environ.get("SPAWNMESH_NODE_ADDRESS", "127.0.0.1:9001"))
    p.add_argument("--system", default="tck")
    p.add_argument("--token", default=os.environ.get("SPAWNMESH_HOST_TOKEN", ""))
    p.add_argument("--serve", default="", help="host:port to serve HostService on (callback)")
    args = p.parse_args()
    host, _, port = args.node.rpartition(":")
    metadata = {"authorization": f"Bearer {args.token}"} if args.token else None
    channel = grpclib.client.Channel(host, int(port), status_details_codec=RichStatusCodec())
    global NODE
    NODE = v1.NodeServiceStub(channel, metadata=metadata)
    if args.serve:
        shost, _, sport = args.serve.rpartition(":")
        server = grpclib.server.Server([HostService()], status_details_codec=RichStatusCodec())
        await server.start(shost, int(sport))
        bound = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        stub = v1.NodeServiceStub(channel, metadata=metadata)
        await stub.register(registration(args.system, f"{shost}:{bound}"))
        print(f"registered {args.system} (serving HostService on {shost}:{bound})", flush=True)
        await server.wait_closed()
        return
    while True:  # reconnect and register again whenever the stream breaks
        try:
            await session(channel, args.system, metadata)
        except (OSError, StreamTerminatedError, ConnectionError) as exc:
            print(f"stream lost ({exc}); reconnecting", flush=True)
        except GRPCError as exc:
            print(f"node refused: {exc.status.name}: {exc.message}", flush=True)
            if exc.status in (
                grpclib.const.Status.UNAUTHENTICATED,
                grpclib.const.Status.INVALID_ARGUMENT,
            ):
                raise SystemExit(2) from None
        await asyncio.sleep(0.2)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
