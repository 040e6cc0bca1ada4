"""The statestore key check: a node whose configured key cannot open the rows already stored
refuses to start with one typed line (ConfigError) instead of reporting ready, failing every
load and sealing new rows under an unrelated key.

``SqlStateStore.check_keys`` on real stores (SQLite always; PostgreSQL and MariaDB with
``SPAWNMESH_TEST_POSTGRES_URL`` / ``SPAWNMESH_TEST_MYSQL_URL``, see tests/test_statestore_sql.py),
the node calling it at start and when a store that was down at start comes up, and
``spawnmesh run`` as a real process restarted with another key.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import trio
from e2e import (
    CLI,
    clean_env,
    free_port,
    http_get,
    new_key,
    node_args,
    spawn_process,
    start_node,
)

from spawnmesh import ActorSystem, Context, WriteThrough, action, open_node
from spawnmesh.errors import ConfigError, StatestoreUnavailable
from spawnmesh.statestore import schema
from spawnmesh.statestore.base import Schedule, StateWrite
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.memory import MemoryStateStore
from spawnmesh.statestore.sql import KEY_SAMPLE_ROWS, SqlStateStore
from tests.conftest import test_config
from tests.test_statestore_sql import DIALECTS, KEY1, KEY2, fresh_database


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.URL]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


def _store(url: sa.URL, keys: str | None) -> SqlStateStore:
    """A store on ``url`` with the keyring ``keys`` (None: plaintext), writing in process."""
    keyring = Keyring.parse(keys) if keys is not None else None
    return SqlStateStore(url, keyring=keyring, allow_plaintext=keyring is None, pool_size=2,
                         writer_process=False)


async def _seed(url: sa.URL, keys: str | None, names: list[str], schedule: str = "") -> None:
    """Write one state row per name (and a kept schedule with id ``schedule``) under ``keys``."""
    store = _store(url, keys)
    await store.open()
    try:
        if names:
            res = await store.save_many([StateWrite(("shop", n), 0, b"\x01") for n in names])
            assert all(isinstance(r, int) for r in res), res
        if schedule:
            await store.save_schedules([Schedule(schedule, "shop", "c", None, "add", b"\x05",
                                                 {}, 10**13, "n1")])
    finally:
        await store.aclose()


async def _check(url: sa.URL, keys: str | None) -> None:
    store = _store(url, keys)
    await store.open()
    try:
        await store.check_keys()
    finally:
        await store.aclose()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "spawnmesh.statestore" and r.levelno == logging.WARNING
            and "sampled rows" in r.getMessage()]


# --------------------------------------------------------------------------- check_keys


async def test_right_key_passes(db_url: sa.URL, caplog: pytest.LogCaptureFixture) -> None:
    await _seed(db_url, f"a:{KEY1}", ["c1", "c2"], schedule="s1")
    await _check(db_url, f"a:{KEY1}")
    await _check(db_url, f"a:{KEY1},b:{KEY2}")  # a rotation configured, nothing resealed yet
    assert _warnings(caplog) == []


async def test_wrong_key_with_the_same_id_fails(db_url: sa.URL) -> None:
    await _seed(db_url, f"a:{KEY1}", ["c1", "c2"])
    with pytest.raises(ConfigError) as err:
        await _check(db_url, f"a:{KEY2}")
    msg = str(err.value)
    assert err.value.setting == "statestore.key"
    assert msg.startswith("statestore.key: ") and "id(s) a " in msg, msg
    assert "\n" not in msg and KEY1 not in msg and KEY2 not in msg, msg


async def test_entirely_different_key_fails(db_url: sa.URL) -> None:
    await _seed(db_url, KEY1, ["c1"], schedule="s1")  # a bare key: its id is derived
    with pytest.raises(ConfigError) as err:
        await _check(db_url, KEY2)
    msg = str(err.value)
    assert Keyring.parse(KEY1).newest_id in msg, msg  # found
    assert Keyring.parse(KEY2).newest_id in msg, msg  # configured
    assert "no sampled row is sealed under a configured key id" in msg, msg
    assert KEY1 not in msg and KEY2 not in msg, msg


async def test_a_store_of_schedules_only_is_checked_too(db_url: sa.URL) -> None:
    await _seed(db_url, f"a:{KEY1}", [], schedule="s1")
    with pytest.raises(ConfigError, match=r"id\(s\) a"):
        await _check(db_url, f"a:{KEY2}")


async def test_no_key_on_an_encrypted_store_fails(db_url: sa.URL) -> None:
    await _seed(db_url, f"a:{KEY1}", ["c1"])
    with pytest.raises(ConfigError, match=r"rows sealed under key id\(s\) a but no key is "
                                          r"configured"):
        await _check(db_url, None)


async def test_plain_store_with_a_key_configured_passes(
    db_url: sa.URL, caplog: pytest.LogCaptureFixture
) -> None:
    await _seed(db_url, None, ["c1", "c2"], schedule="s1")
    await _check(db_url, f"a:{KEY1}")
    assert _warnings(caplog) == []


async def test_an_old_key_id_beside_the_configured_one_only_warns(
    db_url: sa.URL, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows under a retired (or not yet configured) key id beside rows the configured key
    opens: a rotation in progress. Those actors fail alone; the node starts, warned."""
    await _seed(db_url, f"old:{KEY1}", ["a1", "a2"])
    await _seed(db_url, f"old:{KEY1},new:{KEY2}", ["b1", "b2"], schedule="s1")
    caplog.set_level(logging.WARNING, "spawnmesh.statestore")
    await _check(db_url, f"new:{KEY2}")
    [warning] = _warnings(caplog)
    assert "2 of 5 sampled rows" in warning and "new, old, configured: new" in warning, warning
    assert KEY1 not in warning and KEY2 not in warning


async def test_one_corrupt_row_among_good_ones_only_warns(
    db_url: sa.URL, caplog: pytest.LogCaptureFixture
) -> None:
    """A row that fails under a key that opens the others is that actor's problem
    (StateCorrupt), not a wrong key: a tampered or copied row must not stop the node."""
    await _seed(db_url, f"a:{KEY1}", ["c1", "c2", "c3"])
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    st = schema.state
    with engine.begin() as conn:  # c1's sealed bytes copied onto c2
        data = conn.execute(sa.select(st.c.data).where(st.c.name == "c1")).scalar_one()
        conn.execute(st.update().where(st.c.name == "c2").values(data=data))
    engine.dispose()
    caplog.set_level(logging.WARNING, "spawnmesh.statestore")
    await _check(db_url, f"a:{KEY1}")
    [warning] = _warnings(caplog)
    assert "1 of 3 sampled rows" in warning, warning


async def test_empty_store_passes(db_url: sa.URL, caplog: pytest.LogCaptureFixture) -> None:
    for keys in (f"a:{KEY1}", None):
        await _check(db_url, keys)
    assert _warnings(caplog) == []


async def test_only_the_first_rows_are_read(tmp_path: Path) -> None:
    """The sample is bounded: rows past the first ``KEY_SAMPLE_ROWS`` (in key order) are not
    read, so a large store costs the same; here the later rows are under another key."""
    with fresh_database("sqlite", tmp_path) as url:
        await _seed(url, f"a:{KEY1}", [f"a{i:03d}" for i in range(KEY_SAMPLE_ROWS)])
        await _seed(url, f"b:{KEY2}", [f"b{i:03d}" for i in range(50)])
        await _check(url, f"a:{KEY1}")  # only a-rows sampled: they all open
        with pytest.raises(ConfigError):
            await _check(url, f"b:{KEY2}")  # the a-rows are under a key not configured


async def test_memory_store_has_nothing_to_check() -> None:
    await MemoryStateStore().check_keys()


# --------------------------------------------------------------------------- the node


def counters() -> ActorSystem:
    system = ActorSystem("shop")

    @system.actor("counter", state=int, snapshot=WriteThrough())
    class Counter:
        @action
        async def add(self, ctx: Context[int], n: int) -> int:
            ctx.state += n
            return ctx.state

    return system


class DownAtStart(SqlStateStore):
    """A real store whose database does not answer until ``up`` is set (an outage at start)."""

    up = False

    async def open(self) -> None:
        if self.up:
            await super().open()
            return
        self._engine = self._make_engine()  # what open() does before the database answers
        raise StatestoreUnavailable(f"statestore {self.where}: connection refused (test)")

    async def healthy(self, timeout_s: float = 5.0) -> bool:
        return self.up and await super().healthy(timeout_s)


async def test_node_with_the_wrong_key_does_not_start(db_url: sa.URL) -> None:
    await _seed(db_url, f"a:{KEY1}", ["c1"])
    store = _store(db_url, f"a:{KEY2}")
    with pytest.raises(ConfigError, match=r"statestore\.key: the configured key for id\(s\) a"):
        async with open_node(test_config(), counters(), store=store):
            raise AssertionError("the node started")
    assert store._engine is None  # closed on the failed start


async def test_node_starts_with_the_right_key(db_url: sa.URL) -> None:
    await _seed(db_url, f"a:{KEY1}", ["c1"])
    async with open_node(test_config(), counters(), store=_store(db_url, f"a:{KEY1}")) as node:
        assert node.readiness() == (True, [])
        assert await node.ref("shop", "counter").invoke("add", 2) == 2


async def test_store_up_later_is_checked_before_the_node_is_ready(tmp_path: Path) -> None:
    """Down at start (not ready), then up with rows under another key: the check runs on the
    first healthy probe, readiness never turns true, and the node stops with the ConfigError
    (escalated by the supervisor, which ``spawnmesh run`` prints as one line, exit 2)."""
    from spawnmesh.supervisor import RestartIntensityExceeded

    with fresh_database("sqlite", tmp_path) as url:
        await _seed(url, f"a:{KEY1}", ["c1"])
        store = DownAtStart(url, keyring=Keyring.parse(f"b:{KEY2}"), writer_process=False)
        seen_ready: list[bool] = []
        with pytest.raises(RestartIntensityExceeded) as err, trio.fail_after(30):
            async with open_node(test_config(), counters(), store=store) as node:
                assert node.readiness()[1] == ["statestore unavailable"]
                store.up = True
                while True:
                    seen_ready.append(node.readiness()[0])
                    await trio.sleep(0.05)
        assert isinstance(err.value.last_error, ConfigError), err.value
        assert "no sampled row is sealed under a configured key id" in str(err.value.last_error)
        assert seen_ready and not any(seen_ready)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:  # nothing was written under the wrong key
            ids = {r[0] for r in conn.execute(sa.select(schema.state.c.key_id))}
        engine.dispose()
        assert ids == {"a"}


# --------------------------------------------------------------------------- spawnmesh run


@pytest.mark.slow
def test_run_restarted_with_another_key_exits_with_one_line(tmp_path: Path) -> None:
    key_a, key_b = new_key(), new_key()
    db = tmp_path / "state.db"
    node = start_node(tmp_path, key=key_a, db=db)
    try:
        assert node.value("counter", "add", data=5) == 5
    finally:
        assert node.stop().returncode == 0

    port = free_port()
    argv: list[Any] = [*CLI, *node_args(db, url=None)]
    argv[argv.index("--ops-port") + 1] = str(port)
    second = spawn_process(argv, tmp_path, clean_env(key=key_b))
    statuses: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while second.proc.poll() is None and time.monotonic() < deadline:
            try:
                statuses.add(http_get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)[0])
            except OSError:
                pass  # not listening: it never got that far
            time.sleep(0.02)
        result = second.wait_exit(timeout=5)
    finally:
        second.kill()
    assert result.returncode == 2, second.describe()
    assert 200 not in statuses, statuses
    assert "ready" not in result.stdout, result.stdout  # no banner
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("spawnmesh: error: statestore.key: "), result.stderr
    id_a, id_b = Keyring.parse(key_a).newest_id, Keyring.parse(key_b).newest_id
    assert id_a in last and id_b in last, last
    assert key_a not in result.stderr and key_b not in result.stderr

    engine = sa.create_engine(f"sqlite:///{db}", poolclass=sa.pool.NullPool)
    with engine.connect() as conn:  # the store still holds key A's rows only
        ids = {r[0] for r in conn.execute(sa.select(schema.state.c.key_id))}
    engine.dispose()
    assert ids == {id_a}
