"""Tests for the supervisor tree, all on trio's MockClock (virtual time, no real sleeps)."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from spawnmesh.errors import SpawnmeshError
from spawnmesh.supervisor import (
    ChildSpec,
    Restart,
    RestartIntensityExceeded,
    Strategy,
    Supervisor,
)

Log = list[tuple[str, str, float]]
Step = tuple[str, float]  # ("run"|"fail"|"return"|"startfail", seconds)
ChildFn = Callable[..., Awaitable[None]]


def scripted(log: Log, name: str, *plan: Step) -> ChildFn:
    """A child whose n-th incarnation follows plan[n] (then runs for ever), logging events."""
    steps = iter(plan)

    async def fn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        kind, after = next(steps, ("run", math.inf))
        if kind == "startfail":
            await trio.sleep(after)
            log.append(("startfail", name, trio.current_time()))
            raise ValueError(f"{name} cannot start")
        task_status.started()
        log.append(("start", name, trio.current_time()))
        try:
            await trio.sleep(after)
        except trio.Cancelled:
            log.append(("cancelled", name, trio.current_time()))
            raise
        log.append((kind, name, trio.current_time()))
        if kind == "fail":
            raise ValueError(f"{name} failed")

    return fn


def starts(log: Log, name: str | None = None) -> list[tuple[str, float]]:
    return [(n, t) for kind, n, t in log if kind == "start" and name in (None, n)]


async def run_for(sup: Supervisor, seconds: float) -> None:
    """Run ``sup`` for ``seconds`` of virtual time, then cancel it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_one_for_one_restarts_only_the_failed_child(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    log: Log = []
    sup = Supervisor(
        "s",
        [ChildSpec("a", scripted(log, "a", ("fail", 1.0))), ChildSpec("b", scripted(log, "b"))],
    )
    with caplog.at_level(logging.WARNING, logger="spawnmesh.supervisor"):
        await run_for(sup, 5.0)
    assert starts(log) == [("a", 0.0), ("b", 0.0), ("a", 1.05)]
    assert sup.restarts == {"a": 1, "b": 0}
    assert sup.child_names() == ["a", "b"]
    [record] = [r for r in caplog.records if "restart attempt" in r.getMessage()]
    assert "child a failed: ValueError('a failed')" in record.getMessage()
    assert "attempt 1 in 0.050s" in record.getMessage()


async def test_one_for_all_restarts_everyone_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sup = Supervisor(
        "s",
        [
            ChildSpec("a", scripted(log, "a")),
            ChildSpec("b", scripted(log, "b", ("run", 0.5), ("fail", 1.0))),
            ChildSpec("c", scripted(log, "c")),
        ],
        strategy=Strategy.ONE_FOR_ALL,
        backoff_initial_s=0.25,
    )
    await run_for(sup, 5.0)
    assert log[:3] == [("start", n, 0.0) for n in "abc"]
    # b returns at 0.5 (permanent: restart all), fails at 1.75+1.0: restart all again.
    assert sorted(e for e in log[3:6]) == [
        ("cancelled", "a", 0.5),
        ("cancelled", "c", 0.5),
        ("run", "b", 0.5),
    ]
    assert log[6:9] == [("start", n, 0.75) for n in "abc"]
    assert log[9] == ("fail", "b", 1.75)
    assert log[12:15] == [("start", n, 2.25) for n in "abc"]  # second backoff: 0.25 * 2
    assert sup.restarts == {"a": 0, "b": 2, "c": 0}


async def test_restart_types(autojump_clock: trio.testing.MockClock) -> None:
    log: Log = []
    specs = [
        ChildSpec(
            f"{restart.value}-{kind}",
            scripted(log, f"{restart.value}-{kind}", (kind, 1.0)),
            restart,
        )
        for restart in Restart
        for kind in ("return", "fail")
    ]
    sup = Supervisor("s", specs)
    await run_for(sup, 5.0)
    restarted = {name for name, t in starts(log) if t > 0}
    assert restarted == {"permanent-return", "permanent-fail", "transient-fail"}
    assert sup.child_names() == ["permanent-return", "permanent-fail", "transient-fail"]


async def test_backoff_grows_exponentially_is_capped_and_resets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    plan = [("fail", 0.0)] * 5 + [("fail", 30.0), ("fail", 0.0)]
    sup = Supervisor(
        "s",
        [ChildSpec("a", scripted(log, "a", *plan))],
        max_restarts=100,
        within_s=20.0,
        backoff_initial_s=1.0,
        backoff_factor=2.0,
        backoff_max_s=5.0,
    )
    await run_for(sup, 100.0)
    # delays 1, 2, 4, 5 (capped), 5; then it ran 30s >= within_s: back to 1, then 2.
    assert [t for _, t in starts(log)] == [0.0, 1.0, 3.0, 7.0, 12.0, 17.0, 48.0, 50.0]


async def test_escalation_makes_parent_restart_the_subtree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sub = Supervisor(
        "sub",
        [
            ChildSpec("steady", scripted(log, "steady")),
            ChildSpec("flaky", scripted(log, "flaky", *[("fail", 0.0)] * 3)),
        ],
        max_restarts=2,
        within_s=10.0,
        backoff_initial_s=0.5,
    )
    root = Supervisor("root", [ChildSpec("sub", sub.run)], backoff_initial_s=1.0)
    await run_for(root, 10.0)
    # flaky fails at 0, 0.5, 1.5: the third failure escalates; steady is stopped with it.
    assert ("cancelled", "steady", 1.5) in log
    assert starts(log, "steady") == [("steady", 0.0), ("steady", 2.5)]  # root backoff 1.0
    assert starts(log, "flaky")[-1] == ("flaky", 2.5)  # then runs for ever
    assert root.restarts == {"sub": 1}
    assert sub.child_names() == ["steady", "flaky"]


async def test_escalation_goes_up_the_tree(autojump_clock: trio.testing.MockClock) -> None:
    log: Log = []
    sub = Supervisor(
        "sub",
        [ChildSpec("flaky", scripted(log, "flaky", *[("fail", 0.0)] * 100))],
        max_restarts=1,
    )
    root = Supervisor("root", [ChildSpec("sub", sub.run)], max_restarts=1)
    with pytest.raises(RestartIntensityExceeded) as info:
        await root.run()
    err = info.value
    assert isinstance(err, SpawnmeshError) and err.code == "restart_intensity"
    assert (err.supervisor, err.child) == ("root", "sub")
    inner = err.__cause__
    assert isinstance(inner, RestartIntensityExceeded) and inner.supervisor == "sub"
    assert isinstance(inner.__cause__, ValueError) and inner.last_error is inner.__cause__
    assert root.restarts == {"sub": 1}
    assert len(starts(log)) == 4  # two runs of sub, each start + one restart; then nothing


async def test_startup_failure_is_retried_before_the_next_child(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sup = Supervisor(
        "s",
        [
            ChildSpec("a", scripted(log, "a", ("startfail", 0.0), ("startfail", 0.0))),
            ChildSpec("b", scripted(log, "b")),
        ],
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert trio.current_time() == 0.05 + 0.1  # two backoffs, then started
        nursery.cancel_scope.cancel()
    assert [kind for kind, _, _ in log[:4]] == ["startfail", "startfail", "start", "start"]
    assert starts(log) == [("a", 0.05 + 0.1), ("b", 0.05 + 0.1)]  # a is up before b starts
    assert sup.restarts == {"a": 2, "b": 0}


async def test_startup_that_never_succeeds_escalates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sup = Supervisor("s", [ChildSpec("a", scripted(log, "a", *[("startfail", 0.0)] * 100))])
    with pytest.raises(RestartIntensityExceeded) as info:
        await sup.run()
    assert isinstance(info.value.__cause__, ValueError)
    assert len(log) == 6  # 5 restarts allowed, the 6th failure escalates


async def test_start_child_at_run_time(autojump_clock: trio.testing.MockClock) -> None:
    log: Log = []
    sup = Supervisor("s", [ChildSpec("a", scripted(log, "a"))])
    with pytest.raises(RuntimeError):
        await sup.start_child(ChildSpec("early", scripted(log, "early")))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1.0)
        await sup.start_child(ChildSpec("late", scripted(log, "late", ("fail", 1.0))))
        assert sup.child_names() == ["a", "late"]
        with pytest.raises(ValueError, match="duplicate"):
            await sup.start_child(ChildSpec("a", scripted(log, "a")))
        await trio.sleep(5.0)
        nursery.cancel_scope.cancel()
    assert starts(log, "late") == [("late", 1.0), ("late", 2.05)]
    assert sup.restarts == {"a": 0, "late": 1}


async def test_cancellation_stops_everything_without_restarts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: Log = []
    sup = Supervisor(
        "s",
        [
            ChildSpec("a", scripted(log, "a")),
            ChildSpec("b", scripted(log, "b", ("fail", 1.0))),  # in backoff when cancelled
        ],
        backoff_initial_s=10.0,
    )
    await run_for(sup, 2.0)
    assert ("cancelled", "a", 2.0) in log
    assert starts(log) == [("a", 0.0), ("b", 0.0)]  # b's restart was due at 11.0
    assert sup.restarts == {"a": 0, "b": 1}


async def test_base_exceptions_are_never_swallowed(autojump_clock: trio.testing.MockClock) -> None:
    class Fatal(BaseException):
        pass

    async def fatal(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep(1.0)
        raise Fatal

    log: Log = []
    sup = Supervisor("s", [ChildSpec("f", fatal), ChildSpec("a", scripted(log, "a"))])
    with pytest.raises(BaseExceptionGroup) as info:
        await sup.run()
    assert info.value.split(Fatal)[0] is not None
    assert ("cancelled", "a", 1.0) in log
    assert sup.restarts == {"f": 0, "a": 0}


async def test_nested_tree(autojump_clock: trio.testing.MockClock) -> None:
    log: Log = []
    inner = Supervisor(
        "inner",
        [ChildSpec("x", scripted(log, "x")), ChildSpec("y", scripted(log, "y", ("fail", 1.0)))],
        strategy=Strategy.ONE_FOR_ALL,
    )
    root = Supervisor("root", [ChildSpec("inner", inner.run), ChildSpec("z", scripted(log, "z"))])
    await run_for(root, 3.0)
    assert starts(log) == [("x", 0.0), ("y", 0.0), ("z", 0.0), ("x", 1.05), ("y", 1.05)]
    assert root.restarts == {"inner": 0, "z": 0}
    assert inner.restarts == {"x": 0, "y": 1}
    assert {n for kind, n, _ in log if kind == "cancelled"} == {"x", "y", "z"}


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError):
        Supervisor("s", max_restarts=-1)
    with pytest.raises(ValueError):
        Supervisor("s", backoff_factor=0.5)
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor("s", [ChildSpec("a", scripted([], "a")), ChildSpec("a", scripted([], "a"))])


@settings(max_examples=75, deadline=None)
@given(
    max_restarts=st.integers(0, 4),
    within_s=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
    schedules=st.lists(
        st.lists(st.integers(0, 12).map(lambda k: k / 4), max_size=8), min_size=1, max_size=3
    ),
)
def test_restarts_in_any_window_never_exceed_max(
    max_restarts: int, within_s: float, schedules: list[list[float]]
) -> None:
    """For random failure schedules: a restart is only made while the window allows it, and
    escalation happens exactly when a failure would push the window past max_restarts."""
    failures: list[float] = []

    def child(runs: list[float]) -> ChildFn:
        pending = iter(runs)

        async def fn(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            run = next(pending, None)
            if run is None:
                await trio.sleep_forever()
            else:
                await trio.sleep(run)
                failures.append(trio.current_time())
                raise ValueError("scheduled failure")

        return fn

    sup = Supervisor(
        "p",
        [ChildSpec(f"c{i}", child(runs)) for i, runs in enumerate(schedules)],
        max_restarts=max_restarts,
        within_s=within_s,
        backoff_initial_s=0.01,
        backoff_max_s=0.1,
    )
    escalated = False

    async def main() -> None:
        nonlocal escalated
        with trio.move_on_after(1000.0):
            try:
                await sup.run()
            except RestartIntensityExceeded:
                escalated = True

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    def in_window(i: int) -> int:
        return sum(1 for t in failures[: i + 1] if t > failures[i] - within_s)

    failures.sort()
    restarted = sum(sup.restarts.values())
    assert all(in_window(i) <= max_restarts for i in range(restarted))
    if escalated:
        assert in_window(restarted) > max_restarts
    else:
        assert restarted == len(failures)


async def test_a_configuration_error_is_not_restarted() -> None:
    """A child failing on its configuration (a port taken, a path unwritable) would fail the
    same way at every restart: the supervisor escalates at once, the ConfigError as cause."""
    from spawnmesh.errors import ConfigError

    runs = 0

    async def misconfigured(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal runs
        runs += 1
        raise ConfigError("ops.port", "cannot bind: Address already in use")

    sup = Supervisor("node", [ChildSpec("ops-http", misconfigured)])
    with pytest.raises(RestartIntensityExceeded) as caught:
        await sup.run()
    assert runs == 1
    assert isinstance(caught.value.last_error, ConfigError)
