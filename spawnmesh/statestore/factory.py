"""Build a statestore from its URL: ``memory://`` or a SQLite / PostgreSQL / MySQL / MariaDB URL.

Persistent stores encrypt state at rest and refuse to start without a key unless plaintext is
explicitly allowed (which is logged loudly).
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from spawnmesh.errors import ConfigError
from spawnmesh.statestore.base import StateStore
from spawnmesh.statestore.crypto import load_keyring
from spawnmesh.statestore.memory import MemoryStateStore
from spawnmesh.statestore.sql import WRITER_PROCESS_AFTER_ROWS, SqlStateStore

log = logging.getLogger("spawnmesh.statestore")

_DRIVERS = {
    "sqlite": ("sqlite", "pysqlite"),
    "postgresql": ("postgresql", "psycopg"),
    "postgres": ("postgresql", "psycopg"),
    "mysql": ("mysql", "pymysql"),
    "mariadb": ("mariadb", "pymysql"),
}
_ALLOWED = ", ".join(
    ["memory://", "sqlite:///path/to/file.db", "postgresql+psycopg://user:pw@host/db",
     "mysql+pymysql://user:pw@host/db", "mariadb+pymysql://user:pw@host/db"]
)

_NO_KEY = (
    "a persistent statestore encrypts actor state at rest and needs a key: set "
    "SPAWNMESH_STATESTORE_KEY to base64 of 32 random bytes (e.g. `openssl rand -base64 32`), or "
    "statestore.key_file to a file of 'id:base64key' lines (newest last); to store state "
    "unencrypted instead, set statestore.allow_plaintext"
)


def normalize_url(url: str) -> URL:
    """Parse a statestore URL and pin its sync driver (psycopg 3 / PyMySQL / pysqlite)."""
    try:
        u = sa.make_url(url)
    except ArgumentError:
        raise ConfigError("statestore.url", f"cannot parse {url!r}; expected one of {_ALLOWED}")\
            from None
    backend, _, driver = u.drivername.partition("+")
    want = _DRIVERS.get(backend)
    if want is None:
        raise ConfigError(
            "statestore.url", f"unsupported database {backend!r}; expected one of {_ALLOWED}"
        )
    if driver and driver != want[1]:
        raise ConfigError(
            "statestore.url",
            f"driver {driver!r} is not supported for {backend} (statestores run SQLAlchemy's "
            f"sync engine in threads under trio; use {want[0]}+{want[1]})",
        )
    if want[0] == "sqlite" and (not u.database or u.database == ":memory:"):
        raise ConfigError(
            "statestore.url", "an in-memory SQLite database is not durable; use memory:// or "
            "sqlite:///path/to/file.db"
        )
    return u.set(drivername=f"{want[0]}+{want[1]}")


def open_statestore(
    url: str,
    *,
    key: str = "",
    key_file: str = "",
    allow_plaintext: bool = False,
    pool_size: int = 8,
    node_id: str = "",
    history_keep: int = 0,
    history_max_age_s: float = 0.0,
    writer_process: str = "auto",
) -> StateStore:
    """A statestore for ``url`` (not yet opened: ``await store.open()`` before use).

    Raises ConfigError for a bad URL, a bad key, or a persistent store without a key and
    without ``allow_plaintext``.
    """
    if url.strip().lower().startswith("memory:"):
        return MemoryStateStore()
    u = normalize_url(url.strip())
    if pool_size < 1:
        raise ConfigError("statestore.pool_size", f"must be at least 1, not {pool_size}")
    if history_keep < 0 or history_max_age_s < 0:
        raise ConfigError("statestore.history", "history bounds must not be negative")
    keyring = load_keyring(key, key_file)
    if keyring is None:
        if not allow_plaintext:
            raise ConfigError("statestore.key", _NO_KEY)
        log.warning(
            "!!! statestore %s: NO ENCRYPTION KEY - actor state is stored in PLAINTEXT "
            "(statestore.allow_plaintext is set). Anyone who can read the database or its "
            "backups can read every actor's state. !!!",
            u.render_as_string(hide_password=True),
        )
    return SqlStateStore(
        u,
        keyring=keyring,
        allow_plaintext=allow_plaintext,
        pool_size=pool_size,
        node_id=node_id,
        history_keep=history_keep,
        history_max_age_s=history_max_age_s,
        writer_process=writer_process != "off",
        writer_process_after_rows=WRITER_PROCESS_AFTER_ROWS if writer_process == "auto" else 0,
    )
