"""End to end: ``spawnmesh run`` as a real process, driven through the real ``spawnmesh`` CLI.

Every node here is a subprocess on 127.0.0.1 with ``--ops-port 0``, a SQLite statestore in the
test's temporary directory and a fresh random key in its environment (see ``tests/e2e.py``).
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from e2e import (
    CLI,
    NodeProcess,
    clean_env,
    http_post_json,
    killing,
    new_key,
    run_argv,
    run_cli,
    running_node,
    signal_under_counter_load,
    spawn_process,
    wait_for,
)

from spawnmesh._version import __version__

pytestmark = pytest.mark.slow

PROMPT_EXIT_S = 5.0
"""A signalled idle node must exit within this long (the drain has nothing to wait for)."""


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels include ``labels`` (None if absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', head))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


def _audit_events(node: NodeProcess) -> int:
    # Polled, so straight over HTTP rather than a CLI process per poll.
    status, reply = http_post_json(
        f"{node.url}/v1/systems/examples/actors/audit/actions/get_state", {}
    )
    assert status == 200 and isinstance(reply, dict), reply
    state = reply["value"]
    assert isinstance(state, dict)
    events = state["events"]
    assert isinstance(events, int)
    return events


def _wait_audit_events(node: NodeProcess, n: int) -> int:
    """Broadcasts are delivered asynchronously: poll audit until it has seen ``n`` events;
    returns the count it reached."""

    def reached() -> int | None:
        events = _audit_events(node)
        return events if events >= n else None

    return wait_for(reached, f"audit to see {n} events", timeout=10.0, describe=node.describe)


# --- 1: start, banner, probes, counter --------------------------------------------------------


def test_run_prints_banner_answers_probes_and_counts(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with running_node(tmp_path, key=new_key(), db=db) as node:
        banner = node.stdout
        assert re.match(r"^http://127\.0\.0\.1:\d+$", node.url), node.url
        assert int(node.url.rsplit(":", 1)[1]) != 0
        assert f"spawnmesh {__version__} node " in banner and " ready" in banner
        assert f"statestore  sqlite:///{db}" in banner
        for actor in ("counter", "cart", "audit", "worker"):
            assert f"examples/{actor} [" in banner, banner
        try_line = next(line for line in banner.splitlines() if "try:" in line)
        assert f"spawnmesh invoke --node {node.url} examples counter add" in try_line

        assert node.get("/healthz")[0] == 200
        assert node.get("/readyz")[0] == 200
        status, info = node.get("/v1/node")
        assert status == 200 and json.loads(info)["ready"] is True

        first = node.invoke("counter", "add", data=5)
        assert (first.returncode, first.stdout.strip(), first.stderr) == (0, "5", ""), first
        assert node.value("counter", "add", data=5) == 10
        assert node.value("counter", "value") == 10
        assert node.value("counter", "get_state") == {"value": 10, "changes": 2}

        # The "try:" command of the banner runs as printed, from the node's working directory
        # (it names the CLI by path when that is not simply `spawnmesh` on PATH).
        argv = try_line.split("try:", 1)[1].split()
        assert Path(argv[0]).name == "spawnmesh", try_line
        if argv[0] == "spawnmesh":
            argv[:1] = CLI
        assert run_argv(argv, cwd=tmp_path).ok().stdout.strip() == "11"

        # Fire and forget, now and delayed: the CLI prints null at once, the adds land later.
        assert node.value("counter", "add", "--async", data=100) is None
        assert node.value("counter", "add", "--async", "--delay-ms", "200", data=1000) is None
        wait_for(lambda: node.value("counter", "value") == 1111, "the async adds to land",
                 describe=node.describe)


# --- 2: errors through the CLI ----------------------------------------------------------------


def test_invoke_errors_exit_1_with_the_error_code(tmp_path: Path) -> None:
    with running_node(tmp_path, key=new_key()) as node:

        def fails(code: str, *args: str, data: object = None) -> str:
            result = node.invoke(*args, data=data)
            assert result.returncode == 1, result
            assert result.stdout == "", result
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"spawnmesh: {code}: "), result
            return lines[0]

        fails("actor_not_found", "no-such-actor", "add")
        fails("action_not_found", "counter", "no_such_action")
        bad = fails("invalid_argument", "cart-e1", "add_item", "--parent", "cart", data="x")
        assert "Item" in bad

        assert node.value("cart-e1", "add_item", "--parent", "cart",
                          data={"sku": "apple", "qty": 2}) == 1
        assert node.value("cart-e1", "checkout", "--parent", "cart") == {"items": 2}
        failed = fails("actor_failed", "cart-e1", "add_item", "--parent", "cart",
                       data={"sku": "pear"})
        assert "ValueError: cart already checked out" in failed

        # The node is still up and serving.
        assert node.get("/readyz")[0] == 200
        assert node.value("counter", "add", data=1) == 1
        assert node.proc.poll() is None


def test_invoke_without_a_node_fails_cleanly(tmp_path: Path) -> None:
    # Port 1 on loopback: nothing listens there.
    result = run_cli("invoke", "--node", "http://127.0.0.1:1", "examples", "counter", "value")
    assert result.returncode == 1, result
    assert "connection refused" in result.stderr and len(result.stderr.splitlines()) == 1


# --- 3: unnamed carts, broadcast, pool --------------------------------------------------------


def test_unnamed_carts_broadcast_to_audit_and_pooled_worker(tmp_path: Path) -> None:
    with running_node(tmp_path, key=new_key()) as node:
        parent = ("--parent", "cart")
        assert node.value("cart-a", "add_item", *parent, data={"sku": "apple", "qty": 2}) == 1
        assert node.value("cart-a", "add_item", *parent, data={"sku": "pear"}) == 2
        assert node.value("cart-a", "add_item", *parent, data={"sku": "apple", "qty": 3}) == 2
        assert node.value("cart-b", "add_item", *parent, data={"sku": "plum", "qty": 7}) == 1

        assert node.value("cart-a", "get_state", *parent) == {
            "items": {"apple": {"sku": "apple", "qty": 5}, "pear": {"sku": "pear", "qty": 1}},
            "checked_out": False,
        }
        assert node.value("cart-b", "get_state", *parent) == {
            "items": {"plum": {"sku": "plum", "qty": 7}}, "checked_out": False,
        }
        # An unnamed actor that was never spawned does not exist without its template.
        missing = node.invoke("cart-zzz", "get_state")
        assert missing.returncode == 1 and "actor_not_found" in missing.stderr, missing

        # Every add_item broadcast to cart-events reaches audit.
        assert _wait_audit_events(node, 4) == 4
        assert node.value("cart-b", "add_item", *parent, data={"sku": "fig"}) == 2
        assert _wait_audit_events(node, 5) == 5
        last = node.value("audit", "get_state")
        assert isinstance(last, dict)
        assert last["last"] == {"cart": "cart-b", "sku": "fig", "qty": 1}

        for text in ("hello", "", "ünïcode"):
            assert node.value("worker", "digest", data=text) == (
                hashlib.sha256(text.encode()).hexdigest()
            )


def test_spawned_cart_invoked_by_its_own_name_gets_a_typed_payload(tmp_path: Path) -> None:
    with running_node(tmp_path, key=new_key()) as node:
        assert node.value("cart-own", "add_item", "--parent", "cart", data={"sku": "fig"}) == 1
        # Found by its own name (the runtime knows its template) ...
        assert node.value("cart-own", "get_state") == {
            "items": {"fig": {"sku": "fig", "qty": 1}}, "checked_out": False,
        }
        # ... so its actions take the same typed payloads as with --parent.
        result = node.invoke("cart-own", "add_item", data={"sku": "fig", "qty": 2})
        assert (result.returncode, result.stdout.strip()) == (0, "1"), result


# --- 4: signals drain and flush; a restart continues ------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_flushes_and_restart_continues(tmp_path: Path, sig: signal.Signals) -> None:
    key = new_key()
    db = tmp_path / "state.db"
    # Write-behind flushes only once a minute here, so the carts and audit survive the restart
    # only if the drain on the signal flushes them.
    slow_flush = ("--set", "actors.write_behind_ms=60000")
    parent = ("--parent", "cart")

    with running_node(tmp_path, *slow_flush, key=key, db=db) as first:
        assert first.value("counter", "add", data=3) == 3
        assert first.value("counter", "add", data=4) == 7
        assert first.value("cart-s", "add_item", *parent, data={"sku": "kiwi", "qty": 2}) == 1
        _wait_audit_events(first, 1)
        gone = first.stop(sig)
        assert gone.returncode == 0, first.describe()
        assert gone.seconds_to_exit < PROMPT_EXIT_S, gone
        assert f"received {sig.name}: draining" in gone.stderr
        assert "drained (clean)" in gone.stderr
        assert "Traceback" not in gone.stderr

    with running_node(tmp_path, *slow_flush, key=key, db=db) as second:
        assert second.value("counter", "value") == 7
        assert second.value("counter", "add", data=1) == 8
        cart = {"items": {"kiwi": {"sku": "kiwi", "qty": 2}}, "checked_out": False}
        assert second.value("cart-s", "get_state", *parent) == cart
        # The stored state names the template: the cart is found without --parent as well.
        assert second.value("cart-s", "get_state") == cart
        assert second.value("audit", "get_state") == {
            "events": 1, "last": {"cart": "cart-s", "sku": "kiwi", "qty": 2},
        }
        assert second.value("cart-s", "add_item", *parent, data={"sku": "kiwi"}) == 1
        assert _wait_audit_events(second, 2) == 2
        assert second.stop(signal.SIGTERM).returncode == 0


def test_sigkill_keeps_write_through_state_only(tmp_path: Path) -> None:
    """The control of the test above: without a drain, only write-through state survives (so
    the carts and audit surviving a SIGTERM really is the drain's flush)."""
    key, db = new_key(), tmp_path / "state.db"
    slow_flush = ("--set", "actors.write_behind_ms=60000")
    with running_node(tmp_path, *slow_flush, key=key, db=db) as first:
        assert first.value("counter", "add", data=2) == 2
        assert first.value("cart-k", "add_item", "--parent", "cart", data={"sku": "x"}) == 1
        _wait_audit_events(first, 1)
        assert first.stop(signal.SIGKILL).returncode == -signal.SIGKILL
    with running_node(tmp_path, *slow_flush, key=key, db=db) as second:
        assert second.value("counter", "value") == 2
        lost = second.invoke("cart-k", "get_state")
        assert lost.returncode == 1 and "actor_not_found" in lost.stderr, lost
        assert second.value("audit", "get_state") == {"events": 0, "last": {}}


def test_sigterm_under_load_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    key, db = new_key(), tmp_path / "state.db"

    with running_node(tmp_path, key=key, db=db) as node:
        load = signal_under_counter_load(node, clients=4, until_acked=100, sig=signal.SIGTERM)
    gone = load.exit

    assert gone.returncode == 0, gone.stderr
    assert gone.seconds_to_exit < PROMPT_EXIT_S, gone
    # While draining the node refuses new work with 503 shutting_down, then stops listening.
    for ending in load.endings:
        assert ending.startswith(("503 ", "URLError", "ConnectionRefusedError",
                                  "ConnectionResetError", "RemoteDisconnected",
                                  "BadStatusLine", "IncompleteRead")), load.endings
        if ending.startswith("503 "):
            assert "shutting_down" in ending, load.endings
    highest = max(load.values)
    assert highest >= len(load.values)

    with running_node(tmp_path, key=key, db=db) as again:
        value = again.value("counter", "value")
    assert isinstance(value, int)
    # Every acknowledged add is durable (write-through); at most the unanswered ones on top.
    assert highest <= value <= sum(load.sent), (highest, value, sum(load.sent))


def test_signal_drains_once(tmp_path: Path) -> None:
    with running_node(tmp_path, key=new_key()) as node:
        gone = node.stop(signal.SIGTERM)
    assert gone.returncode == 0
    assert gone.stderr.count("drained (") == 1, gone.stderr


# --- 5: bad configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "setting"),
    [
        (["--ops-port", "99999"], {}, "ops.port"),
        (["--ops-port", "0"], {"SPAWNMESH_ACTORS_DEFAULT_TIMEOUT_MS": "abc"},
         "actors.default_timeout_ms"),
        (["--ops-port", "0", "--log-format", "xml"], {}, "log.format"),
        (["--ops-port", "0", "--set", "actors.no_such_setting=1"], {}, "no_such_setting"),
        (["--ops-port", "0", "--app", "no_such_module_e2e:system"], {}, "app"),
    ],
    ids=["ops-port", "env-timeout", "log-format", "unknown-setting", "app"],
)
def test_bad_configuration_exits_2_with_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], setting: str
) -> None:
    result = run_cli(
        "run", "--statestore", f"sqlite:///{tmp_path / 'state.db'}", *args,
        env=clean_env(env, key=new_key()), timeout=15,
    )
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("spawnmesh: error: ") and setting in lines[0], result
    assert result.stdout == "", result


def test_persistent_store_without_key_refuses_to_start(tmp_path: Path) -> None:
    result = run_cli(
        "run", "--ops-port", "0", "--statestore", f"sqlite:///{tmp_path / 'state.db'}",
        env=clean_env(), timeout=15,
    )
    assert result.returncode != 0, result
    assert result.stdout == "", result  # no banner: it never claimed to be ready
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    assert "statestore.key" in lines[0] and "SPAWNMESH_STATESTORE_KEY" in lines[0], result
    assert not (tmp_path / "state.db").exists()  # refused before touching the database


# --- 6: JSON logs and metrics -----------------------------------------------------------------


def test_json_logs_and_metrics_count_invocations(tmp_path: Path) -> None:
    # Debug level: as many log sites as possible must keep to one JSON object per line.
    args = ("--log-format", "json", "--log-level", "debug")
    with running_node(tmp_path, *args, key=new_key()) as node:
        adds = 4
        for i in range(1, adds + 1):
            assert node.value("counter", "add", data=1) == i
        assert node.value("counter", "value") == adds
        parent = ("--parent", "cart")
        assert node.value("cart-j", "add_item", *parent, data={"sku": "a"}) == 1
        assert node.value("cart-j", "checkout", *parent) == {"items": 1}
        ok_calls = adds + 3
        failed = node.invoke("nobody", "value")
        assert failed.returncode == 1 and "actor_not_found" in failed.stderr, failed
        crashed = node.invoke("cart-j", "add_item", *parent, data={"sku": "b"})
        assert crashed.returncode == 1 and "actor_failed" in crashed.stderr, crashed

        status, text = node.get("/metrics")
        assert status == 200
        assert _metric(text, "spawnmesh_invocations_total", outcome="ok") == ok_calls, text
        assert _metric(text, "spawnmesh_invocations_total", outcome="actor_not_found") == 1
        assert _metric(text, "spawnmesh_invocations_total", outcome="actor_failed") == 1
        assert _metric(text, "spawnmesh_active_actors", system="examples",
                       actor="counter") == 1, text
        gone = node.stop(signal.SIGTERM)

    assert gone.returncode == 0
    lines = [line for line in gone.stderr.splitlines() if line.strip()]
    assert len(lines) >= 3, gone.stderr  # at least: ops server up, signal received, drained
    for line in lines:
        record = json.loads(line)  # every line, not just most
        assert isinstance(record, dict)
        assert {"ts", "level", "logger", "msg"} <= record.keys(), line
    assert any(json.loads(line)["msg"].startswith("received SIGTERM") for line in lines)


# --- 7: a user app ----------------------------------------------------------------------------


USER_APP = '''
from dataclasses import dataclass

from spawnmesh import ActorSystem, Context, action

shop = ActorSystem("shop")


@dataclass
class Tally:
    greeted: int = 0


@shop.actor("greeter", state=Tally)
class Greeter:
    @action
    async def greet(self, ctx: Context[Tally], name: str) -> str:
        ctx.state = Tally(ctx.state.greeted + 1)
        return f"hello {name} #{ctx.state.greeted}"
'''


def test_user_app_is_hosted_instead_of_the_examples(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "e2e_user_app.py").write_text(textwrap.dedent(USER_APP))
    env = {"PYTHONPATH": str(code)}
    with running_node(tmp_path, "--app", "e2e_user_app:shop", key=new_key(), env=env) as node:
        assert "shop/greeter [named]: greet" in node.stdout
        assert "examples/" not in node.stdout
        assert node.value("greeter", "greet", system="shop", data="ada") == "hello ada #1"
        assert node.value("greeter", "greet", system="shop", data="bob") == "hello bob #2"
        assert node.value("greeter", "get_state", system="shop") == {"greeted": 2}
        missing = node.invoke("counter", "add", data=1)
        assert missing.returncode == 1 and "actor_not_found" in missing.stderr, missing
        assert node.stop(signal.SIGTERM).returncode == 0


# --- 8: version -------------------------------------------------------------------------------


def test_version_command() -> None:
    result = run_cli("version").ok()
    assert result.stdout.splitlines()[0] == f"spawnmesh {__version__}"
    assert run_cli("--version").ok().stdout.strip() == f"spawnmesh {__version__}"


# --- 9: spawnmesh.serve from a plain program --------------------------------------------------


PLAIN_PROGRAM = '''
import sys

import spawnmesh
from spawnmesh.config import load_config

system = spawnmesh.ActorSystem("plain")


@system.actor("echo")
class Echo:
    @spawnmesh.action
    async def shout(self, ctx, text: str) -> str:
        return text.upper() + "!"


if __name__ == "__main__":
    config = load_config(overrides={
        "name": "plain-node",
        "ops.host": "127.0.0.1",
        "ops.port": 0,
        "statestore.url": sys.argv[1],
    })
    code = spawnmesh.serve(system, config=config)
    print(f"serve returned {code}", flush=True)
    sys.exit(code)
'''


def test_plain_program_serves_until_sigint(tmp_path: Path) -> None:
    program = tmp_path / "plain_node.py"
    program.write_text(textwrap.dedent(PLAIN_PROGRAM))
    argv = [sys.executable, str(program), f"sqlite:///{tmp_path / 'state.db'}"]
    proc = spawn_process(argv, tmp_path, clean_env(key=new_key()), label="plain")
    with killing(proc):
        proc.wait_ready()
        assert "node plain-node ready" in proc.stdout
        assert "plain/echo [named]: shout" in proc.stdout
        status, reply = http_post_json(
            f"{proc.url}/v1/systems/plain/actors/echo/actions/shout", {"payload": "hi"}
        )
        assert (status, reply) == (200, {"value": "HI!"})
        status, reply = http_post_json(
            f"{proc.url}/v1/systems/plain/actors/echo/actions/whisper", {"payload": "hi"}
        )
        assert status == 404 and isinstance(reply, dict)
        assert reply["error"]["code"] == "action_not_found"
        gone = proc.stop(signal.SIGINT)
    assert gone.returncode == 0, proc.describe()
    assert gone.seconds_to_exit < PROMPT_EXIT_S
    assert "serve returned 0" in gone.stdout
    assert "Traceback" not in gone.stderr and "KeyboardInterrupt" not in gone.stderr
