"""Helpers for end-to-end tests: real ``spawnmesh run`` processes driven through the real CLI.

A node runs as a subprocess in its own session, on ``127.0.0.1`` with ``--ops-port 0``, a SQLite
statestore in a temporary directory and a fresh random encryption key in its environment. Its
stdout and stderr go to files (no pipe can fill up and block it); :func:`start_node` waits for the
ready banner, parses the ops URL from it and waits for ``/readyz`` to answer 200. :meth:`NodeProcess
.stop` sends a signal and collects the exit code and the output; :func:`running_node` kills the
whole process group of anything still alive when the block ends, whatever happened inside it.

Every wait polls with a deadline; nothing sleeps for a fixed time hoping something happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

__all__ = [
    "CLI",
    "CliResult",
    "NodeExit",
    "NodeProcess",
    "clean_env",
    "http_get",
    "http_post_json",
    "killing",
    "new_key",
    "node_args",
    "run_argv",
    "run_cli",
    "running_node",
    "spawn_process",
    "start_node",
    "wait_for",
]

T = TypeVar("T")

START_TIMEOUT_S = 20.0
"""How long a node may take from exec to answering ``/readyz`` with 200."""

STOP_TIMEOUT_S = 10.0
"""How long a node may take to exit after SIGTERM/SIGINT before the test fails."""

CLI_TIMEOUT_S = 30.0
"""How long one CLI command may run."""

_POLL_S = 0.02
_OPS_URL_RE = re.compile(r"^\s*ops/admin\s+(http://\S+)", re.MULTILINE)


def _find_cli() -> list[str]:
    """The installed ``spawnmesh`` entry point next to this interpreter (the venv's), else PATH."""
    beside = Path(sys.executable).with_name("spawnmesh")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("spawnmesh")
    if found:
        return [found]
    return [sys.executable, "-m", "spawnmesh.cli"]


CLI: list[str] = _find_cli()
"""The command that runs the ``spawnmesh`` CLI."""


def new_key() -> str:
    """A fresh statestore key: base64 of 32 random bytes."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


def free_port() -> int:
    """A TCP port free on loopback now (for a process that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_env(proxy_port: int, host_port: int) -> dict[str, str]:
    """The environment of a ``spawnmesh run`` serving Spawn hosts, set as a Spawn deployment
    sets it (Spawn's own variable names), with a fresh statestore key."""
    return {
        "SPAWNMESH_SPAWN_ENABLED": "true",
        "PROXY_HTTP_PORT": str(proxy_port),
        "USER_FUNCTION_PORT": str(host_port),
        "SPAWN_STATESTORE_KEY": new_key(),
    }


def clean_env(extra: Mapping[str, str] | None = None, *, key: str | None = None) -> dict[str, str]:
    """This process's environment without any ``SPAWNMESH_*``/``SPAWN_*`` variable (the
    developer's own settings must not leak in), unbuffered output, plus ``extra`` and ``key``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPAWNMESH_", "SPAWN_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["SPAWNMESH_CLUSTER_GOSSIP_PORT"] = "0"  # tests run side by side: no fixed gossip port
    env["SPAWNMESH_CLUSTER_PEER_PORT"] = "0"  # nor peer port
    if key is not None:
        env["SPAWNMESH_STATESTORE_KEY"] = key
    if extra:
        env.update(extra)
    return env


def wait_for(
    predicate: Callable[[], T | None],
    what: str,
    timeout: float = 10.0,
    *,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something other than None/False; fail after
    ``timeout`` seconds with ``what`` (and ``describe()``, e.g. a process's output)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value is not None and value is not False:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{describe()}" if describe else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(_POLL_S)


# --------------------------------------------------------------------------------------------
# HTTP


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """``GET url``: ``(status, body text)``; HTTP error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def http_post_json(url: str, body: object, timeout: float = 10.0) -> tuple[int, object]:
    """``POST url`` with a JSON body: ``(status, decoded JSON reply)``."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _ready(url: str) -> bool:
    try:
        return http_get(f"{url}/readyz", timeout=1.0)[0] == 200
    except OSError:  # not listening yet, reset, timeout
        return False


# --------------------------------------------------------------------------------------------
# CLI


@dataclass(frozen=True, repr=False)
class CliResult:
    """A finished CLI command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> object:
        """stdout parsed as JSON (what ``invoke`` prints on success)."""
        return json.loads(self.stdout)

    def ok(self) -> CliResult:
        """Assert the command succeeded and return it."""
        assert self.returncode == 0, f"{self.args} exited {self.returncode}: {self.stderr}"
        return self

    def __repr__(self) -> str:  # pytest shows assertion messages with repr()
        return (f"$ spawnmesh {' '.join(self.args)}\nexit {self.returncode}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT_S,
    cwd: Path | None = None,
) -> CliResult:
    """Run ``spawnmesh ARGS...`` to completion (``env`` defaults to :func:`clean_env`)."""
    return run_argv([*CLI, *args], env=env, timeout=timeout, cwd=cwd)


def run_argv(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout: float = CLI_TIMEOUT_S,
    cwd: Path | None = None,
) -> CliResult:
    """Run any command to completion; ``args`` of the result are ``argv`` without the CLI
    prefix when it starts with :data:`CLI`."""
    argv = list(argv)
    proc = subprocess.run(
        argv,
        env=dict(env) if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    shown = argv[len(CLI):] if argv[: len(CLI)] == CLI else argv
    return CliResult(tuple(shown), proc.returncode, proc.stdout, proc.stderr)


# --------------------------------------------------------------------------------------------
# node processes


@dataclass(frozen=True)
class NodeExit:
    """How a node process ended."""

    returncode: int
    stdout: str
    stderr: str
    seconds_to_exit: float
    """From the signal to the exit."""


@dataclass
class NodeProcess:
    """A running node (or any program that prints the ready banner) and its output files."""

    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    env: dict[str, str]
    url: str = ""
    """The ops URL parsed from the banner, e.g. ``http://127.0.0.1:40475``."""
    exit: NodeExit | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text("utf-8", "replace")

    def describe(self) -> str:
        """The process's state and output so far, for failure messages."""
        rc = self.proc.poll()
        state = "running" if rc is None else f"exited {rc}"
        return f"node pid {self.pid} {state}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"

    def invoke(
        self, actor: str, action: str, *args: str, system: str = "examples",
        data: object = None,
    ) -> CliResult:
        """``spawnmesh invoke --node URL SYSTEM ACTOR ACTION [--data JSON] ARGS...``."""
        cmd = ["invoke", "--node", self.url, system, actor, action, *args]
        if data is not None:
            cmd += ["--data", json.dumps(data)]
        return run_cli(*cmd, env=clean_env())

    def value(self, actor: str, action: str, *args: str, data: object = None,
              system: str = "examples") -> object:
        """Invoke, assert exit 0, and return the printed JSON value."""
        result = self.invoke(actor, action, *args, system=system, data=data)
        assert result.returncode == 0, f"{result}\n{self.describe()}"
        return result.json()

    def get(self, path: str) -> tuple[int, str]:
        """``GET`` a path of the ops server."""
        return http_get(f"{self.url}{path}")

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        """Wait for the banner (parse the ops URL from it) and for ``/readyz`` = 200."""

        def banner_url() -> str | None:
            match = _OPS_URL_RE.search(self.stdout)
            if match:  # the banner is printed (and flushed) in one write
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited before it was ready\n{self.describe()}")
            return None

        started = time.monotonic()
        self.url = wait_for(banner_url, "the ready banner", timeout, describe=self.describe)
        left = max(0.5, timeout - (time.monotonic() - started))
        wait_for(lambda: _ready(self.url), f"{self.url}/readyz = 200", left,
                 describe=self.describe)
        return self.url

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> NodeExit:
        """Send ``sig``, wait for the exit (failing after ``timeout``), return code and output."""
        if self.exit is not None:
            return self.exit
        sent = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"node did not exit within {timeout:g} s of {signal.Signals(sig).name}\n"
                f"{self.describe()}"
            ) from None
        self.exit = NodeExit(rc, self.stdout, self.stderr, time.monotonic() - sent)
        return self.exit

    def wait_exit(self, timeout: float = START_TIMEOUT_S) -> NodeExit:
        """Wait for a process that is expected to exit by itself (e.g. a start-up failure)."""
        started = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"process still running after {timeout:g} s\n"
                                 f"{self.describe()}") from None
        self.exit = NodeExit(rc, self.stdout, self.stderr, time.monotonic() - started)
        return self.exit

    def kill(self) -> None:
        """SIGKILL the process's whole group (it runs in its own session) and reap it."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5.0)


def node_args(db: Path, *extra: str, url: str | None = None) -> list[str]:
    """``run`` arguments for a node on 127.0.0.1, an ephemeral ops port and SQLite file ``db``
    (or the statestore ``url`` if given)."""
    return ["run", "--ops-host", "127.0.0.1", "--ops-port", "0",
            "--statestore", url or f"sqlite:///{db}", *extra]


def spawn_process(
    argv: Sequence[str], workdir: Path, env: Mapping[str, str], *, label: str = "node"
) -> NodeProcess:
    """Start ``argv`` in its own session with output to files under ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob(f"{label}-*.out")))
    out = workdir / f"{label}-{n}.out"
    err = workdir / f"{label}-{n}.err"
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = subprocess.Popen(
            list(argv),
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=workdir,
            start_new_session=True,  # a terminal's Ctrl-C does not reach it; killpg reaches all
        )
    return NodeProcess(proc, out, err, dict(env))


def start_node(
    workdir: Path,
    *extra_args: str,
    key: str | None,
    db: Path | None = None,
    env: Mapping[str, str] | None = None,
    wait: bool = True,
    url: str | None = None,
) -> NodeProcess:
    """Start ``spawnmesh run`` (see :func:`node_args`) with ``key`` in the environment; by
    default wait until it is ready. ``db`` defaults to ``workdir/state.db``; ``url`` names
    another statestore instead."""
    argv = [*CLI, *node_args(db or workdir / "state.db", *extra_args, url=url)]
    node = spawn_process(argv, workdir, clean_env(env, key=key))
    if wait:
        try:
            node.wait_ready()
        except BaseException:
            node.kill()
            raise
    return node


@contextlib.contextmanager
def running_node(
    workdir: Path,
    *extra_args: str,
    key: str | None,
    db: Path | None = None,
    env: Mapping[str, str] | None = None,
    url: str | None = None,
) -> Iterator[NodeProcess]:
    """A ready node for the duration of the block; killed afterwards if still running."""
    node = start_node(workdir, *extra_args, key=key, db=db, env=env, url=url)
    try:
        yield node
    finally:
        node.kill()


@contextlib.contextmanager
def killing(*processes: NodeProcess) -> Iterator[None]:
    """Kill every process given that still runs when the block ends."""
    try:
        yield
    finally:
        for p in processes:
            p.kill()


@dataclass
class CounterLoad:
    """What happened to HTTP clients adding 1 to the example counter until a signal."""

    acked: list[list[int]]
    """Counter values acknowledged, per client, in order."""
    sent: list[int]
    """Requests sent, per client (acknowledged or not)."""
    endings: list[str]
    """Why each client stopped early (an error reply or a connection error)."""
    exit: NodeExit

    @property
    def values(self) -> list[int]:
        """Every acknowledged value."""
        return [v for per_client in self.acked for v in per_client]


def signal_under_counter_load(
    node: NodeProcess, *, clients: int, until_acked: int, sig: int
) -> CounterLoad:
    """Run ``clients`` threads adding 1 to ``examples/counter`` over HTTP; once ``until_acked``
    adds are acknowledged, send ``sig`` to the node and wait for the clients to stop."""
    acked: list[list[int]] = [[] for _ in range(clients)]
    sent = [0] * clients
    endings: list[str] = []
    stop = threading.Event()
    add_url = f"{node.url}/v1/systems/examples/actors/counter/actions/add"

    def client(i: int) -> None:
        while not stop.is_set():
            sent[i] += 1
            try:
                status, reply = http_post_json(add_url, {"payload": 1}, timeout=10.0)
            except (OSError, ValueError) as exc:  # refused, reset, closed mid-reply
                endings.append(f"{type(exc).__name__}: {exc}")
                return
            if status != 200 or not isinstance(reply, dict):
                endings.append(f"{status} {reply}")
                return
            acked[i].append(reply["value"])

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: sum(map(len, acked)) >= until_acked,
                 f"{until_acked} acknowledged adds", describe=node.describe)
        gone = node.stop(sig)
    finally:
        stop.set()
        for t in threads:
            t.join(15.0)
    assert not any(t.is_alive() for t in threads), "a load client did not stop"
    return CounterLoad(acked, sent, endings, gone)
