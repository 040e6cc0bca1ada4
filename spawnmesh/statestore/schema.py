"""Tables of the SQL statestore and their versioned migrations (same schema on every dialect).

Migrations are a small in-house list of numbered steps applied on ``open()`` under a database
lock, recorded in ``spawnmesh_schema_version``: the schema is four tables owned by this library
and applied automatically on three dialects, which Alembic (a dependency plus an env.py and a
script directory) would not make simpler or safer.

Identifiers (system, name) are compared byte for byte on every dialect: on MySQL/MariaDB they are
``VARBINARY`` holding UTF-8 (the default collations there are case-insensitive and pad spaces), and
their lengths are limited in UTF-8 bytes so the primary key fits InnoDB's index limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeEngine

MAX_SYSTEM_BYTES = 255
"""Longest actor system name, in UTF-8 bytes."""
MAX_NAME_BYTES = 512
"""Longest actor name (and parent name), in UTF-8 bytes."""
MAX_STATE_TYPE = 255
MAX_OWNER = 255
MAX_KEY_ID = 64

STATE_TABLE = "spawnmesh_actor_state"
HISTORY_TABLE = "spawnmesh_actor_state_history"
VERSION_TABLE = "spawnmesh_schema_version"
SCHEDULES_TABLE = "spawnmesh_schedules"
MAX_SCHEDULE_ID = 64
MAX_ACTION = 255


class Ident(sa.types.TypeDecorator[str]):
    """A UTF-8 identifier compared byte for byte: VARCHAR, or VARBINARY on MySQL/MariaDB."""

    impl = sa.String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.max_bytes = length

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(self.max_bytes))
        return dialect.type_descriptor(sa.String(self.max_bytes))

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in ("mysql", "mariadb"):
            return value.encode()
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).decode()
        return value  # type: ignore[no-any-return]


BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
"""Ciphertext column: LONGBLOB on MySQL (BLOB caps at 64 KiB), BYTEA on Postgres, BLOB on SQLite."""

TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

_MYSQL_TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mariadb_engine": "InnoDB",
    "mariadb_charset": "utf8mb4",
}

metadata = sa.MetaData()

state = sa.Table(
    STATE_TABLE,
    metadata,
    sa.Column("system", Ident(MAX_SYSTEM_BYTES), primary_key=True),
    sa.Column("name", Ident(MAX_NAME_BYTES), primary_key=True),
    sa.Column("parent", Ident(MAX_NAME_BYTES), nullable=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.Column("state_type", sa.String(MAX_STATE_TYPE), nullable=False, default=""),
    sa.Column("data", BLOB, nullable=False),
    sa.Column("key_id", sa.String(MAX_KEY_ID), nullable=False),
    sa.Column("tags", TEXT, nullable=True),
    sa.Column("owner", sa.String(MAX_OWNER), nullable=False, default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    **_MYSQL_TABLE_ARGS,
)
"""Current state of every actor, fenced on ``revision``; ``data`` is sealed (see crypto)."""

history = sa.Table(
    HISTORY_TABLE,
    metadata,
    sa.Column("system", Ident(MAX_SYSTEM_BYTES), primary_key=True),
    sa.Column("name", Ident(MAX_NAME_BYTES), primary_key=True),
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("parent", Ident(MAX_NAME_BYTES), nullable=True),
    sa.Column("state_type", sa.String(MAX_STATE_TYPE), nullable=False, default=""),
    sa.Column("data", BLOB, nullable=False),
    sa.Column("key_id", sa.String(MAX_KEY_ID), nullable=False),
    sa.Column("tags", TEXT, nullable=True),
    sa.Column("owner", sa.String(MAX_OWNER), nullable=False, default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    **_MYSQL_TABLE_ARGS,
)
"""Past revisions (same sealed bytes as when current), bounded per actor by count and/or age."""

schedules = sa.Table(
    SCHEDULES_TABLE,
    metadata,
    sa.Column("id", sa.String(MAX_SCHEDULE_ID), primary_key=True),
    sa.Column("system", Ident(MAX_SYSTEM_BYTES), nullable=False),
    sa.Column("actor", Ident(MAX_NAME_BYTES), nullable=False),
    sa.Column("parent", Ident(MAX_NAME_BYTES), nullable=True),
    sa.Column("action", sa.String(MAX_ACTION), nullable=False),
    sa.Column("payload", BLOB, nullable=False),
    sa.Column("key_id", sa.String(MAX_KEY_ID), nullable=False),
    sa.Column("metadata", TEXT, nullable=True),
    sa.Column("due_ms", sa.BigInteger, nullable=False, index=True),
    sa.Column("owner", sa.String(MAX_OWNER), nullable=False, default=""),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    **_MYSQL_TABLE_ARGS,
)
"""Delayed/scheduled invocations not yet enqueued; ``payload`` sealed like state (AAD: id)."""

schema_version = sa.Table(
    VERSION_TABLE,
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(255), nullable=False),
    sa.Column("applied_ms", sa.BigInteger, nullable=False),
    **_MYSQL_TABLE_ARGS,
)
"""One row per applied migration."""


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step; ``apply`` must be idempotent (MySQL commits DDL at once)."""

    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1(conn: Connection) -> None:
    state.create(conn, checkfirst=True)
    history.create(conn, checkfirst=True)


def _v2(conn: Connection) -> None:
    schedules.create(conn, checkfirst=True)


MIGRATIONS: list[Migration] = [
    Migration(1, "actor state and history tables", _v1),
    Migration(2, "durable schedules table", _v2),
]
"""Every migration, in order. Append only; never edit a released step."""

LATEST_VERSION = MIGRATIONS[-1].version

_LOCK_NAME = "spawnmesh_statestore_migrate"
_PG_LOCK_KEY = 0x5350_4157_4E4D  # "SPAWNM"


def _lock(conn: Connection) -> None:
    name = conn.dialect.name
    if name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    elif name in ("mysql", "mariadb"):
        got = conn.execute(sa.text("SELECT GET_LOCK(:n, 60)"), {"n": _LOCK_NAME}).scalar()
        if got != 1:
            raise TimeoutError("timed out waiting for the schema migration lock")
    # SQLite: the write transaction (BEGIN IMMEDIATE) already serializes.


def _unlock(conn: Connection) -> None:
    if conn.dialect.name in ("mysql", "mariadb"):
        conn.execute(sa.text("SELECT RELEASE_LOCK(:n)"), {"n": _LOCK_NAME})


def current_version(conn: Connection) -> int:
    """The highest applied migration (0 on an empty database)."""
    if not sa.inspect(conn).has_table(VERSION_TABLE):
        return 0
    v = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar()
    return int(v or 0)


def migrate(conn: Connection, now_ms: int) -> tuple[int, int]:
    """Apply pending migrations on ``conn`` (inside its transaction); (from, to) versions.

    Raises RuntimeError if the database was migrated by a newer spawnmesh than this one.
    """
    _lock(conn)
    try:
        schema_version.create(conn, checkfirst=True)
        before = current_version(conn)
        if before > LATEST_VERSION:
            raise RuntimeError(
                f"database schema is at version {before}, newer than this node understands "
                f"({LATEST_VERSION}); upgrade spawnmesh on this node"
            )
        for m in MIGRATIONS:
            if m.version <= before:
                continue
            m.apply(conn)
            conn.execute(
                schema_version.insert().values(
                    version=m.version, description=m.description, applied_ms=now_ms
                )
            )
        return before, LATEST_VERSION
    finally:
        _unlock(conn)
