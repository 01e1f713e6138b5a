"""Reading recorded runs back: engine.get_run / runs / latest_run and the records they give."""

from __future__ import annotations

import asyncio
import pickle
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import msgspec
import pytest

import engine
from engine._loader import load_file
from engine._run_journal import INLINE_LIMIT

if TYPE_CHECKING:
    from pathlib import Path


class Score(msgspec.Struct, frozen=True):
    name: str
    value: float


class Opaque:
    """A plain class msgspec cannot encode: stored pickled."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]


@engine.task
async def score(name: str, value: float) -> Score:
    print(f"scoring {name}")  # noqa: T201 (captured into the journal)
    return Score(name, value * 2)


@engine.task(retries=1)
async def flaky_leaf(i: int) -> int:
    if i == 3:
        raise ValueError(f"bad item {i}")
    return i


@engine.task
async def scored(names: list[str], *, scale: float = 1.0) -> list[Score]:
    async with engine.group("scoring"):
        out = await asyncio.gather(*(score(n, scale) for n in names))
    print("all scored")  # noqa: T201
    return list(out)


@engine.task
async def tolerant(n: int) -> int:
    done = await asyncio.gather(*(flaky_leaf(i) for i in range(n)), return_exceptions=True)
    return sum(d for d in done if isinstance(d, int))


@engine.task
async def big(n: int) -> bytes:
    return b"z" * n


@engine.task
async def opaque(n: int) -> Opaque:
    return Opaque(n)


async def test_get_run_decodes_args_and_result_with_the_root_tasks_types(tmp_path: Path) -> None:
    before = datetime.now(UTC)
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(scored, ["a", "b"], scale=1.5, tags=["exp"])
        got = await eng.get_run(run.id)
    assert got.status == "succeeded" and got.task == "scored" and got.tags == ("exp",)
    assert got.args == {"names": ["a", "b"], "scale": 1.5}
    assert got.result == [Score("a", 3.0), Score("b", 3.0)]
    assert isinstance(got.result, list) and all(type(s) is Score for s in got.result)
    assert got.note is None
    assert got.started_at.tzinfo is UTC and got.finished_at is not None
    assert before - timedelta(seconds=1) <= got.started_at <= got.finished_at
    assert got.duration is not None and got.duration >= 0
    assert got.stats == {state: run.stats[state] for state in got.stats} and got.stats["succeeded"] == 3
    assert got.action_count == 3
    assert {(t.task, t.group, t.succeeded) for t in got.tasks} == {("scored", None, 1), ("score", "scoring", 2)}
    # A plain value: JSON and builtins carry it, times as ISO strings.
    data = msgspec.to_builtins(got)
    assert data["result"] == [{"name": "a", "value": 3.0}, {"name": "b", "value": 3.0}]
    assert data["started_at"].endswith("Z")


async def test_actions_are_filtered_decoded_and_say_where_they_ran(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(scored, ["a", "b", "c"])
        got = await eng.get_run(run.id)
        children = [a async for a in got.aactions(task="score")]
        grouped = [a async for a in got.aactions(group="scoring")]
        root = [a async for a in got.aactions(task="scored")]
        page = [a async for a in got.aactions(limit=2, offset=1)]
        everything = [a async for a in got.aactions()]
    assert len(children) == 3 and {a.key for a in grouped} == {a.key for a in children}
    assert sorted((a.output for a in children), key=repr) == [Score("a", 2.0), Score("b", 2.0), Score("c", 2.0)]
    assert all(type(a.output) is Score and a.state == "succeeded" and a.group == "scoring" for a in children)
    # Inputs are recorded for the root action (the run's arguments) only.
    (top,) = root
    assert top.inputs == {"names": ["a", "b", "c"], "scale": 1.0} and top.parent is None
    assert all(a.inputs is None and a.parent == top.key for a in children)
    assert [a.key for a in page] == [a.key for a in everything][1:3]
    (attempt,) = children[0].attempts
    assert attempt.state == "succeeded" and attempt.target == "local"
    assert attempt.started_at is not None and attempt.started_at.tzinfo is UTC


async def test_failed_actions_carry_their_error_and_traceback(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(tolerant, 5)
        assert run.result == 0 + 1 + 2 + 4
        got = await eng.get_run(run.id)
        (failed,) = [a async for a in got.aactions(state="failed")]
    assert failed.task == "flaky_leaf" and failed.attempt == 2 and failed.output is None
    assert failed.error is not None and failed.error.type == "ValueError"
    assert failed.error.message == "bad item 3"
    assert 'raise ValueError(f"bad item {i}")' in failed.error.traceback
    assert got.stats["failed"] == 1 and got.stats["succeeded"] == 5


async def test_logs_of_a_run_and_of_one_action(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(scored, ["a", "b"])
        got = await eng.get_run(run.id)
        lines = await got.alogs()
        (first,) = [a async for a in got.aactions(task="score", limit=1)]
        own = await first.alogs()
    assert {(line.task, line.text) for line in lines} >= {
        ("score", "scoring a"), ("score", "scoring b"), ("scored", "all scored"),
    }
    assert all(line.at.tzinfo is UTC and line.stream == "stdout" for line in lines)
    assert [line.text for line in own] in (["scoring a"], ["scoring b"]) and own[0].action == first.key


async def test_a_blob_stored_result_is_fetched(tmp_path: Path) -> None:
    n = INLINE_LIMIT + 100
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(big, n)
        got = await eng.get_run(run.id, actions=True)
    assert got.result == b"z" * n
    (rec,) = got.action_records
    assert rec.output_kind == "blob-msgpack" and rec.output == b"z" * n


async def test_pickled_values_are_left_alone_with_load_code_false(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(opaque, 2)
        typed = await eng.get_run(run.id)
        raw = await eng.get_run(run.id, load_code=False)
    assert typed.result == Opaque(2)
    assert raw.result is None and raw.note is not None and "pickled" in raw.note
    assert raw.args == {"0": 2}  # no signature read: positional values by position


async def test_runs_filter_by_task_status_tag_and_time_and_latest_run(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        first = await eng.run(scored, ["a"], tags=["x"])
        middle = datetime.now(UTC)
        await asyncio.sleep(0.01)
        second = await eng.run(scored, ["b"], scale=2.0)
        other = await eng.run(big, 3)
        assert [r.id for r in await eng.runs()] == [other.id, second.id, first.id]
        assert [r.id for r in await eng.runs(task=scored)] == [second.id, first.id]
        assert [r.id for r in await eng.runs(task="big")] == [other.id]
        assert [r.id for r in await eng.runs(task=scored, since=middle)] == [second.id]
        assert [r.id for r in await eng.runs(tag="x")] == [first.id]
        latest = await eng.latest_run(scored)
        assert latest is not None and latest.id == second.id
        assert latest.result == [Score("b", 4.0)]
        assert await eng.latest_run(scored, status="failed") is None
        assert await eng.latest_run("nothing-ran") is None


def test_sync_client_reads_pages_after_its_engine_closed(tmp_path: Path) -> None:
    run = engine.run(scored, ["a", "b", "c"])
    store = str(tmp_path / ".shoal" / "shoal.db")
    got = engine.get_run(run.id, store=store)
    assert got.result == [Score("a", 2.0), Score("b", 2.0), Score("c", 2.0)]
    assert len(list(got.actions())) == 4
    assert [a.task for a in got.actions(task="score", limit=2)] == ["score", "score"]
    assert {line.text for line in got.logs()} >= {"scoring a", "all scored"}
    latest = engine.latest_run(scored)
    assert latest is not None and latest.id == run.id and latest.result == got.result
    assert [r.id for r in engine.runs(task="scored", store=store)] == [run.id]
    # A copy (pickled, as to another process) reads its journal by path.
    copy = pickle.loads(pickle.dumps(got))
    assert copy == got and len(list(copy.actions())) == 4
    with pytest.raises(engine.RunNotFound):
        engine.get_run("no-such-run")


async def test_sync_forms_refuse_to_block_a_running_loop(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(big, 1)
        got = await eng.get_run(run.id)
        with pytest.raises(engine.EngineError, match="aactions"):
            list(got.actions())
        with pytest.raises(engine.EngineError, match=r"await eng\.get_run"):
            engine.get_run(run.id)


FLOW = """
import engine, msgspec

class Point(msgspec.Struct):
    x: int
    y: int

@engine.task
async def make(x: int, y: int = 2) -> Point:
    return Point(x, y)
"""


async def test_a_root_task_that_cannot_be_imported_gives_plain_values_and_says_why(tmp_path: Path) -> None:
    script = tmp_path / "gone_flow.py"
    script.write_text(textwrap.dedent(FLOW))
    module: Any = load_file(script)
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(module.make, 1)
        assert type(run.result).__name__ == "Point"
        typed = await eng.get_run(run.id)
        assert type(typed.result).__name__ == "Point" and typed.args == {"x": 1, "y": 2}
        script.unlink()
        sys.modules.pop(module.__name__, None)
        plain = await eng.get_run(run.id)
    assert plain.result == {"x": 1, "y": 2}  # msgpack data, not a Point
    assert plain.args == {"0": 1, "1": 2}
    assert plain.note is not None and "cannot be imported" in plain.note and "gone_flow" in plain.note
