"""Traces (checkpoints inside a task) and the cache across runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

import pytest

import engine

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

CALLS: Counter[str] = Counter()
#: Names of the traces that raise (set per test).
BROKEN: set[str] = set()


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    CALLS.clear()
    BROKEN.clear()
    yield
    CALLS.clear()
    BROKEN.clear()


@engine.trace
def fetch(x: int) -> int:
    CALLS["fetch"] += 1
    if "fetch" in BROKEN:
        raise ConnectionError("fetch failed")
    return x * 2


@engine.trace
async def afetch(x: int) -> dict[str, int]:
    CALLS["afetch"] += 1
    await asyncio.sleep(0)
    if "afetch" in BROKEN:
        raise ConnectionError("afetch failed")
    return {"x": x}


class Flaky(Exception):
    pass


@engine.task
async def work(x: int) -> int:
    a = fetch(x)
    b = fetch(x)  # same input again: its own occurrence
    c = (await afetch(x))["x"]
    CALLS["work-body"] += 1
    if "work" in BROKEN:
        raise Flaky("work failed after its traces")
    return a + b + c


@engine.task
def sync_work(x: int) -> int:
    return fetch(x) + fetch(x + 1)


@engine.task
async def traced_root(x: int) -> int:
    first: int = await work(x)
    second: int = await sync_work(x)  # type: ignore[misc]  # a sync task's call is awaited
    return first + second


def _store(tmp_path: Path) -> Path:
    return tmp_path / "j" / "shoal.db"


async def _traces(eng: engine.Engine, run_id: str) -> list[tuple[str, str, bytes | None]]:
    journal = await eng.journal()
    rows = await journal.read(
        lambda db: db.execute(
            "SELECT task, state, output FROM actions WHERE run_id=? AND kind='trace' ORDER BY rowid",
            (run_id,),
        ).fetchall()
    )
    return [(t, s, o) for t, s, o in rows]


async def test_traces_are_journaled(tmp_path: Path) -> None:
    async with engine.Engine(store=_store(tmp_path)) as eng:
        run = await eng.run(traced_root, 3)
        assert run.result == 6 + 6 + 3 + 6 + 8
        traces = await _traces(eng, run.id)
        journal = await eng.journal()
        keys = await journal.read(
            lambda db: db.execute(
                "SELECT key, parent FROM actions WHERE run_id=? AND kind='trace'", (run.id,)
            ).fetchall()
        )
    # fetch twice (two occurrences), afetch once in work; fetch twice in the sync task.
    assert Counter(name for name, _, _ in traces) == {"fetch": 4, "afetch": 1}
    assert all(state == "succeeded" for _, state, _ in traces)
    assert len({key for key, _ in keys}) == 5
    assert len({parent for _, parent in keys}) == 2
    assert CALLS == {"fetch": 4, "afetch": 1, "work-body": 1}


async def test_traces_replay_on_resume_and_failed_ones_rerun(tmp_path: Path) -> None:
    BROKEN.add("work")
    async with engine.Engine(store=_store(tmp_path)) as eng:
        run = await eng.run(work, 5)
    assert run.status == "failed"
    assert CALLS == {"fetch": 2, "afetch": 1, "work-body": 1}
    BROKEN.clear()
    async with engine.Engine(store=_store(tmp_path)) as eng:
        again = await eng.resume(run.id)
    assert again.result == 10 + 10 + 5
    # The task ran again, its traces did not.
    assert CALLS == {"fetch": 2, "afetch": 1, "work-body": 2}


async def test_trace_that_raised_runs_again_on_resume(tmp_path: Path) -> None:
    BROKEN.add("afetch")
    async with engine.Engine(store=_store(tmp_path)) as eng:
        run = await eng.run(work, 1)
        assert run.status == "failed"
        assert isinstance(run.error, ConnectionError)
        assert Counter(t for t, _, _ in await _traces(eng, run.id)) == {"fetch": 2}
    BROKEN.clear()
    async with engine.Engine(store=_store(tmp_path)) as eng:
        again = await eng.resume(run.id)
        assert again.result == 5
    assert CALLS == {"fetch": 2, "afetch": 2, "work-body": 1}


async def test_traces_in_a_sync_task_replay(tmp_path: Path) -> None:
    BROKEN.add("work")
    async with engine.Engine(store=_store(tmp_path)) as eng:
        run = await eng.run(traced_root, 2)
    assert run.status == "failed"
    BROKEN.clear()
    CALLS.clear()
    async with engine.Engine(store=_store(tmp_path)) as eng:
        again = await eng.resume(run.id)
    assert again.result == 4 + 4 + 2 + 4 + 6
    # work's traces are replayed; sync_work never ran before, so its traces run.
    assert CALLS == {"fetch": 2, "work-body": 1}


async def test_traces_outside_a_journal_just_run() -> None:
    assert fetch(4) == 8
    async with engine.Engine(store="memory") as eng:
        run = await eng.run(work, 1)
    assert run.result == 5
    assert CALLS["fetch"] == 3


# -- cache -------------------------------------------------------------------------


@engine.task(cache=True)
async def square(x: int) -> int:
    CALLS["square"] += 1
    return x * x


@engine.task
async def squares(n: int) -> list[int]:
    return list(await asyncio.gather(*(square(i) for i in range(n))))


async def test_cache_hits_across_runs_and_engines(tmp_path: Path) -> None:
    async with engine.Engine(store=_store(tmp_path)) as eng:
        first = await eng.run(squares, 4)
        assert first.result == [0, 1, 4, 9]
        assert first.counters["square"].cached == 0
    async with engine.Engine(store=_store(tmp_path)) as eng:
        second = await eng.run(squares, 5)
        assert second.result == [0, 1, 4, 9, 16]
        assert second.counters["square"].cached == 4
        assert second.stats["cached"] == 4
        details = await eng.get_run(second.id, actions=True)
    assert CALLS["square"] == 5
    cached = [r for r in details.action_records if r.task == "square"]
    assert sorted(r.cached for r in cached) == [False, True, True, True, True]
    assert all(r.state == "succeeded" and r.cache_key for r in cached)
    assert [t.cached for t in details.tasks if t.task == "square"] == [4]


async def test_cache_can_be_disabled(tmp_path: Path) -> None:
    async with engine.Engine(store=_store(tmp_path)) as eng:
        await eng.run(squares, 2)
        off = await eng.run(squares, 2, cache=False)
        assert off.counters["square"].cached == 0
    assert CALLS["square"] == 4
    async with engine.Engine(store=_store(tmp_path), cache=False) as eng:
        run = await eng.run(squares, 2)
        assert run.counters["square"].cached == 0
        on = await eng.run(squares, 2, cache=True)
        assert on.counters["square"].cached == 2
    assert CALLS["square"] == 6


def test_cache_off_as_a_run_option_of_engine_run() -> None:
    engine.run(squares, 2)
    run = engine.run(squares, 2, cache=False)
    assert run.result == [0, 1]
    assert CALLS["square"] == 4
    assert engine.run(squares, 2).counters["square"].cached == 2


async def test_memory_store_does_not_cache() -> None:
    async with engine.Engine(store="memory") as eng:
        await eng.run(squares, 2)
        run = await eng.run(squares, 2)
    assert run.counters["square"].cached == 0
    assert CALLS["square"] == 4


def _versioned(cache: bool | str, body: str) -> engine.Task[..., int]:
    """A task named "scale" whose source text is ``body``."""
    scope: dict[str, object] = {"CALLS": CALLS}
    source = f"async def scale(x: int) -> int:\n    CALLS['scale'] += 1\n    return {body}\n"
    exec(compile(source, f"<scale {body}>", "exec"), scope)
    fn = scope["scale"]
    if cache is True:
        # cache=True hashes the source that inspect finds; give it one.
        import linecache

        linecache.cache[f"<scale {body}>"] = (len(source), None, source.splitlines(True), f"<scale {body}>")
    return engine.task(name="scale", cache=cache)(fn)  # type: ignore[arg-type]


async def test_cache_version_string(tmp_path: Path) -> None:
    v1 = _versioned("v1", "x + 1")
    v1_other_source = _versioned("v1", "x + 2")
    v2 = _versioned("v2", "x + 2")
    async with engine.Engine(store=_store(tmp_path)) as eng:
        assert (await eng.run(v1, 1)).result == 2
        # Same name and version: a hit, whatever the source says.
        hit = await eng.run(v1_other_source, 1)
        assert hit.result == 2 and hit.counters["scale"].cached == 1
        miss = await eng.run(v2, 1)
        assert miss.result == 3 and miss.counters["scale"].cached == 0
        # Other inputs miss.
        assert (await eng.run(v1, 2)).counters["scale"].cached == 0
    assert CALLS["scale"] == 3


async def test_cache_true_follows_the_source(tmp_path: Path) -> None:
    old = _versioned(True, "x * 10")
    same = _versioned(True, "x * 10")
    changed = _versioned(True, "x * 100")
    assert old.cache_version == same.cache_version != changed.cache_version
    async with engine.Engine(store=_store(tmp_path)) as eng:
        assert (await eng.run(old, 3)).result == 30
        assert (await eng.run(same, 3)).counters["scale"].cached == 1
        run = await eng.run(changed, 3)
        assert run.result == 300
        assert run.counters["scale"].cached == 0
    assert CALLS["scale"] == 2


@engine.task(cache="big-1")
async def big(n: int) -> bytes:
    CALLS["big"] += 1
    return bytes(range(256)) * n


async def test_cache_of_a_large_output_in_the_blob_store(tmp_path: Path) -> None:
    from engine._run_journal import INLINE_LIMIT

    n = INLINE_LIMIT // 256 + 10
    async with engine.Engine(store=_store(tmp_path)) as eng:
        assert len((await eng.run(big, n)).result) == n * 256
        second = await eng.run(big, n)
        assert second.result == bytes(range(256)) * n
        assert second.counters["big"].cached == 1
    assert CALLS["big"] == 1
