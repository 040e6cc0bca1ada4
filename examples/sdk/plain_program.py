"""Host actors from a plain (non-trio) program: ``spawnmesh.serve`` runs a node until a signal.

Run it with an in-memory store on a free port, then call it from another shell::

    SPAWNMESH_STATESTORE_URL=memory:// SPAWNMESH_OPS_PORT=0 python examples/sdk/plain_program.py
    spawnmesh invoke --node http://127.0.0.1:<port> plain greeter hello --data '{"name": "Ada"}'

Ctrl-C (SIGINT) or SIGTERM drains the node (turns finish, state is flushed) and exits 0.
"""

# --8<-- [start:program]
from __future__ import annotations

import sys
from dataclasses import dataclass

import spawnmesh
from spawnmesh import ActorSystem, Context, action

system = ActorSystem("plain")


@dataclass
class Greeting:
    """The payload of ``hello``: JSON from the CLI or HTTP is converted to this type."""

    name: str
    punctuation: str = "!"


@dataclass
class Greeted:
    """How many greetings the greeter has sent."""

    count: int = 0


@system.actor("greeter", state=Greeted)
class Greeter:
    """A named actor hosted by a plain program."""

    @action
    def hello(self, ctx: Context[Greeted], greeting: Greeting) -> str:
        """Greet, and count greetings."""
        ctx.state.count += 1
        return f"hello, {greeting.name}{greeting.punctuation} (#{ctx.state.count})"


if __name__ == "__main__":
    # Configuration comes from SPAWNMESH_* variables, SPAWNMESH_CONFIG or the defaults.
    sys.exit(spawnmesh.serve(system))
# --8<-- [end:program]
