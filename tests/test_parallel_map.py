"""engine.parallel_map / engine.parallel_imap: order, streaming, chunking, errors, cancellation."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

import _pmap_funcs as funcs
import engine
from engine._api import default_engine
from engine._cli import build_app
from engine._cli._progress import Progress
from engine._loader import load_file
from engine._pool import RemoteTraceback, WorkerPool

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

DATA = Path(__file__).parent / "data" / "pmap"


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    """The worker pool of this loop's default engine (used outside runs); closed afterwards."""
    eng = default_engine()
    yield eng.worker_pool()
    await eng.aclose()


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


async def wait_gone(pids: list[int], within: float = 10.0) -> list[int]:
    """The pids still alive after waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        alive = [p for p in pids if not gone(p)]
        if not alive:
            return []
        await asyncio.sleep(0.05)
    return [p for p in pids if not gone(p)]


# -- results --------------------------------------------------------------------------------


async def test_results_come_back_in_input_order(pool: WorkerPool) -> None:
    assert await engine.parallel_map(funcs.square, range(2000)) == [x * x for x in range(2000)]
    assert await engine.parallel_map(funcs.square, (x for x in range(50))) == [
        x * x for x in range(50)
    ]
    assert await engine.parallel_map(funcs.square, []) == []
    # Items that finish out of order (early ones sleep longest) still come back in order.
    items = [(i, 0.05 if i < 2 else 0.0) for i in range(8)]
    assert await engine.parallel_map(funcs.sleep_then_return, items, chunksize=1) == list(range(8))


async def test_imap_ordered_and_unordered(pool: WorkerPool) -> None:
    # Item 0 is slow; the rest are quick, so they finish before it.
    items = [(0, 0.6)] + [(i, 0.0) for i in range(1, 12)]
    ordered = [r async for r in engine.parallel_imap(funcs.sleep_then_return, items, chunksize=1)]
    assert ordered == list(range(12))
    unordered = [
        r
        async for r in engine.parallel_imap(
            funcs.sleep_then_return, items, chunksize=1, ordered=False
        )
    ]
    assert sorted(unordered) == list(range(12))
    if pool.max_workers > 1:
        # Results come as they finish: not in input order, item 0 not first.
        assert unordered[0] != 0 and unordered.index(0) > 2


async def test_imap_reads_a_generator_only_a_bounded_window_ahead(pool: WorkerPool) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled = i + 1
            yield i

    chunk = 10
    # At most 4 chunks per lane taken and not yet consumed, plus the chunk being read.
    bound = (4 * pool.max_workers + 1) * chunk
    consumed = 0
    async with aclosing(engine.parallel_imap(funcs.square, endless(), chunksize=chunk)) as results:
        async for value in results:
            assert value == consumed * consumed
            consumed += 1
            assert pulled - consumed <= bound
            if consumed % 100 == 0:
                await asyncio.sleep(0.01)  # a slow consumer: the producer must wait
            if consumed == 3000:
                break
    assert consumed == 3000 and pulled - consumed <= bound


# -- the pool ---------------------------------------------------------------------------------


async def test_a_mapped_function_may_run_an_event_loop_of_its_own(pool: WorkerPool) -> None:
    # The workers serve chunks from an event loop; the function must not see it.
    assert await engine.parallel_map(funcs.doubled_by_its_own_event_loop, range(20)) == [
        2 * i for i in range(20)
    ]


async def test_pool_is_started_once_and_reused(pool: WorkerPool) -> None:
    assert pool.pids() == []  # nothing starts before the first call
    first = set(await engine.parallel_map(funcs.pid_of, range(40), chunksize=1))
    pids = pool.pids()
    assert len(pids) == pool.max_workers == default_engine().cpu_slots.capacity
    assert first <= set(pids)
    second = set(await engine.parallel_map(funcs.pid_of, range(40), chunksize=1))
    assert second <= set(pids) and pool.pids() == pids


async def test_chunk_size_adapts_to_item_cost(pool: WorkerPool) -> None:
    before = pool.chunks_sent
    n = 200_000
    assert sum(await engine.parallel_map(funcs.square, range(n))) == sum(x * x for x in range(n))
    tiny_chunks = pool.chunks_sent - before
    assert tiny_chunks < 200, tiny_chunks  # batched, not 200,000 round trips

    before = pool.chunks_sent
    heavy = 2 * pool.max_workers + 2
    pids = await engine.parallel_map(funcs.sleep_then_pid, [0.15] * heavy)
    assert pool.chunks_sent - before == heavy  # one item per chunk
    assert len(set(pids)) == pool.max_workers  # spread over every worker


@pytest.mark.parametrize("sized", [True, False])
async def test_as_many_long_items_as_workers_run_one_per_worker(
    tmp_path: Path, sized: bool
) -> None:
    """N items that each wait for all N to arrive finish only if each has a worker of its own."""
    n = 3  # workers, whatever this machine's CPU count
    async with engine.Engine(store="memory", cpus=n) as eng:

        @engine.task
        async def main() -> list[list[tuple[int, bool]]]:
            calls = []
            for call in range(2):  # the pool cold, then warm
                folder = tmp_path / f"call{call}"
                folder.mkdir()
                items = [(str(folder), i, n) for i in range(n)]
                calls.append(
                    await engine.parallel_map(funcs.meet, items if sized else iter(items))
                )
            return calls

        run = await eng.run(main)
        assert eng.worker_pool().max_workers == n
    for replies in run.result:
        assert [met for _, met in replies] == [True] * n, replies
        assert len({pid for pid, _ in replies}) == n, replies


# -- functions from scripts, lambdas, closures --------------------------------------------------


def test_function_of_a_script_run_as_main(tmp_path: Path) -> None:
    marker = tmp_path / "imports.txt"
    src = Path(engine.__file__).parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(DATA / "script_main.py"), str(marker)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(sum(x + 1000 for x in range(20)))
    # The script's top-level code ran once: workers did not import it again.
    assert len(marker.read_text().splitlines()) == 1


async def test_function_of_a_module_loaded_from_its_path(pool: WorkerPool) -> None:
    name = "shoal_user_flow_0f3a"
    spec = importlib.util.spec_from_file_location(name, DATA / "flow_module.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as `shoal run FILE` does; workers still cannot import it
    try:
        spec.loader.exec_module(module)
        pairs = await engine.parallel_map(module.to_pair, range(10))
        assert [type(p) for p in pairs] == [module.Pair] * 10
        assert [(p.a, p.b) for p in pairs] == [(x, 3 * x) for x in range(10)]
        # Items of the module's classes travel the same way.
        back = await engine.parallel_map(lambda p: p.b - p.a, pairs)
        assert back == [2 * x for x in range(10)]
    finally:
        del sys.modules[name]


@pytest.mark.parametrize("taken", [False, True])
async def test_function_of_a_file_loaded_like_shoal_run(
    pool: WorkerPool, tmp_path: Path, taken: bool
) -> None:
    """``shoal run FILE`` imports the file by its name, or under a private name if taken."""
    from engine._loader import load_file

    await engine.parallel_map(funcs.square, range(4))  # workers start before the file loads
    folder = tmp_path / ("taken" if taken else "free")
    folder.mkdir()
    stem = "_pmap_funcs" if taken else "pmap_user_flow_1c2d"
    script = folder / f"{stem}.py"
    script.write_text((DATA / "flow_module.py").read_text())
    saved_path = list(sys.path)
    module = load_file(script)
    try:
        assert (module.__name__ == stem) != taken
        pairs = await engine.parallel_map(module.to_pair, range(6))
        assert [(type(p), p.b) for p in pairs] == [(module.Pair, 3 * x) for x in range(6)]
    finally:
        sys.path[:] = saved_path
        sys.modules.pop(module.__name__, None)


async def test_lambdas_and_closures(pool: WorkerPool) -> None:
    assert await engine.parallel_map(lambda x: x + 1, range(5)) == [1, 2, 3, 4, 5]
    base = {"k": 10}

    def add_base(x: int) -> int:
        return x + base["k"]

    assert await engine.parallel_map(add_base, range(3)) == [10, 11, 12]
    # The closure's value is taken at each call.
    base["k"] = 20
    assert await engine.parallel_map(add_base, range(3)) == [20, 21, 22]


async def test_unpicklable_function_fails_at_once(pool: WorkerPool) -> None:
    lock = threading.Lock()

    def locked(x: int) -> int:
        with lock:
            return x

    with pytest.raises(
        engine.InputError, match=r"cannot send the function .*locked.*cannot be pickled"
    ):
        await engine.parallel_map(locked, range(10))
    with pytest.raises(engine.InputError, match="cannot be pickled"):
        engine.parallel_imap(locked, range(10))  # not even iterated
    assert pool.pids() == []  # failed before any worker started

    items: list[Any] = [1, 2, threading.Lock(), 4]
    with pytest.raises(engine.InputError, match="item 2 cannot be pickled"):
        await engine.parallel_map(funcs.square, items, chunksize=4)


async def test_error_from_the_input_iterator_is_raised(pool: WorkerPool) -> None:
    def broken() -> Iterator[int]:
        yield from range(5)
        raise RuntimeError("the input ran dry")

    with pytest.raises(RuntimeError, match="the input ran dry"):
        await engine.parallel_map(funcs.square, broken())


async def test_workers_caps_the_processes_used(pool: WorkerPool) -> None:
    pids = await engine.parallel_map(funcs.sleep_then_pid, [0.02] * 10, workers=1)
    assert len(set(pids)) == 1


async def test_bad_options_are_refused(pool: WorkerPool) -> None:
    with pytest.raises(engine.ConfigError, match="workers="):
        await engine.parallel_map(funcs.square, range(3), workers=0)
    with pytest.raises(engine.ConfigError, match="chunksize="):
        await engine.parallel_map(funcs.square, range(3), chunksize=-1)


# -- errors -------------------------------------------------------------------------------------


async def test_worker_exception_is_raised_with_its_traceback_and_item(pool: WorkerPool) -> None:
    with pytest.raises(ValueError, match="seven is not allowed") as info:
        await engine.parallel_map(funcs.fail_on_seven, range(100))
    err = info.value
    assert isinstance(err.__cause__, RemoteTraceback)
    assert "fail_on_seven" in str(err.__cause__) and "_pmap_funcs.py" in str(err.__cause__)
    assert any("item 7" in note for note in err.__notes__)
    # The pool still works.
    assert await engine.parallel_map(funcs.square, range(4)) == [0, 1, 4, 9]


async def test_exception_that_cannot_be_rebuilt_becomes_remote_error(pool: WorkerPool) -> None:
    with pytest.raises(engine.RemoteError, match="failed with code 42") as info:
        await engine.parallel_map(funcs.fail_stubbornly, range(10))
    assert info.value.remote_type.endswith("StubbornError")
    assert "fail_stubbornly" in info.value.remote_traceback
    assert any("item 3" in note for note in info.value.__notes__)


@pytest.mark.parametrize(
    ("fn", "how"),
    [(funcs.kill_self_on_five, "killed by SIGKILL"), (funcs.exit_on_five, "exited with status 3")],
)
async def test_dead_worker_raises_worker_crashed_and_pool_recovers(
    pool: WorkerPool, fn: Any, how: str
) -> None:
    await engine.parallel_map(funcs.square, range(4))
    before = pool.pids()
    with pytest.raises(engine.WorkerCrashed, match=rf"{how}.* while running item 5\b"):
        await engine.parallel_map(fn, range(20), chunksize=1)
    assert await engine.parallel_map(funcs.square, range(30)) == [x * x for x in range(30)]
    after = pool.pids()
    assert len(after) == pool.max_workers and after != before
    assert await wait_gone(sorted(set(before) - set(after))) == []


# -- cancellation -------------------------------------------------------------------------------


async def test_cancelling_the_caller_stops_the_workers_promptly(pool: WorkerPool) -> None:
    seconds, n = 1.0, 8 * pool.max_workers
    serial_time_per_worker = seconds * n / pool.max_workers  # the map would take this long
    call = asyncio.create_task(engine.parallel_map(funcs.sleep_then_pid, [seconds] * n))
    while True:  # until every worker has an item
        if pool.chunks_sent >= pool.max_workers:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    busy = pool.pids()
    started = time.monotonic()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    took = time.monotonic() - started
    assert took < serial_time_per_worker / 4, took
    # Workers busy on the cancelled items were killed, not left running.
    assert await wait_gone(busy) == []
    # The pool notices a killed worker's socket closing a moment later.
    for _ in range(200):
        if set(pool.pids()).isdisjoint(busy):
            break
        await asyncio.sleep(0.05)
    assert set(pool.pids()).isdisjoint(busy)
    me = psutil.Process()
    # Killed workers are reaped in the background: wait for their zombies to go.
    for _ in range(200):
        if {c.pid for c in me.children(recursive=True)}.isdisjoint(busy):
            break
        await asyncio.sleep(0.05)
    assert {c.pid for c in me.children(recursive=True)}.isdisjoint(busy)
    # And the next call gets fresh workers.
    assert await engine.parallel_map(funcs.square, range(5)) == [0, 1, 4, 9, 16]


async def test_closing_the_engine_stops_every_worker() -> None:
    async with engine.Engine(store="memory") as eng:

        @engine.task
        async def main() -> list[int]:
            return await engine.parallel_map(funcs.pid_of, range(10), chunksize=1)

        run = await eng.run(main)
        pids = eng.worker_pool().pids()
        assert set(run.result) <= set(pids)
    assert await wait_gone(pids) == []


# -- inside a run ---------------------------------------------------------------------------------


async def test_inside_a_run_counts_items_and_takes_cpu_slots() -> None:
    async with engine.Engine(store="memory") as eng:
        seen_in_use: list[float] = []

        @engine.task
        async def main() -> int:
            watcher = asyncio.create_task(watch())
            try:
                squares = await engine.parallel_map(funcs.square, range(100))
                await engine.parallel_map(funcs.sleep_then_pid, [0.2] * 4, workers=1)
            finally:
                watcher.cancel()
            return sum(squares)

        async def watch() -> None:
            while True:
                seen_in_use.append(eng.cpu_slots.in_use)
                await asyncio.sleep(0.02)

        run = await eng.run(main)
        assert run.status == "succeeded"
        assert run.result == sum(x * x for x in range(100))
        counts = run.counters_for(f"parallel_map:{funcs.square.__qualname__}")
        assert (counts.succeeded, counts.pending, counts.running, counts.failed) == (100, 0, 0, 0)
        slow = run.counters_for(f"parallel_map:{funcs.sleep_then_pid.__qualname__}")
        assert slow.succeeded == 4
        assert 1 in seen_in_use and max(seen_in_use) <= eng.cpu_slots.capacity
        assert eng.cpu_slots.in_use == 0


async def test_failure_inside_a_run_is_counted() -> None:
    async with engine.Engine(store="memory") as eng:

        @engine.task
        async def main() -> list[int]:
            return await engine.parallel_map(funcs.fail_on_seven, range(20), chunksize=1)

        run = await eng.run(main)
        assert run.status == "failed" and isinstance(run.error, ValueError)
        counts = run.counters_for(f"parallel_map:{funcs.fail_on_seven.__qualname__}")
        assert counts.failed == 1
        assert counts.pending == counts.running == 0
        assert counts.succeeded + counts.failed + counts.cancelled == 20
        # The run's one action failed; its items are not among its actions.
        assert (run.stats["failed"], run.stats["succeeded"], run.stats["cancelled"]) == (1, 0, 0)


# -- items are counted as items, not actions ------------------------------------------------------

COUNTED = str(DATA / "counted.py")  # 15 actions, and parallel_map over 5 items


def shoal(*args: str) -> Result:
    return CliRunner().invoke(build_app(), list(args), catch_exceptions=False)


def summary_line(result: Result, run_id: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"run {run_id} ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_run_summary_counts_actions_as_shoal_show_does_and_items_apart() -> None:
    result = shoal("run", COUNTED, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == sum(i * i for i in range(14)) + sum(i**3 for i in range(5))
    runs = json.loads(shoal("runs", "--json").stdout)
    run_id = runs[0]["id"]
    show = json.loads(shoal("show", run_id, "--json").stdout)
    assert runs[0]["actions"] == show["actions"] == 15
    assert summary_line(result, run_id).endswith(
        " (15 actions: 15 succeeded; 5 parallel_map items: 5 succeeded)"
    )


def test_failed_run_summary_counts_actions_and_items_apart() -> None:
    result = shoal("run", COUNTED, "--bad")
    assert result.exit_code == 1, result.output
    run_id = json.loads(shoal("runs", "--json").stdout)[0]["id"]
    assert json.loads(shoal("show", run_id, "--json").stdout)["actions"] == 15
    found = re.search(
        r" \(15 actions: 14 succeeded, 1 failed; 5 parallel_map items: (\d+) succeeded, "
        r"1 failed(?:, (\d+) cancelled)?\)$",
        summary_line(result, run_id),
    )
    assert found is not None, summary_line(result, run_id)
    assert int(found[1]) + 1 + int(found[2] or 0) == 5


async def test_run_stats_count_actions_and_items_apart(tmp_path: Path) -> None:
    module = load_file(Path(COUNTED))
    out = io.StringIO()
    console = Console(file=out, width=150)
    async with engine.Engine(store=tmp_path / "journal.db") as eng:
        progress = Progress(eng, console, live=True)
        run = await eng.run(module.main)
        record = await eng.get_run(run.id)
        console.print(progress.render(run))
        progress.close()
    assert run.status == "succeeded"
    assert run.stats["succeeded"] == record.action_count == 15
    assert sum(run.stats[state] for state in ("pending", "running", "failed", "cancelled")) == 0
    items = run.counters_for(f"parallel_map:{module.cube.__qualname__}")
    assert (items.unit, items.succeeded, items.total) == ("items", 5, 5)
    # The live display: the items have their row; the overall bar counts actions.
    text = out.getvalue()
    assert "15/15 actions" in text
    assert re.search(r"parallel_map:cube\s+0\s+0\s+0\s+5\b", text), text  # pending running committing succeeded
