"""SQL statestore on SQLite, PostgreSQL and MariaDB/MySQL: conformance, fencing races across
stores, history and restore, encryption at rest, key rotation, outages and recovery.

Postgres and MariaDB tests need ``SPAWNMESH_TEST_POSTGRES_URL`` / ``SPAWNMESH_TEST_MYSQL_URL``
(``bash scripts/test-dbs.sh pytest ...`` starts throwaway servers and sets them); each test gets a
fresh database.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio

from spawnmesh.errors import (
    ConfigError,
    InvalidArgument,
    StaleActivation,
    StateCorrupt,
    StatestoreUnavailable,
)
from spawnmesh.statestore import schema
from spawnmesh.statestore.base import StateWrite
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.factory import open_statestore
from spawnmesh.statestore.memory import MemoryStateStore
from spawnmesh.statestore.sql import SqlStateStore
from spawnmesh.testing.statestore import StateStoreConformance

KEY1 = base64.b64encode(bytes(range(32))).decode()
KEY2 = base64.b64encode(bytes(range(100, 132))).decode()
PG_ENV = "SPAWNMESH_TEST_POSTGRES_URL"
MY_ENV = "SPAWNMESH_TEST_MYSQL_URL"
DIALECTS = ["sqlite", "postgresql", "mysql"]


def _keyring(*entries: str) -> Keyring:
    return Keyring.parse(",".join(entries))


# --------------------------------------------------------------------------- databases


@contextmanager
def fresh_database(dialect: str, tmp_path: Path) -> Iterator[sa.URL]:
    """A URL of a new, empty database of ``dialect`` (dropped afterwards)."""
    if dialect == "sqlite":
        yield sa.make_url(f"sqlite+pysqlite:///{tmp_path / 'state.db'}")
        return
    env = PG_ENV if dialect == "postgresql" else MY_ENV
    base = os.environ.get(env)
    if not base:
        pytest.skip(f"{env} is not set: run under `bash scripts/test-dbs.sh` for {dialect} tests")
    base_url = sa.make_url(base)
    name = f"spawnmesh_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        yield base_url.set(database=name)
    finally:
        with admin.connect() as conn:
            force = " WITH (FORCE)" if dialect == "postgresql" else ""
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}{force}")
        admin.dispose()


@asynccontextmanager
async def sql_store(url: sa.URL | str, **kw: Any) -> AsyncIterator[SqlStateStore]:
    """An opened SqlStateStore (encrypted with KEY1 unless told otherwise), its writer process
    ready (unless ``writer_process=False``), closed afterwards."""
    kw.setdefault("keyring", _keyring(KEY1))
    kw.setdefault("pool_size", 4)
    store = SqlStateStore(url, **kw)
    await store.open()
    if store._proc is not None:  # batches go through the writer process once it is ready
        with trio.fail_after(60):
            while not await store._proc.poll_ready():  # noqa: ASYNC110 (no event for it)
                await trio.sleep(0.02)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.URL]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def _raw(url: sa.URL) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


# --------------------------------------------------------------------------- conformance


class TestSqliteConformance(StateStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqlStateStore]:
        with fresh_database("sqlite", tmp_path) as url:
            async with sql_store(url) as s:
                yield s


class TestPostgresConformance(StateStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqlStateStore]:
        with fresh_database("postgresql", tmp_path) as url:
            async with sql_store(url) as s:
                yield s


class TestMysqlConformance(StateStoreConformance):
    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[SqlStateStore]:
        with fresh_database("mysql", tmp_path) as url:
            async with sql_store(url) as s:
                yield s


class TestInProcessConformance(StateStoreConformance):
    """The same suite with ``writer_process=False`` (sealing and SQL in the node's process:
    the fallback when no writer process can start, and what the fenced statements run as)."""

    @pytest.fixture(params=DIALECTS)
    async def store(
        self, request: pytest.FixtureRequest, tmp_path: Path
    ) -> AsyncIterator[SqlStateStore]:
        with fresh_database(request.param, tmp_path) as url:
            async with sql_store(url, writer_process=False) as s:
                assert s.write_lanes == 1
                yield s


# --------------------------------------------------------------------------- fencing races


async def test_two_nodes_race_one_wins_each_round(db_url: sa.URL) -> None:
    """Two stores (two nodes, own pools and threads) race fenced writes on one row."""
    async with sql_store(db_url) as a, sql_store(db_url) as b:
        assert await a.save_many([StateWrite(("s", "row"), 0, b"0")]) == [1]
        rev = 1
        for rnd in range(15):
            results: dict[str, object] = {}

            async def write(
                store: SqlStateStore, tag: str, base: int, results: dict[str, object] = results
            ) -> None:
                (results[tag],) = await store.save_many(
                    [StateWrite(("s", "row"), base, tag.encode(), owner=tag)]
                )

            async with trio.open_nursery() as n:
                n.start_soon(write, a, f"a{rnd}", rev)
                n.start_soon(write, b, f"b{rnd}", rev)
            wins = [t for t, r in results.items() if r == rev + 1]
            stale = [t for t, r in results.items() if isinstance(r, StaleActivation)]
            assert len(wins) == 1 and len(stale) == 1, results
            rev += 1
            got = await b.load(("s", "row"))
            assert got is not None and got.revision == rev and got.blob == wins[0].encode()


async def test_racing_counters_across_nodes_lose_nothing(db_url: sa.URL) -> None:
    """Read-modify-write loops on two nodes: every acknowledged increment survives."""
    async with sql_store(db_url) as a, sql_store(db_url) as b:
        await a.save_many([StateWrite(("s", "ctr"), 0, b"0")])
        acked = 0

        async def incrementer(store: SqlStateStore) -> None:
            nonlocal acked
            done = 0
            while done < 8:
                cur = await store.load(("s", "ctr"))
                assert cur is not None
                (res,) = await store.save_many(
                    [StateWrite(("s", "ctr"), cur.revision, str(int(cur.blob) + 1).encode())]
                )
                if isinstance(res, int):
                    done += 1
                    acked += 1

        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(incrementer, a if i % 2 else b)
        got = await a.load(("s", "ctr"))
        assert got is not None and int(got.blob) == acked == 48 and got.revision == 49


async def test_racing_batches_of_new_actors(db_url: sa.URL) -> None:
    """Two nodes create overlapping sets of new actors in batches: one winner per key, the
    losers are reported stale and the rest of each batch still commits."""
    async with sql_store(db_url) as a, sql_store(db_url) as b:
        results: dict[str, list[Any]] = {}

        async def create(store: SqlStateStore, tag: str, names: list[str]) -> None:
            ws = [StateWrite(("s", n), 0, f"{tag}:{n}".encode()) for n in names]
            results[tag] = list(zip(names, await store.save_many(ws), strict=True))

        for rnd in range(5):
            left = [f"r{rnd}-{i}" for i in range(0, 60)]
            right = [f"r{rnd}-{i}" for i in range(30, 90)]
            async with trio.open_nursery() as n:
                n.start_soon(create, a, "a", left)
                n.start_soon(create, b, "b", right)
            winners: dict[str, str] = {}
            for tag, pairs in results.items():
                for name, res in pairs:
                    if res == 1:
                        assert name not in winners, f"{name} created twice"
                        winners[name] = tag
                    else:
                        assert isinstance(res, StaleActivation)
            assert len(winners) == 90
            loaded = await a.load_many([("s", n) for n in winners])
            for name, tag in winners.items():
                st = loaded[("s", name)]
                assert not isinstance(st, StateCorrupt)
                assert st.blob == f"{tag}:{name}".encode()


async def test_slow_path_fences_items_the_fast_path_misjudged(
    db_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the pre-read is wrong (a racing insert or update slipped in), the statements' own
    fencing still holds, and the batch is redone item by item so only those items are stale.
    (In process: the monkeypatch must reach the code that writes.)"""
    async with sql_store(db_url, writer_process=False) as s:
        await s.save_many([StateWrite(("s", "exists"), 0, b"1"), StateWrite(("s", "upd"), 0, b"1")])
        await s.save_many([StateWrite(("s", "upd"), 1, b"2")])
        real = s._current

        def lying_current(conn: Any, keys: Any, lock: bool) -> dict[tuple[str, str], int]:
            out = real(conn, keys, lock)
            out.pop(("s", "exists"), None)  # "absent": the insert hits the primary key
            if ("s", "upd") in out:
                out[("s", "upd")] = 1  # "still at 1": the fenced UPDATE matches no row
            return out

        monkeypatch.setattr(s, "_current", lying_current)
        res = await s.save_many([
            StateWrite(("s", "exists"), 0, b"dup"),
            StateWrite(("s", "upd"), 1, b"stale"),
            StateWrite(("s", "new"), 0, b"n"),
        ])
        assert isinstance(res[0], StaleActivation) and isinstance(res[1], StaleActivation)
        assert res[2] == 1 and s.fallbacks == 1
        monkeypatch.undo()
        for name, rev, blob in [("exists", 1, b"1"), ("upd", 2, b"2"), ("new", 1, b"n")]:
            got = await s.load(("s", name))
            assert got is not None and (got.revision, got.blob) == (rev, blob)


# --------------------------------------------------------------------------- history


async def test_history_bounded_and_restore(db_url: sa.URL) -> None:
    async with sql_store(db_url, history_keep=3) as s:
        key = ("s", "h")
        rev = 0
        for i in range(1, 8):
            (rev,) = await s.save_many(  # type: ignore[misc]
                [StateWrite(key, rev, f"v{i}".encode(), state_type=f"T{i}", tags={"i": str(i)})]
            )
        await s.save_many([StateWrite(("s", "other"), 0, b"o")])
        hist = await s.history(key)
        assert [(h.revision, h.blob) for h in hist] == [(5, b"v5"), (6, b"v6"), (7, b"v7")]
        new_rev = await s.restore(key, 5)
        assert new_rev == 8
        cur = await s.load(key)
        assert cur is not None
        assert (cur.revision, cur.blob, cur.state_type, dict(cur.tags)) == (
            8, b"v5", "T5", {"i": "5"})
        assert [h.revision for h in await s.history(key)] == [6, 7, 8]
        # The activation that still holds revision 7 is fenced off by the restore.
        (res,) = await s.save_many([StateWrite(key, 7, b"late")])
        assert isinstance(res, StaleActivation)
        with pytest.raises(InvalidArgument, match="not in history"):
            await s.restore(key, 2)
        assert [h.revision for h in await s.history(("s", "other"))] == [1]
        # Delete takes the history with it; revisions restart at 1.
        assert await s.delete(key, base_revision=8)
        assert await s.history(key) == []
        assert await s.save_many([StateWrite(key, 0, b"again")]) == [1]


async def test_history_bounded_by_age(tmp_path: Path) -> None:
    clock = [1_000_000]
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_store(url, history_max_age_s=10, clock=lambda: clock[0]) as s:
            key = ("s", "aged")
            rev = 0
            for _ in range(5):
                (rev,) = await s.save_many([StateWrite(key, rev, str(rev).encode())])  # type: ignore[misc]
                clock[0] += 4_000
            assert [h.revision for h in await s.history(key)] == [3, 4, 5]
            clock[0] += 60_000
            await s.save_many([StateWrite(key, rev, b"late")])
            assert [h.revision for h in await s.history(key)] == [6]


async def test_history_off_by_default(db_url: sa.URL) -> None:
    async with sql_store(db_url) as s:
        await s.save_many([StateWrite(("s", "x"), 0, b"1")])
        assert await s.history(("s", "x")) == []
        with pytest.raises(InvalidArgument):
            await s.restore(("s", "x"), 1)


# --------------------------------------------------------------------------- encryption


async def test_no_plaintext_in_sqlite_files(tmp_path: Path) -> None:
    marker = b"PLAINTEXT-MARKER-7f3a9c"
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_store(url, history_keep=5) as s:
            for rev in range(3):
                res = await s.save_many(
                    [StateWrite(("s", f"m{j}"), rev, marker * 10 + bytes([rev])) for j in range(20)]
                )
                assert res == [rev + 1] * 20
            got = await s.load(("s", "m7"))
            assert got is not None and got.blob.startswith(marker)
            files = _db_files(tmp_path)
            assert any(name.endswith("-wal") for name in files)  # the WAL is checked too
            assert [name for name, data in files.items() if marker in data] == []
        assert [name for name, data in _db_files(tmp_path).items() if marker in data] == []
    # The same check does see the marker when state is stored in plaintext.
    plain_dir = tmp_path / "plain"
    with fresh_database("sqlite", plain_dir) as url:
        async with sql_store(url, keyring=None, allow_plaintext=True) as s:
            await s.save_many([StateWrite(("s", "p"), 0, marker)])
            assert any(marker in data for data in _db_files(plain_dir).values())


def _db_files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in directory.glob("state.db*")}


async def test_row_copied_onto_other_actor_is_corrupt_for_that_actor_only(
    db_url: sa.URL,
) -> None:
    async with sql_store(db_url) as s:
        await s.save_many([StateWrite(("s", "a"), 0, b"secret-a"),
                           StateWrite(("s", "b"), 0, b"secret-b"),
                           StateWrite(("s", "c"), 0, b"secret-c")])
        await s.save_many([StateWrite(("s", "c"), 1, b"secret-c2")])
        t = schema.state
        eng = _raw(db_url)
        with eng.begin() as conn:
            a = conn.execute(sa.select(t.c.data, t.c.key_id).where(t.c.name == "a")).one()
            conn.execute(t.update().where(t.c.name == "b").values(data=a.data, key_id=a.key_id))
            # c's revision-2 ciphertext presented as revision 1 (rollback attempt)
            conn.execute(t.update().where(t.c.name == "c").values(revision=1))
        eng.dispose()
        with pytest.raises(StateCorrupt, match="s/b"):
            await s.load(("s", "b"))
        with pytest.raises(StateCorrupt, match="s/c"):
            await s.load(("s", "c"))
        got = await s.load(("s", "a"))
        assert got is not None and got.blob == b"secret-a"
        many = await s.load_many([("s", "a"), ("s", "b"), ("s", "c")])
        assert isinstance(many[("s", "b")], StateCorrupt)
        assert isinstance(many[("s", "c")], StateCorrupt)
        assert not isinstance(many[("s", "a")], StateCorrupt)
        assert await s.healthy()


async def test_wrong_key_is_corrupt(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_store(url, keyring=_keyring(f"k1:{KEY1}")) as s:
            await s.save_many([StateWrite(("s", "w"), 0, b"data")])
        # same key id, different key bytes: authentication fails
        async with sql_store(url, keyring=_keyring(f"k1:{KEY2}")) as s:
            with pytest.raises(StateCorrupt, match="authentication failed"):
                await s.load(("s", "w"))
        # unknown key id
        async with sql_store(url, keyring=_keyring(f"k2:{KEY2}")) as s:
            with pytest.raises(StateCorrupt, match="k1"):
                await s.load(("s", "w"))
        # an encrypted store does not accept plaintext rows
        eng = _raw(url)
        with eng.begin() as conn:
            t = schema.state
            conn.execute(t.update().values(key_id="plain", data=b"forged"))
        eng.dispose()
        async with sql_store(url, keyring=_keyring(f"k1:{KEY1}")) as s:
            with pytest.raises(StateCorrupt, match="unencrypted"):
                await s.load(("s", "w"))


async def test_key_rotation_reencrypts_every_row(db_url: sa.URL) -> None:
    old, new = f"old:{KEY1}", f"new:{KEY2}"
    keys = [("s", f"r{i}") for i in range(450)]
    async with sql_store(db_url, keyring=_keyring(old), history_keep=2) as s:
        await s.save_many([StateWrite(k, 0, f"{k[1]}-1".encode()) for k in keys])
        await s.save_many([StateWrite(k, 1, f"{k[1]}-2".encode()) for k in keys[:100]])
    async with sql_store(db_url, keyring=_keyring(old, new), history_keep=2) as s:
        await s.save_many([StateWrite(keys[0], 2, b"r0-3")])  # sealed under the new key
        n = await s.rotate_keys(batch=128)
        # 449 state rows + 450 + 100 history rows were under the old key (r0's state is new,
        # its history rows for revisions 2 (old) and 3 (new) remain, revision 1 was pruned)
        assert n == 449 + 449 + 100
        assert await s.rotate_keys() == 0
        infos = await s.list_actors("s", limit=1000)
        assert len(infos) == 450 and {i.key_id for i in infos} == {"new"}
    async with sql_store(db_url, keyring=_keyring(new), history_keep=2) as s:
        loaded = await s.load_many(keys)
        for k in keys:
            st = loaded[k]
            assert not isinstance(st, StateCorrupt)
        assert loaded[keys[0]].blob == b"r0-3"  # type: ignore[union-attr]
        assert loaded[keys[5]].blob == b"r5-2"  # type: ignore[union-attr]
        assert loaded[keys[300]].blob == b"r300-1"  # type: ignore[union-attr]
        assert [h.blob for h in await s.history(keys[5])] == [b"r5-1", b"r5-2"]


async def test_plaintext_rows_sealed_by_rotation(tmp_path: Path) -> None:
    with fresh_database("sqlite", tmp_path) as url:
        async with sql_store(url, keyring=None, allow_plaintext=True) as s:
            await s.save_many([StateWrite(("s", "p"), 0, b"plain")])
            assert (await s.list_actors())[0].key_id == "plain"
            with pytest.raises(InvalidArgument):
                await s.rotate_keys()
        async with sql_store(url, allow_plaintext=True) as s:
            assert await s.rotate_keys() == 1
        async with sql_store(url) as s:
            got = await s.load(("s", "p"))
            assert got is not None and got.blob == b"plain"


# --------------------------------------------------------------------------- identifiers


async def test_names_are_exact_bytes_and_lengths_checked(db_url: sa.URL) -> None:
    async with sql_store(db_url) as s:
        names = ["Foo", "foo", "foo ", "fóo", "fo\u006f\u0301"]
        assert await s.save_many([StateWrite(("s", n), 0, n.encode()) for n in names]) == [1] * 5
        for n in names:
            got = await s.load(("s", n))
            assert got is not None and got.blob == n.encode()
        longest = "名" * (schema.MAX_NAME_BYTES // 3)
        assert await s.save_many([StateWrite(("s", longest), 0, b"x", parent=longest)]) == [1]
        assert [i.key for i in await s.list_actors("s", after=("s", "foo "))][-1] == ("s", longest)
        with pytest.raises(InvalidArgument, match="UTF-8 bytes"):
            await s.save_many([StateWrite(("s", longest + "xyz"), 0, b"x")])
        with pytest.raises(InvalidArgument, match="UTF-8 bytes"):
            await s.load(("s" * 300, "x"))
        with pytest.raises(InvalidArgument, match="more than one"):
            await s.save_many([StateWrite(("s", "d"), 0, b"1"), StateWrite(("s", "d"), 1, b"2")])


async def test_metadata_and_owner(db_url: sa.URL) -> None:
    async with sql_store(db_url, node_id="node-1") as s:
        await s.save_many([StateWrite(("s", "o"), 0, b"1", state_type="T", parent="tmpl")])
        await s.save_many([StateWrite(("s", "o"), 1, b"2", owner="node-2/e7")])
        (info,) = await s.list_actors()
        assert (info.revision, info.owner, info.state_type) == (2, "node-2/e7", "")
        assert info.created_ms <= info.updated_ms and info.created_ms > 1_600_000_000_000


async def test_migrations_are_idempotent_and_recorded(db_url: sa.URL) -> None:
    async with sql_store(db_url) as a, sql_store(db_url) as b:
        await a.save_many([StateWrite(("s", "m"), 0, b"1")])
        got = await b.load(("s", "m"))
        assert got is not None
    eng = _raw(db_url)
    with eng.connect() as conn:
        assert schema.current_version(conn) == schema.LATEST_VERSION
        rows = conn.execute(sa.select(schema.schema_version.c.version)).scalars().all()
        assert rows == [m.version for m in schema.MIGRATIONS]
        conn.execute(schema.schema_version.insert().values(
            version=99, description="from the future", applied_ms=0))
        conn.commit()
    eng.dispose()
    s = SqlStateStore(db_url, keyring=_keyring(KEY1))
    with pytest.raises(StatestoreUnavailable, match="newer"):
        await s.open()
    await s.aclose()


# --------------------------------------------------------------------------- outages


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    "url",
    ["postgresql+psycopg://u@127.0.0.1:{port}/db", "mysql+pymysql://u:p@127.0.0.1:{port}/db"],
)
async def test_closed_port_is_unavailable_not_a_crash(url: str) -> None:
    s = SqlStateStore(url.format(port=_closed_port()), keyring=_keyring(KEY1))
    with pytest.raises(StatestoreUnavailable) as err:
        await s.open()
    assert "127.0.0.1" in str(err.value) and ":p@" not in str(err.value)
    assert await s.healthy() is False
    with pytest.raises(StatestoreUnavailable):
        await s.load(("s", "x"))
    with pytest.raises(StatestoreUnavailable):
        await s.save_many([StateWrite(("s", "x"), 0, b"1")])
    await s.aclose()


class _Proxy:
    """A TCP proxy in front of a database that can be cut and restored (an outage)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.target = host, port
        self.port = 0
        self._scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._serve)

    def cut(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    async def _serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream(self.host, self.target)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as n:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    async for chunk in src:
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                n.cancel_scope.cancel()

            n.start_soon(pump, client, upstream)
            n.start_soon(pump, upstream, client)


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
async def test_outage_then_recovery(dialect: str, tmp_path: Path) -> None:
    with fresh_database(dialect, tmp_path) as url:
        proxy = _Proxy(url.host or "127.0.0.1", int(url.port or 0))
        async with trio.open_nursery() as nursery:
            await proxy.start(nursery)
            via = url.set(host="127.0.0.1", port=proxy.port)
            async with sql_store(via, connect_timeout_s=2) as s:
                assert await s.save_many([StateWrite(("s", "x"), 0, b"acked")]) == [1]
                proxy.cut()
                await trio.sleep(0.05)
                assert await s.healthy() is False
                with pytest.raises(StatestoreUnavailable) as err:
                    await s.save_many([StateWrite(("s", "x"), 1, b"during-outage")])
                assert "statestore" in str(err.value)
                with pytest.raises(StatestoreUnavailable):
                    await s.load(("s", "x"))
                await proxy.start(nursery)  # the database comes back on the same address
                assert await s.healthy() is True
                got = await s.load(("s", "x"))
                assert got is not None and (got.revision, got.blob) == (1, b"acked")
                assert await s.save_many([StateWrite(("s", "x"), 1, b"after")]) == [2]
                proxy.cut()


# --------------------------------------------------------------------------- factory


async def test_factory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert isinstance(open_statestore("memory://"), MemoryStateStore)
    with pytest.raises(ConfigError, match=r"statestore\.key: .*SPAWNMESH_STATESTORE_KEY"):
        open_statestore(f"sqlite:///{tmp_path}/a.db")
    with pytest.raises(ConfigError, match=r"statestore\.url"):
        open_statestore("postgresql+asyncpg://u@h/db", key=KEY1)
    with pytest.raises(ConfigError, match=r"statestore\.url"):
        open_statestore("oracle://u@h/db", key=KEY1)
    with pytest.raises(ConfigError, match=r"statestore\.url"):
        open_statestore("sqlite://", key=KEY1)
    with pytest.raises(ConfigError, match=r"statestore\.key"):
        open_statestore(f"sqlite:///{tmp_path}/a.db", key="not-a-key")
    for url in ("postgresql://u@h/db", "postgres://u@h/db", "mysql://u@h/db",
                "mariadb+pymysql://u@h/db"):
        st = open_statestore(url, key=KEY1)
        assert isinstance(st, SqlStateStore)
    with caplog.at_level(logging.WARNING, logger="spawnmesh.statestore"):
        st = open_statestore(f"sqlite:///{tmp_path}/sub/plain.db", allow_plaintext=True)
    assert "PLAINTEXT" in caplog.text
    await st.open()
    try:
        assert await st.save_many([StateWrite(("s", "p"), 0, b"x")]) == [1]
    finally:
        await st.aclose()
    key_file = tmp_path / "keys"
    key_file.write_text(f"# statestore keys\nold:{KEY1}\nnew:{KEY2}\n")
    st = open_statestore(f"sqlite:///{tmp_path}/k.db", key_file=str(key_file), history_keep=2)
    assert isinstance(st, SqlStateStore)
    await st.open()
    try:
        await st.save_many([StateWrite(("s", "k"), 0, b"x")])
        assert (await st.list_actors())[0].key_id == "new"
    finally:
        await st.aclose()


async def test_clean_batches_stay_on_the_fast_path(db_url: sa.URL) -> None:
    """Batches without stale items are applied by the optimistic statements alone (a broken fast
    path would otherwise hide behind the correct, slower per-item path)."""
    async with sql_store(db_url, history_keep=2) as s:
        keys = [("s", f"f{i}") for i in range(1200)]
        for base in range(3):
            res = await s.save_many(
                [StateWrite(k, base, os.urandom(50), parent="p", tags={"a": "b"}) for k in keys]
            )
            assert res == [base + 1] * len(keys)
        assert (s.rechecks, s.fallbacks, s.batches) == (0, 0, 3)
        got = await s.load(keys[-1])
        assert got is not None and got.parent == "p" and dict(got.tags) == {"a": "b"}
        res = await s.save_many([StateWrite(keys[0], 3, b"ok"), StateWrite(keys[1], 1, b"stale")])
        assert res[0] == 4 and isinstance(res[1], StaleActivation)
        assert (s.rechecks, s.fallbacks) == (1, 0)
