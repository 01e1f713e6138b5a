"""The ``shoal`` command line: run, progress, inspection, logs, cancel, Ctrl-C, bad input."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

import engine
from engine._capture import CaptureStream, OutputCapture
from engine._cli import build_app
from engine._cli._progress import Progress

if TYPE_CHECKING:
    from engine._run import Run

DATA = Path(__file__).parent / "data" / "cli"
FLOWS = str(DATA / "flows.py")
FAILING = str(DATA / "failing.py")
SLOW = str(DATA / "slow.py")

# Restores Python's own SIGINT handler, which a parent that ignores SIGINT
# (a shell's background job) would otherwise pass on as "ignored".
BOOT = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'shoal'; from engine._cli import main; main()"
)


def shoal(*args: str) -> Result:
    return CliRunner().invoke(build_app(), list(args), catch_exceptions=False)


def last_run(*filters: str) -> dict[str, Any]:
    result = shoal("runs", "--json", *filters)
    assert result.exit_code == 0, result.output
    runs: list[dict[str, Any]] = json.loads(result.stdout)
    assert runs, "no run recorded"
    return runs[0]


def wait_for_running(deadline: float = 20.0) -> str:
    """The id of the run another process is running, once it is in the journal."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if Path(".shoal/shoal.db").exists():
            runs = json.loads(shoal("runs", "--json", "--status", "running").stdout or "[]")
            if runs and runs[0]["actions"] > 10:
                return str(runs[0]["id"])
        time.sleep(0.1)
    raise AssertionError("the run never showed up as running")


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", BOOT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# -- run ---------------------------------------------------------------------------


def test_run_prints_result_and_summary() -> None:
    result = shoal("run", FLOWS, "--n", "4", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"] == 0 + 1 + 4 + 9
    assert "succeeded" in result.stderr
    assert "5 actions" in result.stderr
    # A run shorter than the plain progress period prints no progress lines.
    assert "done," not in result.stderr


def test_run_turns_parameters_into_typed_options() -> None:
    result = shoal(
        "run", FLOWS, "--n", "2", "--scale", "2.5", "--names", "a", "--names", '["b", "c"]',
        "--loud", "--cfg", '{"lr": 0.5}', "--label", "42", "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "total": 2.5,
        "names": ["a", "b", "c"],
        "loud": True,
        "cfg": {"lr": 0.5, "layers": 2},
        "label": "42",
    }


def test_run_without_json_prints_repr_and_defaults_apply() -> None:
    result = shoal("run", f"{FLOWS}:main", "--no-loud")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == repr(
        {"total": 5.0, "names": [], "loud": False, "cfg": None, "label": "x"}
    )


def test_run_options_help_lists_parameters() -> None:
    result = shoal("run", FLOWS, "--help")
    assert result.exit_code == 0
    for text in ("--n INT", "--scale FLOAT", "--loud/--no-loud", "--cfg JSON", "[default: 3]"):
        assert text in result.stdout


def test_failed_run_exits_1_and_prints_failures() -> None:
    result = shoal("run", FAILING, "--n", "4")
    assert result.exit_code == 1
    run = last_run()
    assert run["status"] == "failed"
    err = result.stderr
    assert "ValueError: odd item 1" in err
    assert "second line of the error" not in err
    assert f"shoal resume {run['id']}" in err
    # Each failure is printed with its action id.
    show = json.loads(shoal("show", run["id"], "--json").stdout)
    for action in show["failed_actions"]:
        assert action["key"] in err


def test_tags_and_max_concurrency_and_filters() -> None:
    assert shoal("run", FLOWS, "--tag", "nightly", "--tag", "gpu", "--max-concurrency", "1").exit_code == 0
    assert shoal("run", FAILING).exit_code == 1
    tagged = json.loads(shoal("runs", "--json", "--tag", "nightly").stdout)
    assert [r["tags"] for r in tagged] == [["nightly", "gpu"]]
    failed = json.loads(shoal("runs", "--json", "--status", "failed").stdout)
    assert [r["task"] for r in failed] == ["main"] and failed[0]["root"].endswith(":main")
    assert len(json.loads(shoal("runs", "--json", "--limit", "1").stdout)) == 1
    table = shoal("runs").stdout
    assert tagged[0]["id"] in table and failed[0]["id"] in table
    assert "nightly, gpu" in table


def test_memory_store_runs_without_a_journal() -> None:
    result = shoal("run", FLOWS, "--store", "memory", "--json")
    assert result.exit_code == 0, result.output
    assert not Path(".shoal").exists()


def test_explicit_store_path(tmp_path: Path) -> None:
    store = str(tmp_path / "elsewhere.db")
    assert shoal("run", FLOWS, "--store", store).exit_code == 0
    assert len(json.loads(shoal("runs", "--json", "--store", store).stdout)) == 1
    assert shoal("runs", "--json").stdout.strip() == "[]"


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope.py"], "no such file: nope.py"),
        (["run", str(DATA / "notasks.py")], "defines no task"),
        (["run", str(DATA / "several.py")], "several tasks (first, second) and none is named 'main'"),
        (["run", f"{FLOWS}:nothing"], "has no task 'nothing'"),
        (["run", FLOWS, "--bogus", "1"], "no such option: --bogus"),
        (["run", FLOWS, "--n", "abc"], "invalid value for --n: expected int, got 'abc'"),
        (["run", FLOWS, "--cfg", '{"layers": 3}'], "invalid value for --cfg: expected"),
        (["run", FLOWS, "--n"], "option --n needs a value (int)"),
        (["run", f"{FLOWS}:needs"], "missing option: --count (int)"),
        (["run"], "missing argument FILE[:TASK]"),
        (["runs", "--status", "weird"], "invalid value for --status"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args: list[str], message: str) -> None:
    result = shoal(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["show", "logs", "resume", "cancel"])
def test_unknown_run_id_is_a_usage_error(command: str) -> None:
    # Once with no journal at all, once with a journal that lacks the run.
    for _ in range(2):
        result = shoal(command, "nosuchrun")
        assert result.exit_code == 2, result.output
        assert "nosuchrun" in result.stderr and "shoal runs" in result.stderr
        shoal("run", FLOWS)


def test_runs_without_journal_says_so_and_creates_nothing() -> None:
    result = shoal("runs")
    assert result.exit_code == 0
    assert "no runs recorded" in result.stderr
    assert not Path(".shoal").exists()


# -- show ------------------------------------------------------------------------------


def test_show_draws_groups_tasks_and_failures() -> None:
    assert shoal("run", f"{FLOWS}:chatty", "--n", "3").exit_code == 0
    run = last_run()
    out = shoal("show", run["id"]).stdout
    assert run["id"] in out and "succeeded" in out
    assert "group talk" in out
    assert "speak  3 succeeded" in out and "shout  1 succeeded" in out

    data = json.loads(shoal("show", run["id"], "--json", "--actions").stdout)
    assert {(t["task"], t["group"], t["succeeded"]) for t in data["tasks"]} == {
        ("chatty", None, 1), ("speak", "talk", 3), ("shout", None, 1),
    }
    assert len(data["actions"]) == 5 and data["failed_actions"] == []
    listed = shoal("show", run["id"], "--actions").stdout
    assert all(a["key"] in listed for a in data["actions"])

    assert shoal("run", FAILING, "--n", "4").exit_code == 1
    failed = last_run()
    out = shoal("show", failed["id"]).stdout
    assert "failed actions" in out and "ValueError: odd item" in out
    data = json.loads(shoal("show", failed["id"], "--json").stdout)
    assert {a["error"]["message"].splitlines()[0] for a in data["failed_actions"] if a["task"] == "check"} <= {
        "odd item 1", "odd item 3",
    }
    assert data["error"]["type"] == "ValueError"


# -- progress ------------------------------------------------------------------------------


async def test_plain_progress_prints_periodic_lines_then_a_summary() -> None:
    module = engine._loader.load_file(SLOW)
    out = io.StringIO()
    console = Console(file=out, width=200)
    async with engine.Engine(store="memory", max_concurrency=20) as eng:
        progress = Progress(eng, console, live=False, plain_every=0.05)
        run = await eng.submit(module.main, 200)
        await progress.follow(run)
        progress.close()
    text = out.getvalue()
    lines = [line for line in text.splitlines() if line.startswith("[")]
    assert lines, text
    assert any(" nap: " in line and " done, 0 failed" in line for line in lines)
    assert text.rstrip().splitlines()[-1].startswith(f"run {run.id} succeeded in ")


async def test_live_progress_renders_tasks_and_failures() -> None:
    module = engine._loader.load_file(FAILING)
    out = io.StringIO()
    console = Console(file=out, width=150, force_terminal=True)
    async with engine.Engine(store="memory") as eng:
        progress = Progress(eng, console, live=True, live_every=0.01)
        run = await eng.submit(module.main, 6)
        await progress.follow(run)
        progress.close()
        assert run.status == "failed"
    text = out.getvalue()
    for word in ("check", "pending", "running", "succeeded", "failed", "cached", "rate", "elapsed", "actions"):
        assert word in text
    assert "ValueError: odd item 1" in text
    assert "second line" not in text
    assert progress.failures_seen >= 1


async def test_progress_ignores_other_events_and_other_runs() -> None:
    async with engine.Engine(store="memory") as eng:
        progress = Progress(eng, Console(file=io.StringIO()), live=False)
        module = engine._loader.load_file(FAILING)
        other = await eng.run(module.main, 4)
        assert other.status == "failed"
        # Only failure events were queued, none of the starts and successes.
        queued = progress.failures._queue.qsize()
        assert queued == other.stats["failed"]
        progress.close()


# -- capture and logs ---------------------------------------------------------------------------


async def _captured_run(eng: engine.Engine, task: Any, *args: Any) -> tuple[Run, OutputCapture]:
    run = await eng.submit(task, *args)
    # The run's first step has not started yet: install capture now, as
    # Run._drive does before the root action.
    capture = OutputCapture(run, flush_every=0.05)
    capture.start()
    await eng.wait_run(run)
    await capture.stop()
    return run, capture


async def _chatty_captured() -> tuple[Run, list[tuple[str, float, str, str]], dict[str, str]]:
    module = engine._loader.load_file(FLOWS)
    before = sys.stdout, sys.stderr
    async with engine.Engine() as eng:
        run, _ = await _captured_run(eng, module.chatty, 2)
        assert run.status == "succeeded"
        assert (sys.stdout, sys.stderr) == before
        rows = await (await eng.journal()).logs(run.id)
        detail = await eng.get_run(run.id, actions=True)
    return run, rows, {rec.task: rec.key for rec in detail.action_records}


def test_capture_saves_prints_and_logs_per_action(capsys: pytest.CaptureFixture[str]) -> None:
    run, rows, keys = asyncio.run(_chatty_captured())
    texts = [(action, stream, text) for action, _at, stream, text in rows]
    speak_lines = [t for a, s, t in texts if s == "stdout" and t.startswith("speaking")]
    assert speak_lines == ["speaking 0 ...and more", "speaking 1 ...and more"]
    assert (keys["chatty"], "stdout", "root done") in texts
    assert (keys["chatty"], "stderr", "to stderr") in texts
    assert (keys["chatty"], "log", "WARNING flows: careful 2") in texts
    assert (keys["shout"], "stdout", "thread says hi") in texts
    # Still passed through to the real streams.
    seen = capsys.readouterr()
    assert "speaking 0 ...and more" in seen.out and "to stderr" in seen.err

    # ... and shown by shoal logs.
    out = shoal("logs", run.id).stdout
    assert "root done" in out and "[stderr] to stderr" in out and "[log] WARNING flows: careful 2" in out
    only = shoal("logs", run.id, keys["shout"][:10]).stdout
    assert only.strip() == "thread says hi"
    as_json = json.loads(shoal("logs", run.id, "--json").stdout)
    assert {"action", "at", "stream", "text"} <= set(as_json[0])
    assert "no output recorded" in shoal("logs", run.id, "ffffffffff").stderr


async def test_capture_is_shared_by_concurrent_runs_and_removed_by_the_last() -> None:
    @engine.task
    async def talk(word: str, pause: float) -> str:
        for i in range(3):
            print(f"{word} {i}")  # noqa: T201 - output to capture
            await asyncio.sleep(pause)
        return word

    original = sys.stdout
    async with engine.Engine() as eng:
        run_a = await eng.submit(talk, "alpha", 0.01)
        run_b = await eng.submit(talk, "beta", 0.02)
        cap_a, cap_b = OutputCapture(run_a), OutputCapture(run_b)
        cap_a.start()
        cap_b.start()
        installed = sys.stdout
        assert isinstance(installed, CaptureStream) and set(installed.hub.captures) == {run_a.id, run_b.id}
        await eng.wait_run(run_a)
        await cap_a.stop()
        assert sys.stdout is installed  # run_b still captures
        await eng.wait_run(run_b)
        await cap_b.stop()
        assert sys.stdout is original
        assert not any(isinstance(h, logging.Handler) and h.__class__.__name__ == "CaptureHandler"
                       for h in logging.getLogger().handlers)
        journal = await eng.journal()
        logs_a = [t for _a, _at, _s, t in await journal.logs(run_a.id)]
        logs_b = [t for _a, _at, _s, t in await journal.logs(run_b.id)]
    assert logs_a == ["alpha 0", "alpha 1", "alpha 2"]
    assert logs_b == ["beta 0", "beta 1", "beta 2"]


async def test_capture_flushes_while_the_run_is_going() -> None:
    release = asyncio.Event()

    @engine.task
    async def drip() -> None:
        print("early line")  # noqa: T201 - output to capture
        await release.wait()

    async with engine.Engine() as eng:
        run = await eng.submit(drip)
        journal = await eng.journal()
        seen: list[Any] = []
        for _ in range(3000):
            seen = await journal.logs(run.id)
            if seen:
                break
            await asyncio.sleep(0.01)
        assert not run.done and [row[3] for row in seen] == ["early line"]
        release.set()
        await eng.wait_run(run)


async def test_capture_ignores_memory_runs() -> None:
    @engine.task
    async def quiet() -> int:
        print("not captured")  # noqa: T201 - output to capture
        return 1

    original = sys.stdout
    async with engine.Engine(store="memory") as eng:
        run = await eng.submit(quiet)
        capture = OutputCapture(run)
        capture.start()
        assert sys.stdout is original
        await eng.wait_run(run)
        await capture.stop()


@pytest.mark.skipif(
    "OutputCapture" not in Path(inspect.getfile(OutputCapture)).with_name("_run.py").read_text(),
    reason="Run._drive does not install OutputCapture yet",
)
def test_logs_of_a_cli_run() -> None:
    assert shoal("run", f"{FLOWS}:chatty").exit_code == 0
    out = shoal("logs", last_run()["id"]).stdout
    assert "speaking 1 ...and more" in out and "thread says hi" in out


# -- cancel, Ctrl-C, resume ------------------------------------------------------------------------


def test_ctrl_c_cancels_records_and_exits_130() -> None:
    proc = spawn("run", SLOW)
    try:
        run_id = wait_for_running()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 130, err
    assert f"shoal resume {run_id}" in err
    assert last_run()["status"] == "cancelled"
    shown = json.loads(shoal("show", run_id, "--json").stdout)
    assert any(t["cancelled"] for t in shown["tasks"])


def test_cancel_from_another_process() -> None:
    proc = spawn("run", SLOW)
    try:
        run_id = wait_for_running()
        result = shoal("cancel", run_id, "--wait", "--timeout", "20")
        if result.exit_code != 0:
            stop(proc)
            raise AssertionError(result.output + proc.communicate()[1][-2000:])
        assert f"run {run_id} is cancelled" in result.stderr
        _out, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 1, err
    assert "cancelled" in err
    again = shoal("cancel", run_id)
    assert again.exit_code == 0 and "nothing to cancel" in again.stderr
