"""User mistakes on the command line end in one ``spawnmesh: ...`` line and a non-zero exit,
never a traceback: a busy ops port, a data directory that cannot be created, a key file in a
missing directory, a malformed join address, ``leave`` on a node outside any cluster,
``--delay-ms`` without ``--async``. Real ``spawnmesh`` processes, real sockets and a real
read-only directory (no mocks)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from spawnmesh.errors import ConfigError
from spawnmesh.ops.http import serve_ops

SPAWNMESH = str(Path(sys.executable).with_name("spawnmesh"))
KEY = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without SPAWNMESH_* (the developer's must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAWNMESH_", "SPAWN_"))}
    env.update(extra)
    return env


def spawnmesh(*args: str, timeout: float = 60, cwd: Path | None = None,
              **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SPAWNMESH, *args], capture_output=True, text=True, timeout=timeout,
                          env=_env(**env), cwd=cwd, check=False)


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --------------------------------------------------------------------------- ops port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback TCP port with a listener on it (as another node's ops server would be)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_run_on_a_busy_ops_port_exits_2_with_one_line(busy_port: int) -> None:
    res = spawnmesh("run", "--ops-port", str(busy_port), "--statestore", "memory://",
                    "--set", "cluster.enabled=false")
    assert res.returncode == 2, res.stderr
    assert one_line(res.stderr) == (
        f"spawnmesh: error: ops.port: cannot bind the ops HTTP server on 127.0.0.1:{busy_port}: "
        "Address already in use (another node on this port? set ops.port, 0 picks a free one)"
    )
    assert res.stdout == ""  # never got as far as "ready"


def test_run_on_an_address_not_of_this_machine_names_ops_host() -> None:
    res = spawnmesh("run", "--ops-host", "192.0.2.1", "--ops-port", "9", "--statestore",
                    "memory://", "--set", "cluster.enabled=false")  # TEST-NET-1: not local
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert line.startswith("spawnmesh: error: ops.host: cannot bind the ops HTTP server on "
                           "192.0.2.1:9: "), line


async def test_serve_ops_bind_failure_is_a_config_error(busy_port: int) -> None:
    """The server itself (what an embedded node and a port taken after the CLI's check see)."""
    with pytest.raises(ConfigError) as info:
        await serve_ops(None, "127.0.0.1", busy_port)  # type: ignore[arg-type]
    assert info.value.setting == "ops.port" and "Address already in use" in str(info.value)


# --------------------------------------------------------------------------- statestore dir


def _sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def test_a_file_in_the_way_of_the_data_directory_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    url = _sqlite_url(tmp_path / "file" / "data" / "state.db")
    res = spawnmesh("state", "get", "shop", "c1", "--statestore", url,
                    SPAWNMESH_STATESTORE_KEY=KEY)
    assert res.returncode == 2, res.stderr
    assert one_line(res.stderr) == (
        f"spawnmesh: error: statestore.url: cannot create the directory "
        f"'{tmp_path / 'file' / 'data'}' of the SQLite file: Not a directory"
    )


def _read_only(directory: Path) -> list[str] | None:
    """A command prefix under which ``directory`` cannot be written: chmod 0555 for a normal
    user; for root (who ignores modes) a read-only bind mount in a private mount namespace.
    None if neither works here."""
    directory.chmod(0o555)
    probe = directory / "probe"
    try:
        probe.mkdir()
    except PermissionError:
        return []
    probe.rmdir()  # root: the mode is not enough
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return None
    d = str(directory)
    prefix = [unshare, "-m", "sh", "-c",
              # cd again: a working directory inside it must be looked up on the new mount
              f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}" && cd "$PWD" && '
              'exec "$@"', "sh"]
    check = subprocess.run([*prefix, "mkdir", str(probe)], capture_output=True, timeout=30,
                           check=False)
    if check.returncode == 0 or b"Read-only" not in check.stderr:
        return None
    return prefix


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _read_only(ro)
    if prefix is None:
        ro.chmod(0o755)
        pytest.skip("cannot make a read-only directory here (root without mount namespaces)")
    yield ro, prefix
    ro.chmod(0o755)


def test_a_read_only_data_directory_is_one_line(read_only_dir: tuple[Path, list[str]]) -> None:
    ro, prefix = read_only_dir
    url = _sqlite_url(ro / ".spawnmesh" / "state.db")
    res = subprocess.run([*prefix, SPAWNMESH, "state", "get", "shop", "c1", "--statestore", url],
                         capture_output=True, text=True, timeout=60, check=False,
                         env=_env(SPAWNMESH_STATESTORE_KEY=KEY))
    assert res.returncode == 2, res.stderr
    line = one_line(res.stderr)
    assert line.startswith(f"spawnmesh: error: statestore.url: cannot create the directory "
                           f"'{ro / '.spawnmesh'}' of the SQLite file: "), line
    assert line.endswith(("Read-only file system", "Permission denied")), line


def test_run_in_a_read_only_directory_logs_one_error_not_a_traceback(
    read_only_dir: tuple[Path, list[str]],
) -> None:
    """``spawnmesh run`` with the default relative SQLite URL, started in a read-only working
    directory: the node reports the store as unusable (one log line naming statestore.url,
    not ready) instead of a traceback."""
    ro, prefix = read_only_dir
    node = subprocess.Popen(
        [*prefix, SPAWNMESH, "run", "--ops-port", "0", "--set", "cluster.enabled=false"],
        cwd=ro, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=_env(SPAWNMESH_STATESTORE_KEY=KEY),
    )
    try:
        url = _wait_ready(node)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url + "/readyz", timeout=10)
        assert info.value.code == 503
    finally:
        node.send_signal(signal.SIGINT)
        _, stderr = node.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "statestore.url: cannot create the directory" in errors[0], stderr


# --------------------------------------------------------------------------- keygen


def test_keygen_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    target = tmp_path / "nonexistent" / "dir" / "k"
    res = spawnmesh("keygen", "--out", str(target))
    assert res.returncode == 2, res.stderr
    assert one_line(res.stderr) == (
        f"spawnmesh: error: cannot create {target}: No such file or directory"
    )
    assert not target.parent.exists()


# --------------------------------------------------------------------------- a running node


def _wait_ready(node: subprocess.Popen[str], timeout_s: float = 30) -> str:
    """The ops URL from the node's "ready" banner on stdout."""
    assert node.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = node.stdout.readline()
        if not line:
            raise AssertionError(f"node exited ({node.poll()}) before it was ready")
        if "ops/admin" in line:
            return line.split()[1]
    raise AssertionError("node not ready in time")


@pytest.fixture
def standalone_node() -> Iterator[str]:
    """A ``spawnmesh run`` node with clustering off, in-memory store, a free ops port."""
    node = subprocess.Popen(
        [SPAWNMESH, "run", "--ops-port", "0", "--statestore", "memory://",
         "--set", "cluster.enabled=false"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
    )
    try:
        yield _wait_ready(node)
    finally:
        node.send_signal(signal.SIGINT)
        node.wait(timeout=30)


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
        return bool(response.status == 200)


def test_leave_on_a_node_outside_any_cluster_fails_and_keeps_it_running(
    standalone_node: str,
) -> None:
    res = spawnmesh("leave", "--node", standalone_node)
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_line(res.stderr)
    assert "is not in a cluster (cluster.enabled=false): nothing to leave" in line, line
    assert res.stdout == ""
    assert _healthy(standalone_node)  # not shut down


def test_join_with_a_malformed_address_is_a_usage_error(standalone_node: str) -> None:
    for bad, why in [("notanaddr", "no port (write host:port)"),
                     ("host:0", "port must be 1..65535"),
                     ("[::1]7946", "expected [ipv6]:port")]:
        res = spawnmesh("join", bad, "127.0.0.1:7946", "--node", standalone_node)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)
        assert one_line(res.stderr) == (
            f"spawnmesh: error: expected HOST:PORT (a member's gossip address), got "
            f"{bad!r}: {why}"
        )
    # a well-formed address reaches the node, which says why it cannot join
    res = spawnmesh("join", "127.0.0.1:7946", "--node", standalone_node)
    assert res.returncode == 1 and "clustering is off" in one_line(res.stderr)


def test_delay_without_async_is_a_usage_error(standalone_node: str) -> None:
    res = spawnmesh("invoke", "examples", "counter", "add", "--data", "5", "--delay-ms", "100",
                    "--node", standalone_node)
    assert res.returncode == 2, res.stdout + res.stderr
    assert one_line(res.stderr) == (
        "spawnmesh: error: --delay-ms needs --async: a delayed call is fire-and-forget, it has "
        "no reply to print"
    )
    value = spawnmesh("invoke", "examples", "counter", "value", "--node", standalone_node)
    assert json.loads(value.stdout) == 0  # nothing was sent
    ok = spawnmesh("invoke", "examples", "counter", "add", "--data", "5", "--async",
                   "--delay-ms", "100", "--node", standalone_node)
    assert ok.returncode == 0 and ok.stdout == "null\n", ok.stderr
    deadline = time.monotonic() + 10
    while json.loads(spawnmesh("invoke", "examples", "counter", "value", "--node",
                               standalone_node).stdout) != 5:
        assert time.monotonic() < deadline, "the delayed add never ran"
        time.sleep(0.1)


def test_invoke_without_data_uses_the_handlers_default(standalone_node: str) -> None:
    res = spawnmesh("invoke", "examples", "counter", "add", "--node", standalone_node)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == 1  # add(n: int = 1) on a new counter
