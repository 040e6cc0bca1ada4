"""A pooled, stateless worker defined in function style; concurrent calls spread over it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import trio

from spawnmesh import ActorSystem, Context, Kind, open_node

# --8<-- [start:define]
system = ActorSystem("work")

hasher = system.define("hasher", kind=Kind.POOLED, pool_size=3)


@dataclass
class Job:
    """A piece of work for the pool."""

    name: str
    text: str


@dataclass
class Done:
    """A finished job, with the pool instance that ran it."""

    name: str
    digest: str
    instance: str


@hasher.action
async def digest(ctx: Context[None], job: Job) -> Done:
    """Hash ``job.text``; the sleep stands in for I/O, so instances overlap."""
    await trio.sleep(0.1)
    text_hash = hashlib.sha256(job.text.encode()).hexdigest()[:12]
    return Done(job.name, text_hash, ctx.self_id.name)


@hasher.action(name="whoami")
def instance_name(ctx: Context[None]) -> str:
    """A plain function works too; ``name=`` renames the action."""
    return ctx.self_id.name
# --8<-- [end:define]


async def main() -> None:
    """Run nine jobs concurrently on a pool of three and report how they spread."""
    # --8<-- [start:run]
    async with open_node(None, system) as node:
        pool = node.ref("work", "hasher")
        results: list[Done] = []

        async def run(i: int) -> None:
            results.append(await pool.invoke("digest", Job(f"job-{i}", f"text {i}")))

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(9):
                nursery.start_soon(run, i)
        elapsed = trio.current_time() - start
        instances = sorted({r.instance for r in results})
        print("jobs done:", len(results))
        print("instances used:", instances)
        print("ran in parallel:", elapsed < 0.6)  # 9 x 100 ms on 3 instances: about 300 ms
        print("whoami:", await pool.invoke("whoami"))
    # --8<-- [end:run]


if __name__ == "__main__":
    trio.run(main)
