"""One error hierarchy for spawnmesh.

Every error has a stable wire ``code`` (append-only; peers and hosts box errors by code) and a
gRPC status name, so the peer protocol, the host API and the CLI map errors by one table.
``retryable`` tells a caller whether the same invocation may succeed if sent again.
"""

from __future__ import annotations

from typing import Any, ClassVar


class SpawnmeshError(Exception):
    """Base of every error spawnmesh raises on purpose."""

    code: ClassVar[str] = "internal"
    grpc_status: ClassVar[str] = "INTERNAL"
    retryable: ClassVar[bool] = False
    origin: str = ""
    """Node where the error was raised, when it was rebuilt from a peer's Error frame."""

    def to_wire(self) -> dict[str, Any]:
        """Box this error for a peer, a host or the CLI: code, message and details."""
        return {"code": self.code, "message": str(self), **self.details()}

    def details(self) -> dict[str, Any]:
        """Extra fields that travel with the error (override in subclasses)."""
        return {}


class ConfigError(SpawnmeshError):
    """A configuration value is invalid; the message names the setting and what is allowed."""

    code = "config"
    grpc_status = "INVALID_ARGUMENT"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


class DefinitionError(SpawnmeshError):
    """An actor definition or actor system is malformed (caught at registration time)."""

    code = "invalid_definition"
    grpc_status = "INVALID_ARGUMENT"


class InvalidArgument(SpawnmeshError):
    """A request is malformed: bad names, undecodable payload, wrong payload type."""

    code = "invalid_argument"
    grpc_status = "INVALID_ARGUMENT"


class ActorNotFound(SpawnmeshError):
    """No actor (named definition, spawned instance or template) answers to this id."""

    code = "actor_not_found"
    grpc_status = "NOT_FOUND"


class ActionNotFound(SpawnmeshError):
    """The actor exists but has no action of this name."""

    code = "action_not_found"
    grpc_status = "UNIMPLEMENTED"


class InvocationTimeout(SpawnmeshError):
    """The invocation's deadline passed before its reply arrived."""

    code = "timeout"
    grpc_status = "DEADLINE_EXCEEDED"
    retryable = True


class Overloaded(SpawnmeshError):
    """A bounded queue (per actor, per node or per peer) is full; back off and retry."""

    code = "overloaded"
    grpc_status = "RESOURCE_EXHAUSTED"
    retryable = True


class CallCycle(SpawnmeshError):
    """A synchronous call chain would reach an actor that is already waiting in it (deadlock)."""

    code = "call_cycle"
    grpc_status = "FAILED_PRECONDITION"

    def __init__(self, message: str, chain: list[str] | None = None) -> None:
        super().__init__(message)
        self.chain = chain or []

    def details(self) -> dict[str, Any]:
        return {"chain": self.chain}


class ActorFailed(SpawnmeshError):
    """The actor's handler raised; carries the original type, message and traceback text."""

    code = "actor_failed"
    grpc_status = "UNKNOWN"

    def __init__(
        self,
        actor: str,
        error_type: str,
        error_message: str,
        traceback_text: str = "",
        node: str = "",
    ) -> None:
        super().__init__(f"actor {actor} failed: {error_type}: {error_message}")
        self.actor = actor
        self.error_type = error_type
        self.error_message = error_message
        self.traceback_text = traceback_text
        self.node = node

    def details(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "traceback": self.traceback_text,
            "node": self.node,
        }


class StaleActivation(SpawnmeshError):
    """A state write was fenced off: the revision it was based on is no longer current."""

    code = "stale_activation"
    grpc_status = "ABORTED"
    retryable = True


class StatestoreUnavailable(SpawnmeshError):
    """The statestore cannot be reached or failed; nothing acknowledged was lost."""

    code = "statestore_unavailable"
    grpc_status = "UNAVAILABLE"
    retryable = True


class StateCorrupt(SpawnmeshError):
    """A stored state row cannot be decrypted or decoded; only this actor is affected."""

    code = "state_corrupt"
    grpc_status = "DATA_LOSS"


class NodeShuttingDown(SpawnmeshError):
    """The node is draining and accepts no new invocations."""

    code = "shutting_down"
    grpc_status = "UNAVAILABLE"
    retryable = True


class NoOwner(SpawnmeshError):
    """No live member hosts this actor type."""

    code = "no_owner"
    grpc_status = "UNAVAILABLE"
    retryable = True


class NotOwner(SpawnmeshError):
    """This node does not own the actor; ``owner`` names the node it believes does."""

    code = "not_owner"
    grpc_status = "UNAVAILABLE"
    retryable = True

    def __init__(self, message: str, owner: str = "") -> None:
        super().__init__(message)
        self.owner = owner

    def details(self) -> dict[str, Any]:
        return {"owner": self.owner}


class ProtocolError(SpawnmeshError):
    """Bytes from a peer or client violate the protocol (bad frame, bad version, bad auth)."""

    code = "protocol"
    grpc_status = "INVALID_ARGUMENT"


class PacketRejected(ProtocolError):
    """A cluster packet was refused before the membership core saw it; ``reason`` says why
    (wrong cluster, unknown key id, bad tag, unsupported version, not encrypted, malformed)."""

    code = "packet_rejected"

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason

    def details(self) -> dict[str, Any]:
        return {"reason": self.reason}


class FrameTooLarge(ProtocolError):
    """A peer-wire frame exceeds the maximum frame size (sending: this request only; receiving:
    the connection is closed, see spec/wire.md)."""

    code = "frame_too_large"
    grpc_status = "RESOURCE_EXHAUSTED"


class AuthenticationFailed(ProtocolError):
    """A peer could not prove the cluster key (wrong key, unknown key id, or no key on one side)."""

    code = "unauthenticated"
    grpc_status = "UNAUTHENTICATED"


class ClusterMismatch(ProtocolError):
    """A peer belongs to another cluster (its cluster name differs)."""

    code = "wrong_cluster"
    grpc_status = "FAILED_PRECONDITION"


class VersionMismatch(ProtocolError):
    """Two peers share no protocol version."""

    code = "version_mismatch"
    grpc_status = "FAILED_PRECONDITION"


class PeerUnavailable(SpawnmeshError):
    """A peer node cannot be reached, or its connection was lost with the request in flight (the
    request may or may not have run there); retry, possibly on another owner."""

    code = "peer_unavailable"
    grpc_status = "UNAVAILABLE"
    retryable = True


class HostUnavailable(SpawnmeshError):
    """The actor's host (a process attached over the gRPC host API) is not connected, or its
    connection was lost with the turn in flight (the state is reset to the last committed)."""

    code = "host_unavailable"
    grpc_status = "UNAVAILABLE"
    retryable = True


def _all_error_types() -> list[type[SpawnmeshError]]:
    out: list[type[SpawnmeshError]] = []
    stack: list[type[SpawnmeshError]] = [SpawnmeshError]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


ERRORS_BY_CODE: dict[str, type[SpawnmeshError]] = {c.code: c for c in _all_error_types()}


def from_wire(boxed: dict[str, Any]) -> SpawnmeshError:
    """Rebuild an error boxed by :meth:`SpawnmeshError.to_wire` (unknown codes stay generic)."""
    code = str(boxed.get("code", "internal"))
    message = str(boxed.get("message", ""))
    cls = ERRORS_BY_CODE.get(code, SpawnmeshError)
    err: SpawnmeshError
    if cls is ActorFailed:
        err = ActorFailed(
            str(boxed.get("actor", "")),
            str(boxed.get("error_type", "")),
            str(boxed.get("error_message", "")),
            str(boxed.get("traceback", "")),
            str(boxed.get("node", "")),
        )
    elif cls is CallCycle:
        err = CallCycle(message, list(boxed.get("chain", [])))
    elif cls is NotOwner:
        err = NotOwner(message, str(boxed.get("owner", "")))
    elif cls is PacketRejected:
        err = PacketRejected(message, str(boxed.get("reason", "malformed")))
    elif cls is ConfigError:
        err = ConfigError(str(boxed.get("setting", "")), message)
    else:
        err = cls(message)
    return err
