"""``spawnmesh state get|history|restore|delete`` and ``spawnmesh statestore migrate|rotate-key``
against a real SQLite file (and PostgreSQL / MariaDB when their test URLs are set)."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa
import trio
from click.testing import CliRunner, Result

from spawnmesh.cli import main
from spawnmesh.statestore import schema
from spawnmesh.statestore.base import Schedule, StateWrite
from spawnmesh.statestore.crypto import Keyring
from spawnmesh.statestore.sql import SqlStateStore
from tests.test_statestore_sql import KEY1, KEY2, fresh_database

DIALECTS = ["sqlite", "postgresql", "mysql"]


@pytest.fixture(params=DIALECTS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.URL]:
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    for var in list(os.environ):  # the developer's settings must not leak in (test URLs may)
        if var.startswith(("SPAWNMESH_", "SPAWN_")) and not var.startswith("SPAWNMESH_TEST_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("SPAWNMESH_STATESTORE_KEY", KEY1)
    return CliRunner()


def _url(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


def _seed(url: sa.URL, writes: list[tuple[str, bytes]], keys: str = KEY1) -> None:
    """Write revisions 1..n of each (name, blob) in order, with history kept."""

    async def go() -> None:
        store = SqlStateStore(url, keyring=Keyring.parse(keys), history_keep=10, pool_size=1)
        await store.open()
        revs: dict[str, int] = {}
        try:
            for name, blob in writes:
                base = revs.get(name, 0)
                [res] = await store.save_many(
                    [StateWrite(("shop", name), base, blob, "demo.Cart", "cart",
                                {"team": "a"}, owner="n1#1")]
                )
                assert isinstance(res, int)
                revs[name] = res
        finally:
            await store.aclose()

    trio.run(go)


def _schedule(url: sa.URL, sc: Schedule, keys: str) -> None:
    async def go() -> None:
        store = SqlStateStore(url, keyring=Keyring.parse(keys), pool_size=1)
        await store.open()
        try:
            await store.save_schedules([sc])
        finally:
            await store.aclose()

    trio.run(go)


def _schedules(url: sa.URL, keys: str) -> list[Schedule]:
    async def go() -> list[Schedule]:
        store = SqlStateStore(url, keyring=Keyring.parse(keys), pool_size=1)
        await store.open()
        try:
            return await store.list_schedules()
        finally:
            await store.aclose()

    return trio.run(go)


def cli(runner: CliRunner, url: sa.URL, *args: str, history: bool = True) -> Result:
    extra = ["--set", "statestore.history_keep=10"] if history else []
    return runner.invoke(main, [*args, "--statestore", _url(url), *extra])


def out(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_get_history_restore_delete(runner: CliRunner, db_url: sa.URL) -> None:
    mp = msgspec.msgpack.encode
    _seed(db_url, [("c1", mp({"items": 1})), ("c1", mp({"items": 2})),
                   ("c1", mp({"items": 3, "raw": b"\x00\x01"})), ("c2", b"\xc1not msgpack")])
    got = out(cli(runner, db_url, "state", "get", "shop", "c1"))
    assert got["revision"] == 3 and got["encoding"] == "msgpack"
    assert got["state"] == {"items": 3, "raw": base64.b64encode(b"\x00\x01").decode()}
    assert (got["system"], got["name"], got["parent"], got["state_type"], got["tags"]) == (
        "shop", "c1", "cart", "demo.Cart", {"team": "a"}
    )
    assert got["updated_ms"] > 0
    raw = out(cli(runner, db_url, "state", "get", "shop", "c2"))
    assert raw["encoding"] == "base64"
    assert base64.b64decode(raw["state"]) == b"\xc1not msgpack"

    hist = out(cli(runner, db_url, "state", "history", "shop", "c1"))
    assert [(h["revision"], h["state"]["items"]) for h in hist] == [(1, 1), (2, 2), (3, 3)]

    restored = out(cli(runner, db_url, "state", "restore", "shop", "c1", "1"))
    assert restored == {"system": "shop", "name": "c1", "restored": 1, "revision": 4}
    now = out(cli(runner, db_url, "state", "get", "shop", "c1"))
    assert (now["revision"], now["state"]) == (4, {"items": 1})

    bad = cli(runner, db_url, "state", "restore", "shop", "c1", "99")
    assert bad.exit_code == 1 and "not in history" in bad.stderr

    assert out(cli(runner, db_url, "state", "delete", "shop", "c1"))["deleted"] is True
    gone = cli(runner, db_url, "state", "get", "shop", "c1")
    assert gone.exit_code == 1 and "not_found" in gone.stderr and "shop/c1" in gone.stderr
    again = cli(runner, db_url, "state", "delete", "shop", "c1")
    assert again.exit_code == 1 and "not_found" in again.stderr
    assert out(cli(runner, db_url, "state", "history", "shop", "c1")) == []


def test_migrate_reports_versions(runner: CliRunner, db_url: sa.URL) -> None:
    first = out(cli(runner, db_url, "statestore", "migrate"))
    assert first == {"from_version": 0, "to_version": schema.LATEST_VERSION}
    second = out(cli(runner, db_url, "statestore", "migrate"))
    assert second == {"from_version": schema.LATEST_VERSION,
                      "to_version": schema.LATEST_VERSION}


def test_rotate_key_reseals_under_the_newest_key(
    runner: CliRunner, db_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    mp = msgspec.msgpack.encode
    _seed(db_url, [("c1", mp(1)), ("c1", mp(2)), ("c2", mp(3))])
    kept = Schedule("s-1", "shop", "c1", "cart", "add", mp({"n": 7}), {"k": "v"}, 10**13, "n1")
    _schedule(db_url, kept, KEY1)
    old_id = Keyring.parse(KEY1).newest_id  # seeded under KEY1's derived id
    monkeypatch.setenv("SPAWNMESH_STATESTORE_KEY", f"{old_id}:{KEY1},new:{KEY2}")
    res = out(cli(runner, db_url, "statestore", "rotate-key"))
    # 2 current + 3 history rows + 1 schedule
    assert res == {"resealed": 6, "skipped": 0, "key_id": "new"}
    assert out(cli(runner, db_url, "statestore", "rotate-key"))["resealed"] == 0
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        ids = {r[0] for r in conn.execute(sa.select(schema.state.c.key_id))}
        sched_ids = {r[0] for r in conn.execute(sa.select(schema.schedules.c.key_id))}
    engine.dispose()
    assert ids == {"new"} and sched_ids == {"new"}
    monkeypatch.setenv("SPAWNMESH_STATESTORE_KEY", f"new:{KEY2}")  # the old key is gone
    assert out(cli(runner, db_url, "state", "get", "shop", "c1"))["state"] == 2
    assert _schedules(db_url, f"new:{KEY2}") == [kept]  # the kept schedule still opens


def test_rotate_key_reports_rows_no_key_opens_and_exits_1(
    runner: CliRunner, db_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row under a key that is no longer configured cannot be re-sealed: it is counted in
    ``skipped`` and the command fails, so "run it until it reports 0" cannot stop early."""
    mp = msgspec.msgpack.encode
    _seed(db_url, [("c1", mp(1)), ("c1", mp(2))])  # under KEY1: 1 current + 2 history rows
    _schedule(db_url, Schedule("s-1", "shop", "c1", None, "add", mp(1), {}, 10**13, "n1"),
              KEY1)
    _seed(db_url, [("c2", mp(3))], keys=f"new:{KEY2}")  # 1 current + 1 history, newest key
    _seed(db_url, [("c3", mp(4))], keys=f"mid:{KEY2}")  # KEY2 under another id: re-sealable
    monkeypatch.setenv("SPAWNMESH_STATESTORE_KEY", f"mid:{KEY2},new:{KEY2}")  # KEY1 dropped
    res = cli(runner, db_url, "statestore", "rotate-key")
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout) == {"resealed": 2, "skipped": 4, "key_id": "new"}
    assert res.stderr.startswith("spawnmesh: state_corrupt: 4 row(s) open under none")
    assert len(res.stderr.splitlines()) == 1
    again = cli(runner, db_url, "statestore", "rotate-key")  # nothing changes by repeating
    assert again.exit_code == 1
    assert json.loads(again.stdout) == {"resealed": 0, "skipped": 4, "key_id": "new"}
    monkeypatch.setenv("SPAWNMESH_STATESTORE_KEY", f"{Keyring.parse(KEY1).newest_id}:{KEY1},"
                                                   f"new:{KEY2}")  # the old key back
    assert out(cli(runner, db_url, "statestore", "rotate-key")) == {
        "resealed": 4, "skipped": 0, "key_id": "new"}


def test_errors(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = sa.make_url(f"sqlite+pysqlite:///{tmp_path / 's.db'}")
    _seed(url, [("c1", b"\x01")])
    monkeypatch.setenv("SPAWNMESH_STATESTORE_KEY", KEY2)  # not the key that sealed it
    wrong = cli(runner, url, "state", "get", "shop", "c1")
    assert wrong.exit_code == 1 and "shop/c1" in wrong.stderr
    assert "Traceback" not in wrong.output
    monkeypatch.delenv("SPAWNMESH_STATESTORE_KEY")
    nokey = cli(runner, url, "state", "get", "shop", "c1")
    assert nokey.exit_code == 2 and "needs a key" in nokey.stderr
    mem = runner.invoke(main, ["state", "get", "shop", "c1", "--statestore", "memory://"])
    assert mem.exit_code == 2 and "memory://" in mem.stderr
    down = runner.invoke(main, ["state", "get", "a", "b", "--statestore",
                                "postgresql+psycopg://u@127.0.0.1:1/db", "--set",
                                "statestore.allow_plaintext=true"])
    assert down.exit_code == 1 and "statestore" in down.stderr and "Traceback" not in down.output


def test_schedules_lists_what_is_kept_and_who_fires_it(runner: CliRunner, db_url: sa.URL) -> None:
    mp = msgspec.msgpack.encode
    late = Schedule("s-late", "shop", "c1", "cart", "add", mp({"n": 2}), {"k": "v"}, 1_000, "n1")
    soon = Schedule("s-soon", "shop", "c2", None, "ping", b"", {}, 10**13, "n2")
    later = Schedule("s-later", "shop", "c3", "cart", "add", mp(3), {}, 2 * 10**13, "n1")
    for sc in (later, late, soon):
        _schedule(db_url, sc, KEY1)
    every = out(cli(runner, db_url, "statestore", "schedules"))
    assert [r["id"] for r in every] == ["s-late", "s-soon", "s-later"]  # soonest first
    first = every[0]
    assert (first["system"], first["actor"], first["parent"], first["action"]) == (
        "shop", "c1", "cart", "add")
    assert (first["owner"], first["due_ms"], first["metadata"]) == ("n1", 1_000, {"k": "v"})
    assert (first["encoding"], first["payload"]) == ("msgpack", {"n": 2})
    assert first["late_ms"] > 10**12  # due in 1970
    assert (every[1]["encoding"], every[1]["payload"], every[1]["late_ms"]) == ("none", None, 0)
    mine = out(cli(runner, db_url, "statestore", "schedules", "--owner", "n1"))
    assert [r["id"] for r in mine] == ["s-late", "s-later"]
    due = out(cli(runner, db_url, "statestore", "schedules", "--overdue"))
    assert [r["id"] for r in due] == ["s-late"]
    one = out(cli(runner, db_url, "statestore", "schedules", "--limit", "1"))
    assert [r["id"] for r in one] == ["s-late"]
