"""The SQL store's writer process: framing, crashes and restarts, signals, shutdown, and the
fallback to writing in the node's process when no child can start.

Real child processes on a real SQLite file (the conformance suite in test_statestore_sql runs
every dialect through the writer process as well as in process).
"""

from __future__ import annotations

import base64
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from spawnmesh.errors import StaleActivation, StatestoreUnavailable
from spawnmesh.statestore.base import StateWrite
from spawnmesh.statestore.crypto import Keyring, state_aad, state_aads
from spawnmesh.statestore.sql import SqlStateStore
from spawnmesh.statestore.writerproc import FrameBuffer, FrameError, frame
from tests.e2e import wait_for

KEY = base64.b64encode(bytes(range(32))).decode()


@asynccontextmanager
async def store_at(path: Path, **kw: Any) -> AsyncIterator[SqlStateStore]:
    kw.setdefault("keyring", Keyring.parse(KEY))
    s = SqlStateStore(f"sqlite:///{path}", **kw)
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def _until(pred: Any, what: str, timeout_s: float = 15.0) -> None:
    """Poll ``pred`` until true (a process's exit has no event to wait on here)."""
    with trio.fail_after(timeout_s):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.02)


async def ready(s: SqlStateStore) -> int:
    """Wait until the store's writer process can take batches (until then the store writes in
    the node's process); its answers so far."""
    proc = s._proc
    assert proc is not None
    with trio.fail_after(60):
        while not await proc.poll_ready():  # noqa: ASYNC110 (no event for a pipe byte)
            await trio.sleep(0.02)
    return proc.replies


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------- framing


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
)
def test_frames_come_out_whole_however_the_stream_is_cut(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(frame(b) for b in bodies)
    points = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    buf = FrameBuffer()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        buf.feed(stream[a:b])
        assert buf.missing() >= 1
        while (body := buf.pop()) is not None:
            out.append(body)
    assert out == bodies
    assert buf.pop() is None


@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["s", "sys", "\u00e9t\u00e9"]),
            st.text(max_size=20),
            st.integers(0, 2**62),
        ),
        max_size=20,
    )
)
def test_batch_sealing_matches_one_by_one(rows: list[tuple[str, str, int]]) -> None:
    """The writer process seals a batch at once (framed systems cached, one nonce read): the
    authenticated data is exactly ``state_aad``'s and every row opens under it."""
    ring = Keyring.parse(KEY)
    aads = state_aads(rows)
    assert aads == [state_aad(*r) for r in rows]
    plain = [f"{n}:{rev}".encode() for _, n, rev in rows]
    key_id, sealed = ring.seal_many(plain, aads)
    assert [ring.open(key_id, d, a) for d, a in zip(sealed, aads, strict=True)] == plain
    assert len({d[:12] for d in sealed}) == len(sealed)  # fresh nonce per row


def test_oversized_frame_is_an_error_not_an_allocation() -> None:
    buf = FrameBuffer(max_frame=100)
    buf.feed(frame(b"x" * 101))
    with pytest.raises(FrameError):
        buf.pop()


# --------------------------------------------------------------------------- lifecycle


async def test_child_starts_with_the_store_and_exits_on_close(tmp_path: Path) -> None:
    async with store_at(tmp_path / "s.db") as s:
        pid = s.writer_pid  # started by open(), not waited for
        assert pid is not None and _alive(pid)
        # until it is ready, batches are written in this process
        assert await s.save_many([StateWrite(("s", "a"), 0, b"1")]) == [1]
        before = await ready(s)
        assert await s.save_many([StateWrite(("s", "a"), 1, b"2")]) == [2]
        assert s._proc is not None and s._proc.replies == before + 1  # through the child
        assert s.writer_pid == pid
    assert not _alive(pid)


async def test_unused_child_is_stopped_at_once(tmp_path: Path) -> None:
    """A store opened and closed without a write (a CLI command) does not wait for the child's
    imports to finish."""
    s = SqlStateStore(f"sqlite:///{tmp_path / 's.db'}", keyring=Keyring.parse(KEY))
    # a child that would take 60 s to notice its stdin closed (aclose waits up to 10 s for a
    # child that was asked to write)
    s.writer_command = [sys.executable, "-c", "import time; time.sleep(60)"]
    await s.open()
    pid = s.writer_pid
    assert pid is not None
    with trio.fail_after(5):
        await s.aclose()
    assert not _alive(pid)


async def test_killed_child_fails_the_batch_and_a_new_one_takes_over(tmp_path: Path) -> None:
    """SIGKILL the child between batches: that batch fails with StatestoreUnavailable (the
    writer keeps it pending), the next starts a new child, and nothing written is lost."""
    async with store_at(tmp_path / "s.db") as s:
        await ready(s)
        assert await s.save_many([StateWrite(("s", "a"), 0, b"1")]) == [1]
        pid = s.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await _until(lambda: not _alive(pid), "child gone")
        with pytest.raises(StatestoreUnavailable, match="writer process failed"):
            await s.save_many([StateWrite(("s", "a"), 1, b"2")])
        assert await s.save_many([StateWrite(("s", "a"), 1, b"2")]) == [2]
        assert s.writer_pid not in (None, pid)  # a new child (written here while it starts)
        answered = await ready(s)
        assert await s.save_many([StateWrite(("s", "a"), 2, b"3")]) == [3]
        assert s._proc is not None and s._proc.replies == answered + 1
        got = await s.load(("s", "a"))
        assert got is not None and (got.revision, got.blob) == (3, b"3")


async def test_child_killed_mid_batch_leaves_all_or_nothing(tmp_path: Path) -> None:
    """A child killed while it writes a big batch: the transaction is all or nothing, and the
    retry either applies it or finds it applied (fenced off, never written twice)."""
    keys = [("s", f"k{i}") for i in range(5000)]
    async with store_at(tmp_path / "s.db") as s:
        await ready(s)
        assert await s.save_many([StateWrite(k, 0, b"old") for k in keys]) == [1] * len(keys)
        pid = s.writer_pid
        assert pid is not None

        async def kill_soon() -> None:
            await trio.sleep(0.005)
            os.kill(pid, signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_soon)
            try:
                first: list[Any] | None = await s.save_many(
                    [StateWrite(k, 1, b"new") for k in keys]
                )
            except StatestoreUnavailable:
                first = None
        revs = {r.revision for r in (await s.load_many(keys)).values()}  # type: ignore[union-attr]
        assert revs in ({1}, {2})  # never a torn batch
        if first is None:
            retry = await s.save_many([StateWrite(k, 1, b"new") for k in keys])
            if revs == {2}:  # it had committed before dying: the retry is fenced off
                assert all(isinstance(r, StaleActivation) for r in retry)
            else:
                assert retry == [2] * len(keys)
        got = await s.load_many(keys)
        assert len(got) == len(keys)
        assert {r.blob for r in got.values()} == {b"new"}  # type: ignore[union-attr]


async def test_child_ignores_sigint_and_sigterm(tmp_path: Path) -> None:
    """A terminal's Ctrl-C or a service manager's SIGTERM reaches the whole process group; the
    node drains through its writer process, so the child must outlive them."""
    async with store_at(tmp_path / "s.db") as s:
        await ready(s)
        assert await s.save_many([StateWrite(("s", "a"), 0, b"1")]) == [1]
        pid = s.writer_pid
        assert pid is not None and s._proc is not None
        answered = s._proc.replies
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        await trio.sleep(0.2)
        assert _alive(pid)
        assert await s.save_many([StateWrite(("s", "a"), 1, b"2")]) == [2]
        assert s.writer_pid == pid and s._proc.replies == answered + 1


def test_child_exits_when_the_node_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the node closes the child's stdin: the child exits (no orphan writer)."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, trio
        from spawnmesh.statestore.base import StateWrite
        from spawnmesh.statestore.crypto import Keyring, state_aad, state_aads
        from spawnmesh.statestore.sql import SqlStateStore

        async def main():
            s = SqlStateStore({str(f"sqlite:///{tmp_path / 's.db'}")!r},
                              keyring=Keyring.parse({KEY!r}))
            await s.open()
            assert await s.save_many([StateWrite(("s", "a"), 0, b"1")]) == [1]
            print(s.writer_pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

        trio.run(main)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    wait_for(lambda: not _alive(child), "orphaned writer process to exit", 15.0)


async def test_no_child_can_start_falls_back_to_writing_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Children that die before they are ready never cost a write: batches are written in the
    node's process meanwhile, and after three such deaths the store stops starting them."""
    s = SqlStateStore(f"sqlite:///{tmp_path / 's.db'}", keyring=Keyring.parse(KEY))
    s.writer_command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    await s.open()
    try:
        rev = 0
        with trio.fail_after(60):
            while s._proc is not None:
                assert await s.save_many([StateWrite(("s", "a"), rev, b"%d" % rev)]) == [rev + 1]
                rev += 1
                await trio.sleep(0.02)
        assert "writing state in the node's process instead" in caplog.text
        assert s.writer_pid is None
        assert await s.save_many([StateWrite(("s", "a"), rev, b"last")]) == [rev + 1]
        got = await s.load(("s", "a"))
        assert got is not None and (got.revision, got.blob) == (rev + 1, b"last")
    finally:
        await s.aclose()


async def test_invalid_batch_is_refused_by_the_child_like_in_process(tmp_path: Path) -> None:
    from spawnmesh.errors import InvalidArgument

    async with store_at(tmp_path / "s.db") as s:
        await ready(s)
        with pytest.raises(InvalidArgument, match="more than one write"):
            await s.save_many([StateWrite(("s", "a"), 0, b"1"), StateWrite(("s", "a"), 0, b"2")])
        with pytest.raises(InvalidArgument, match="negative base"):
            await s.save_many([StateWrite(("s", "b"), -1, b"1")])
        assert await s.save_many([StateWrite(("s", "a"), 0, b"1")]) == [1]  # still serving


async def test_concurrent_batches_share_one_child(tmp_path: Path) -> None:
    """Overlapping save_many calls (the writer's lanes) each get their own reply."""
    async with store_at(tmp_path / "s.db") as s:
        answered = await ready(s)
        results: dict[int, list[Any]] = {}

        async def batch(i: int) -> None:
            results[i] = await s.save_many(
                [StateWrite(("s", f"b{i}-{j}"), 0, b"x") for j in range(50 + i)]
            )

        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(batch, i)
        assert {i: len(r) for i, r in results.items()} == {i: 50 + i for i in range(6)}
        assert all(r == [1] * len(r) for r in results.values())
        assert s.writes == sum(50 + i for i in range(6))
        assert s._proc is not None and s._proc.replies == answered + 6


async def test_auto_mode_starts_the_child_with_the_write_load(tmp_path: Path) -> None:
    """``statestore.writer_process = auto``: no second interpreter for a light node; it starts
    once enough rows were written here (or one big batch arrives)."""
    async with store_at(tmp_path / "s.db", writer_process_after_rows=50) as s:
        assert s.writer_pid is None  # not with open()
        for i in range(4):
            assert await s.save_many([StateWrite(("s", f"a{i}"), 0, b"x")] * 1) == [1]
        assert s.writer_pid is None  # 4 rows: still light
        batch = [StateWrite(("s", f"b{i}"), 0, b"x") for i in range(60)]
        assert await s.save_many(batch) == [1] * 60  # written here while the child starts
        assert s.writer_pid is not None
        answered = await ready(s)
        assert await s.save_many([StateWrite(("s", "a0"), 1, b"y")]) == [2]
        assert s._proc is not None and s._proc.replies == answered + 1


async def test_auto_mode_gives_up_for_good_on_a_child_that_cannot_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = SqlStateStore(
        f"sqlite:///{tmp_path / 's.db'}", keyring=Keyring.parse(KEY), writer_process_after_rows=1
    )
    s.writer_command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    await s.open()
    try:
        with trio.fail_after(60):
            for rev in range(60):
                assert await s.save_many([StateWrite(("s", "a"), rev, b"v")]) == [rev + 1]
                await trio.sleep(0.02)
        assert caplog.text.count("writing state in the node's process instead") == 1
        assert s.writer_pid is None
    finally:
        await s.aclose()
