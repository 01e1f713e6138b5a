"""Core semantics: retries keep their checkpoints, groups, options, pickling, config,
interrupts, sync forms of map and group, and forgotten awaits."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

import engine

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from _fakes import FakeSleep

#: How many times each body ran, by name (reset per test).
RAN: Counter[str] = Counter()
#: How many attempts of ``flaky_parent`` fail before one succeeds (set per test).
FAILS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    RAN.clear()
    FAILS.clear()
    yield
    RAN.clear()
    FAILS.clear()


class Flaky(Exception):
    pass


# -- retries keep their checkpoints ---------------------------------------------


@engine.task
async def leaf(x: int) -> int:
    RAN[f"leaf-{x}"] += 1
    return x * 10


@engine.task
async def breaks(x: int) -> int:
    RAN["breaks"] += 1
    if RAN["breaks"] <= FAILS.get("breaks", 0):
        raise Flaky(f"breaks({x}) failed")
    return -x


@engine.trace
def lookup(x: int) -> int:
    RAN[f"lookup-{x}"] += 1
    return x + 1


@engine.trace
async def alookup(x: int) -> int:
    RAN[f"alookup-{x}"] += 1
    await asyncio.sleep(0)
    return x + 2


@engine.task(retries=3)
async def flaky_parent(n: int) -> int:
    RAN["parent"] += 1
    # The same call twice: its own occurrence, in every attempt.
    total = sum(await asyncio.gather(*(leaf(i) for i in range(n)), leaf(0)))
    total += lookup(1) + lookup(1) + await alookup(2)
    if RAN["parent"] <= FAILS.get("parent", 0):
        raise Flaky(f"attempt {RAN['parent']} failed after its children")
    return total


@engine.task
async def root_of_flaky(n: int) -> int:
    value: int = await flaky_parent(n)
    return value


def _expected(n: int) -> int:
    return sum(i * 10 for i in range(n)) + 0 + 2 + 2 + 4


async def _action_rows(eng: engine.Engine, run_id: str) -> list[tuple[str, str, str, str]]:
    journal = await eng.journal()
    rows = await journal.read(
        lambda db: db.execute(
            "SELECT key, task, state, kind FROM actions WHERE run_id=? ORDER BY rowid", (run_id,)
        ).fetchall()
    )
    return [(k, t, s, kind) for k, t, s, kind in rows]


@pytest.mark.parametrize("store", ["journal", "memory"])
async def test_a_retried_action_replays_the_children_and_traces_of_earlier_attempts(
    store: str, tmp_path: Path, fake_sleep: FakeSleep
) -> None:
    FAILS["parent"] = 2
    where = "memory" if store == "memory" else str(tmp_path / "j.db")
    async with engine.Engine(store=where, sleep=fake_sleep) as eng:
        run = await eng.run(root_of_flaky, 4)
        assert run.result == _expected(4)
        rows = await _action_rows(eng, run.id) if store == "journal" else []
    # Three attempts of the parent; every child and trace body ran once.
    assert RAN["parent"] == 3
    assert {k: v for k, v in RAN.items() if k != "parent"} == {
        "leaf-0": 2,  # called twice per attempt (two occurrences), run twice in all
        "leaf-1": 1,
        "leaf-2": 1,
        "leaf-3": 1,
        "lookup-1": 2,
        "alookup-2": 1,
    }
    leaf_counts = run.counters["leaf"]
    assert (leaf_counts.succeeded, leaf_counts.replayed, leaf_counts.pending) == (5, 10, 0)
    assert run.counters["flaky_parent"].retries == 2
    if store == "journal":
        children = [r for r in rows if r[1] == "leaf"]
        traces = [r for r in rows if r[3] == "trace"]
        # One row per call of one attempt: nothing recorded twice.
        assert len(children) == 5 and len({r[0] for r in children}) == 5
        assert len(traces) == 3 and len({r[0] for r in traces}) == 3
        assert all(r[2] == "succeeded" for r in children + traces)


@engine.task(retries=2)
async def parent_with_a_failing_child() -> list[int]:
    RAN["parent"] += 1
    first: int = await leaf(1)
    second: int = await breaks(2)
    return [first, second]


async def test_a_child_that_failed_runs_again_and_its_succeeded_sibling_does_not(
    tmp_path: Path, fake_sleep: FakeSleep
) -> None:
    FAILS["breaks"] = 1
    async with engine.Engine(store=tmp_path / "j.db", sleep=fake_sleep) as eng:
        run = await eng.run(parent_with_a_failing_child)
        assert run.result == [10, -2]
        rows = await _action_rows(eng, run.id)
    assert (RAN["parent"], RAN["leaf-1"], RAN["breaks"]) == (2, 1, 2)
    # The failed child kept its key: its retry is the same action, now succeeded.
    breaks_rows = [(k, s) for k, t, s, _ in rows if t == "breaks"]
    assert [s for _, s in breaks_rows] == ["failed", "succeeded"]
    assert len({k for k, _ in breaks_rows}) == 1
    assert [s for _, t, s, _ in rows if t == "leaf"] == ["succeeded"]


@engine.trace
def step(i: int) -> int:
    RAN["step"] += 1
    return i


@engine.task(retries=10)
async def crash_recovery(n: int) -> int:
    """A loop of checkpoints that crashes now and then (Flyte's crash-recovery flow)."""
    RAN["attempt"] += 1
    done = 0
    for i in range(n):
        done += step(i)
        if i == 10 * RAN["attempt"] and RAN["attempt"] <= 4:
            raise Flaky(f"crashed at step {i}")
    return done


@pytest.mark.parametrize("store", ["journal", "memory"])
async def test_traces_are_checkpoints_for_retries(store: str, tmp_path: Path, fake_sleep: FakeSleep) -> None:
    where = "memory" if store == "memory" else str(tmp_path / "j.db")
    async with engine.Engine(store=where, sleep=fake_sleep) as eng:
        run = await eng.run(crash_recovery, 60)
    assert run.result == sum(range(60))
    assert RAN["attempt"] == 5  # it crashed four times
    assert RAN["step"] == 60  # every step ran once over all attempts (not 11 + 21 + 31 + 41 + 60)


async def test_a_resumed_run_replays_what_a_retried_action_did(tmp_path: Path, fake_sleep: FakeSleep) -> None:
    FAILS["parent"] = 4  # more than its retries: the first run fails
    async with engine.Engine(store=tmp_path / "j.db", sleep=fake_sleep) as eng:
        run = await eng.run(root_of_flaky, 3)
    assert run.status == "failed"
    assert RAN["parent"] == 4 and RAN["leaf-1"] == 1 and RAN["lookup-1"] == 2
    before = dict(RAN)
    FAILS.clear()
    async with engine.Engine(store=tmp_path / "j.db", sleep=fake_sleep) as eng:
        again = await eng.resume(run.id)
        rows = await _action_rows(eng, run.id)
    assert again.result == _expected(3)
    # The parent ran once more; its children and traces came from the journal.
    assert RAN["parent"] == before["parent"] + 1
    assert {k: v for k, v in RAN.items() if k != "parent"} == {
        k: v for k, v in before.items() if k != "parent"
    }
    leaf_rows = [r for r in rows if r[1] == "leaf"]
    assert len(leaf_rows) == len({r[0] for r in leaf_rows}) == 4


@engine.task(retries=1)
def sync_flaky_parent() -> int:
    RAN["parent"] += 1
    value: int = leaf(5) + lookup(5)  # type: ignore[operator]
    if RAN["parent"] == 1:
        raise Flaky("first attempt")
    return value


@pytest.mark.parametrize("store", ["journal", "memory"])
async def test_a_retried_sync_task_keeps_its_checkpoints(store: str, tmp_path: Path, fake_sleep: FakeSleep) -> None:
    where = "memory" if store == "memory" else str(tmp_path / "j.db")
    async with engine.Engine(store=where, sleep=fake_sleep) as eng:
        run = await eng.run(sync_flaky_parent)
    assert run.result == 56
    assert (RAN["parent"], RAN["leaf-5"], RAN["lookup-5"]) == (2, 1, 1)


# -- Retry(on=...) and option errors --------------------------------------------


@engine.task(retries=engine.Retry(2, on=[Flaky, ConnectionError]))
async def retried_on_a_list(kind: str) -> str:
    RAN[kind] += 1
    if RAN[kind] == 1:
        raise Flaky("once") if kind == "flaky" else KeyError(kind)
    return kind


async def test_retry_on_takes_a_list_and_keeps_the_tasks_own_error(eng: engine.Engine) -> None:
    run = await eng.run(retried_on_a_list, "flaky")
    assert run.result == "flaky" and RAN["flaky"] == 2
    # Not listed: not retried, and the task's own exception is what surfaces.
    run = await eng.run(retried_on_a_list, "other")
    assert run.status == "failed" and type(run.error) is KeyError and RAN["other"] == 1


@pytest.mark.parametrize(
    "on",
    [[ValueError], {ValueError, KeyError}, (t for t in (ValueError,)), ValueError, (ValueError,)],
    ids=["list", "set", "generator", "class", "tuple"],
)
def test_retry_on_takes_any_iterable_of_exception_classes(on: Any) -> None:
    retry = engine.Retry(1, on=on)
    assert isinstance(retry.on, tuple) and ValueError in retry.on
    assert hash(retry) == hash(engine.Retry(1, on=retry.on))


@pytest.mark.parametrize("on", ["ValueError", 42, [42], [], ValueError("x"), [ValueError, int]])
def test_retry_on_refuses_anything_else(on: Any) -> None:
    with pytest.raises(engine.ConfigError, match=r"engine\.Retry on= takes exception classes"):
        engine.Retry(1, on=on)


@pytest.mark.parametrize("retries", [-1, "twice", 1.5])
def test_a_bad_retries_option_names_the_task_and_the_option(retries: Any) -> None:
    with pytest.raises(engine.ConfigError, match=r"task 'named_task': retries="):

        @engine.task(retries=retries)
        async def named_task() -> None: ...

    env = engine.Environment("env", retries=retries)
    with pytest.raises(engine.ConfigError, match=r"task 'env\.in_env': retries="):

        @env.task
        async def in_env() -> None: ...
