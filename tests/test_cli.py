"""The ``spawnmesh`` CLI: version, config show/docs, run's config errors, and invoke over HTTP.

``invoke`` is tested against a real HTTP server on 127.0.0.1 that answers like a node's ops
port, so the request the CLI builds and the way it reads replies are both exercised for real.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import platform
import socket
import sys
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner

from spawnmesh._version import __version__
from spawnmesh.cli import main
from spawnmesh.config import NodeConfig, render_docs_markdown
from spawnmesh.errors import ConfigError
from spawnmesh.logs import setup_logging

KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The developer's own SPAWNMESH_* variables must not leak into these tests.
    for var in list(os.environ):
        if var.startswith(("SPAWNMESH_", "SPAWN_")):
            monkeypatch.delenv(var)
    return CliRunner()


# --- version, config ----------------------------------------------------------------------------


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["version"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0] == f"spawnmesh {__version__}"
    assert platform.python_version() in result.output and trio.__version__ in result.output
    assert runner.invoke(main, ["--version"]).output.strip() == f"spawnmesh {__version__}"


def test_help_lists_commands(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("run", "invoke", "version", "config"):
        assert command in result.output


def test_config_show_layers_and_redacts(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[ops]\nport = 9100\n[statestore]\nurl = "memory://"\n')
    env = {"SPAWNMESH_STATESTORE_KEY": KEY, "SPAWNMESH_ACTORS_DEFAULT_TIMEOUT_MS": "700"}
    result = runner.invoke(
        main,
        ["config", "show", "--config", str(path), "--json", "--set", "log.level=debug"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["ops"]["port"] == 9100
    assert shown["statestore"]["url"] == "memory://"
    assert shown["actors"]["default_timeout_ms"] == 700
    assert shown["log"]["level"] == "debug"
    assert shown["statestore"]["key"] == "***"
    assert KEY not in result.output

    toml_out = runner.invoke(main, ["config", "show", "--config", str(path)], env=env)
    assert toml_out.exit_code == 0
    assert '[ops]\nhost = "127.0.0.1"\nport = 9100\n' in toml_out.output
    assert 'key = "***"' in toml_out.output and KEY not in toml_out.output


def test_config_docs_prints_the_generated_markdown(runner: CliRunner) -> None:
    result = runner.invoke(main, ["config", "docs"])
    assert result.exit_code == 0 and result.output == render_docs_markdown()


# --- run: configuration errors exit 2 with one line ---------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (
            ["--ops-port", "abc"],
            {},
            "ops.port: must be an integer in 0..65535, got 'abc' (from --ops-port)",
        ),
        (["--log-format", "xml"], {}, "log.format: must be one of human, json"),
        (["--set", "actors.nope=1"], {}, "actors.nope: unknown setting (from --set actors.nope)"),
        (["--set", "no-equals-sign"], {}, "--set expects key=value"),
        (
            [],
            {"SPAWNMESH_ACTORS_MAX_QUEUE_PER_ACTOR": "0"},
            "(from SPAWNMESH_ACTORS_MAX_QUEUE_PER_ACTOR)",
        ),
        (
            ["--config", "/nonexistent/spawnmesh.toml"],
            {},
            "config: cannot read /nonexistent/spawnmesh.toml",
        ),
    ],
)
def test_run_bad_config_exits_2_with_one_line(
    runner: CliRunner, args: list[str], env: dict[str, str], needle: str
) -> None:
    result = runner.invoke(main, ["run", *args], env=env)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spawnmesh: error: ") and needle in lines[0]


@dataclass
class _FakeNode:
    """Stands in for spawnmesh.node (another component) so run's wiring can be checked."""

    exit_code: int = 3
    seen: list[NodeConfig] = field(default_factory=list)

    def run_node(self, config: NodeConfig) -> int:
        self.seen.append(config)
        return self.exit_code


def test_run_passes_flags_over_env_to_run_node(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeNode()
    module = types.ModuleType("spawnmesh.node")
    module.run_node = fake.run_node  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "spawnmesh.node", module)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        result = runner.invoke(
            main,
            [
                "run",
                "--ops-port",
                "0",
                "--name",
                "n1",
                "--set",
                "ops.port=5",
                "--log-level",
                "error",
            ],
            env={"SPAWNMESH_OPS_PORT": "7", "SPAWNMESH_ACTORS_WRITE_BATCH_MAX": "9"},
        )
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.captureWarnings(False)
    assert result.exit_code == 3, result.output
    (config,) = fake.seen
    assert config.ops.port == 0  # the explicit flag beats --set and the environment
    assert config.name == "n1" and config.actors.write_batch_max == 9
    assert config.log.level == "error"


# --- invoke against a real HTTP server -----------------------------------------------------------


@dataclass
class _FakeOps:
    """A tiny stand-in for a node's ops port: records requests, answers from ``replies``."""

    url: str = ""
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # path -> (status, body); anything else answers 404 actor_not_found like the node.
    replies: dict[str, tuple[int, bytes]] = field(default_factory=dict)


@pytest.fixture
def ops_server() -> Iterator[_FakeOps]:
    state = _FakeOps()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"null")
            state.requests.append((self.path, body))
            status, reply = state.replies.get(
                self.path,
                (
                    404,
                    json.dumps(
                        {"error": {"code": "actor_not_found", "message": "no actor here"}}
                    ).encode(),
                ),
            )
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_invoke_success_prints_value_and_sends_the_documented_body(
    runner: CliRunner, ops_server: _FakeOps
) -> None:
    path = "/v1/systems/shop/actors/cart%2F42/actions/add%20item"
    ops_server.replies[path] = (200, json.dumps({"value": {"total": 3, "items": ["é"]}}).encode())
    result = runner.invoke(
        main,
        [
            "invoke", "shop", "cart/42", "add item",
            "--data", '{"sku": "x", "qty": 2}',
            "--metadata", "trace=abc", "--metadata", "k=v=w",
            "--timeout-ms", "1500", "--parent", "cart",
            "--node", ops_server.url + "/",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == '{"total":3,"items":["é"]}\n'  # compact: not a TTY
    ((got_path, body),) = ops_server.requests
    assert got_path == path
    assert body == {
        "payload": {"sku": "x", "qty": 2},
        "metadata": {"trace": "abc", "k": "v=w"},
        "timeout_ms": 1500,
        "async": False,
        "delay_ms": None,
        "parent": "cart",
    }


def test_invoke_async_with_defaults_and_node_from_env(
    runner: CliRunner, ops_server: _FakeOps
) -> None:
    ops_server.replies["/v1/systems/s/actors/a/actions/go"] = (200, b'{"value": null}')
    result = runner.invoke(
        main,
        ["invoke", "s", "a", "go", "--async", "--delay-ms", "250"],
        env={"SPAWNMESH_NODE": ops_server.url},
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "null\n"
    ((_, body),) = ops_server.requests
    assert body == {
        "payload": None,
        "metadata": {},
        "timeout_ms": None,
        "async": True,
        "delay_ms": 250,
        "parent": None,
    }


def test_invoke_error_reply_prints_code_and_message(
    runner: CliRunner, ops_server: _FakeOps
) -> None:
    result = runner.invoke(main, ["invoke", "s", "ghost", "x", "--node", ops_server.url])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == "spawnmesh: actor_not_found: no actor here\n"


def test_invoke_non_json_error_reply(runner: CliRunner, ops_server: _FakeOps) -> None:
    ops_server.replies["/v1/systems/s/actors/a/actions/x"] = (502, b"Bad Gateway\n")
    result = runner.invoke(main, ["invoke", "s", "a", "x", "--node", ops_server.url])
    assert result.exit_code == 1
    assert result.stderr == "spawnmesh: http_502: Bad Gateway\n"


def test_invoke_connection_refused_names_the_url(runner: CliRunner) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    result = runner.invoke(main, ["invoke", "s", "a", "x", "--node", url])
    assert result.exit_code == 1
    assert url in result.stderr and "connection refused" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_invoke_bad_data_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["invoke", "s", "a", "x", "--data", "{nope"])
    assert result.exit_code == 2
    assert result.stderr.startswith("spawnmesh: error: --data is not valid JSON")


# --- logging (set up by `run` from log.format / log.level) ----------------------------------------


@pytest.fixture
def restore_root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        yield root
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.captureWarnings(False)


def test_human_log_lines(restore_root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("human", "info", stream=stream)
    log = logging.getLogger("spawnmesh.test")
    log.debug("hidden")
    log.info("actor %s activated", "cart/1", extra={"system": "shop", "note": "two words"})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert " INFO " in lines[0] and "spawnmesh.test: actor cart/1 activated" in lines[0]
    assert lines[0].endswith('system=shop note="two words"')


def test_json_log_lines_and_idempotence(restore_root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    setup_logging("human", "debug", stream=stream)
    setup_logging("json", "debug", stream=stream)  # replaces, never duplicates
    setup_logging("json", "debug", stream=stream)
    log = logging.getLogger("spawnmesh.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("turn failed", extra={"actor": "a1", "obj": object()})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "error" and record["logger"] == "spawnmesh.test"
    assert record["msg"] == "turn failed" and record["actor"] == "a1"
    assert record["ts"].endswith("Z") and "ValueError: boom" in record["exc"]
    assert record["obj"].startswith("<object")


def test_setup_logging_rejects_unknown_format(restore_root_logger: logging.Logger) -> None:
    with pytest.raises(ConfigError):
        setup_logging("xml", "info")
    with pytest.raises(ConfigError):
        setup_logging("json", "loud")
