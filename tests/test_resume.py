"""Resume in place: recorded outputs are replayed, the rest runs again.

The crash tests run a real flow in a child process, kill it with SIGKILL
and resume it in another process; executions are counted through marker
files that the flow leaves behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import pytest

import engine
from engine._loader import load_file

if TYPE_CHECKING:
    from collections.abc import Iterator

FLOWS = Path(__file__).parent / "data" / "journal"
FLOW = FLOWS / "flow.py"

#: Executions of the tasks below, by task and argument (cleared per test).
CALLS: Counter[tuple[str, int]] = Counter()
#: Arguments of ``step`` that raise (set per test).
FAILING: set[int] = set()


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    CALLS.clear()
    FAILING.clear()
    yield
    CALLS.clear()
    FAILING.clear()


class StepFailed(Exception):
    pass


@engine.task
async def step(i: int) -> int:
    CALLS["step", i] += 1
    if i in FAILING:
        raise StepFailed(f"step {i} failed")
    return i * i


@engine.task
async def pipeline(n: int) -> list[int]:
    return list(await asyncio.gather(*(step(i) for i in range(n))))


@engine.task
async def slow(i: int) -> int:
    CALLS["slow", i] += 1
    if i > 0:
        await asyncio.sleep(30)
    return i


@engine.task
async def mostly_slow(n: int) -> list[int]:
    return list(await asyncio.gather(*(slow(i) for i in range(n))))


def _store(tmp_path: Path) -> Path:
    return tmp_path / "journal" / "shoal.db"


# -- in process, root task in an importable module -------------------------------


async def test_resume_replays_succeeded_and_reruns_failed(tmp_path: Path) -> None:
    FAILING.update({2, 5})
    async with engine.Engine(store=_store(tmp_path)) as eng:
        first = await eng.run(pipeline, 8)
    assert first.status == "failed"
    assert isinstance(first.error, StepFailed)
    assert all(CALLS["step", i] == 1 for i in range(8))

    FAILING.clear()
    async with engine.Engine(store=_store(tmp_path)) as eng:
        again = await eng.resume(first.id)
        assert again.id == first.id
        assert again.status == "succeeded"
        assert again.result == [i * i for i in range(8)]
        assert again.attempt == first.attempt + 1
        assert again.counters["step"].replayed == 6
        summary = (await eng.runs())[0]
    # Only the two that failed ran again.
    assert {i: CALLS["step", i] for i in range(8)} == {i: 2 if i in (2, 5) else 1 for i in range(8)}
    assert summary.id == first.id
    assert summary.status == "succeeded"
    assert summary.attempt == 2


async def test_resume_reruns_cancelled_and_unfinished(tmp_path: Path) -> None:
    async with engine.Engine(store=_store(tmp_path)) as eng:
        run = await eng.submit(mostly_slow, 4)
        while run.counters.get("slow") is None or run.counters["slow"].succeeded < 1:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        run.cancel()
        await run.wait()
        assert run.status == "cancelled"
        details = await eng.get_run(run.id, actions=True)
    assert {i: CALLS["slow", i] for i in range(4)} == dict.fromkeys(range(4), 1)
    assert Counter((r.task, r.state) for r in details.action_records) == {
        ("mostly_slow", "cancelled"): 1,
        ("slow", "succeeded"): 1,
        ("slow", "cancelled"): 3,
    }

    async with engine.Engine(store=_store(tmp_path)) as eng:
        resuming = asyncio.ensure_future(eng.resume(run.id))
        while any(CALLS["slow", i] < 2 for i in (1, 2, 3)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        # The three cancelled ones run again; slow(0) is replayed.
        assert CALLS["slow", 0] == 1
        resuming.cancel()
        with pytest.raises(asyncio.CancelledError):
            await resuming
        summary = await eng.get_run(run.id)
    assert summary.status == "cancelled"
    assert summary.attempt == 2


async def test_resume_of_succeeded_run_returns_its_result(tmp_path: Path) -> None:
    async with engine.Engine(store=_store(tmp_path)) as eng:
        run = await eng.run(pipeline, 3)
    assert run.result == [0, 1, 4]
    CALLS.clear()
    async with engine.Engine(store=_store(tmp_path)) as eng:
        again = await eng.resume(run.id)
        assert again.status == "succeeded"
        assert again.result == [0, 1, 4]
        assert again.id == run.id
        assert again.attempt == run.attempt
        assert (await eng.get_run(run.id)).attempt == 1
    assert not CALLS


async def test_resume_unknown_run(tmp_path: Path) -> None:
    async with engine.Engine(store=_store(tmp_path)) as eng:
        await eng.run(pipeline, 1)
        with pytest.raises(engine.RunNotFound, match="no-such-run") as info:
            await eng.resume("no-such-run")
        assert str(_store(tmp_path)) in str(info.value)
        with pytest.raises(engine.RunNotFound):
            await eng.get_run("no-such-run")


def test_sync_resume_with_default_engine(tmp_path: Path) -> None:
    FAILING.add(1)
    first = engine.run(pipeline, 3)
    assert first.status == "failed"
    assert (tmp_path / ".shoal" / "shoal.db").is_file()
    FAILING.clear()
    again = engine.resume(first.id)
    assert again.result == [0, 1, 4]
    assert CALLS["step", 0] == 1 and CALLS["step", 1] == 2


async def test_aresume_with_default_engine(tmp_path: Path) -> None:
    FAILING.add(0)
    try:
        first = await engine.arun(pipeline, 2)
        assert first.status == "failed"
        FAILING.clear()
        again = await engine.aresume(first.id)
        assert again.result == [0, 1]
        assert CALLS["step", 1] == 1
    finally:
        await engine._api.default_engine().aclose()


# -- root tasks in files -----------------------------------------------------------

FILE_FLOW = '''
import os
from pathlib import Path
import engine

@engine.task
async def part(i: int) -> int:
    log = Path(os.environ["FLOW_LOG"])
    with log.open("a") as fh:
        fh.write(f"{i}\\n")
    if i == 2 and not Path(os.environ["FLOW_LOG"] + ".ok").exists():
        raise RuntimeError("part 2 is not ready")
    return i + 100

@engine.task
async def main(n: int) -> int:
    total = 0
    for i in range(n):
        total += await part(i)
    return total
'''


def _executions(log: Path) -> Counter[int]:
    return Counter(int(line) for line in log.read_text().split())


@pytest.mark.parametrize("name", ["myflow", "json"])
async def test_resume_of_file_loaded_with_load_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # "json" collides with a module already imported: the file is loaded
    # under a private name, which resume must not try to import.
    folder = tmp_path / f"flows_{name}"
    folder.mkdir()
    script = folder / f"{name}.py"
    script.write_text(FILE_FLOW)
    log = tmp_path / "log"
    monkeypatch.setenv("FLOW_LOG", str(log))
    monkeypatch.syspath_prepend(str(folder))
    module = load_file(script)
    async with engine.Engine(store=_store(tmp_path)) as eng:
        first = await eng.run(module.main, 4)
        assert first.status == "failed"
        Path(f"{log}.ok").touch()  # noqa: ASYNC240
        again = await eng.resume(first.id)
        assert again.result == 100 * 4 + 6
    assert _executions(log) == {0: 1, 1: 1, 2: 2, 3: 1}
    # Another process finds the root task again through the recorded file.
    Path(f"{log}.ok").unlink()  # noqa: ASYNC240
    async with engine.Engine(store=_store(tmp_path)) as eng:
        third = await eng.run(module.main, 3)
    assert third.status == "failed"
    Path(f"{log}.ok").touch()  # noqa: ASYNC240
    out = _python(
        tmp_path,
        f"import engine; r = engine.Engine; import asyncio\n"
        f"async def go():\n"
        f"    async with engine.Engine(store={str(_store(tmp_path))!r}) as eng:\n"
        f"        r = await eng.resume({third.id!r})\n"
        f"        print('RESULT', r.status, r.result)\n"
        f"asyncio.run(go())\n",
    )
    assert "RESULT succeeded 303" in out
    assert _executions(log) == {0: 2, 1: 2, 2: 4, 3: 1}


async def test_resume_when_root_task_cannot_be_imported(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    folder.mkdir()
    script = folder / "vanishing_flow.py"
    script.write_text(FILE_FLOW)
    os.environ["FLOW_LOG"] = str(tmp_path / "log")
    try:
        module = load_file(script)
        async with engine.Engine(store=_store(tmp_path)) as eng:
            run = await eng.run(module.main, 3)
        assert run.status == "failed"
    finally:
        del os.environ["FLOW_LOG"]
        sys.modules.pop(module.__name__, None)
        sys.path.remove(str(folder))

    # The task was renamed.
    script.write_text(FILE_FLOW.replace("async def main", "async def main2"))
    async with engine.Engine(store=_store(tmp_path)) as eng:
        with pytest.raises(engine.ImportFailed, match="main"):
            await eng.resume(run.id)
    sys.modules.pop("vanishing_flow", None)
    # Importing it fails.
    script.write_text("raise SystemError('broken on purpose')\n")
    async with engine.Engine(store=_store(tmp_path)) as eng:
        with pytest.raises(engine.ImportFailed, match="broken on purpose"):
            await eng.resume(run.id)
    # The file is gone.
    script.unlink()
    sys.modules.pop("vanishing_flow", None)
    async with engine.Engine(store=_store(tmp_path)) as eng:
        with pytest.raises(engine.ImportFailed, match="vanishing_flow") as info:
            await eng.resume(run.id)
    assert "restore the code" in str(info.value)
    if str(folder) in sys.path:
        sys.path.remove(str(folder))


# -- crashes: SIGKILL a child process, resume in another --------------------------


def _env(tmp_path: Path, marks: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SHOAL_HOME=str(tmp_path / ".shoal"), FLOW_MARKS=str(marks), FLOW_DELAY="0.03", FLOW_TAIL="0"
    )
    env.update(extra)
    return env


def _python(tmp_path: Path, code: str, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _start(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a child process; its output goes to a file in ``tmp_path`` (for failures)."""
    with (tmp_path / "child.log").open("ab") as log:
        return subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=log, stderr=log)


def _poll(db_path: Path, sql: str) -> tuple[object, ...] | None:
    if not db_path.exists():
        return None
    try:
        db = sqlite3.connect(db_path, timeout=1.0)
        try:
            row: tuple[object, ...] | None = db.execute(sql).fetchone()
            return row
        finally:
            db.close()
    except sqlite3.Error:
        return None


def _succeeded_leaves(db_path: Path, run_id: str) -> set[int]:
    db = sqlite3.connect(db_path)
    try:
        rows = db.execute(
            "SELECT output FROM actions WHERE run_id=? AND task='leaf' AND state='succeeded'",
            (run_id,),
        ).fetchall()
    finally:
        db.close()
    return {int(msgspec.msgpack.decode(out)["i"]) for (out,) in rows}


def _marks(marks: Path, kind: str) -> Counter[int]:
    return Counter(int(p.name.split("-")[1]) for p in marks.iterdir() if p.name.startswith(kind + "-"))


def _kill_when(proc: subprocess.Popen[bytes], db_path: Path, leaves: int, chunks: int) -> str:
    """SIGKILL ``proc`` once ``leaves`` leaf and ``chunks`` chunk actions are committed."""
    sql = (
        "SELECT run_id, sum(task='leaf'), sum(task='chunk') FROM actions "
        "WHERE state='succeeded' AND kind='action' GROUP BY run_id"
    )
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the flow finished before it could be killed"
            row = _poll(db_path, sql)
            if row is not None and int(row[1]) >= leaves and int(row[2] or 0) >= chunks:  # type: ignore[call-overload]
                os.kill(proc.pid, signal.SIGKILL)
                return str(row[0])
            time.sleep(0.005)
        raise AssertionError("the flow made no progress")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


N = 20
EXPECTED = sum(i * i + i * 10 for i in range(N))


def _check_resumed(tmp_path: Path, marks: Path, run_id: str, before: set[int], out: str) -> None:
    assert f"RESULT {run_id} succeeded {EXPECTED} 2" in out, out
    leaves = _marks(marks, "leaf")
    assert set(leaves) == set(range(N))
    # No action that had succeeded ran twice.
    assert {i: leaves[i] for i in before} == dict.fromkeys(before, 1)
    traces = _marks(marks, "trace")
    assert all(1 <= traces[i] <= leaves[i] for i in range(N))
    assert {i: traces[i] for i in before} == dict.fromkeys(before, 1)


def _resume_elsewhere(cwd: Path, env: dict[str, str], run_id: str) -> subprocess.CompletedProcess[str]:
    """Resume ``run_id`` in another process (what a user does after a crash)."""
    return subprocess.run(
        [sys.executable, "-c", RESUME, run_id], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


RESUME = (
    "import sys, engine\n"
    "r = engine.resume(sys.argv[1])\n"
    "print('RESULT', r.id, r.status, r.result, r.attempt, r.stats['replayed'])\n"
)


@pytest.mark.parametrize(
    ("leaves", "chunks", "tail"),
    [(1, 0, "0"), (N // 2, 0, "0"), (N, N // 5, "30")],
    ids=["early", "mid", "late"],
)
def test_script_killed_then_resumed_in_another_process(
    tmp_path: Path, leaves: int, chunks: int, tail: str
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    db_path = tmp_path / ".shoal" / "shoal.db"
    proc = _start(tmp_path, [str(FLOW), str(N)], _env(tmp_path, marks, FLOW_TAIL=tail))
    run_id = _kill_when(proc, db_path, leaves, chunks)
    assert proc.returncode == -signal.SIGKILL
    before = _succeeded_leaves(db_path, run_id)
    assert len(before) >= leaves
    assert _poll(db_path, f"SELECT status, root FROM runs WHERE id='{run_id}'") == ("running", "__main__:main")

    out = _resume_elsewhere(tmp_path, _env(tmp_path, marks), run_id)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_resumed(tmp_path, marks, run_id, before, out.stdout)
    # Succeeded leaves under an unfinished chunk, or whole chunks, were replayed.
    assert int(out.stdout.split()[-1]) >= 1


@pytest.mark.parametrize("how", ["module", "load_file"])
def test_flow_killed_then_resumed(tmp_path: Path, how: str) -> None:
    """The root task lives in an importable module, or in a file loaded like ``shoal run FILE``."""
    marks = tmp_path / "marks"
    marks.mkdir()
    db_path = tmp_path / ".shoal" / "shoal.db"
    if how == "module":
        start = "import sys, engine, flow\nengine.run(flow.main, int(sys.argv[1]))\n"
        env = _env(tmp_path, marks, PYTHONPATH=str(FLOWS))
    else:
        start = (
            "import sys, engine\nfrom engine._loader import load_file\n"
            f"m = load_file({str(FLOW)!r})\nengine.run(m.main, int(sys.argv[1]))\n"
        )
        env = _env(tmp_path, marks)
    proc = _start(tmp_path, ["-c", start, str(N)], env)
    run_id = _kill_when(proc, db_path, N // 2, 0)
    before = _succeeded_leaves(db_path, run_id)
    root = _poll(db_path, f"SELECT root FROM runs WHERE id='{run_id}'")
    assert root == ("flow:main",)
    # Resume in yet another process, with no PYTHONPATH: found through the file.
    out = _resume_elsewhere(tmp_path, _env(tmp_path, marks), run_id)
    assert out.returncode == 0, out.stdout + out.stderr
    _check_resumed(tmp_path, marks, run_id, before, out.stdout)


def test_flow_killed_then_resumed_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    db_path = tmp_path / ".shoal" / "shoal.db"
    proc = _start(tmp_path, [str(FLOW), str(N)], _env(tmp_path, marks))
    run_id = _kill_when(proc, db_path, 3, 0)
    before = _succeeded_leaves(db_path, run_id)
    monkeypatch.setenv("FLOW_MARKS", str(marks))
    monkeypatch.setenv("FLOW_DELAY", "0")
    monkeypatch.syspath_prepend(str(FLOWS))
    run = engine.resume(run_id)
    out = f"RESULT {run.id} {run.status} {run.result} {run.attempt}"
    _check_resumed(tmp_path, marks, run_id, before, out)
    assert run.stats["replayed"] >= len(before)


def test_killed_twice_then_resumed(tmp_path: Path) -> None:
    """A resumed run that is killed again resumes again; attempts keep counting."""
    marks = tmp_path / "marks"
    marks.mkdir()
    db_path = tmp_path / ".shoal" / "shoal.db"
    proc = _start(tmp_path, [str(FLOW), str(N)], _env(tmp_path, marks))
    run_id = _kill_when(proc, db_path, 5, 0)
    first = _succeeded_leaves(db_path, run_id)
    proc = _start(tmp_path, ["-c", RESUME, run_id], _env(tmp_path, marks))
    assert _kill_when(proc, db_path, 12, 0) == run_id
    second = _succeeded_leaves(db_path, run_id)
    counts = _marks(marks, "leaf")
    out = _python(tmp_path, RESUME.replace("sys.argv[1]", repr(run_id)), _env(tmp_path, marks))
    assert f"RESULT {run_id} succeeded {EXPECTED} 3" in out
    leaves = _marks(marks, "leaf")
    assert first <= second
    assert {i: leaves[i] for i in first} == dict.fromkeys(first, 1)
    # What succeeded by the second kill did not run in the third process.
    assert {i: leaves[i] for i in second} == {i: counts[i] for i in second}


def test_resume_refuses_a_run_still_running(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    db_path = tmp_path / ".shoal" / "shoal.db"
    proc = _start(tmp_path, [str(FLOW), str(N)], _env(tmp_path, marks, FLOW_TAIL="30"))
    try:
        deadline = time.monotonic() + 30
        row = None
        while row is None and time.monotonic() < deadline:
            row = _poll(db_path, "SELECT id FROM runs")
            time.sleep(0.01)
        assert row is not None
        with pytest.raises(engine.EngineError, match=f"still running in process {proc.pid}"):
            engine.resume(str(row[0]))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_flow_script_is_importable_without_running() -> None:
    # Guard for the helpers above: importing the flow must not start a run.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(FLOWS)!r})
        import flow
        print(flow.expected(3))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["35"], proc.stderr


async def test_replayed_calls_work_wherever_a_call_does(tmp_path: Path) -> None:
    """On resume a replayed call is awaitable, gatherable and can become a task."""
    attempts = 0

    @engine.task
    async def leaf(i: int) -> int:
        return i * 2

    @engine.task
    async def root() -> list[int]:
        nonlocal attempts
        attempts += 1
        direct = await leaf(1)
        gathered = await asyncio.gather(leaf(2), leaf(3))
        spawned = await asyncio.create_task(leaf(4))
        waited = await asyncio.wait_for(leaf(5), 10)
        if attempts == 1:
            raise RuntimeError("fail once, after the children")
        return [direct, *gathered, spawned, waited]

    async with engine.Engine(store=tmp_path / "j.db") as eng:
        first = await eng.run(root)
        assert first.status == "failed"
        again = await eng.resume(first.id, task=root)
    assert again.result == [2, 4, 6, 8, 10]
    assert again.counters["leaf"].replayed == 5
    assert again.counters["leaf"].succeeded == 5


async def test_cancel_of_a_run_whose_process_died_records_it_cancelled(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    db_path = tmp_path / ".shoal" / "shoal.db"
    proc = _start(tmp_path, [str(FLOW), str(N)], _env(tmp_path, marks))
    run_id = _kill_when(proc, db_path, 2, 0)
    async with engine.Engine(store=db_path) as eng:
        journal = await eng.journal()
        assert await journal.request_cancel(run_id) == "abandoned"
        assert (await eng.get_run(run_id)).status == "cancelled"
        assert await journal.request_cancel(run_id) == "cancelled"
    out = await asyncio.to_thread(_resume_elsewhere, tmp_path, _env(tmp_path, marks), run_id)
    assert f"RESULT {run_id} succeeded {EXPECTED}" in out.stdout, out.stderr


def test_resume_uses_the_recorded_file_when_a_module_of_that_name_exists(tmp_path: Path) -> None:
    """A script named like an importable module (test.py) resumes from the script."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "test.py").write_text(
        "import os, engine\n"
        "@engine.task\n"
        "async def main(n: int) -> int:\n"
        "    if os.environ.get('FAIL_ONCE'):\n"
        "        raise RuntimeError('first attempt fails')\n"
        "    return n * 2\n"
        "if __name__ == '__main__':\n"
        "    print(engine.run(main, 21).id)\n"
    )
    env = {**os.environ, "SHOAL_HOME": str(tmp_path / ".shoal")}
    first = subprocess.run(
        [sys.executable, "test.py"], cwd=work, env={**env, "FAIL_ONCE": "1"},
        capture_output=True, text=True, timeout=60,
    )
    run_id = first.stdout.strip()
    assert run_id, first.stderr
    # Resumed from another folder, where `import test` finds the standard library's package.
    again = _resume_elsewhere(tmp_path, env, run_id)
    assert f"RESULT {run_id} succeeded 42" in again.stdout, again.stderr
