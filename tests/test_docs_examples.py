"""The SDK guide's examples: every program in examples/sdk runs and prints what the guide says,
and every code block of docs/sdk.md marked as coming from an example file is that file's code.

Marking: in an example file, a region is the lines between ``# --8<-- [start:NAME]`` and
``# --8<-- [end:NAME]`` (dedented); in docs/sdk.md, the line
``<!-- example: examples/sdk/FILE.py#NAME -->`` right before a python block says that the block
is that region, verbatim (``#NAME`` omitted: the whole file).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "sdk"
DOC = ROOT / "docs" / "sdk.md"
TIMEOUT_S = 60

_START = re.compile(r"^\s*# --8<-- \[start:([\w-]+)\]\s*$")
_END = re.compile(r"^\s*# --8<-- \[end:([\w-]+)\]\s*$")
_MARK = re.compile(r"^<!-- example: (examples/sdk/[\w.-]+\.py)(?:#([\w-]+))? -->$")
_FENCE = re.compile(r"^(\s*)```(\w*)\s*$")

EXPECTED_OUTPUT: dict[str, list[str]] = {
    "counter.py": [
        "add 5 -> 5",
        "add 2 -> 7",
        "state: Counter(value=7, history=[5, 2])",
        "stored revision: 2",
        "failed: ValueError refusing to add 100",
        "traceback names the handler: True",
        "state after failure: Counter(value=7, history=[5, 2])",
        "timeout_ms: demo/counter.slow: no reply within 50 ms",
        "move_on_after cancelled the call: True",
        "counter still answers: 7",
        "whoami: {'caller': None, 'metadata': {'user': 'ada'}}",
        "after casts: 118",
        "reset -> 118",
        "ticker ticked: True",
    ],
    "shopping_cart.py": [
        "refs: ActorRef(shop/cart-alice<cart>) ActorRef(shop/cart-bob<cart>) "
        "ActorRef(shop/cart-carol<cart>)",
        "alice lines: 2",
        "bob lines: 1",
        "receipt: Receipt(cart='cart-alice', lines=2, total_cents=230)",
        "rejected: cart is checked out",
        "rejected: cart is empty",
        "alice state: Cart(items={'apple': Item(sku='apple', qty=3, price_cents=50), "
        "'pear': Item(sku='pear', qty=1, price_cents=80)}, checked_out=True)",
        "the template itself cannot be invoked",
        "passivated: 3 active now: 0",
        "bob after reactivation: 3",
    ],
    "pooled_worker.py": [
        "jobs done: 9",
        "instances used: ['hasher#0', 'hasher#1', 'hasher#2']",
        "ran in parallel: True",
        "whoami: hasher#0",
    ],
    "broadcast.py": [
        "published: SPAWNMESH SHIPS",
        "moderator rejected: a draft needs a title",
        "archive: ['SPAWNMESH SHIPS']",
        "reader-1: ['SPAWNMESH SHIPS']",
        "reader-2: ['SPAWNMESH SHIPS']",
        "stats: Stats(published=1, reported_by='news/desk')",
        "desk: Desk(submitted=2, published=1)",
        "broadcast from outside, deliveries: 3",
        "archive: ['SPAWNMESH SHIPS', 'FROM OUTSIDE']",
        "inactive reader-3 saw: []",
    ],
}


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SPAWNMESH_* settings (examples use the defaults)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPAWNMESH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["SPAWNMESH_CLUSTER_GOSSIP_PORT"] = "0"  # examples run side by side: no fixed port
    env["SPAWNMESH_CLUSTER_PEER_PORT"] = "0"
    env.update(extra)
    return env


def regions(path: Path) -> dict[str, str]:
    """The named regions of an example file, dedented; '' is the whole file."""
    out: dict[str, str] = {"": path.read_text()}
    open_name: str | None = None
    lines: list[str] = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if m := _START.match(line):
            assert open_name is None, f"{path.name}:{no}: region {m[1]} inside {open_name}"
            assert m[1] not in out, f"{path.name}:{no}: region {m[1]} twice"
            open_name, lines = m[1], []
        elif m := _END.match(line):
            assert m[1] == open_name, f"{path.name}:{no}: end of {m[1]}, open is {open_name}"
            out[open_name] = textwrap.dedent("\n".join(lines) + "\n")
            open_name = None
        elif open_name is not None:
            lines.append(line)
    assert open_name is None, f"{path.name}: region {open_name} is never closed"
    return out


def doc_blocks() -> list[tuple[int, str, str | None, str]]:
    """Every fenced block of docs/sdk.md: (line, language, example source or None, code)."""
    lines = DOC.read_text().splitlines()
    blocks: list[tuple[int, str, str | None, str]] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang, start = m[1], m[2], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):])
            i += 1
        assert i < len(lines), f"docs/sdk.md:{start + 1}: unclosed code block"
        i += 1
        prev = start - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        source = None
        if prev >= 0 and lines[prev].startswith("<!-- example:"):
            mark = _MARK.match(lines[prev].strip())
            assert mark, f"docs/sdk.md:{prev + 1}: malformed example marker {lines[prev]!r}"
            source = f"{mark[1]}#{mark[2] or ''}"
        blocks.append((start + 1, lang, source, "\n".join(body) + "\n"))
    return blocks


def _example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.py"))


# ------------------------------------------------------------------ docs stay in sync


def test_every_marked_block_is_its_example_verbatim() -> None:
    marked = [(line, src, code) for line, _, src, code in doc_blocks() if src is not None]
    assert len(marked) >= 10, "the guide should quote its examples"
    for line, src, code in marked:
        path, _, name = src.partition("#")
        file = ROOT / path
        assert file.is_file(), f"docs/sdk.md:{line}: {path} does not exist"
        found = regions(file)
        assert name in found, f"docs/sdk.md:{line}: {path} has no region {name!r}"
        assert code == found[name], (
            f"docs/sdk.md:{line} differs from {src}; copy the region into the guide again"
        )


def test_every_example_and_region_is_in_the_guide() -> None:
    quoted = {src for _, _, src, _ in doc_blocks() if src is not None}
    for name in _example_files():
        for region in regions(EXAMPLES / name):
            if region:
                assert f"examples/sdk/{name}#{region}" in quoted, (
                    f"region {region!r} of {name} is not quoted in docs/sdk.md"
                )
        assert f"examples/sdk/{name}" in DOC.read_text(), f"{name} is not named in the guide"


def test_unmarked_python_blocks_compile() -> None:
    for line, lang, src, code in doc_blocks():
        if lang == "python" and src is None:
            compile(code, f"docs/sdk.md:{line}", "exec")


def test_marked_blocks_are_python() -> None:
    for line, lang, src, _ in doc_blocks():
        if src is not None:
            assert lang == "python", f"docs/sdk.md:{line}: an example block must be ```python"


# ------------------------------------------------------------------ the programs run


@pytest.fixture(scope="module")
def example_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every example program at once (they are independent), each as its own process."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=_clean_env(),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in EXPECTED_OUTPUT
    }
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT_S)
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def test_every_example_is_checked() -> None:
    assert sorted([*EXPECTED_OUTPUT, "plain_program.py"]) == _example_files()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_OUTPUT))
def test_example_runs_and_prints(
    name: str, example_runs: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    run = example_runs[name]
    assert run.returncode == 0, f"{name} exited {run.returncode}:\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stdout.splitlines()
    for expected in EXPECTED_OUTPUT[name]:
        assert expected in lines, f"{name} did not print {expected!r}; it printed:\n{run.stdout}"
    assert lines == EXPECTED_OUTPUT[name], "output changed: update EXPECTED_OUTPUT and the guide"


def _line_reader(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """A queue of the process's stdout lines (None at EOF), filled by a daemon thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_until(lines: queue.Queue[str | None], pattern: str, deadline: float) -> re.Match[str]:
    """Take stdout lines until one matches ``pattern`` (or fail at EOF or the deadline)."""
    seen: list[str] = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if m := re.search(pattern, line):
            return m
    pytest.fail(f"no line matching {pattern!r}; output so far:\n{''.join(seen)}")


def _post(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_plain_program_serves_until_sigint() -> None:
    """serve() hosts the system, answers over the ops API, and exits 0 on SIGINT."""
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "plain_program.py")], cwd=ROOT,
        env=_clean_env(SPAWNMESH_STATESTORE_URL="memory://", SPAWNMESH_OPS_PORT="0"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        lines = _line_reader(proc)
        url = _read_until(lines, r"ops/admin\s+(http://127\.0\.0\.1:\d+)", deadline)[1]
        _read_until(lines, r"actor\s+plain/greeter \[named\]: hello", deadline)
        invoke = f"{url}/v1/systems/plain/actors/greeter/actions/hello"
        status, reply = _post(invoke, {"payload": {"name": "Ada"}})
        assert (status, reply["value"]) == (200, "hello, Ada! (#1)")
        status, reply = _post(invoke, {"payload": {"name": "Bob", "punctuation": "?"}})
        assert (status, reply["value"]) == (200, "hello, Bob? (#2)")
        status, reply = _post(invoke, {"payload": {"nom": "Ada"}})
        assert status == 400 and "invalid_argument" in json.dumps(reply), reply
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT_S)
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_output_shown_in_the_guide_is_what_the_examples_print() -> None:
    printed = {line for lines in EXPECTED_OUTPUT.values() for line in lines}
    for line, lang, _, code in doc_blocks():
        if lang == "text":
            for out in code.splitlines():
                assert out in printed, f"docs/sdk.md:{line}: {out!r} is not printed by an example"
