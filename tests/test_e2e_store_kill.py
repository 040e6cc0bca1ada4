"""SIGKILL during write-through load on PostgreSQL: no acknowledged write is lost.

Real ``spawnmesh run`` processes (see ``e2e.py``) on a fresh PostgreSQL database (needs
``SPAWNMESH_TEST_POSTGRES_URL``: run under ``bash scripts/test-dbs.sh``). Several HTTP clients add 1
to the example counter (write-through: the reply is sent once the state is durable) and record
every value acknowledged; the node is killed with SIGKILL mid-load and restarted on the same
database. Every acknowledged increment must be there: the value is at least the highest value
acknowledged and at least the number of acknowledged increments, and above that by at most the
number of increments that were in flight (sent, never answered) when the node died.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from e2e import new_key, running_node, signal_under_counter_load

from tests.test_statestore_sql import fresh_database

CLIENTS = 6


@pytest.mark.slow
def test_sigkill_under_write_through_load_on_postgres(tmp_path: Path) -> None:
    with fresh_database("postgresql", tmp_path) as db:
        url = db.render_as_string(hide_password=False)
        key = new_key()
        with running_node(tmp_path, key=key, url=url) as node:
            load = signal_under_counter_load(node, clients=CLIENTS, until_acked=300,
                                             sig=signal.SIGKILL)
        assert load.exit.returncode == -signal.SIGKILL
        acked, sent = load.acked, load.sent

        values = [v for per_client in acked for v in per_client]
        n_acked = len(values)
        assert len(set(values)) == n_acked, "two replies acknowledged the same counter value"
        for per_client in acked:  # each client's own adds are serialized: strictly increasing
            assert per_client == sorted(per_client)
        highest = max(values)
        in_flight = sum(sent) - n_acked  # sent but never answered: at most one per client
        assert in_flight <= CLIENTS

        with running_node(tmp_path, key=key, url=url) as again:
            value = again.value("counter", "value")
        assert isinstance(value, int)
        assert value >= highest, (value, highest)
        assert value >= n_acked, (value, n_acked)
        # Nothing acknowledged is lost, and nothing beyond what was sent was applied: the
        # surplus is exactly the in-flight adds that became durable before the kill.
        assert value - n_acked <= in_flight, (value, n_acked, in_flight)
        assert highest >= n_acked  # the counter started at 0 and only these clients added
