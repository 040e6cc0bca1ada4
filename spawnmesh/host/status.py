"""spawnmesh errors <-> gRPC status codes, by one table (each error's ``grpc_status``).

A failed call carries the status code, a readable message, and in the standard
``grpc-status-details-bin`` trailer a ``google.rpc.Status`` whose details are a
``google.rpc.ErrorInfo`` (reason: the spawnmesh error code, domain ``spawnmesh``, metadata: the
error's details and ``retryable``) and, for a rejected registration, a ``google.rpc.BadRequest``
listing every problem. Any gRPC library decodes it; :func:`error_from_status` rebuilds the
spawnmesh error on our side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from grpclib.const import Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError

from spawnmesh.errors import ERRORS_BY_CODE, SpawnmeshError, from_wire
from spawnmesh.host.gen.google import rpc
from spawnmesh.host.gen.google.protobuf import Any as AnyMsg
from spawnmesh.host.gen.message_pool import default_message_pool

DOMAIN = "spawnmesh"

STATUS_OF: dict[str, Status] = {
    code: Status[cls.grpc_status] for code, cls in sorted(ERRORS_BY_CODE.items())
}
"""spawnmesh error code -> gRPC status: the one table (from errors.py)."""


def status_of(err: SpawnmeshError) -> Status:
    """The gRPC status of a spawnmesh error."""
    return Status[err.grpc_status]


def error_info(err: SpawnmeshError) -> rpc.ErrorInfo:
    """The ErrorInfo detail of ``err``: code, retryable and its details as strings."""
    meta = {"retryable": "true" if err.retryable else "false"}
    for key, value in err.details().items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return rpc.ErrorInfo(reason=err.code, domain=DOMAIN, metadata=meta)


def grpc_error(err: SpawnmeshError, violations: Sequence[tuple[str, str]] = ()) -> GRPCError:
    """The GRPCError to raise in a grpclib handler for ``err`` (with a BadRequest listing
    ``violations`` as (field, description) when given)."""
    details: list[Any] = [error_info(err)]
    if violations:
        details.append(
            rpc.BadRequest(
                field_violations=[
                    rpc.BadRequestFieldViolation(field=f, description=d) for f, d in violations
                ]
            )
        )
    return GRPCError(status_of(err), str(err), details)


class RichStatusCodec(StatusDetailsCodecBase):
    """grpclib's status details codec for ``google.rpc.Status`` with betterproto2 messages."""

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        return bytes(
            rpc.Status(
                code=status.value,
                message=message or "",
                details=[AnyMsg.pack(d, default_message_pool) for d in details or ()],
            )
        )

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        return unpack_details(data)


def unpack_details(data: bytes) -> list[Any]:
    """The detail messages of a ``grpc-status-details-bin`` value (unknown types skipped)."""
    out = []
    for d in rpc.Status.parse(data).details:
        try:
            msg = d.unpack(default_message_pool)
        except TypeError:
            continue
        if msg is not None:
            out.append(msg)
    return out


def error_from_status(status: Status, message: str, details: Sequence[Any] = ()) -> SpawnmeshError:
    """Rebuild the spawnmesh error a gRPC status stands for (by its ErrorInfo when present,
    else the first error class with that status)."""
    for d in details:
        if isinstance(d, rpc.ErrorInfo) and d.domain == DOMAIN:
            boxed: dict[str, Any] = {"code": d.reason, "message": message}
            for key, value in d.metadata.items():
                if key != "retryable":
                    boxed[key] = _maybe_json(value)
            return from_wire(boxed)
    for code, st in STATUS_OF.items():
        if st == status and code not in ("internal",):
            return from_wire({"code": code, "message": message})
    return SpawnmeshError(message)


def _maybe_json(value: str) -> Any:
    if value[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
