"""spawnmesh: virtual actors on a self-organising mesh, one process per machine.

The public SDK: define actors in an :class:`ActorSystem`, embed a node with :func:`open_node`
(or run one with :func:`serve`), talk to actors through :class:`ActorRef`.
"""

from spawnmesh._version import __version__
from spawnmesh.actors.context import Context, Reply
from spawnmesh.actors.definition import Kind, WriteBehind, WriteThrough
from spawnmesh.errors import (
    ActionNotFound,
    ActorFailed,
    ActorNotFound,
    CallCycle,
    InvalidArgument,
    InvocationTimeout,
    NodeShuttingDown,
    Overloaded,
    SpawnmeshError,
    StaleActivation,
    StatestoreUnavailable,
)
from spawnmesh.ids import ActorId
from spawnmesh.node import Node, open_node, serve
from spawnmesh.refs import ActorRef
from spawnmesh.system import ActorSystem, action, timer

__all__ = [
    "ActionNotFound",
    "ActorFailed",
    "ActorId",
    "ActorNotFound",
    "ActorRef",
    "ActorSystem",
    "CallCycle",
    "Context",
    "InvalidArgument",
    "InvocationTimeout",
    "Kind",
    "Node",
    "NodeShuttingDown",
    "Overloaded",
    "Reply",
    "SpawnmeshError",
    "StaleActivation",
    "StatestoreUnavailable",
    "WriteBehind",
    "WriteThrough",
    "__version__",
    "action",
    "open_node",
    "serve",
    "timer",
]
