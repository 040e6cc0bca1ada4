"""A client written with Google's grpcio: invokes a host's shopping cart through a spawnmesh node.

    python examples/hosts/grpcio_client.py --node 127.0.0.1:9001 [--cart NAME]

It spawns a cart from the "cart" template of the tck system, adds two items, checks out, and
shows how errors arrive (status code, message, and the google.rpc details in the
grpc-status-details-bin trailer). Prints one JSON object per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpcio_stubs

pb = grpcio_stubs.load()
A, P, T = pb.actor, pb.protocol, pb.tck


def pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def request(system: str, name: str, action: str, value: Any = None, parent: str = "") -> Any:
    req = P.InvocationRequest(action_name=action)
    req.system.name = system
    req.actor.id.name, req.actor.id.system, req.actor.id.parent = name, system, parent
    if value is None:
        req.noop.SetInParent()
    else:
        req.value.CopyFrom(pack(value))
    return req


def error_of(exc: grpc.RpcError) -> dict[str, Any]:
    """Status code, message and decoded google.rpc details of a failed call."""
    out: dict[str, Any] = {"code": exc.code().name, "message": exc.details()}
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = pb.status.Status.FromString(value)
            for d in status.details:
                if d.Is(pb.details.ErrorInfo.DESCRIPTOR):
                    info = pb.details.ErrorInfo()
                    d.Unpack(info)
                    out["reason"], out["metadata"] = info.reason, dict(info.metadata)
                elif d.Is(pb.details.BadRequest.DESCRIPTOR):
                    bad = pb.details.BadRequest()
                    d.Unpack(bad)
                    out["violations"] = [[v.field, v.description] for v in bad.field_violations]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--node", default=os.environ.get("SPAWNMESH_NODE_ADDRESS", "127.0.0.1:9001"))
    p.add_argument("--system", default="tck")
    p.add_argument("--cart", default="cart-grpcio")
    p.add_argument("--token", default=os.environ.get("SPAWNMESH_HOST_TOKEN", ""))
    args = p.parse_args()
    md = (("authorization", f"Bearer {args.token}"),) if args.token else None
    sys_ = args.system

    def show(step: str, **fields: Any) -> None:
        print(json.dumps({"step": step, **fields}), flush=True)

    with grpc.insecure_channel(args.node) as channel:
        node = pb.host_grpc.NodeServiceStub(channel)
        spawn = P.SpawnRequest()
        spawn.actors.add(name=args.cart, system=sys_, parent="cart")
        show("spawn", status=P.Status.Name(node.Spawn(spawn, metadata=md).status.status))
        for sku, qty, price in (("apple", 2, 50), ("pear", 1, 80)):
            resp = node.Invoke(
                request(
                    sys_, args.cart, "add_item", T.LineItem(sku=sku, qty=qty, price_cents=price)
                ),
                metadata=md,
                timeout=10,
            )
            lines = T.Value()
            resp.value.Unpack(lines)
            show("add_item", sku=sku, lines=lines.n)
        resp = node.Invoke(request(sys_, args.cart, "checkout"), metadata=md, timeout=10)
        receipt = T.Receipt()
        resp.value.Unpack(receipt)
        show(
            "checkout",
            cart=receipt.cart,
            lines=receipt.lines,
            total_cents=receipt.total_cents,
            type_url=resp.value.type_url,
        )
        for step, req, timeout in (
            ("closed_cart", request(sys_, args.cart, "add_item", T.LineItem(sku="plum")), 10),
            ("no_actor", request(sys_, "nobody", "add"), 10),
            ("deadline", request(sys_, "counter", "slow", T.Value(n=5000)), 0.3),
        ):
            try:
                node.Invoke(req, metadata=md, timeout=timeout)
                show(step, code="OK")
            except grpc.RpcError as exc:
                show(step, **error_of(exc))
        bad = P.RegistrationRequest()
        bad.actor_system.name = "broken"
        b = bad.actor_system.registry.actors["b"]
        b.id.name = "b"
        b.timer_actions.add(seconds=0).action.name = "tick"
        b.metadata.channel_group.add(topic="t", action="nowhere")
        try:
            node.Register(bad, metadata=md)
            show("bad_registration", code="OK")
        except grpc.RpcError as exc:
            show("bad_registration", **error_of(exc))
        big = request(sys_, "echo", "echo", T.Value(text="x" * (5 << 20)))
        try:
            node.Invoke(big, metadata=md, timeout=10)
            show("oversized", code="OK")
        except grpc.RpcError as exc:
            show("oversized", **error_of(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
