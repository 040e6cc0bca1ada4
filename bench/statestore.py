"""Statestore benchmark: raw SQL upserts against the node's write-behind and write-through paths.

For each dialect (sqlite; postgres and mariadb when their servers are there), in one run:

* ``raw_batched_upserts_per_s``: plain SQLAlchemy Core upserts of 200-byte values, 1,000 rows
  per ``executemany`` transaction, over a working set of existing keys (the ceiling);
* ``write_behind_per_s``: actor state changes persisted per second through a node (encryption
  on): ``--actors`` unnamed write-behind actors with ~200 bytes of state are changed
  continuously, and the rows the store writes per second are counted (its ``writes`` counter);
* ``write_through_per_s``: 64 concurrent callers, each on its own write-through actor, each
  reply only after its state is durable (group commit);
* ``write_behind_ratio`` = write_behind / raw_batched;
* ``raw_cpu_us_per_row``, ``write_behind_node_cpu_us_per_row`` (the node's process, turns
  included), ``write_behind_writer_cpu_us_per_row`` (SqlStateStore's writer process) and
  ``write_behind_cpu_ratio`` = raw CPU a row / the larger of the other two: the ratio with every
  process on a core of its own (or equal shares of a busy machine), which machine load mostly
  cancels out of (the throughput ratio moves 2x between runs on a shared 2-core VM).

The raw side is the ceiling as the issue defines it: no encryption, no fencing, a 3-column
table, nothing else running. The node side does all a node does: turns that change state,
coalescing, AES-GCM sealing, fenced updates of the 11-column state table (a single node:
clustering off, so no gossip port).

Prints figures, then one JSON line (last). Postgres and MariaDB come from
``SPAWNMESH_TEST_POSTGRES_URL`` / ``SPAWNMESH_TEST_MYSQL_URL``; when neither is set the bench
re-runs itself under ``scripts/test-dbs.sh``, which starts throwaway servers.

    python bench/statestore.py [--quick] [--dialects sqlite,postgres,mariadb] [--writer thread]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa
import trio

from spawnmesh import ActorSystem, Context, WriteBehind, WriteThrough, action, open_node
from spawnmesh.config import load_config
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.sql import SqlStateStore

ROOT = Path(__file__).resolve().parent.parent
PG_ENV = "SPAWNMESH_TEST_POSTGRES_URL"
MY_ENV = "SPAWNMESH_TEST_MYSQL_URL"
KEY = base64.b64encode(bytes(range(32))).decode()
VALUE_BYTES = 200
RAW_BATCH = 1000
CALLERS = 64
YIELD_EVERY = 16
"""Invocations a write-behind driver makes between trips through the scheduler."""


@dataclass
class Doc:
    """About 200 bytes of msgpack state: a counter and a 185-character text."""

    value: int = 0
    text: str = "t" * 185


def build_system(every_ms: int = 50) -> ActorSystem:
    bench = ActorSystem("bench")

    @bench.actor("doc", kind="unnamed", state=Doc, snapshot=WriteBehind(every_ms=every_ms))
    class DocActor:
        @action
        async def bump(self, ctx: Context[Doc]) -> None:
            ctx.state = Doc(ctx.state.value + 1, ctx.state.text)

    @bench.actor("durable", kind="unnamed", state=Doc, snapshot=WriteThrough())
    class DurableActor:
        @action
        async def bump(self, ctx: Context[Doc]) -> int:
            ctx.state = Doc(ctx.state.value + 1, ctx.state.text)
            return ctx.state.value

    return bench


# --------------------------------------------------------------------------- databases


@contextmanager
def fresh_database(dialect: str, tmp: Path) -> Iterator[sa.URL]:
    """A new, empty database of ``dialect`` (dropped afterwards)."""
    if dialect == "sqlite":
        path = tmp / f"bench-{uuid.uuid4().hex[:8]}.db"
        yield sa.make_url(f"sqlite+pysqlite:///{path}")
        return
    base = sa.make_url(os.environ[PG_ENV if dialect == "postgres" else MY_ENV])
    name = f"spawnmesh_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield base.set(database=name)
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if dialect == "postgres" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()


def dialects_available(wanted: list[str]) -> list[str]:
    out = []
    for d in wanted:
        if d == "sqlite" or (d == "postgres" and os.environ.get(PG_ENV)) or (
            d == "mariadb" and os.environ.get(MY_ENV)
        ):
            out.append(d)
        else:
            print(f"{d}: skipped (no server URL)")
    return out


# --------------------------------------------------------------------------- raw upserts


def raw_upserts(url: sa.URL, n_keys: int, seconds: float) -> tuple[float, float]:
    """Plain SQLAlchemy Core upserts of 200-byte values, 1,000 per transaction: rows/s, and
    CPU microseconds per row of this process (the database server's CPU not included)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    if url.get_backend_name() == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:  # same pragmas as the store
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    md = sa.MetaData()
    table = sa.Table(
        "bench_raw", md,
        sa.Column("k", sa.String(64), primary_key=True),
        sa.Column("v", sa.LargeBinary, nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    md.create_all(engine)
    backend = url.get_backend_name()
    stmt: Any
    if backend == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        ins = sqlite_insert(table)
        stmt = ins.on_conflict_do_update(index_elements=["k"],
                                         set_={"v": ins.excluded.v, "n": ins.excluded.n})
    elif backend == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        pins = pg_insert(table)
        stmt = pins.on_conflict_do_update(index_elements=["k"],
                                          set_={"v": pins.excluded.v, "n": pins.excluded.n})
    else:
        from sqlalchemy.dialects.mysql import insert as my_insert

        mins = my_insert(table)
        stmt = mins.on_duplicate_key_update(v=mins.inserted.v, n=mins.inserted.n)
    keys = [f"bench/raw-{i}" for i in range(n_keys)]
    value = os.urandom(VALUE_BYTES)
    rows_done = 0
    rnd = 0

    def one_pass() -> int:
        nonlocal rnd
        rnd += 1
        done = 0
        with engine.connect() as conn:
            for i in range(0, n_keys, RAW_BATCH):
                with conn.begin():
                    conn.execute(stmt, [{"k": k, "v": value, "n": rnd}
                                        for k in keys[i : i + RAW_BATCH]])
                done += len(keys[i : i + RAW_BATCH])
        return done

    one_pass()  # create the rows: every measured statement is an update of an existing key
    t0, c0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        rows_done += one_pass()
    rate = rows_done / (time.perf_counter() - t0)
    cpu_us = (time.process_time() - c0) * 1e6 / max(1, rows_done)
    engine.dispose()
    return rate, cpu_us


# --------------------------------------------------------------------------- through the node


def make_store(url: sa.URL, writer: str) -> SqlStateStore:
    """The store the node writes through, encrypted; ``writer`` "process" (the default of
    SqlStateStore: sealing and SQL in its writer process) or "thread" (in the node's process)."""
    return SqlStateStore(url, keyring=Keyring.parse(KEY), pool_size=4,
                         writer_process=writer == "process")


def child_cpu_s(store: SqlStateStore) -> float:
    """CPU seconds used so far by the store's writer process (0 if none runs)."""
    pid = store.writer_pid
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def node_config(write_behind_ms: int) -> Any:
    """A single node (clustering off: no gossip port, nothing but the statestore path)."""
    return load_config(
        overrides={"statestore.url": "memory://", "ops.port": 0, "cluster.enabled": False,
                   "actors.deactivate_after_ms": 3_600_000,
                   "actors.write_behind_ms": write_behind_ms,
                   "actors.write_batch_max": 1000},
        env={},
    )


@dataclass
class WriteBehindRun:
    """What the write-behind measurement saw."""

    rows_per_s: float
    changes: int
    batches: int
    node_cpu_us: float
    """CPU microseconds of the node's process per persisted row, turns included (per state
    change when changes outnumber rows: each row needs one)."""
    writer_cpu_us: float
    """CPU microseconds of the writer process per persisted row (0 without one)."""


async def write_behind(url: sa.URL, n_actors: int, seconds: float, writer: str) -> WriteBehindRun:
    """Persisted state changes per second (rows the store wrote), and invocations made."""
    store = make_store(url, writer)
    async with open_node(node_config(50), build_system(), store=store) as node:
        refs = [node.ref("bench", f"wb-{i}", parent="doc") for i in range(n_actors)]
        # First round: activate and create every row (inserts), then measure updates.
        for r in refs:
            await r.invoke("bump")
        assert await node.runtime.writer.flush_all()
        invokes = 0
        stop = False

        async def driver(part: list[Any]) -> None:
            nonlocal invokes
            while not stop:
                for i in range(0, len(part), YIELD_EVERY):
                    for r in part[i : i + YIELD_EVERY]:
                        await r.invoke("bump")
                    # callers on the network yield between bursts of requests; a loop that
                    # never does only measures how rarely the writer task gets scheduled
                    await trio.lowlevel.checkpoint()
                invokes += len(part)

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(driver, refs[k::4])
            await trio.sleep(0.5)  # reach a steady state
            w0, i0, t0 = store.writes, invokes, time.perf_counter()
            b0, c0, k0 = store.batches, time.process_time(), child_cpu_s(store)
            await trio.sleep(seconds)
            w1, i1, t1 = store.writes, invokes, time.perf_counter()
            b1, c1, k1 = store.batches, time.process_time(), child_cpu_s(store)
            stop = True
        rows = max(1, w1 - w0)
        # the node's CPU per row it could persist: each needs a state change, and when the
        # writer lags, changes outnumber rows (they are coalesced)
        return WriteBehindRun((w1 - w0) / (t1 - t0), i1 - i0, b1 - b0,
                              (c1 - c0) * 1e6 / max(rows, i1 - i0), (k1 - k0) * 1e6 / rows)


async def drain(url: sa.URL, n_actors: int, writer: str) -> float:
    """How fast the node's writer persists a backlog of dirty actors when nothing else runs
    (what shutdown and handoff do): rows per second, best of three rounds."""
    store = make_store(url, writer)
    async with open_node(node_config(3_600_000), build_system(3_600_000), store=store) as node:
        refs = [node.ref("bench", f"dr-{i}", parent="doc") for i in range(n_actors)]
        best = 0.0
        for _ in range(4):  # the first round inserts; the others update
            for r in refs:
                await r.invoke("bump")
            w0, t0 = store.writes, time.perf_counter()
            assert await node.runtime.writer.flush_all()
            rate = (store.writes - w0) / (time.perf_counter() - t0)
            best = max(best, rate) if store.writes > n_actors else best
        return best


async def write_through(url: sa.URL, seconds: float, writer: str) -> tuple[float, int]:
    """Acknowledged durable writes per second from 64 concurrent callers; and batches."""
    store = make_store(url, writer)
    async with open_node(node_config(1000), build_system(), store=store) as node:
        refs = [node.ref("bench", f"wt-{i}", parent="durable") for i in range(CALLERS)]
        for r in refs:
            await r.invoke("bump")
        done = 0
        stop = False

        async def caller(r: Any) -> None:
            nonlocal done
            while not stop:
                await r.invoke("bump")
                done += 1

        async with trio.open_nursery() as nursery:
            for r in refs:
                nursery.start_soon(caller, r)
            await trio.sleep(0.3)
            d0, b0, t0 = done, store.batches, time.perf_counter()
            await trio.sleep(seconds)
            d1, b1, t1 = done, store.batches, time.perf_counter()
            stop = True
        # every acknowledged write is in the store
        for i, r in enumerate(refs):
            got = await store.load(("bench", f"wt-{i}"))
            state = await r.invoke("get_state")
            assert got is not None and msgspec.msgpack.decode(got.blob)["value"] == state.value
        return (d1 - d0) / (t1 - t0), b1 - b0


# --------------------------------------------------------------------------- main


def run_dialect(dialect: str, tmp: Path, args: argparse.Namespace) -> dict[str, float]:
    secs, writer = args.seconds, args.writer
    with fresh_database(dialect, tmp) as url:
        raw, raw_cpu = raw_upserts(url, args.actors, secs)
    print(f"{dialect}: raw batched upserts (Core executemany, {RAW_BATCH}/txn, {VALUE_BYTES} B "
          f"values, 3-column table, no encryption, no fencing): {raw:,.0f} rows/s "
          f"({raw_cpu:.1f} us CPU a row)")
    with fresh_database(dialect, tmp) as url:
        wb = trio.run(write_behind, url, args.actors, secs, writer)
    print(f"{dialect}: write-behind through the node ({args.actors:,} actors, ~200 B state, "
          f"encrypted, fenced, writer {writer}): {wb.rows_per_s:,.0f} state rows persisted/s "
          f"({wb.changes / secs:,.0f} state changes/s made, "
          f"{wb.rows_per_s * secs / max(1, wb.batches):,.0f} rows a batch; CPU a persisted "
          f"row: node {wb.node_cpu_us:.1f} us with the turns, writer process "
          f"{wb.writer_cpu_us:.1f} us)")
    with fresh_database(dialect, tmp) as url:
        dr = trio.run(drain, url, args.actors, writer)
    print(f"{dialect}: write-behind backlog drained by the writer alone: {dr:,.0f} rows/s "
          f"(ratio to raw {dr / raw:.2f})")
    with fresh_database(dialect, tmp) as url:
        wt, wt_batches = trio.run(write_through, url, secs, writer)
    print(f"{dialect}: write-through ({CALLERS} callers, encrypted): {wt:,.0f} durable "
          f"acknowledged writes/s ({wt * secs / max(1, wt_batches):.1f} per group commit)")
    ratio = wb.rows_per_s / raw
    # What the ratio would be with each process on a core of its own (or, on a busy machine,
    # with equal CPU shares): the raw loop's CPU a row over that of the busier process of the
    # node (turns included) and its writer process. Load on the machine mostly cancels out.
    cpu_ratio = raw_cpu / max(wb.node_cpu_us, wb.writer_cpu_us, 1e-9)
    print(f"{dialect}: write_behind_ratio {ratio:.2f} (CPU-cost ratio {cpu_ratio:.2f})")
    return {"raw_batched_upserts_per_s": round(raw), "write_behind_per_s": round(wb.rows_per_s),
            "write_through_per_s": round(wt), "write_behind_ratio": round(ratio, 3),
            "write_behind_drain_per_s": round(dr), "raw_cpu_us_per_row": round(raw_cpu, 2),
            "write_behind_node_cpu_us_per_row": round(wb.node_cpu_us, 2),
            "write_behind_writer_cpu_us_per_row": round(wb.writer_cpu_us, 2),
            "write_behind_cpu_ratio": round(cpu_ratio, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer actors")
    ap.add_argument("--dialects", default="sqlite,postgres,mariadb")
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--actors", type=int, default=0)
    ap.add_argument("--writer", choices=("process", "thread"), default="process",
                    help="where SqlStateStore seals and writes (default: its writer process)")
    ap.add_argument("--no-servers", action="store_true",
                    help="do not start database servers through scripts/test-dbs.sh")
    args = ap.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.actors = args.actors or (5_000 if args.quick else 20_000)
    wanted = [d.strip() for d in args.dialects.split(",") if d.strip()]
    needs_servers = any(d != "sqlite" for d in wanted)
    if (needs_servers and not args.no_servers and not os.environ.get(PG_ENV)
            and not os.environ.get(MY_ENV) and not os.environ.get("SPAWNMESH_BENCH_DBS")):
        os.environ["SPAWNMESH_BENCH_DBS"] = "1"
        script = str(ROOT / "scripts" / "test-dbs.sh")
        os.execvp("bash", ["bash", script, sys.executable, __file__, *sys.argv[1:]])
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus, Python "
          f"{platform.python_version()}, SQLAlchemy {sa.__version__}")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="spawnmesh-bench-") as tmp:
        for d in dialects_available(wanted):
            results[d] = run_dialect(d, Path(tmp), args)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
