"""Core semantics: retries keep their checkpoints, groups, options, pickling, config,
interrupts, sync forms of map and group, and forgotten awaits."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pytest

import engine
from engine._config import SSHTarget

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


@engine.task
async def slow_leaf(x: int) -> int:
    RAN["slow_leaf"] += 1
    await asyncio.sleep(0.05)
    return x


@engine.task(retries=1)
async def gather_with_a_failing_sibling() -> list[int]:
    RAN["parent"] += 1
    return list(await asyncio.gather(slow_leaf(1), breaks(2)))


async def test_a_sibling_left_running_by_a_failed_attempt_is_waited_for_not_run_again(
    tmp_path: Path, fake_sleep: FakeSleep
) -> None:
    FAILS["breaks"] = 1
    async with engine.Engine(store=tmp_path / "j.db", sleep=fake_sleep) as eng:
        run = await eng.run(gather_with_a_failing_sibling)
        assert run.result == [1, -2]
        rows = await _action_rows(eng, run.id)
    assert (RAN["parent"], RAN["slow_leaf"], RAN["breaks"]) == (2, 1, 2)
    assert [s for _, t, s, _ in rows if t == "slow_leaf"] == ["succeeded"]
    counts = run.counters["slow_leaf"]
    assert (counts.succeeded, counts.replayed, counts.pending, counts.running) == (1, 1, 0, 0)


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


# -- engine.group labels actions where they start --------------------------------


async def _groups_of(eng: engine.Engine, main: engine.Task[[], Any]) -> dict[int, str | None]:
    """Run ``main`` and give the group of each ``leaf`` action, by its argument."""
    events = eng.events(kinds={"started"})
    run = await eng.run(main)
    assert run.status == "succeeded", run.error
    events.close()
    seen: dict[int, str | None] = {}
    async for ev in events:
        if ev.task == "leaf":
            seen[len(seen)] = ev.group
    return seen


async def test_coroutines_made_before_a_group_and_gathered_inside_it_are_in_it(
    tmp_path: Path,
) -> None:
    @engine.task
    async def main() -> None:
        early = [leaf(i) for i in range(3)]
        async with engine.group("g"):
            await asyncio.gather(*early)
            late = leaf(9)
        await late  # made inside, started after: not in the group

    async with engine.Engine(store=tmp_path / "j.db") as eng:
        assert await _groups_of(eng, main) == {0: "g", 1: "g", 2: "g", 3: None}
        runs = await eng.runs()
        journal = await eng.journal()
        rows = await journal.read(
            lambda db: db.execute(
                "SELECT grp FROM actions WHERE run_id=? AND task='leaf' ORDER BY rowid",
                (runs[0].id,),
            ).fetchall()
        )
    assert sorted(r[0] or "" for r in rows) == ["", "g", "g", "g"]


async def test_a_map_made_in_a_group_and_awaited_after_it_is_in_it(eng: engine.Engine) -> None:
    @engine.task
    async def main() -> None:
        async with engine.group("outer"), engine.group("shards"):
            results = engine.map(leaf, range(3))
            spawned = asyncio.create_task(leaf(7))
        assert await results == [0, 10, 20]
        await spawned
        async with engine.group("elsewhere"):
            assert await results_made_outside == [0]

    results_made_outside: engine.MapResults[int]

    @engine.task
    async def outer() -> None:
        nonlocal results_made_outside
        results_made_outside = engine.map(leaf, range(1))
        await main()

    groups = await _groups_of(eng, outer)
    # The map and the asyncio task keep the group they were made in.
    assert Counter(groups.values()) == {"outer/shards": 4, None: 1}


# -- a forgotten await -----------------------------------------------------------


@engine.task
async def sq(x: int) -> int:
    RAN["sq"] += 1
    return x * x


@engine.task
async def returns_the_call() -> int:
    return sq(3)  # type: ignore[return-value]  # the forgotten await under test


@pytest.mark.parametrize("store", ["journal", "memory"])
async def test_returning_a_call_instead_of_its_result_says_await_it(store: str, tmp_path: Path) -> None:
    where = "memory" if store == "memory" else str(tmp_path / "j.db")
    async with engine.Engine(store=where) as eng:
        run = await eng.run(returns_the_call)
    assert run.status == "failed"
    assert isinstance(run.error, engine.EncodeError)
    message = str(run.error)
    assert "task 'returns_the_call' returned a call of task 'sq'" in message
    assert "await it" in message
    assert RAN["sq"] == 0
    assert run.stats["pending"] == 0


@engine.task
async def forgets_a_call() -> int:
    sq(4)  # type: ignore[unused-coroutine]  # never awaited, under test
    return 1


async def test_a_call_never_awaited_warns_by_the_task_name_and_is_not_left_pending(
    eng: engine.Engine,
) -> None:
    import gc

    with pytest.warns(RuntimeWarning, match="coroutine 'sq' was never awaited"):
        run = await eng.run(forgets_a_call)
        gc.collect()
    assert run.result == 1
    assert run.stats["pending"] == 0
    assert run.counters["sq"].cancelled == 1 and run.counters["sq"].succeeded == 0
    assert RAN["sq"] == 0


@engine.task
async def keeps_a_call_for_later() -> Any:
    return {"later": sq(5)}


async def test_a_call_started_after_its_run_ended_is_counted_once(eng: engine.Engine) -> None:
    run = await eng.run(keeps_a_call_for_later)
    late = run.result["later"]
    assert run.counters["sq"].as_dict()["cancelled"] == 1
    with pytest.raises(asyncio.CancelledError):
        await late
    counts = run.counters["sq"]
    assert (counts.pending, counts.cancelled, counts.succeeded) == (0, 1, 0)


# -- KeyboardInterrupt and SystemExit in a task -------------------------------------


@engine.task(retries=engine.Retry(3, on=BaseException))
async def stops(kind: str) -> int:
    RAN["stops"] += 1
    if kind == "exit":
        raise SystemExit(3)
    raise KeyboardInterrupt


@engine.task
async def awaits_inline(kind: str) -> int:
    value: int = await stops(kind)
    return value


@engine.task
async def awaits_in_gather(kind: str) -> list[int]:
    async def slow() -> int:
        await asyncio.sleep(30)
        return 0

    return list(await asyncio.gather(leaf(1), stops(kind), slow()))


@pytest.mark.parametrize("root", [awaits_inline, awaits_in_gather], ids=["inline", "gather"])
@pytest.mark.parametrize("kind", ["interrupt", "exit"])
async def test_an_interrupt_in_a_task_cancels_the_run_and_comes_out_of_run(
    root: engine.Task[[str], Any], kind: str, tmp_path: Path
) -> None:
    expected = SystemExit if kind == "exit" else KeyboardInterrupt
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        with pytest.raises(expected) as caught:
            await eng.run(root, kind)
        if isinstance(caught.value, SystemExit):
            assert caught.value.code == 3
        (summary,) = await eng.runs()
        assert summary.status == "cancelled"
        assert summary.error is not None and summary.error.type == expected.__name__
        details = await eng.get_run(summary.id, actions=True)
    states = {rec.task: rec.state for rec in details.action_records}
    assert states["stops"] == "cancelled" and states[root.name] == "cancelled"
    assert RAN["stops"] == 1  # not retried, whatever on= says


_EXITING_FLOW = """
import asyncio, sys, engine

@engine.task
async def bye() -> None:
    sys.exit(3)

@engine.task
async def main(gather: bool) -> None:
    if gather:
        await asyncio.gather(bye(), asyncio.sleep(30))
    else:
        await bye()

if __name__ == "__main__":
    run = engine.run(main, gather=sys.argv[1] == "gather")
    print("engine.run returned", run.status)
"""


@pytest.mark.parametrize("how", ["inline", "gather"])
def test_sys_exit_in_a_task_exits_the_script_with_its_code(how: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    flow = tmp_path / "flow.py"
    flow.write_text(_EXITING_FLOW)
    done = subprocess.run(
        [sys.executable, str(flow), how], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 3, done.stderr
    assert "engine.run returned" not in done.stdout


# -- engine.map and engine.group from sync code ----------------------------------


@engine.task
def sync_fan_out(n: int) -> list[int]:
    with engine.group("sync-block"):
        squares = list(engine.map(leaf, range(n)))
    firsts = []
    for value in engine.map(leaf, range(100, 100 + n), concurrency=2):
        firsts.append(value)
        if len(firsts) == 2:
            break  # stopping early cancels what is in flight
    single: int = leaf(7)  # type: ignore[assignment]  # a sync task's call returns the value
    return [*squares, *firsts, single]


async def test_a_sync_task_iterates_map_and_enters_a_group(eng: engine.Engine) -> None:
    events = eng.events(kinds={"started"})

    @engine.task
    async def main(n: int) -> list[int]:
        async with engine.group("outer"):
            value: list[int] = await sync_fan_out(n)  # type: ignore[misc]
            return value

    run = await eng.run(main, 4)
    events.close()
    assert run.result == [0, 10, 20, 30, 1000, 1010, 70]
    seen: Counter[str | None] = Counter()
    async for ev in events:
        if ev.task == "leaf":
            seen[ev.group] += 1
    assert seen["outer/sync-block"] == 4
    assert seen["outer"] >= 3  # the second map (at least its first two) and leaf(7)
    assert run.stats["pending"] == 0 and run.stats["running"] == 0
    assert run.groups == {"outer", "outer/sync-block"}


async def test_for_over_map_in_async_code_names_the_async_forms(eng: engine.Engine) -> None:
    @engine.task
    async def main() -> None:
        for _ in engine.map(leaf, range(2)):
            pass

    run = await eng.run(main)
    assert isinstance(run.error, engine.EngineError)
    assert "use 'async for' over it or 'await' it" in str(run.error)


async def test_a_plain_with_group_works_in_async_code_too(eng: engine.Engine) -> None:
    events = eng.events(kinds={"started"})

    @engine.task
    async def main() -> int:
        with engine.group("plain"):
            value: int = await leaf(1)
        return value

    assert (await eng.run(main)).result == 10
    events.close()
    assert [ev.group async for ev in events if ev.task == "leaf"] == ["plain"]


def test_for_over_map_outside_a_run_calls_the_functions() -> None:
    assert list(engine.map(leaf, range(3))) == [0, 10, 20]


# -- every public class pickles ------------------------------------------------------

_DIGEST = "0" * 64


_AT = datetime.fromtimestamp(1.0, UTC)


def _values() -> dict[str, Any]:
    """One value of every public class that is a value (built the way users get one)."""
    entry = engine.DirEntry("a/b.txt", _DIGEST, 3)
    file = engine.File(f"file:///blobs/{_DIGEST[:2]}/{_DIGEST}", _DIGEST, 3, "b.txt")
    error = engine.ErrorInfo("ValueError", "bad", "Traceback ...")
    task_summary = engine.TaskSummary("leaf", "g", succeeded=2)
    record = engine.ActionRecord("r1", "k", None, "leaf", "succeeded", 1, 1, 1.0, 2.0, "g", b"\x01", "msgpack")
    counts = engine.TaskCounts("leaf")
    counts.succeeded = 2
    attempt = engine.RecordedAttempt(1, "succeeded", "local", "in-process", "host:12", _AT, _AT)
    action = engine.RecordedAction(
        "r1", "k", None, "leaf", "g", "succeeded", "action", 1, 1, _AT, _AT, {"x": 1}, 2, "msgpack", error,
        (attempt,), False, None,
    )
    values: dict[str, Any] = {
        "ActionEvent": engine.ActionEvent("started", "r1", "k", "leaf", 1, 1.0, "g"),
        "ActionRecord": record,
        "AttemptInfo": engine.AttemptInfo(1, "succeeded", "box", "local", "host:12", 1.0, 2.0),
        "Config": engine.Config(max_concurrency=4, cache=False),
        "DataFrame": engine.DataFrame(file, 2, ("x",)),
        "Dir": engine.Dir("file:///blobs", _DIGEST, 3, (entry,)),
        "DirEntry": entry,
        "Environment": engine.Environment("env", retries=2),
        "ErrorInfo": error,
        "File": file,
        "LocalBlobStore": engine.LocalBlobStore("blobs"),
        "Resources": engine.Resources(cpu=2, memory="1Gi"),
        "Cluster": engine.Cluster(rank=1, world_size=2, master_port=29500, hosts=("h0", "h1")),
        "Retry": engine.Retry(2, on=[ValueError]),
        "RunSummary": engine.RunSummary("r1", "main", "m:main", "failed", 1, 1.0, 2.0, ("t",), 3, error, (task_summary,), (record,)),
        "Task": leaf,
        "TaskCounts": counts,
        "LogLine": engine.LogLine("k", "leaf", _AT, "stdout", "hi"),
        "RecordedAttempt": attempt,
        "RecordedAction": action,
        "RecordedRun": engine.RecordedRun(
            "r1", "main", "m:main", "succeeded", 1, _AT, _AT, None, ("t",), None, {"n": 2}, 4,
            {"succeeded": 1}, (task_summary,), 1, (action,), store="j.db",
        ),
        "TaskSummary": task_summary,
    }
    for name in engine.__all__:
        cls = getattr(engine, name)
        if isinstance(cls, type) and issubclass(cls, engine.EngineError):
            values[name] = cls(f"{name} happened")
    values["RunFailed"] = engine.RunFailed("run r1 failed", run_id="r1")
    values["RemoteError"] = engine.RemoteError("boom", remote_type="KeyError", remote_traceback="tb")
    return values


#: Public classes whose objects are live machinery (a loop, threads, a process pool, an open
#: stream or blob), not values: they are not meant to cross a process boundary.
_NOT_VALUES = {"BlobReader", "BlobStore", "Engine", "EventStream", "MapResults", "ParallelIterator", "Run"}


def test_every_public_class_is_a_value_that_pickles_or_is_listed_as_machinery() -> None:
    classes = {n for n in engine.__all__ if isinstance(getattr(engine, n), type)}
    assert classes == set(_values()) | _NOT_VALUES


@pytest.mark.parametrize("name", sorted(_values()))
def test_every_public_value_survives_a_pickle_round_trip(name: str) -> None:
    import pickle

    value = _values()[name]
    back = pickle.loads(pickle.dumps(value))
    assert type(back) is type(value) and type(value).__module__ == "engine"
    if isinstance(value, BaseException):
        assert str(back) == str(value) and vars(back) == vars(value)
    elif isinstance(value, engine.TaskCounts):
        assert back.as_dict() == value.as_dict()
    elif isinstance(value, engine.Environment | engine.LocalBlobStore):
        assert vars(back) == vars(value)
    else:
        assert back == value


def test_every_class_that_says_it_is_engines_is_found_there() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(engine.__path__):
        if info.name.startswith("_") and not info.ispkg:
            module = importlib.import_module(f"engine.{info.name}")
            for value in vars(module).values():
                if isinstance(value, type) and value.__module__ == "engine":
                    assert getattr(engine, value.__name__, None) is value, value


async def test_parallel_map_takes_dirs(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_text("abc")
    (tmp_path / "tree" / "b.txt").write_text("de")
    async with engine.Engine(store="memory", cpus=2) as eng:

        @engine.task
        async def main() -> list[int]:
            tree = await engine.Dir.from_path(tmp_path / "tree")
            sizes: list[int] = await engine.parallel_map(_dir_size, [tree, tree], workers=2)
            return sizes

        run = await eng.run(main)
    assert run.result == [5, 5]


def _dir_size(tree: engine.Dir) -> int:
    return sum(entry.size for entry in tree.files)


# -- config keys, end to end ---------------------------------------------------------


@engine.task(cache=True)
async def cached_leaf(x: int) -> int:
    RAN["cached_leaf"] += 1
    return x


def _pyproject(folder: Path, body: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text(f'[project]\nname = "flow"\n\n[tool.shoal]\n{body}\n')
    return path


async def test_config_cache_false_is_honoured_unless_the_engine_says_otherwise(tmp_path: Path) -> None:
    _pyproject(tmp_path, "cache = false")
    for _ in range(2):
        async with engine.Engine() as eng:
            assert (await eng.run(cached_leaf, 1)).result == 1
    assert RAN["cached_leaf"] == 2  # no lookups: ran both times
    for _ in range(2):
        async with engine.Engine(cache=True) as eng:
            run = await eng.run(cached_leaf, 2)
    assert RAN["cached_leaf"] == 3 and run.stats["cached"] == 1


async def test_config_home_store_and_blob_store_are_folders_relative_to_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    _pyproject(project, 'home = "state"\nblob_store = "blobs-here"')
    monkeypatch.chdir(project / "sub")  # found from a subfolder, upwards
    (project / "sub" / "data.txt").write_text("payload")

    @engine.task
    async def upload() -> engine.File:
        return await engine.File.from_path("data.txt")

    async with engine.Engine() as eng:
        run = await eng.run(upload)
    ref = run.result
    assert (project / "state" / "shoal.db").is_file()  # home beats SHOAL_HOME
    assert list((project / "blobs-here").rglob(ref.digest))

    _pyproject(project, 'store = "journals/flow.db"')
    async with engine.Engine() as eng:
        await eng.run(cached_leaf, 1)
    assert (project / "journals" / "flow.db").is_file()

    _pyproject(project, 'store = "memory"')
    async with engine.Engine() as eng:
        assert not eng.durable
        assert (await eng.run(cached_leaf, 1)).result == 1


async def test_config_max_concurrency_limits_running_actions(tmp_path: Path) -> None:
    _pyproject(tmp_path, "max_concurrency = 2")
    running = peak = 0

    @engine.task
    async def busy(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return i

    @engine.task
    async def many() -> int:
        return len(await asyncio.gather(*(busy(i) for i in range(8))))

    async with engine.Engine(store="memory") as eng:
        assert eng.max_concurrency == 2
        assert (await eng.run(many)).result == 8
    assert peak == 2


async def test_config_offload_targets_are_read(tmp_path: Path) -> None:
    (tmp_path / "shoal.toml").write_text('[offload.gpu]\nbackend = "ssh"\nhosts = ["gpu1"]\n')

    @engine.task(offload="gpu")
    async def on_gpu() -> int:
        return 1

    @engine.task
    async def calls_gpu() -> int:
        value: int = await on_gpu()
        return value

    async with engine.Engine(store="memory") as eng:
        assert eng.config.offload == {"gpu": SSHTarget(hosts=["gpu1"])}


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("max_concurency = 4", r"unknown shoal setting 'max_concurency'.*Did you mean 'max_concurrency'\?"),
        ("colour = 'red'", r"unknown shoal setting 'colour'.*Settings are: home, store, max_concurrency"),
        ("source = 'x'", r"unknown shoal setting 'source'"),
        ("max_concurrency = 0", r"invalid shoal setting max_concurrency = 0: Expected `int` >= 1"),
        ("cache = 'no'", r"invalid shoal setting cache = 'no': Expected `bool`, got `str`"),
        ("store = 3", r"invalid shoal setting store = 3: Expected `str \| null`, got `int`"),
        ("[tool.shoal.offload]\ngpu = 3", r"invalid shoal setting offload\[\.\.\.\]: Expected `object`, got `int`"),
    ],
)
def test_bad_config_names_the_file_and_the_key(tmp_path: Path, body: str, match: str) -> None:
    path = _pyproject(tmp_path, body)
    with pytest.raises(engine.ConfigError, match=match) as caught:
        engine.Engine()
    assert str(caught.value).startswith(f"config file {path}: ")


def test_a_missing_shoal_config_file_says_shoal_config_named_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_CONFIG", str(tmp_path / "nowhere.toml"))
    with pytest.raises(engine.ConfigError, match=r"nowhere\.toml named by SHOAL_CONFIG does not exist"):
        engine.Engine()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "shoal.toml").write_text("max_concurrency = 3\n")
    monkeypatch.setenv("SHOAL_CONFIG", str(elsewhere / "shoal.toml"))
    assert engine.Engine(store="memory").max_concurrency == 3


@engine.task(retries=1)
async def retried_and_returns_the_call() -> int:
    return sq(3)  # type: ignore[return-value]  # the forgotten await under test


async def test_a_retried_task_returning_a_call_says_await_it_too(eng: engine.Engine) -> None:
    run = await eng.run(retried_and_returns_the_call)
    assert isinstance(run.error, engine.EncodeError)
    assert "returned a call of task 'sq'" in str(run.error)
    assert RAN["sq"] == 0 and run.stats["pending"] == 0
