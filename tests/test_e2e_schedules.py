"""Tier 5: kept schedules with real ``spawnmesh run`` processes sharing one PostgreSQL.

Through n1, delayed ``record`` casts (one id each) are made to many counters; n1 keeps them in
the store under its name. Then n2 restarts (SIGTERM, started again under its name) and n1 is
SIGKILLed before they fall due. Checked: every cast is applied exactly once (the counters list
the ids they applied), by the survivor that took n1's schedules over once it saw n1 dead; the
restarted n2 took nothing of n1's. Needs ``SPAWNMESH_TEST_POSTGRES_URL`` (run under
``bash scripts/test-dbs.sh``).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.e2e import wait_for
from tests.test_e2e_mesh import (
    COUNTERS,
    cluster,
    http_post,
    invoke,
    metric,
    status_of,
)

pytestmark = pytest.mark.slow

DELAY_MS = 15_000
"""Long enough for a restart of n2 and the kill of n1 to be noticed before the casts are due."""


def kept_by(db_url: str) -> dict[str, int]:
    """Owner -> schedules kept, read from the database."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT owner, count(*) FROM spawnmesh_schedules GROUP BY owner")
            )
            return {str(owner): int(n) for owner, n in rows}
    finally:
        engine.dispose()


def test_schedules_of_a_killed_node_fire_once_from_one_survivor(tmp_path: Path) -> None:
    with cluster(tmp_path) as c:
        c.start("n1", "n2", "n3")
        c.wait_converged(["n1", "n2", "n3"])
        n1 = c.nodes["n1"]
        ops = {name: f"later-{name}" for name in COUNTERS}
        for name, op in ops.items():
            status, reply = http_post(
                n1.url, name, "record", {"payload": op, "parent": "counter", "delay_ms": DELAY_MS}
            )
            assert status == 200, reply
        made = time.monotonic()
        wait_for(lambda: kept_by(c.db_url) == {"n1": len(COUNTERS)}, "n1 keeps every cast", 10)

        # a member restarting under its name takes back its own schedules, not n1's
        assert c.before_exit("n2").stop(signal.SIGTERM, timeout=20).returncode == 0
        del c.nodes["n2"]
        c.start("n2")
        c.wait_converged(["n1", "n2", "n3"])
        assert kept_by(c.db_url) == {"n1": len(COUNTERS)}

        c.nodes["n1"].kill()
        survivors = [c.nodes["n2"], c.nodes["n3"]]
        wait_for(lambda: all(status_of(s).get("n1") == "dead" for s in survivors),
                 "n1 dead at both survivors", 30, describe=c.describe)
        wait_for(lambda: sum(kept_by(c.db_url).values()) == len(COUNTERS)
                 and "n1" not in kept_by(c.db_url), "n1's schedules taken over", 10)
        assert time.monotonic() - made < DELAY_MS / 1000, "too slow: the casts fell due already"

        wait_for(lambda: kept_by(c.db_url) == {}, "every schedule fired and forgotten",
                 DELAY_MS / 1000 + 30, describe=c.describe)
        time.sleep(1.0)  # time for a duplicate to land
        for name, op in ops.items():
            assert invoke(survivors[0], name, "ops") == [op], name
        adopted = [metric(s, "spawnmesh_schedules_adopted_total") for s in survivors]
        assert sorted(adopted) == [0, len(COUNTERS)], adopted
