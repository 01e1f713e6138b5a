"""Offloaded actions through the public API, on real worker processes (``offload.Local``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from typer.testing import CliRunner

import _offload_tasks as t
import engine
import offload
from _offload_kit import gone, until
from engine._cli import build_app

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path


@pytest.fixture
async def box(tmp_path: Path) -> AsyncIterator[engine.Engine]:
    """A journaled engine whose target "box" is two local workers."""
    async with engine.Engine(home=tmp_path / "home", targets={"box": offload.Local(workers=2)}) as eng:
        yield eng


def workers_of(pid: int) -> list[psutil.Process]:
    """The worker processes started by ``pid`` (this test process)."""
    return [
        p for p in psutil.Process(pid).children(recursive=True)
        if any("offload.worker" in part for part in p.cmdline())
    ]


def text_of(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@engine.task
async def call(task: Any, *args: Any) -> Any:
    return await task(*args)


async def test_an_offloaded_action_runs_in_a_worker_process_and_says_where(box: engine.Engine) -> None:
    run = await box.run(call, t.where, 21)
    assert run.status == "succeeded", run.error
    value, pid = run.result
    assert value == 42 and pid != os.getpid()
    synced = await box.run(call, t.sync_where, 1)
    assert synced.result[0] == 2 and synced.result[1] != os.getpid()

    shown = await box.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "where"]
    [attempt] = action.attempts
    assert (attempt.attempt, attempt.state, attempt.target, attempt.backend) == (1, "succeeded", "box", "local")
    assert attempt.where.endswith(f":{pid}")
    assert attempt.started_at is not None and attempt.finished_at is not None
    assert attempt.started_at <= attempt.finished_at
    [root] = [a for a in shown.action_records if a.task == "call"]
    assert root.attempts[0].backend == "in-process" and root.attempts[0].where.endswith(f":{os.getpid()}")
    assert shown.bundle is not None and shown.bundle_size


async def test_a_fan_out_spreads_over_the_workers(box: engine.Engine) -> None:
    run = await box.run(t.fan, 40)
    assert run.result == [2 * i for i in range(40)]
    shown = await box.get_run(run.id, actions=True)
    places = {a.attempts[0].where for a in shown.action_records if a.task == "where"}
    assert len(places) == 2


async def test_the_tasks_own_exception_keeps_its_type_and_the_remote_traceback(box: engine.Engine) -> None:
    run = await box.run(call, t.unlucky, 7)
    assert run.status == "failed"
    assert type(run.error) is t.Unlucky and run.error.code == 7 and str(run.error) == "no luck (code 7)"
    assert "raise Unlucky" in str(run.error.__cause__)
    [failed] = [a for a in (await box.get_run(run.id, actions=True)).action_records if a.task == "unlucky"]
    assert failed.state == "failed" and failed.error is not None
    assert failed.error.type.endswith("Unlucky") and "raise Unlucky" in failed.error.traceback
    assert failed.attempts[0].state == "failed"


async def test_retries_of_an_offloaded_task_use_the_tasks_budget(box: engine.Engine, tmp_path: Path) -> None:
    marker = tmp_path / "fails"
    run = await box.run(call, t.fails_twice, str(marker))
    assert (run.status, run.result) == ("succeeded", 3)
    shown = await box.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "fails_twice"]
    assert [(a.attempt, a.state) for a in action.attempts] == [(1, "failed"), (2, "failed"), (3, "succeeded")]


def test_what_an_attempt_prints_and_logs_is_captured_under_its_action(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"

    async def go() -> engine.Run:
        async with engine.Engine(home=home, targets={"box": offload.Local(workers=1)}) as eng:
            return await eng.run(call, t.chatty, 5)

    run = asyncio.run(go())
    assert run.result == 5
    out, err = capfd.readouterr()
    assert "printed 5" in out and "to stderr 5" in err and "logged 5" in err
    shown = CliRunner().invoke(build_app(), ["logs", run.id, "--json"], env={"SHOAL_HOME": str(home)})
    assert shown.exit_code == 0, shown.output
    lines = json.loads(shown.stdout)
    seen = {(line["stream"], line["text"]) for line in lines if line["task"] == "chatty"}
    assert ("stdout", "printed 5") in seen and ("stderr", "to stderr 5") in seen
    assert any(stream == "log" and "logged 5" in text for stream, text in seen)


async def test_a_timeout_stops_the_remote_attempt_and_its_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    async with engine.Engine(home=tmp_path / "home", targets={"box": offload.Local(workers=1)}) as eng:
        # The worker is started first: timeout=1 covers the attempt, and a
        # worker's start on a busy machine could take most of that second.
        assert (await eng.run(call, t.where, 1)).status == "succeeded"
        run = await eng.run(call, t.sleeper, str(pidfile))
    assert run.status == "failed" and isinstance(run.error, engine.ActionTimeout)
    assert text_of(pidfile), "the attempt never started within its timeout"
    pid = int(text_of(pidfile))
    await until(lambda: gone(pid), "the timed-out attempt's process to end")


async def test_cancelling_a_run_kills_the_remote_process_group(box: engine.Engine, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    run = await box.submit(call, t.hangs, str(pidfile))
    await until(lambda: text_of(pidfile).strip(), "the attempt to start")
    worker, child = map(int, text_of(pidfile).split())
    run.cancel()
    await run.wait()
    assert run.status == "cancelled"
    await until(lambda: gone(worker) and gone(child), "the worker and its child to be killed")
    shown = await box.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "hangs"]
    assert action.state == "cancelled" and action.attempts[-1].state == "cancelled"


async def test_a_killed_worker_is_retried_without_using_the_tasks_retries(box: engine.Engine, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    run = await box.submit(call, t.dies_once, str(marker))
    await until(lambda: text_of(marker).strip(), "the attempt to start")
    first = int(text_of(marker).split()[0])
    os.kill(first, signal.SIGKILL)
    await run.wait()
    assert (run.status, run.result) == ("succeeded", 2)  # dies_once has no retries of its own
    shown = await box.get_run(run.id, actions=True)
    [action] = [a for a in shown.action_records if a.task == "dies_once"]
    assert [(a.attempt, a.state) for a in action.attempts] == [(1, "lost"), (1, "succeeded")]
    assert action.attempts[0].where.endswith(f":{first}") and action.attempts[1].where != action.attempts[0].where
    assert run.stats["retries"] == 1


async def test_files_go_to_the_worker_and_back(box: engine.Engine) -> None:
    @engine.task
    async def main() -> bytes:
        f = await engine.File.from_bytes(b"quiet please", name="in.txt")
        loud = await t.shout(f)
        return await loud.read_bytes()

    run = await box.run(main)
    assert (run.status, run.result) == ("succeeded", b"QUIET PLEASE")


async def test_aclose_leaves_no_worker_process(tmp_path: Path) -> None:
    async with engine.Engine(store="memory", targets={"box": offload.Local(workers=2)}) as eng:
        assert (await eng.run(t.fan, 4)).result == [0, 2, 4, 6]
        pids = [p.pid for p in workers_of(os.getpid())]
        assert len(pids) == 2
    assert all(gone(pid) for pid in pids)


async def test_an_engine_offload_map_sends_a_plain_task_elsewhere_or_back_here(tmp_path: Path) -> None:
    @engine.task
    async def main() -> list[int]:
        return [pid for _, pid in await asyncio.gather(t.where(1), t.sync_where(2))]  # type: ignore[call-overload]

    async with engine.Engine(store="memory", targets={"box": offload.Local(workers=1)}) as eng:
        pids = (await eng.run(main)).result
        assert all(pid != os.getpid() for pid in pids)
    async with engine.Engine(store="memory", offload={"where": "local", "sync_where": "local"}) as eng:
        assert (await eng.run(main)).result == [os.getpid(), os.getpid()]


async def test_an_unknown_target_is_a_clear_error(tmp_path: Path) -> None:
    async with engine.Engine(store="memory", offload={"where": "nowhere"}) as eng:
        run = await eng.run(call, t.where, 1)
    assert isinstance(run.error, engine.ConfigError)
    assert "'nowhere'" in str(run.error) and "not defined" in str(run.error)
    with pytest.raises(engine.ConfigError, match="'local'"):
        engine.Engine(store="memory", targets={"local": offload.Local()})
    with pytest.raises(engine.ConfigError, match="backend object"):
        engine.Engine(store="memory", targets={"box": "gpu1"})


async def test_a_closure_is_refused_before_anything_is_sent(box: engine.Engine) -> None:
    def make() -> engine.Task[[int], Any]:
        @engine.task(offload="box")
        async def inner(x: int) -> int:
            return x

        return inner

    @engine.task
    async def main() -> int:
        value: int = await make()(1)
        return value

    run = await box.run(main)
    assert isinstance(run.error, engine.InputError)
    assert "inner" in str(run.error) and "module level" in str(run.error)
    assert workers_of(os.getpid()) == []


async def test_an_argument_that_cannot_travel_is_a_clear_error(box: engine.Engine) -> None:
    @engine.task
    async def main() -> Any:
        return await t.where(lambda: 1)  # type: ignore[arg-type]

    run = await box.run(main)
    assert isinstance(run.error, engine.InputError)


async def test_resources_no_worker_can_give_fail_at_once(box: engine.Engine) -> None:
    run = await box.run(call, t.greedy)
    assert isinstance(run.error, engine.ResourceError)
    assert "greedy" in str(run.error) and "'box'" in str(run.error)


FLOW = '''
import sys
import time
from pathlib import Path

import engine
import offload


@engine.trace
def step(folder: str, i: int) -> int:
    with open(Path(folder) / "steps", "a") as fh:
        fh.write(f"{i}\\n")
    if i == 2 and not (Path(folder) / "go").exists():
        time.sleep(60)
    return i * 10


@engine.task(offload="box")
def work(folder: str, n: int) -> int:
    return sum(step(folder, i) for i in range(n))


@engine.task
async def main(folder: str, n: int = 3) -> int:
    return await work(folder, n)


async def go(folder: str) -> None:
    async with engine.Engine(targets={"box": offload.Local(workers=1)}) as eng:
        run = await eng.run(main, folder, 3)
        print(run.id, run.status, flush=True)


if __name__ == "__main__":
    import asyncio

    asyncio.run(go(sys.argv[1]))
'''


async def test_traces_of_an_offloaded_attempt_are_replayed_on_resume_after_a_crash(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "flow.py").write_text(FLOW)
    home = tmp_path / ".shoal"
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = subprocess.Popen(  # noqa: ASYNC220  (the driving process, to be killed)
        [sys.executable, str(project / "flow.py"), str(marks)],
        cwd=project,
        env={**os.environ, "SHOAL_HOME": str(home)},
    )
    try:
        steps = marks / "steps"
        deadline = time.monotonic() + 60
        db = home / "shoal.db"
        # Until the two first traces are in the journal and the third runs.
        while time.monotonic() < deadline:
            if steps.exists() and len(steps.read_text().split()) == 3 and db.exists():
                con = sqlite3.connect(db)
                try:
                    traced = con.execute("SELECT count(*) FROM actions WHERE kind='trace'").fetchone()[0]
                finally:
                    con.close()
                if traced == 2:
                    break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the flow never reached its third trace")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    (marks / "go").touch()
    [run] = await _runs(home)
    async with engine.Engine(home=home, targets={"box": offload.Local(workers=1)}) as eng:
        resumed = await eng.resume(run)
    assert (resumed.status, resumed.result) == ("succeeded", 0 + 10 + 20)
    # Steps 0 and 1 ran once (replayed on resume); step 2 ran before the crash and again after.
    assert (marks / "steps").read_text().split() == ["0", "1", "2", "2"]


async def _runs(home: Path) -> list[str]:
    async with engine.Engine(home=home) as eng:
        return [s.id for s in await eng.runs()]



async def test_a_task_the_worker_cannot_import_is_a_clear_error(tmp_path: Path) -> None:
    import _offload_unimportable as u

    # The module imports fine here; where the workers run, its own imports fail.
    picky = offload.Local(workers=1, env={"SHOAL_TEST_REFUSE_IMPORT": "1"})
    async with engine.Engine(store="memory", targets={"picky": picky}) as eng:
        run = await eng.run(call, u.lonely)
    assert run.status == "failed"
    assert isinstance(run.error, engine.ImportFailed), repr(run.error)
    message = str(run.error)
    assert "_offload_unimportable" in message and "_offload_missing" in message


async def test_a_backend_given_directly_is_named_after_its_class_and_serves_engines_in_turn(tmp_path: Path) -> None:
    for i in range(2):
        async with engine.Engine(home=tmp_path / "home") as eng:
            run = await eng.run(call, t.anonymous, i)
            assert run.result == 100 + i
            shown = await eng.run_summary(run.id, actions=True)
        [action] = [a for a in shown.action_records if a.task == "anonymous"]
        assert [(a.target, a.backend) for a in action.attempts] == [("offload.Local", "local")]
