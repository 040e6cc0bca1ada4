"""SQL statestore (SQLite, PostgreSQL, MySQL/MariaDB): fenced, encrypted at rest, with history.

SQLAlchemy Core on the *sync* engine (its asyncio extension does not run under trio): every
database call runs in a worker thread via ``trio.to_thread.run_sync`` with a capacity limiter the
size of the connection pool, so threads never wait on the pool.

A batch (``save_many``) is one transaction, tried up to three ways. *Optimistic*: the fenced
statements run directly (one multi-row UPDATE ``... WHERE revision = base``, one INSERT for base 0)
and the batch commits only if every item applied. *Checked* (after a stale item): the current
revisions are read first (locked on Postgres/MySQL; SQLite's ``BEGIN IMMEDIATE`` serializes
writers), stale items are reported and the rest applied the same way. *Item by item* (if a racing
insert or a row count still disagrees): each statement alone, inserts under savepoints. The fence
is always in the statement itself, so a stale item never overwrites and never fails the others.

Batches are written by a writer process (``writerproc``: sealing and SQL off the node's GIL) once
it is ready, and in this process until then, or for good if it cannot start
(``writer_process=False`` always writes here).
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import outcome
import sqlalchemy as sa
import trio
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, Engine, Row

from spawnmesh import clock
from spawnmesh.errors import (
    ConfigError,
    InvalidArgument,
    StaleActivation,
    StateCorrupt,
    StatestoreUnavailable,
)
from spawnmesh.statestore import schema
from spawnmesh.statestore.base import (
    NO_TAGS,
    ActorKey,
    Schedule,
    StateWrite,
    StoredState,
    WriteResult,
)
from spawnmesh.statestore.crypto import (
    PLAIN_KEY_ID,
    Keyring,
    schedule_aad,
    state_aad,
    state_aads,
)
from spawnmesh.statestore.writerproc import ERROR, INVALID, OK, UNAVAILABLE, WriterProcess

log = logging.getLogger("spawnmesh.statestore")

T = TypeVar("T")

_state = schema.state
_hist = schema.history
_sched = schema.schedules
_CHUNK = 500
"""Keys per ``IN (...)`` lookup (well under every dialect's bound-parameter limit)."""
_SHORT_SYSTEM = schema.MAX_SYSTEM_BYTES // 4
_SHORT_NAME = schema.MAX_NAME_BYTES // 4
"""Lengths in characters that cannot exceed the byte limits (UTF-8 is at most 4 bytes a char)."""
_SEAL_SLICE = 1000
"""Rows sealed between checkpoints of the trio thread (about 3 ms of work)."""
_GIL_CHECK_S = 0.002
_GIL_GIVE_S = 0.001
"""While a database call runs and the trio loop is busy, the loop gives the GIL away for up
to 1 ms every 2 ms (see ``SqlStateStore._run``)."""
_ATTEMPTS = 4
"""Tries of one transaction that hit a deadlock / serialization failure / busy database."""


_encode_batch = msgspec.msgpack.Encoder().encode
_decode_batch = msgspec.msgpack.Decoder().decode


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (for created/updated columns)."""
    return clock.wall_ms()


@dataclass(frozen=True, slots=True)
class ActorInfo:
    """Metadata of one stored actor (no decryption needed), for operators and listings."""

    key: ActorKey
    revision: int
    state_type: str
    parent: str | None
    owner: str
    key_id: str
    created_ms: int
    updated_ms: int


class _Retry(Exception):
    """Internal: the fast path saw something unexpected; redo the batch item by item."""


def _stale(key: ActorKey, base: int, current: int, what: str = "write") -> StaleActivation:
    return StaleActivation(
        f"{key[0]}/{key[1]}: {what} based on revision {base}, current is {current}"
    )


def _transient(err: exc.DBAPIError) -> bool:
    """Deadlock, serialization failure, lock timeout or busy SQLite: worth retrying the txn."""
    orig = err.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in ("40001", "40P01", "55P03"):
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in (1205, 1213):
        return True
    return "database is locked" in str(orig)


def _describe(err: BaseException) -> str:
    orig = getattr(err, "orig", None) or err
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    if len(text) > 240:
        text = text[:240] + "..."
    return f"{type(orig).__name__}: {text}" if text else type(orig).__name__


_UPDATE_KEYS = ("data", "key_id", "state_type", "parent", "tags", "owner", "updated_ms")

_Row = tuple[str, str, int, int, bytes, str, str, str | None, str | None, str]
"""One state write's statement parameters, sealed: system, name, revision (base + 1), base
revision (the fence), data, key id, state type, parent, tags (JSON or None), owner. A plain
tuple: the hot path builds one per persisted row (a dict cost twice as much)."""
_S: Final = 0
_N: Final = 1
_REV: Final = 2
_BASE: Final = 3
_DATA: Final = 4
_KID: Final = 5
_TYPE: Final = 6
_PARENT: Final = 7
_TAGS: Final = 8
_OWNER: Final = 9


def _upd(p: _Row, now: int) -> dict[str, Any]:
    """Parameters of the ``update`` statement (Core, the item-by-item path) for row ``p``."""
    return {
        "data": p[_DATA], "key_id": p[_KID], "state_type": p[_TYPE], "parent": p[_PARENT],
        "tags": p[_TAGS], "owner": p[_OWNER], "updated_ms": now,
        "k_system": p[_S], "k_name": p[_N], "k_base": p[_BASE],
    }


def _ins(p: _Row, now: int) -> dict[str, Any]:
    """Parameters of the ``insert`` statement (Core, the item-by-item path) for row ``p``."""
    return {
        "system": p[_S], "name": p[_N], "revision": p[_REV], "data": p[_DATA],
        "key_id": p[_KID], "state_type": p[_TYPE], "parent": p[_PARENT], "tags": p[_TAGS],
        "owner": p[_OWNER], "created_ms": now, "updated_ms": now,
    }


def _tags_json(tags: Mapping[str, str]) -> str | None:
    if not tags:
        return None
    return json.dumps(dict(tags), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


KEY_SAMPLE_ROWS = 16
"""Rows of each table ``check_keys`` tries to open (the first ones in primary-key order)."""
_KEY_SETTING = "statestore.key"


def judge_key_sample(
    opened: Mapping[str, int], failed: Mapping[str, int], configured: Sequence[str]
) -> str | None:
    """The verdict on a sample of sealed rows, per key id: how many opened and how many did
    not under the ``configured`` key ids. Raises ConfigError when the keys are wrong for this
    store (a configured id whose key opens none of its rows; no row under a configured id;
    no key at all); returns a warning when only some rows are unreadable, else None."""
    found = sorted(set(opened) | set(failed))
    if not found:
        return None
    held = ", ".join(found)
    conf = ", ".join(configured) or "none"
    fix = "configure the key that sealed them (statestore.key or statestore.key_file)"
    if not configured:
        raise ConfigError(
            _KEY_SETTING,
            f"the store holds rows sealed under key id(s) {held} but no key is configured; {fix}",
        )
    wrong = [k for k in found if k in configured and failed.get(k) and not opened.get(k)]
    if wrong:
        raise ConfigError(
            _KEY_SETTING,
            f"the configured key for id(s) {', '.join(wrong)} opens none of the sampled rows "
            f"sealed under that id (a different key with the same id); the store holds key "
            f"id(s) {held}, configured: {conf}; {fix}",
        )
    if not any(opened.values()):
        raise ConfigError(
            _KEY_SETTING,
            f"no sampled row is sealed under a configured key id: the store holds key id(s) "
            f"{held}, configured: {conf}; {fix}, or both it and a new one (newest last) to "
            "re-seal under the new one with `spawnmesh statestore rotate-key`",
        )
    unreadable = sum(failed.values())
    if not unreadable:
        return None
    return (
        f"{unreadable} of {unreadable + sum(opened.values())} sampled rows open under no "
        f"configured key (the store holds key id(s) {held}, configured: {conf}): a rotation "
        "in progress, a retired key, or corrupt rows; those actors fail with StateCorrupt"
    )


WRITER_PROCESS_AFTER_ROWS = 2_000
"""The node's default ``writer_process_after_rows`` (``statestore.writer_process = auto``):
the writer process pays off under write load and only costs memory otherwise (a light node,
e.g. an edge device, never starts one)."""


class SqlStateStore:
    """The durable :class:`~spawnmesh.statestore.base.StateStore` on SQLAlchemy Core.

    ``keyring`` None stores plaintext (key id ``plain``) and needs ``allow_plaintext``; with a
    keyring, ``allow_plaintext`` also lets it read plain rows (and ``rotate_keys`` seal them).
    History keeps the last ``history_keep`` revisions and/or those younger than
    ``history_max_age_s`` per actor (both 0: no history).
    """

    def __init__(
        self,
        url: str | URL,
        *,
        keyring: Keyring | None,
        allow_plaintext: bool = False,
        pool_size: int = 8,
        node_id: str = "",
        history_keep: int = 0,
        history_max_age_s: float = 0.0,
        connect_timeout_s: float = 5.0,
        clock: Callable[[], int] = now_ms,
        writer_process: bool = True,
        writer_process_after_rows: int = 0,
    ) -> None:
        if keyring is None and not allow_plaintext:
            raise ValueError("SqlStateStore without a keyring needs allow_plaintext=True")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._url = sa.make_url(url) if isinstance(url, str) else url
        self._keyring = keyring
        self._allow_plain = allow_plaintext
        self._pool_size = pool_size
        self._node_id = node_id
        self._history_keep = max(0, history_keep)
        self._history_age_ms = max(0, int(history_max_age_s * 1000))
        self._history = self._history_keep > 0 or self._history_age_ms > 0
        self._connect_timeout_s = connect_timeout_s
        self._clock = clock
        self._limiter = trio.CapacityLimiter(pool_size)
        self._engine: Engine | None = None
        self._migrated = False
        self._stmts: dict[str, Any] = {}
        self._rng = random.Random()
        self._raw: _RawSql | None = None
        self._proc: WriterProcess | None = None
        self._in_writer_process = False
        """Set in the writer process (nothing else runs there: no GIL to share)."""
        self._count_lock = threading.Lock()
        """Counters are bumped from two threads at once in the writer process."""
        self._child_start = 0
        self._child_totals = [0, 0, 0, 0, 0]
        """The writer process's counter totals seen so far (and which child reported them)."""
        self._inproc_lock = trio.Lock()
        """Batches written in this process go one at a time (two SQLite write transactions
        would only wait on each other)."""
        self._proc_after_rows = max(0, writer_process_after_rows)
        """0: the writer process starts with ``open()``; else once this many rows (or one
        batch of 100) were written in this process."""
        self._rows_here = 0
        """Rows written in this process while no writer process ran (what starts one)."""
        self._proc_setup: dict[str, Any] | None = None
        """What a writer process is started with (None: write in this process)."""
        self.writer_command: list[str] | None = None
        """Command line of the writer process (None: ``writerproc.COMMAND``; for tests)."""
        if writer_process:
            self._proc_setup = {
                "url": self._url.render_as_string(hide_password=False),
                "keys": keyring.export() if keyring is not None else None,
                "allow_plaintext": allow_plaintext,
                "node_id": node_id,
                "history_keep": self._history_keep,
                "history_max_age_s": history_max_age_s,
                "connect_timeout_s": connect_timeout_s,
            }
        self.batches = 0
        """Batches committed (for metrics and tests)."""
        self.writes = 0
        """State rows written (new revisions applied, fenced-off items not counted)."""
        self.rechecks = 0
        """Batches whose optimistic attempt found a stale item and were redone after a read."""
        self.fallbacks = 0
        """Batches redone item by item after a racing insert or an unexpected row count."""
        self.retries = 0
        """Transactions retried after a deadlock, serialization failure or busy database."""
        self.schema_versions = (0, 0)
        """Schema version before and after ``open()`` migrated it."""
        self.where = self._url.render_as_string(hide_password=True)
        """The database URL without its password (for messages and logs)."""

    # ------------------------------------------------------------------ plumbing

    @property
    def key_id(self) -> str:
        """Id of the key that seals new writes (``plain`` without a keyring)."""
        return self._keyring.newest_id if self._keyring is not None else PLAIN_KEY_ID

    @property
    def writer_pid(self) -> int | None:
        """Process id of the writer process while one runs (for tests and benchmarks)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def write_lanes(self) -> int:
        """Batches worth writing at once (read by the state writer). With a writer process:
        two on SQLite (the node encodes the next batch while the child writes one), three on a
        database server (the child works on two at once); without: one (two SQLite
        transactions in threads would only wait on each other's lock)."""
        if self._proc_setup is None:
            return 1
        return 2 if self.dialect == "sqlite" else 3

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql``, ``mysql`` or ``mariadb``."""
        return self._url.get_backend_name()

    def _make_engine(self) -> Engine:
        backend = self._url.get_backend_name()
        kw: dict[str, Any] = {
            "pool_size": self._pool_size,
            "max_overflow": 0,
            "pool_pre_ping": True,
            "pool_timeout": 30,
            "pool_recycle": 1800,
        }
        connect_args: dict[str, Any] = {}
        timeout = max(1, int(self._connect_timeout_s))
        if backend == "sqlite":
            db = self._url.database or ""
            if not db or db == ":memory:" or db.startswith("file::memory:"):
                raise InvalidArgument("an in-memory SQLite statestore is not durable; use memory://")
            try:
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # read-only or missing volume, a file in the way...
                raise ConfigError(
                    "statestore.url",
                    f"cannot create the directory {str(Path(db).parent)!r} of the SQLite "
                    f"file: {err.strerror or err}",
                ) from None
            connect_args.update(check_same_thread=False, timeout=timeout)
            kw["poolclass"] = sa.pool.QueuePool
            # A local file: no connection to go stale, so no ping per checkout. Every sqlite3
            # call releases the GIL, and under a busy trio thread each costs a GIL handoff.
            kw["pool_pre_ping"] = False
        elif backend == "postgresql":
            connect_args.update(connect_timeout=timeout)
        elif backend in ("mysql", "mariadb"):
            connect_args.update(connect_timeout=timeout, read_timeout=60, write_timeout=60)
            kw["isolation_level"] = "READ COMMITTED"
        engine = sa.create_engine(self._url, connect_args=connect_args, **kw)
        if backend == "sqlite":
            busy_ms = timeout * 1000

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (savepoints work)
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute(f"PRAGMA busy_timeout={busy_ms}")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                ro = conn.get_execution_options().get("spawnmesh_readonly", False)
                conn.exec_driver_sql("BEGIN" if ro else "BEGIN IMMEDIATE")

        return engine

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (after ``open()``)."""
        if self._engine is None:
            raise StatestoreUnavailable("statestore is not open")
        return self._engine

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(*args)
        except exc.SQLAlchemyError as err:
            raise StatestoreUnavailable(
                f"statestore {self.where} failed: {_describe(err)}"
            ) from err
        except (OSError, TimeoutError) as err:
            raise StatestoreUnavailable(
                f"statestore {self.where} failed: {_describe(err)}"
            ) from err

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``_call``, after the schema migration if ``open()`` could not do it (the database
        was down when the node started: it recovers by itself when the database returns)."""
        if not self._migrated and self._engine is not None:
            await self._migrate()
        return await self._call(fn, *args)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a worker thread (waiting for it even if cancelled, like
        ``trio.to_thread.run_sync``), and see that the worker gets the GIL.

        CPython hands the GIL to a waiting thread only if the holder keeps it for a whole
        switch interval; a busy trio thread drops and retakes it at every ``epoll`` call, far
        more often, so a worker can wait for the GIL for seconds (measured: a 120-row batch took
        2 s under load). While the call runs and the trio loop has runnable tasks, the trio
        thread therefore blocks for up to ``_GIL_GIVE_S`` every ``_GIL_CHECK_S`` (GIL released),
        in which the worker can run; an idle loop sleeps in ``epoll`` and needs none of this."""
        async with self._limiter:
            box: list[outcome.Outcome[T]] = []
            finished = threading.Event()
            done = trio.Event()
            token = trio.lowlevel.current_trio_token()

            def deliver(result: outcome.Outcome[T]) -> None:  # in the worker thread
                box.append(result)
                finished.set()
                token.run_sync_soon(done.set)

            trio.lowlevel.start_thread_soon(lambda: self._guard(fn, *args), deliver)
            with trio.CancelScope(shield=True):
                while True:
                    with trio.move_on_after(_GIL_CHECK_S):
                        await done.wait()
                    if box:
                        break
                    if trio.lowlevel.current_statistics().tasks_runnable:
                        finished.wait(_GIL_GIVE_S)  # blocks the loop briefly: the GIL is free
            # Like to_thread.run_sync: a result is returned even if the caller was cancelled
            # meanwhile (the writer must learn the revisions it wrote).
            return box[0].unwrap()

    def _transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction, retrying deadlocks and busy databases."""
        for attempt in range(_ATTEMPTS):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except exc.DBAPIError as err:
                if attempt + 1 < _ATTEMPTS and not err.connection_invalidated and _transient(err):
                    with self._count_lock:
                        self.retries += 1
                    # back off in this worker thread (a deadlock victim retries at once)
                    threading.Event().wait(0.005 * (2**attempt) * (1 + self._rng.random()))
                    continue
                raise
        raise AssertionError("unreachable")

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.engine.connect() as conn:
            conn.execution_options(spawnmesh_readonly=True)
            return fn(conn)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the engine, start the writer process (if any, and not deferred to the write
        load: ``writer_process_after_rows``; not waited for: its imports overlap the migration
        and the node's start), check the connection and apply pending schema migrations."""
        if self._engine is None:
            self._engine = self._make_engine()
        if self._proc_setup is not None and self._proc is None and not self._proc_after_rows:
            self._proc = WriterProcess(self._proc_setup, self.where, self.writer_command)
            await self._proc.start()
        if self._keyring is None:
            log.warning("statestore %s: state is stored UNENCRYPTED (allow_plaintext)", self.where)
        await self._migrate()

    async def _migrate(self) -> None:
        try:
            before, after = await self._call(self._migrate_sync)
        except RuntimeError as err:
            raise StatestoreUnavailable(f"statestore {self.where}: {err}") from None
        self._migrated = True
        self.schema_versions = (before, after)
        if before != after:
            log.info("statestore %s: schema migrated from version %d to %d",
                     self.where, before, after)

    def _migrate_sync(self) -> tuple[int, int]:
        # Not through _transaction: MySQL DDL commits implicitly; migrate() is idempotent.
        with self.engine.begin() as conn:
            return schema.migrate(conn, self._clock())

    async def aclose(self) -> None:
        """Stop the writer process (after the batch in hand) and dispose of the pool."""
        proc, self._proc = self._proc, None
        if proc is not None:
            await proc.aclose()
        engine, self._engine = self._engine, None
        if engine is not None:
            await trio.to_thread.run_sync(engine.dispose, limiter=self._limiter)

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        """True if the database answers ``SELECT 1`` within ``timeout_s``; never raises."""
        if self._engine is None:
            return False
        with trio.move_on_after(timeout_s):
            try:
                return await trio.to_thread.run_sync(
                    self._guard, self._ping_sync, abandon_on_cancel=True
                )
            except Exception:
                return False
        return False

    def _ping_sync(self) -> bool:
        with self.engine.connect() as conn:
            conn.execution_options(spawnmesh_readonly=True)
            conn.execute(sa.text("SELECT 1"))
        return True

    async def check_keys(self) -> None:
        """Refuse (ConfigError) a keyring that cannot open this store's rows, judged on the
        first ``KEY_SAMPLE_ROWS`` rows of the state and schedules tables: a node with the
        wrong key would otherwise report ready, fail every load and seal new rows under a
        key unrelated to the old ones. Logs a warning when only some sampled rows open."""
        sample = await self._run(self._read, self._sample_sealed)
        opened: dict[str, int] = {}
        failed: dict[str, int] = {}
        for key_id, data, aad in sample:
            counts = opened if self._opens(key_id, data, aad) else failed
            counts[key_id] = counts.get(key_id, 0) + 1
        configured = self._keyring.key_ids if self._keyring is not None else []
        warning = judge_key_sample(opened, failed, configured)
        if warning is not None:
            log.warning("statestore %s: %s", self.where, warning)

    def _sample_sealed(self, conn: Connection) -> list[tuple[str, bytes, bytes]]:
        """(key id, sealed bytes, authenticated data) of the sealed rows among the first
        ``KEY_SAMPLE_ROWS`` of each table, in primary-key order (an index range, never a
        table scan: no filter on the unindexed ``key_id``)."""
        out: list[tuple[str, bytes, bytes]] = []
        states = conn.execute(
            sa.select(_state.c.system, _state.c.name, _state.c.revision, _state.c.key_id,
                      _state.c.data)
            .order_by(_state.c.system, _state.c.name)
            .limit(KEY_SAMPLE_ROWS)
        )
        for r in states:
            if r.key_id != PLAIN_KEY_ID:
                out.append((r.key_id, bytes(r.data), state_aad(r.system, r.name, r.revision)))
        schedules = conn.execute(
            sa.select(_sched.c.id, _sched.c.key_id, _sched.c.payload)
            .order_by(_sched.c.id)
            .limit(KEY_SAMPLE_ROWS)
        )
        for sc in schedules:
            if sc.key_id != PLAIN_KEY_ID:
                out.append((sc.key_id, bytes(sc.payload), schedule_aad(sc.id)))
        return out

    def _opens(self, key_id: str, data: bytes, aad: bytes) -> bool:
        """Whether a key of this store's keyring with ``key_id`` opens ``data``."""
        if self._keyring is None or not self._keyring.has(key_id):
            return False
        try:
            self._keyring.open(key_id, data, aad)
        except StateCorrupt:
            return False
        return True

    # ------------------------------------------------------------------ sealing

    def _seal(self, key: ActorKey, revision: int, blob: bytes) -> tuple[str, bytes]:
        if self._keyring is None:
            return PLAIN_KEY_ID, blob
        sealed = self._keyring.seal(blob, state_aad(key[0], key[1], revision))
        return sealed.key_id, sealed.data

    def _unseal(self, key: ActorKey, revision: int, key_id: str, data: bytes) -> bytes:
        try:
            if key_id == PLAIN_KEY_ID:
                if not self._allow_plain:
                    raise StateCorrupt("row is stored unencrypted but this store requires a key")
                return bytes(data)
            if self._keyring is None:
                raise StateCorrupt(f"row is sealed under key id {key_id!r} but no key is set")
            return self._keyring.open(key_id, bytes(data), state_aad(key[0], key[1], revision))
        except StateCorrupt as err:
            raise StateCorrupt(f"{key[0]}/{key[1]} revision {revision}: {err}") from None

    def _to_stored(self, row: Row[Any]) -> StoredState:
        key = (row.system, row.name)
        blob = self._unseal(key, row.revision, row.key_id, row.data)
        tags: Mapping[str, str] = NO_TAGS
        if row.tags:
            try:
                parsed = json.loads(row.tags)
            except ValueError:
                raise StateCorrupt(f"{key[0]}/{key[1]}: tags are not valid JSON") from None
            if not isinstance(parsed, dict):
                raise StateCorrupt(f"{key[0]}/{key[1]}: tags are not a JSON object")
            tags = {str(k): str(v) for k, v in parsed.items()}
        updated = getattr(row, "updated_ms", None)
        if updated is None:
            updated = row.created_ms
        return StoredState(
            key, int(row.revision), blob, row.state_type or "", row.parent, tags, int(updated)
        )

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _check_key(key: ActorKey) -> None:
        system, name = key
        if not system or not name:
            raise InvalidArgument(f"actor key {key!r}: system and name must not be empty")
        if len(system) <= _SHORT_SYSTEM and len(name) <= _SHORT_NAME:
            return  # short enough in characters: no need to count UTF-8 bytes
        if len(system.encode()) > schema.MAX_SYSTEM_BYTES:
            raise InvalidArgument(
                f"actor system {system[:40]!r}...: longer than {schema.MAX_SYSTEM_BYTES} "
                "UTF-8 bytes"
            )
        if len(name.encode()) > schema.MAX_NAME_BYTES:
            raise InvalidArgument(
                f"actor name {system}/{name[:40]!r}...: longer than {schema.MAX_NAME_BYTES} "
                "UTF-8 bytes"
            )

    def _check_write(self, w: StateWrite) -> None:
        self._check_row(w.key[0], w.key[1], w.base_revision, w.state_type, w.parent,
                        w.owner or self._node_id)

    @staticmethod
    def _check_row(
        system: str, name: str, base: int, state_type: str, parent: str | None, owner: str
    ) -> None:
        if not (system and name and len(system) <= _SHORT_SYSTEM and len(name) <= _SHORT_NAME):
            SqlStateStore._check_key((system, name))
        if base < 0:
            raise InvalidArgument(f"{system}/{name}: negative base revision")
        if (parent is not None and len(parent) > _SHORT_NAME
                and len(parent.encode()) > schema.MAX_NAME_BYTES):
            raise InvalidArgument(f"{system}/{name}: parent name too long")
        if len(state_type) > schema.MAX_STATE_TYPE:
            raise InvalidArgument(
                f"{system}/{name}: state type longer than {schema.MAX_STATE_TYPE}"
            )
        if len(owner) > schema.MAX_OWNER:
            raise InvalidArgument(f"{system}/{name}: owner longer than {schema.MAX_OWNER}")

    # ------------------------------------------------------------------ statements

    def _stmt(self, name: str) -> Any:
        st = self._stmts.get(name)
        if st is not None:
            return st
        b = sa.bindparam
        if name == "update":
            st = (
                _state.update()
                .where(
                    _state.c.system == b("k_system"),
                    _state.c.name == b("k_name"),
                    _state.c.revision == b("k_base"),
                )
                .values(
                    revision=_state.c.revision + 1,
                    data=b("data"),
                    key_id=b("key_id"),
                    state_type=b("state_type"),
                    parent=b("parent"),
                    tags=b("tags"),
                    owner=b("owner"),
                    updated_ms=b("updated_ms"),
                )
            )
        elif name == "insert":
            st = _state.insert()
        elif name == "hist_insert":
            st = _hist.insert()
        elif name == "hist_prune":
            st = _hist.delete().where(
                _hist.c.system == b("k_system"),
                _hist.c.name == b("k_name"),
                _hist.c.revision < b("k_rev"),
                sa.or_(_hist.c.revision <= b("k_cut"), _hist.c.created_ms < b("k_min_ms")),
            )
        else:
            raise KeyError(name)
        self._stmts[name] = st
        return st

    def _current(
        self, conn: Connection, keys: Sequence[ActorKey], lock: bool
    ) -> dict[ActorKey, int]:
        """Current revisions of ``keys`` (absent keys are missing), locking rows if ``lock``."""
        out: dict[ActorKey, int] = {}
        ordered = sorted(set(keys))
        for i in range(0, len(ordered), _CHUNK):
            chunk = ordered[i : i + _CHUNK]
            by_system: dict[str, list[str]] = {}
            for s, n in chunk:
                by_system.setdefault(s, []).append(n)
            conds = [
                sa.and_(_state.c.system == s, _state.c.name.in_(names))
                for s, names in by_system.items()
            ]
            q = (
                sa.select(_state.c.system, _state.c.name, _state.c.revision)
                .where(sa.or_(*conds))
                .order_by(_state.c.system, _state.c.name)
            )
            if lock:
                q = q.with_for_update()
            for s, n, r in conn.execute(q):
                out[(s, n)] = int(r)
        return out

    # ------------------------------------------------------------------ protocol

    async def load(self, key: ActorKey) -> StoredState | None:
        """The current state of ``key`` (decrypted), or None."""
        self._check_key(key)
        row = await self._run(self._read, lambda conn: self._load_row(conn, key))
        return None if row is None else self._to_stored(row)

    def _load_row(self, conn: Connection, key: ActorKey) -> Row[Any] | None:
        q = sa.select(_state).where(_state.c.system == key[0], _state.c.name == key[1])
        return conn.execute(q).first()

    async def load_many(
        self, keys: Sequence[ActorKey]
    ) -> dict[ActorKey, StoredState | StateCorrupt]:
        """Current states of ``keys`` that exist; an undecryptable one maps to its StateCorrupt."""
        for k in keys:
            self._check_key(k)
        rows = await self._run(self._read, lambda conn: self._load_rows(conn, keys))
        out: dict[ActorKey, StoredState | StateCorrupt] = {}
        for row in rows:
            try:
                out[(row.system, row.name)] = self._to_stored(row)
            except StateCorrupt as err:
                out[(row.system, row.name)] = err
        return out

    def _load_rows(self, conn: Connection, keys: Sequence[ActorKey]) -> list[Row[Any]]:
        rows: list[Row[Any]] = []
        ordered = sorted(set(keys))
        for i in range(0, len(ordered), _CHUNK):
            by_system: dict[str, list[str]] = {}
            for s, n in ordered[i : i + _CHUNK]:
                by_system.setdefault(s, []).append(n)
            q = sa.select(_state).where(
                sa.or_(*(sa.and_(_state.c.system == s, _state.c.name.in_(ns))
                         for s, ns in by_system.items()))
            )
            rows.extend(conn.execute(q))
        return rows

    async def save_many(self, writes: list[StateWrite]) -> list[WriteResult]:
        """Apply fenced writes in one transaction; per item the new revision or StaleActivation."""
        if not writes:
            await trio.lowlevel.checkpoint()
            return []
        if self._proc is None and self._proc_setup is not None:
            self._rows_here += len(writes)
            if self._rows_here >= self._proc_after_rows or len(writes) >= 100:
                # Load worth a second process (a light node, e.g. an edge device, never
                # starts one: it costs a second interpreter's memory). Not waited for: its
                # imports take a good part of a second; batches are written here meanwhile.
                self._proc = WriterProcess(self._proc_setup, self.where, self.writer_command)
                await self._proc.start()
        if self._proc is not None and await self._writer_ready(self._proc):
            # Encode and let go of the batch before waiting: rows that outlive a garbage
            # collection of the young generation get promoted, and enough of them trigger
            # full collections over every live actor (measured: 15% of the node's time).
            body = self._encode_rows(writes)
            del writes
            return await self._save_remote(body)
        # In this process: no writer process, or it is still starting (its imports take a
        # good part of a second, more on a busy machine; nothing waits for them).
        async with self._inproc_lock:
            return await self._save_here(writes)

    async def _writer_ready(self, proc: WriterProcess) -> bool:
        """Whether batches go to the writer process now; (re)starts it if none runs, and gives
        up on it once children keep dying on start."""
        if proc.pid is None and not proc.broken:
            await proc.start()
        if proc.broken:
            if self._proc is proc:
                log.error(
                    "statestore %s: the writer process dies on start (see its errors above); "
                    "writing state in the node's process instead", self.where,
                )
                self._proc = None
                self._proc_setup = None  # for good: the write-load start would only retry
                await proc.aclose()
            return False
        return await proc.poll_ready()

    async def _save_here(self, writes: list[StateWrite]) -> list[WriteResult]:
        seen: set[ActorKey] = set()
        for w in writes:
            self._check_write(w)
            if w.key in seen:
                raise InvalidArgument(f"{w.key[0]}/{w.key[1]}: more than one write in a batch")
            seen.add(w.key)
        # Seal in the trio thread, in slices: CPU-bound Python in a worker thread would have
        # to win the GIL from a busy trio thread again and again (measured: 3-5x slower under
        # load); the worker thread only runs the SQL, which releases the GIL while it waits.
        now = self._clock()
        params: list[_Row] = []
        for i in range(0, len(writes), _SEAL_SLICE):
            if i:
                await trio.lowlevel.checkpoint()
            params += self._batch_params(writes[i : i + _SEAL_SLICE])
        return await self._run(self._save_sync, params, now)

    def _encode_rows(self, writes: list[StateWrite]) -> bytes:
        """A writer-process request: ``[now_ms, rows]``, a row being system, name, base
        revision, state, state type, parent, tags (JSON or None), owner."""
        node_id = self._node_id
        return _encode_batch((
            self._clock(),
            [
                (w.key[0], w.key[1], w.base_revision, w.blob, w.state_type, w.parent,
                 _tags_json(w.tags) if w.tags else None, w.owner or node_id)
                for w in writes
            ],
        ))

    async def _save_remote(self, body: bytes) -> list[WriteResult]:
        """``save_many`` through the writer process (see ``writerproc``)."""
        proc = self._proc
        assert proc is not None
        if self._engine is None:
            raise StatestoreUnavailable("statestore is not open")
        if not self._migrated:
            await self._migrate()
        reply = await proc.call(body)
        status = reply[0]
        if status == OK:
            results, totals = reply[1], reply[2]
            if proc.starts != self._child_start:  # a new child counts from zero
                self._child_start, self._child_totals = proc.starts, [0, 0, 0, 0, 0]
            seen = self._child_totals
            # replies may come out of order: count only what is beyond the totals seen
            added = [max(0, t - s) for t, s in zip(totals, seen, strict=True)]
            self._child_totals = [max(t, s) for t, s in zip(totals, seen, strict=True)]
            self.batches += added[0]
            self.writes += added[1]
            self.rechecks += added[2]
            self.fallbacks += added[3]
            self.retries += added[4]
            return [r if r.__class__ is int else StaleActivation(r) for r in results]
        if status == INVALID:
            raise InvalidArgument(reply[1])
        if status == UNAVAILABLE:
            raise StatestoreUnavailable(reply[1])
        assert status == ERROR
        raise StatestoreUnavailable(f"statestore {self.where}: writer process: {reply[1]}")

    def save_rows_sync(self, body: bytes | memoryview) -> list[Any]:
        """The writer process's side of ``save_many``: a request in, a reply out (``OK``, the
        results with StaleActivations as their messages, and the counters' totals). Called
        from two threads at once on a database server."""
        now, rows = _decode_batch(body)
        check = self._check_row
        for r in rows:
            check(r[0], r[1], r[2], r[4], r[5], r[7])
        if len({(r[0], r[1]) for r in rows}) != len(rows):
            seen: set[ActorKey] = set()
            for r in rows:
                if (r[0], r[1]) in seen:
                    raise InvalidArgument(f"{r[0]}/{r[1]}: more than one write in a batch")
                seen.add((r[0], r[1]))
        if self._engine is None:
            with self._count_lock:
                if self._engine is None:
                    self._engine = self._make_engine()
        params = self._seal_rows(rows)
        del rows
        out = self._guard(self._save_sync, params, now)
        with self._count_lock:
            totals = [self.batches, self.writes, self.rechecks, self.fallbacks, self.retries]
        return [OK, [r if r.__class__ is int else str(r) for r in out], totals]

    def dispose_sync(self) -> None:
        """Release the pool (the writer process, on its way out)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    def _row_params(self, w: StateWrite) -> _Row:
        """Statement parameters of ``w``, sealed for revision base + 1."""
        rev = w.base_revision + 1
        key_id, data = self._seal(w.key, rev, w.blob)
        return (w.key[0], w.key[1], rev, w.base_revision, data, key_id, w.state_type, w.parent,
                _tags_json(w.tags), w.owner or self._node_id)

    def _batch_params(self, writes: list[StateWrite]) -> list[_Row]:
        """Statement parameters of a batch (see ``_row_params``), sealed in one go."""
        node_id = self._node_id
        return self._seal_rows([
            (w.key[0], w.key[1], w.base_revision, w.blob, w.state_type, w.parent,
             _tags_json(w.tags) if w.tags else None, w.owner or node_id)
            for w in writes
        ])

    def _seal_rows(self, rows: Sequence[Sequence[Any]]) -> list[_Row]:
        """Statement parameters of request rows (system, name, base, state, state type,
        parent, tags JSON, owner), each state sealed for revision base + 1."""
        if self._keyring is None:
            return [
                (r[0], r[1], r[2] + 1, r[2], r[3], PLAIN_KEY_ID, r[4], r[5], r[6], r[7])
                for r in rows
            ]
        key_id, sealed = self._keyring.seal_many(
            [r[3] for r in rows], state_aads([(r[0], r[1], r[2] + 1) for r in rows])
        )
        return [
            (r[0], r[1], r[2] + 1, r[2], data, key_id, r[4], r[5], r[6], r[7])
            for r, data in zip(rows, sealed, strict=True)
        ]

    def _save_sync(self, params: list[_Row], now: int) -> list[WriteResult]:
        # Sorted by key: every transaction touches rows in the same order (fewer lock cycles).
        order = sorted(range(len(params)), key=lambda i: (params[i][_S], params[i][_N]))
        out: list[WriteResult]
        try:
            out = self._transaction(
                lambda conn: self._save_txn(conn, params, order, now, "optimistic")
            )
        except _Retry:
            with self._count_lock:
                self.rechecks += 1
            try:
                out = self._transaction(
                    lambda conn: self._save_txn(conn, params, order, now, "checked")
                )
            except _Retry:
                with self._count_lock:
                    self.fallbacks += 1
                out = self._transaction(
                    lambda conn: self._save_txn(conn, params, order, now, "slow")
                )
        written = sum(1 for r in out if r.__class__ is int)
        with self._count_lock:
            self.batches += 1
            self.writes += written
        return out

    def _save_txn(
        self,
        conn: Connection,
        params: list[_Row],
        order: list[int],
        now: int,
        mode: str,
    ) -> list[WriteResult]:
        """One attempt at a batch. ``optimistic``: run the fenced statements directly, _Retry
        unless every item applied; ``checked``: read (and lock) current revisions first, _Retry
        if a statement still disagrees; ``slow``: item by item under savepoints."""
        results: list[WriteResult] = [0] * len(params)
        updates: list[int] = []
        inserts: list[int] = []
        if mode == "optimistic":
            for i in order:
                (updates if params[i][_BASE] else inserts).append(i)
        else:
            current = self._current(conn, [(p[_S], p[_N]) for p in params], lock=True)
            for i in order:
                p = params[i]
                cur = current.get((p[_S], p[_N]), 0)
                if cur != p[_BASE]:
                    results[i] = _stale((p[_S], p[_N]), p[_BASE], cur)
                else:
                    (updates if cur else inserts).append(i)
        raw = self._raw_sql(conn)
        done: list[int] = []
        if mode != "slow":
            if updates and raw.update_rows(conn, [params[i] for i in updates], now) != len(
                updates
            ):
                raise _Retry
            if inserts:
                try:
                    raw.insert_rows(conn, [params[i] for i in inserts], now)
                except exc.IntegrityError:
                    raise _Retry from None  # a racing insert: the whole transaction rolls back
            done = updates + inserts
        else:
            for i in updates:
                p = params[i]
                if conn.execute(self._stmt("update"), _upd(p, now)).rowcount == 1:
                    done.append(i)
                else:
                    key = (p[_S], p[_N])
                    now_rev = self._current(conn, [key], lock=False).get(key, 0)
                    results[i] = _stale(key, p[_BASE], now_rev)
            for i in inserts:
                p = params[i]
                try:
                    with conn.begin_nested():
                        conn.execute(self._stmt("insert"), _ins(p, now))
                    done.append(i)
                except exc.IntegrityError:
                    results[i] = StaleActivation(
                        f"{p[_S]}/{p[_N]}: write based on revision 0 "
                        "(new actor), but another activation created it first"
                    )
        for i in done:
            results[i] = params[i][_REV]
        if self._history and done:
            self._write_history(conn, [params[i] for i in sorted(done)], now)
        return results

    def _raw_sql(self, conn: Connection) -> _RawSql:
        raw = self._raw
        if raw is None:
            raw = self._raw = _RawSql(conn.dialect, gil_shared=not self._in_writer_process)
        return raw

    def _write_history(self, conn: Connection, rows: list[_Row], now: int) -> None:
        conn.execute(
            self._stmt("hist_insert"),
            [
                {
                    "system": p[_S], "name": p[_N], "revision": p[_REV], "parent": p[_PARENT],
                    "state_type": p[_TYPE], "data": p[_DATA], "key_id": p[_KID],
                    "tags": p[_TAGS], "owner": p[_OWNER], "created_ms": now,
                }
                for p in rows
            ],
        )
        keep = self._history_keep
        min_ms = now - self._history_age_ms if self._history_age_ms else -1
        prune = []
        for p in rows:
            cut = p[_REV] - keep if keep else 0
            if cut >= 1 or min_ms >= 0:
                prune.append({"k_system": p[_S], "k_name": p[_N],
                              "k_rev": p[_REV], "k_cut": cut, "k_min_ms": min_ms})
        if prune:
            conn.execute(self._stmt("hist_prune"), prune)

    async def delete(self, key: ActorKey, base_revision: int | None = None) -> bool:
        """Delete ``key``'s state and history (fenced on ``base_revision`` unless None)."""
        self._check_key(key)
        return await self._run(self._transaction, lambda conn: self._delete_txn(conn, key,
                                                                                base_revision))

    def _delete_txn(self, conn: Connection, key: ActorKey, base: int | None) -> bool:
        cur = self._current(conn, [key], lock=True).get(key)
        if cur is None:
            return False
        if base is not None and cur != base:
            raise _stale(key, base, cur, "delete")
        where = [_state.c.system == key[0], _state.c.name == key[1]]
        if base is not None:
            where.append(_state.c.revision == base)
        removed = conn.execute(_state.delete().where(*where)).rowcount
        conn.execute(_hist.delete().where(_hist.c.system == key[0], _hist.c.name == key[1]))
        return bool(removed)

    # ------------------------------------------------------------------ extras

    async def history(self, key: ActorKey) -> list[StoredState]:
        """Kept past revisions of ``key`` (including the current one), oldest first."""
        self._check_key(key)

        def q(conn: Connection) -> list[Row[Any]]:
            return list(conn.execute(
                sa.select(_hist)
                .where(_hist.c.system == key[0], _hist.c.name == key[1])
                .order_by(_hist.c.revision)
            ))

        return [self._to_stored(r) for r in await self._run(self._read, q)]

    async def restore(self, key: ActorKey, revision: int) -> int:
        """Point-in-time restore: write ``revision``'s state from history as a new revision.

        Returns the new revision; an activation still holding the old one is fenced off.
        """
        self._check_key(key)
        return await self._run(self._transaction, lambda conn: self._restore_txn(conn, key,
                                                                                 revision))

    def _restore_txn(self, conn: Connection, key: ActorKey, revision: int) -> int:
        cur = self._current(conn, [key], lock=True).get(key)
        if cur is None:
            raise InvalidArgument(f"{key[0]}/{key[1]}: no current state to restore onto")
        old = conn.execute(
            sa.select(_hist).where(
                _hist.c.system == key[0], _hist.c.name == key[1], _hist.c.revision == revision
            )
        ).first()
        if old is None:
            raise InvalidArgument(f"{key[0]}/{key[1]}: revision {revision} is not in history")
        st = self._to_stored(old)
        w = StateWrite(key, cur, st.blob, st.state_type, st.parent, st.tags, old.owner)
        now = self._clock()
        p = self._row_params(w)
        if conn.execute(self._stmt("update"), _upd(p, now)).rowcount != 1:
            raise _stale(key, cur, -1, "restore")
        if self._history:
            self._write_history(conn, [p], now)
        return p[_REV]

    # ------------------------------------------------------------------ schedules

    async def save_schedules(self, schedules: list[Schedule]) -> None:
        """Keep ``schedules`` (sealed like state; each replaces one with the same id), in one
        transaction: all or none. InvalidArgument, before any write, if one is over a limit."""
        if not schedules:
            return
        now = self._clock()
        rows = [self._schedule_row(sc, now) for sc in schedules]
        ids = [r["id"] for r in rows]

        def txn(conn: Connection) -> None:
            for i in range(0, len(ids), _CHUNK):
                conn.execute(_sched.delete().where(_sched.c.id.in_(ids[i : i + _CHUNK])))
            conn.execute(_sched.insert(), rows)

        await self._run(self._transaction, txn)

    def _schedule_row(self, sc: Schedule, now_ms: int) -> dict[str, Any]:
        """The row of one schedule, its payload sealed; InvalidArgument if over a limit."""
        self._check_key((sc.system, sc.actor))
        if not sc.id or len(sc.id) > schema.MAX_SCHEDULE_ID:
            raise InvalidArgument(f"schedule id {sc.id[:80]!r}: 1-{schema.MAX_SCHEDULE_ID} chars")
        if len(sc.action) > schema.MAX_ACTION:
            raise InvalidArgument(f"action {sc.action[:40]!r}...: longer than {schema.MAX_ACTION}")
        if self._keyring is None:
            key_id, data = PLAIN_KEY_ID, sc.payload
        else:
            sealed = self._keyring.seal(sc.payload, schedule_aad(sc.id))
            key_id, data = sealed.key_id, sealed.data
        return {
            "id": sc.id, "system": sc.system, "actor": sc.actor, "parent": sc.parent,
            "action": sc.action, "payload": data, "key_id": key_id,
            "metadata": _tags_json(sc.metadata), "due_ms": sc.due_ms,
            "owner": (sc.owner or self._node_id)[: schema.MAX_OWNER],
            "created_ms": now_ms,
        }

    async def list_schedules(
        self,
        limit: int = 10_000,
        *,
        owner: str | None = None,
        due_before_ms: int | None = None,
        after: tuple[int, str] | None = None,
    ) -> list[Schedule]:
        """Kept schedules, soonest first (of ``owner``, due before ``due_before_ms``, past
        ``after``, when given); one that cannot be opened is logged and skipped."""
        query = sa.select(_sched)
        if owner is not None:
            query = query.where(_sched.c.owner == owner[: schema.MAX_OWNER])
        if due_before_ms is not None:
            query = query.where(_sched.c.due_ms < due_before_ms)
        if after is not None:
            due, sid = after
            query = query.where(
                (_sched.c.due_ms > due) | ((_sched.c.due_ms == due) & (_sched.c.id > sid))
            )
        query = query.order_by(_sched.c.due_ms, _sched.c.id).limit(limit)

        def q(conn: Connection) -> list[Row[Any]]:
            return list(conn.execute(query))

        out: list[Schedule] = []
        for r in await self._run(self._read, q):
            try:
                if r.key_id == PLAIN_KEY_ID:
                    if not self._allow_plain:
                        raise StateCorrupt("stored unencrypted but this store requires a key")
                    payload = bytes(r.payload)
                elif self._keyring is None:
                    raise StateCorrupt(f"sealed under key id {r.key_id!r} but no key is set")
                else:
                    payload = self._keyring.open(r.key_id, bytes(r.payload), schedule_aad(r.id))
                meta = json.loads(r.metadata) if r.metadata else {}
                if not isinstance(meta, dict):
                    raise StateCorrupt("metadata is not a JSON object")
            except (StateCorrupt, ValueError) as err:
                log.error("schedule %s for %s/%s cannot be read, skipped: %s", r.id, r.system,
                          r.actor, err)
                continue
            out.append(Schedule(r.id, r.system, r.actor, r.parent, r.action, payload,
                                {str(k): str(v) for k, v in meta.items()}, int(r.due_ms),
                                r.owner or ""))
        return out

    async def claim_schedules(self, from_owner: str | None, to_owner: str) -> int:
        """Move ``from_owner``'s schedules (None: every other owner's) to ``to_owner``: one
        UPDATE conditioned on the old owner, so concurrent claimers each move a disjoint set
        (a row locked by one claimer no longer matches for the other once that one commits)."""
        to = to_owner[: schema.MAX_OWNER]
        if from_owner is None:
            cond = _sched.c.owner != to
        else:
            cond = _sched.c.owner == from_owner[: schema.MAX_OWNER]
        stmt = _sched.update().where(cond).values(owner=to)

        def txn(conn: Connection) -> int:
            return int(conn.execute(stmt).rowcount)

        return await self._run(self._transaction, txn)

    async def delete_schedules(self, schedule_ids: list[str]) -> int:
        """Forget schedules (they were queued), in one transaction; how many existed."""
        if not schedule_ids:
            return 0

        def txn(conn: Connection) -> int:
            n = 0
            for i in range(0, len(schedule_ids), _CHUNK):
                chunk = schedule_ids[i : i + _CHUNK]
                n += conn.execute(_sched.delete().where(_sched.c.id.in_(chunk))).rowcount or 0
            return n

        return await self._run(self._transaction, txn)

    async def list_actors(
        self, system: str | None = None, limit: int = 1000, after: ActorKey | None = None
    ) -> list[ActorInfo]:
        """Stored actors in key order (metadata only), ``limit`` at a time after ``after``."""

        def q(conn: Connection) -> list[ActorInfo]:
            cols = [c for c in _state.c if c.name != "data"]
            stmt = sa.select(*cols).order_by(_state.c.system, _state.c.name).limit(limit)
            if system is not None:
                stmt = stmt.where(_state.c.system == system)
            if after is not None:
                stmt = stmt.where(
                    sa.or_(
                        _state.c.system > after[0],
                        sa.and_(_state.c.system == after[0], _state.c.name > after[1]),
                    )
                )
            return [
                ActorInfo((r.system, r.name), int(r.revision), r.state_type or "", r.parent,
                          r.owner or "", r.key_id, int(r.created_ms), int(r.updated_ms))
                for r in conn.execute(stmt)
            ]

        return await self._run(self._read, q)

    async def rotate_keys(self, batch: int = 200) -> int:
        """Re-seal every row (state, history and kept schedules) not under the newest key;
        returns rows re-sealed (:meth:`rotate_keys_counted` also counts those skipped).

        Rows that cannot be opened are logged and left as they are.
        """
        return (await self.rotate_keys_counted(batch))[0]

    async def rotate_keys_counted(self, batch: int = 200) -> tuple[int, int]:
        """:meth:`rotate_keys`, returning ``(re-sealed, skipped)``: skipped rows open under
        none of the configured keys (logged, left as they are), so the old key is still needed
        (or those rows are lost)."""
        if self._keyring is None:
            raise InvalidArgument("rotate_keys needs a keyring (this store is unencrypted)")
        total = skipped = 0
        for table in (_state, _hist):
            after: tuple[Any, ...] | None = None
            while True:
                n, bad, after = await self._run(self._rotate_batch, table, after, batch)
                total += n
                skipped += bad
                if after is None:
                    break
                await trio.lowlevel.checkpoint()
        after_id: str | None = ""
        while after_id is not None:
            n, bad, after_id = await self._run(self._rotate_schedules_batch, after_id, batch)
            total += n
            skipped += bad
        return total, skipped

    def _rotate_schedules_batch(
        self, after_id: str, batch: int
    ) -> tuple[int, int, str | None]:
        """Re-seal up to ``batch`` kept schedules past id ``after_id``; (re-sealed, skipped, the
        next cursor or None at the end). A plaintext one is sealed; one that cannot be opened
        is logged, counted as skipped and left."""
        keyring = self._keyring
        assert keyring is not None
        newest = keyring.newest_id

        def txn(conn: Connection) -> tuple[int, int, str | None]:
            rows = list(conn.execute(
                sa.select(_sched.c.id, _sched.c.key_id, _sched.c.payload)
                .where(_sched.c.key_id != newest, _sched.c.id > after_id)
                .order_by(_sched.c.id)
                .limit(batch)
            ))
            updates = []
            skipped = 0
            for r in rows:
                try:
                    if r.key_id == PLAIN_KEY_ID:
                        payload = bytes(r.payload)
                    else:
                        payload = keyring.open(r.key_id, bytes(r.payload), schedule_aad(r.id))
                except StateCorrupt as err:
                    log.warning("rotate_keys: skipping schedule %s: %s", r.id, err)
                    skipped += 1
                    continue
                sealed = keyring.seal(payload, schedule_aad(r.id))
                updates.append({"k_id": r.id, "k_old": r.key_id, "payload": sealed.data,
                                "key_id": sealed.key_id})
            if updates:
                conn.execute(
                    _sched.update()
                    .where(_sched.c.id == sa.bindparam("k_id"),
                           _sched.c.key_id == sa.bindparam("k_old"))
                    .values(payload=sa.bindparam("payload"), key_id=sa.bindparam("key_id")),
                    updates,
                )
            return len(updates), skipped, (rows[-1].id if len(rows) == batch else None)

        return self._transaction(txn)

    def _rotate_batch(
        self, table: sa.Table, after: tuple[Any, ...] | None, batch: int
    ) -> tuple[int, int, tuple[Any, ...] | None]:
        """Re-seal up to ``batch`` rows of ``table`` past ``after``; (re-sealed, skipped, the
        next cursor or None at the end)."""
        assert self._keyring is not None
        newest = self._keyring.newest_id
        pk = [table.c.system, table.c.name, table.c.revision]
        is_hist = table is _hist
        order = pk if is_hist else pk[:2]

        def txn(conn: Connection) -> tuple[int, int, tuple[Any, ...] | None]:
            stmt = (
                sa.select(table.c.system, table.c.name, table.c.revision, table.c.key_id,
                          table.c.data)
                .where(table.c.key_id != newest)
                .order_by(*order)
                .limit(batch)
            )
            if after is not None:
                stmt = stmt.where(_after(order, after))
            if not is_hist:
                stmt = stmt.with_for_update()
            rows = list(conn.execute(stmt))
            if not rows:
                return 0, 0, None
            updates = []
            skipped = 0
            for r in rows:
                key = (r.system, r.name)
                try:
                    blob = self._unseal(key, r.revision, r.key_id, r.data)
                except StateCorrupt as err:
                    log.warning("rotate_keys: skipping %s: %s", "/".join(key), err)
                    skipped += 1
                    continue
                key_id, data = self._seal(key, r.revision, blob)
                updates.append({"k_system": r.system, "k_name": r.name, "k_rev": r.revision,
                                "k_old": r.key_id, "data": data, "key_id": key_id})
            if updates:
                stmt_u = (
                    table.update()
                    .where(table.c.system == sa.bindparam("k_system"),
                           table.c.name == sa.bindparam("k_name"),
                           table.c.revision == sa.bindparam("k_rev"),
                           table.c.key_id == sa.bindparam("k_old"))
                    .values(data=sa.bindparam("data"), key_id=sa.bindparam("key_id"))
                )
                conn.execute(stmt_u, updates)
            last = rows[-1]
            cursor = tuple(getattr(last, c.name) for c in order)
            return len(updates), skipped, (cursor if len(rows) == batch else None)

        return self._transaction(txn)


def _after(cols: Sequence[sa.Column[Any]], values: Iterable[Any]) -> sa.ColumnElement[bool]:
    """Keyset condition ``(cols) > (values)`` spelled out (portable across dialects)."""
    vals = list(values)
    terms = []
    for i in range(len(cols)):
        eqs = [cols[j] == vals[j] for j in range(i)]
        terms.append(sa.and_(*eqs, cols[i] > vals[i]))
    return sa.or_(*terms)



_RAW_CHUNK_ROWS = 500
_RAW_CHUNK_BYTES = 4 << 20
"""Rows / payload bytes per multi-row statement (well under max_allowed_packet on MySQL)."""
_SQLITE_CHUNK_ROWS = 2000
"""Rows per SQLite UPDATE ... FROM (8 binds a row: under SQLite's 32,766 since 3.32)."""


def _chunks(rows: list[_Row], max_rows: int = _RAW_CHUNK_ROWS) -> Iterator[list[_Row]]:
    """Runs of rows under one key id, of at most ``max_rows`` rows / ``_RAW_CHUNK_BYTES``."""
    chunk: list[_Row] = []
    size = 0
    for p in rows:
        if chunk and p[_KID] != chunk[0][_KID]:
            yield chunk
            chunk, size = [], 0
        chunk.append(p)
        size += len(p[_DATA])
        if len(chunk) >= max_rows or size >= _RAW_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _RawSql:
    """The hot statements as driver SQL (skips SQLAlchemy's per-row parameter processing).

    Fenced updates: SQLite runs one prepared ``UPDATE ... WHERE revision = ?`` per row in C
    (``executemany``; or one ``UPDATE ... FROM (VALUES ...)`` per chunk in the node's process);
    Postgres one ``UPDATE ... FROM unnest(...)`` with the fence in its WHERE, MySQL/MariaDB one
    fenced upsert (``_upsert_sql``), so a batch costs one round trip per 500 rows, not per row.
    """

    def __init__(self, dialect: sa.Dialect, *, gil_shared: bool) -> None:
        q = dialect.identifier_preparer.quote
        self.kind = dialect.name
        self.binary_idents = dialect.name in ("mysql", "mariadb")
        ph = "?" if dialect.paramstyle == "qmark" else "%s"
        self.ph = ph
        t = q(schema.STATE_TABLE)
        self.q = q
        cols = ("system", "name", "revision", "data", "key_id", "state_type", "parent", "tags",
                "owner", "created_ms", "updated_ms")
        self.cols = cols
        self.insert_sql = (
            f"INSERT INTO {t} ({', '.join(q(c) for c in cols)}) "
            f"VALUES ({', '.join([ph] * len(cols))})"
        )
        sets = ", ".join(f"{q(c)} = {ph}" for c in _UPDATE_KEYS)
        self.update_one_sql = (
            f"UPDATE {t} SET {q('revision')} = {q('revision')} + 1, {sets} "
            f"WHERE {q('system')} = {ph} AND {q('name')} = {ph} AND {q('revision')} = {ph}"
        )
        self.table = t
        self._many: dict[int, str] = {}
        self._pg_unnest: str | None = None
        self.row_alias = False
        """MySQL 8.0.19+ names the row an upsert tried to insert with an alias (``AS new``);
        MariaDB and older MySQL with ``VALUES(col)``."""
        version = tuple(getattr(dialect, "server_version_info", None) or ())
        self.sqlite_update_from = gil_shared and self.kind == "sqlite" and version >= (3, 33)
        """UPDATE ... FROM (SQLite 3.33+): one multi-row fenced update per chunk, where the
        thread shares the GIL with a busy trio thread (``executemany`` releases and retakes
        it per row); alone in the writer process, ``executemany`` costs less (measured 3.3 vs
        4.3 us of CPU a row)."""
        if self.binary_idents and not getattr(dialect, "is_mariadb", False):
            self.row_alias = version >= (8, 0, 19)

    def _ident(self, v: str | None) -> Any:
        return v.encode() if self.binary_idents and v is not None else v

    def insert_rows(self, conn: Connection, rows: list[_Row], now: int) -> None:
        idn = self._ident
        conn.exec_driver_sql(self.insert_sql, [
            (idn(p[_S]), idn(p[_N]), p[_REV], p[_DATA], p[_KID], p[_TYPE], idn(p[_PARENT]),
             p[_TAGS], p[_OWNER], now, now)
            for p in rows
        ])

    def update_rows(self, conn: Connection, rows: list[_Row], now: int) -> int:
        """Apply fenced updates; returns how many rows matched their base revision."""
        idn = self._ident
        if self.kind == "sqlite":
            if not self.sqlite_update_from:
                res = conn.exec_driver_sql(self.update_one_sql, [
                    (p[_DATA], p[_KID], p[_TYPE], p[_PARENT], p[_TAGS], p[_OWNER], now, p[_S],
                     p[_N], p[_BASE])
                    for p in rows
                ])
                return int(res.rowcount)
            return self._update_rows_sqlite(conn, rows, now)
        if self.kind == "postgresql":
            return self._update_rows_pg(conn, rows, now)
        # MySQL / MariaDB: a fenced upsert (see _upsert_sql). A row reports 2 when it was
        # updated, 1 (or 0) when fenced off or inserted: all updated iff the sum is 2 a row.
        for chunk in _chunks(rows):
            flat: list[Any] = []
            for p in chunk:
                flat += (idn(p[_S]), idn(p[_N]), p[_REV], p[_DATA], p[_KID], p[_TYPE],
                         idn(p[_PARENT]), p[_TAGS], p[_OWNER], now, now)
            res = conn.exec_driver_sql(self._upsert_sql(len(chunk)), tuple(flat))
            if int(res.rowcount) != 2 * len(chunk):
                return -1  # not all applied: the caller rolls back (an insert too) and rechecks
        return len(rows)

    def _update_rows_sqlite(self, conn: Connection, rows: list[_Row], now: int) -> int:
        # One statement per chunk: executemany would run (and release the GIL around) one
        # step per row, and a busy trio thread then makes the writer wait for the GIL each time.
        total = 0
        for chunk in _chunks(rows, _SQLITE_CHUNK_ROWS):
            # the SET clause's batch-level binds come first in the text, so first here
            flat: list[Any] = [chunk[0][_KID], now]
            for p in chunk:
                flat += (p[_S], p[_N], p[_BASE], p[_DATA], p[_TYPE], p[_PARENT], p[_TAGS],
                         p[_OWNER])
            res = conn.exec_driver_sql(self._update_from_sql(len(chunk)), tuple(flat))
            total += int(res.rowcount)
        return total

    def _update_from_sql(self, n: int) -> str:
        key = -n  # shares the cache with the MySQL statements (positive sizes)
        sql = self._many.get(key)
        if sql is not None:
            return sql
        q, t = self.q, self.table
        # SQLite names the columns of a VALUES list column1, column2, ...
        names = ("system", "name", "base", "data", "state_type", "parent", "tags", "owner")
        col = {c: f"v.column{i + 1}" for i, c in enumerate(names)}
        row = "(" + ", ".join(["?"] * len(names)) + ")"
        sets = ", ".join(f"{q(c)} = {col[c]}" for c in names[3:])
        sql = (
            f"UPDATE {t} SET {q('revision')} = {q('revision')} + 1, {sets}, "
            f"{q('key_id')} = ?, {q('updated_ms')} = ? "
            f"FROM (VALUES {', '.join([row] * n)}) AS v "
            f"WHERE {t}.{q('system')} = {col['system']} AND {t}.{q('name')} = {col['name']} "
            f"AND {t}.{q('revision')} = {col['base']}"
        )
        if len(self._many) < 64:
            self._many[key] = sql
        return sql

    def _update_rows_pg(self, conn: Connection, rows: list[_Row], now: int) -> int:
        # One statement text whatever the batch size: psycopg prepares it, no re-planning.
        if self._pg_unnest is None:
            q, t = self.q, self.table
            vcols = ("system", "name", "base", *_UPDATE_KEYS)
            casts = ("varchar", "varchar", "bigint", "bytea", "varchar", "varchar", "varchar",
                     "text", "varchar", "bigint")
            sets = ", ".join(f"{q(c)} = v.{q(c)}" for c in _UPDATE_KEYS)
            self._pg_unnest = (
                f"UPDATE {t} AS t SET {q('revision')} = t.{q('revision')} + 1, {sets} "
                f"FROM unnest({', '.join(f'%s::{c}[]' for c in casts)}) "
                f"AS v({', '.join(q(c) for c in vcols)}) "
                f"WHERE t.{q('system')} = v.{q('system')} AND t.{q('name')} = v.{q('name')} "
                f"AND t.{q('revision')} = v.{q('base')}"
            )
        total = 0
        for chunk in _chunks(rows):
            cols = (
                [p[_S] for p in chunk], [p[_N] for p in chunk], [p[_BASE] for p in chunk],
                [p[_DATA] for p in chunk], [p[_KID] for p in chunk], [p[_TYPE] for p in chunk],
                [p[_PARENT] for p in chunk], [p[_TAGS] for p in chunk],
                [p[_OWNER] for p in chunk], [now] * len(chunk),
            )
            total += int(conn.exec_driver_sql(self._pg_unnest, cols).rowcount)
        return total

    def _upsert_sql(self, n: int) -> str:
        """MySQL / MariaDB fenced update of ``n`` rows as one upsert: ``INSERT ... VALUES
        (...), ... ON DUPLICATE KEY UPDATE col = IF(revision = new revision - 1, new col, col)``
        for every column, ``revision`` last (assignments see the columns set before them).
        Measured on MariaDB 10.11: 7.7 us of server CPU a row against 13.5 for an
        ``UPDATE ... JOIN`` of the rows as a derived table (the raw upsert: 5.0). A row whose
        base is stale is left as it was; one that does not exist is inserted, which the row
        count reveals (the batch is then rolled back and rechecked)."""
        sql = self._many.get(n)
        if sql is not None:
            return sql
        q, ph, t = self.q, self.ph, self.table
        row = "(" + ", ".join([ph] * len(self.cols)) + ")"

        def new(c: str) -> str:
            return f"new.{q(c)}" if self.row_alias else f"VALUES({q(c)})"

        rev = q("revision")
        fence = f"{rev} = {new('revision')} - 1"
        sets = ", ".join(
            f"{q(c)} = IF({fence}, {new(c)}, {q(c)})"
            for c in ("data", "key_id", "state_type", "parent", "tags", "owner", "updated_ms")
        )
        sql = (
            f"INSERT INTO {t} ({', '.join(q(c) for c in self.cols)}) "
            f"VALUES {', '.join([row] * n)}{' AS new' if self.row_alias else ''} "
            f"ON DUPLICATE KEY UPDATE {sets}, {rev} = IF({fence}, {new('revision')}, {rev})"
        )
        if len(self._many) < 64:
            self._many[n] = sql
        return sql
