"""The ``shoal`` command line: run, progress, inspection, logs, cancel, Ctrl-C, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
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

import msgspec
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
OVERRIDES = str(DATA / "overrides.py")

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


def wait_for_running(deadline: float = 20.0, min_actions: int = 11) -> str:
    """The id of the run another process is running, once it has recorded ``min_actions``."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if Path(".shoal/shoal.db").exists():
            runs = json.loads(shoal("runs", "--json", "--status", "running").stdout or "[]")
            if runs and runs[0]["actions"] >= min_actions:
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
        (["run", OVERRIDES, "--with", "nope.retries=1"], "the flow has no task 'nope'"),
        (["run", OVERRIDES, "--with", "flaky.retires=1"], "unknown option 'retires'. Did you mean 'retries'?"),
        (["run", OVERRIDES, "--with", "flaky.retries=abc"], "retries takes a whole number (or none), got 'abc'"),
        (["run", OVERRIDES, "--with", "flaky.timeout=-1"], "timeout= is a number of seconds > 0"),
        (["run", OVERRIDES, "--with", "flaky.resources=cpu=x"], "resources cpu= takes a number"),
        (["run", OVERRIDES, "--with", "flaky.name=other"], "cannot be overridden"),
        (["run", OVERRIDES, "--with", "flaky=3"], "expected TASK.OPTION=VALUE"),
        (["run", OVERRIDES, "--with", "flaky.offload=nowhere"], "--with flaky.offload=nowhere: there is no offload target 'nowhere'"),
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
    assert len(data["action_records"]) == data["actions"] == 5 and data["failed_actions"] == []
    listed = shoal("show", run["id"], "--actions").stdout
    assert all(a["key"] in listed for a in data["action_records"])

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


async def _chatty_captured() -> tuple[Run, list[tuple[str, float, str, str, int | None]], dict[str, str]]:
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
    texts = [(action, stream, text) for action, _at, stream, text, _rank in rows]
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
    unknown = shoal("logs", run.id, "ffffffffff")
    assert unknown.exit_code == 2 and "no action 'ffffffffff'" in unknown.stderr


async def test_capture_is_shared_by_concurrent_runs_and_removed_by_the_last() -> None:
    hold = asyncio.Event()  # keeps run_b going until run_a's capture has stopped

    @engine.task
    async def talk(word: str, pause: float) -> str:
        for i in range(3):
            print(f"{word} {i}")  # noqa: T201 - output to capture
            await asyncio.sleep(pause)
        if word == "beta":
            await hold.wait()
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
        hold.set()
        await eng.wait_run(run_b)
        await cap_b.stop()
        assert sys.stdout is original
        assert not any(isinstance(h, logging.Handler) and h.__class__.__name__ == "CaptureHandler"
                       for h in logging.getLogger().handlers)
        journal = await eng.journal()
        logs_a = [t for _a, _at, _s, t, _r in await journal.logs(run_a.id)]
        logs_b = [t for _a, _at, _s, t, _r in await journal.logs(run_b.id)]
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


# -- the live table, from counters ---------------------------------------------------------


class _Counted:
    """Stands for a run in the display: ``counters`` is all it reads."""

    def __init__(self, *counts: engine.TaskCounts) -> None:
        self.id = "r1"
        self.counters = {(c.name if c.group is None else (c.group, c.name)): c for c in counts}


def _counts(name: str, group: str | None = None, **states: int) -> engine.TaskCounts:
    counts = engine.TaskCounts(name, group)
    for state, n in states.items():
        setattr(counts, state, n)
    return counts


def _text(renderable: Any) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(renderable)
    return out.getvalue()


async def test_live_table_counts_work_done_apart_from_commits_and_shows_groups() -> None:
    now = [100.0]
    async with engine.Engine(store="memory") as eng:
        progress = Progress(eng, Console(file=io.StringIO()), live=True, clock=lambda: now[0])
        progress.close()
    square = _counts("square", "shards", running=1_000, committing=400_000, succeeded=100_000, upcoming=499_000)
    run = _Counted(
        _counts("main", running=1),
        square,
        _counts("check", "report", cancelled=3, failed=2, pending=1),
    )
    text = _text(progress.render(run))  # type: ignore[arg-type]
    header = next(line for line in text.splitlines() if "pending" in line).split()
    assert header == [
        "task", "pending", "running", "committing", "succeeded", "failed", "cancelled", "cached", "rate", "elapsed",
    ]
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    # Upcoming map calls are pending; what waits for its commit is not running.
    assert rows["square"][1:6] == ["499,000", "1,000", "400,000", "100,000", "0"]
    assert rows["check"][1:7] == ["1", "0", "0", "0", "2", "3"]
    lines = text.splitlines()
    assert lines.index(next(x for x in lines if "group shards" in x)) < lines.index(
        next(x for x in lines if x.split()[:1] == ["square"])
    )
    assert "group report" in text
    # The bar's total is the whole fan-out; done counts the work that is over.
    assert "500,005/1,000,007 actions done" in text
    assert "400,000 committing" in text

    # The rate follows finished work over the window, committed or not.
    now[0] += 2.0
    square.committing += 50_000  # 50,000 more finished, none of them committed
    square.upcoming -= 50_000
    text = _text(progress.render(run))  # type: ignore[arg-type]
    square_row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["square"])
    assert square_row[8] == "25,000/s"

    plain = progress.plain_lines(run)  # type: ignore[arg-type]
    assert any(line.endswith("shards/square: 550000/1000000 done (450,000 committing), 0 failed") for line in plain)
    assert any(line.endswith("report/check: 5/6 done, 2 failed, 3 cancelled") for line in plain)


async def test_a_finished_task_shows_its_average_rate() -> None:
    now = [0.0]
    async with engine.Engine(store="memory") as eng:
        progress = Progress(eng, Console(file=io.StringIO()), live=True, clock=lambda: now[0])
        progress.close()
    nap = _counts("nap", running=10)
    run = _Counted(nap)
    progress.render(run)  # type: ignore[arg-type]
    now[0] = 4.0
    nap.running, nap.succeeded = 0, 10
    progress.render(run)  # type: ignore[arg-type]
    now[0] = 60.0  # long after: no window left, the average remains
    row = next(line.split() for line in _text(progress.render(run)).splitlines() if line.split()[:1] == ["nap"])  # type: ignore[arg-type]
    assert row[8] == "2/s" and row[9] == "4.00s"


async def test_map_over_sized_items_gives_progress_its_total_up_front() -> None:
    seen: list[str] = []

    @engine.task
    async def item(i: int) -> int:
        if i == 0:
            run = engine.current_run()
            assert run is not None
            seen.append(_text(progress.render(run)))
        await asyncio.sleep(0)
        return i

    @engine.task
    async def fan(n: int) -> int:
        async with engine.group("items"):
            total = sum(await engine.map(item, range(n), concurrency=5))
        # A generator has no length: its calls are counted as they are made.
        total += sum(await engine.map(item, (i for i in range(1, 4)), concurrency=2))
        return total

    async with engine.Engine(store="memory") as eng:
        progress = Progress(eng, Console(file=io.StringIO()), live=True)
        run = await eng.run(fan, 50)
        progress.close()
    assert run.result == sum(range(50)) + 6
    assert "/51 actions done" in seen[0], seen[0]  # fan and the 50 items, from the first item on
    assert "group items" in seen[0]
    # Nothing is left announced once the maps are over.
    assert all(c.upcoming == 0 for c in run.counters.values())
    assert run.counters[("items", "item")].succeeded == 50 and run.counters["item"].succeeded == 3


async def test_map_stopped_early_withdraws_what_it_announced() -> None:
    @engine.task
    async def boom(i: int) -> int:
        if i == 3:
            raise ValueError("stop")
        return i

    @engine.task
    async def fan() -> int:
        return sum(await engine.map(boom, range(100), concurrency=4))

    async with engine.Engine(store="memory") as eng:
        run = await eng.run(fan)
    assert run.status == "failed"
    counts = run.counters["boom"]
    assert counts.upcoming == 0 and counts.total < 100


# -- the command's contract: stdout, pipes, JSON, exit codes ---------------------------------

PRINTER = str(DATA / "printer.py")
SLEEPER = str(DATA / "sleeper.py")


def shoal_process(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``shoal`` command in a child process, nothing configured (no logging, no pytest)."""
    return subprocess.run(
        [sys.executable, "-c", BOOT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_logs_show_each_record_once_with_its_task() -> None:
    result = shoal_process("run", f"{FLOWS}:chatty")
    assert result.returncode == 0, result.stderr
    # Python's last resort still shows the warning to the user...
    assert "careful 2" in result.stderr
    run_id = last_run()["id"]
    records = json.loads(shoal("show", run_id, "--actions", "--json").stdout)["action_records"]
    keys = {a["task"]: a["key"] for a in records}
    lines = shoal("logs", run_id).stdout.splitlines()
    # ... and the journal holds it once, as a log record, not again as stderr.
    assert [line for line in lines if "careful" in line] == [f"{keys['chatty']} chatty: [log] WARNING flows: careful 2"]
    speaks = sorted(f"{a['key']} speak: speaking" for a in records if a["task"] == "speak")
    assert sorted(line.rsplit(" ", 3)[0] for line in lines if " speak: " in line) == speaks
    assert f"{keys['shout']} shout: thread says hi" in lines
    as_json = json.loads(shoal("logs", run_id, "--json").stdout)
    assert {(row["task"], row["text"]) for row in as_json} >= {("shout", "thread says hi"), ("chatty", "root done")}


def test_a_reader_that_stops_early_fails_neither_the_run_nor_the_command() -> None:
    # `shoal run printer.py | head -n 3`, with a real pipe: head exits after three lines.
    script = f"set -o pipefail; {sys.executable} -c \"$BOOT\" run {PRINTER} | head -n 3"
    proc = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "BOOT": BOOT},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["result 0", "result 1", "result 2"]
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    # What the tasks printed went to stderr, and to the journal, whole.
    assert "action 7 line 19" in proc.stderr
    run = last_run()
    assert run["status"] == "succeeded" and run["actions"] == 51
    logs = shoal("logs", run["id"], "--json")
    assert len([r for r in json.loads(logs.stdout) if r["text"].startswith("action ")]) == 50 * 20


def test_json_stdout_holds_only_the_json_when_tasks_print() -> None:
    result = shoal("run", PRINTER, "--n", "3", "--lines", "2", "--result-lines", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == "result 0"
    assert "action 2 line 1" in result.stderr


async def test_capture_survives_a_closed_stdout(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)

    @engine.task
    async def loud(n: int) -> int:
        for i in range(n):
            print(f"loud {i}")  # noqa: T201 - output to capture
        return n

    try:
        async with engine.Engine() as eng:
            run = await eng.run(loud, 30)
            rows = await (await eng.journal()).logs(run.id)
    finally:
        monkeypatch.undo()
        with contextlib.suppress(BrokenPipeError):
            closed.close()
    assert run.status == "succeeded", run.error
    assert [text for _a, _at, _s, text, _r in rows] == [f"loud {i}" for i in range(30)]


def test_failed_run_with_json_prints_a_document() -> None:
    result = shoal("run", FAILING, "--n", "4", "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["run"] == last_run()["id"] and doc["status"] == "failed"
    assert doc["error"]["type"] == "ValueError" and doc["error"]["message"].startswith("odd item 1")
    assert "Traceback" in doc["error"]["traceback"]


def test_show_json_gives_actions_one_type() -> None:
    assert shoal("run", FLOWS, "--n", "4").exit_code == 0
    run_id = last_run()["id"]
    plain = json.loads(shoal("show", run_id, "--json").stdout)
    listed = json.loads(shoal("show", run_id, "--json", "--actions", "--limit", "2").stdout)
    assert plain["actions"] == listed["actions"] == 5
    assert "action_records" not in plain
    assert len(listed["action_records"]) == 2
    assert json.loads(shoal("runs", "--json").stdout)[0]["actions"] == 5


def test_show_gives_arguments_result_and_tracebacks() -> None:
    assert shoal("run", FLOWS, "--n", "2", "--names", "a", "--label", "y" * 1000).exit_code == 0
    run_id = last_run()["id"]
    out = shoal("show", run_id).stdout
    flat = "".join(out.split())  # the table wraps long values
    assert "arguments  2, 1.0, ['a'], False, None," in out
    assert "morecharacters)" in flat and "y" * 1000 not in flat  # long values are cut, and say so
    assert "result     {'total': 1.0," in out
    data = json.loads(shoal("show", run_id, "--json").stdout)
    assert data["args"] == {"args": [2, 1.0, ["a"], False, None, "y" * 1000], "kwargs": {}}
    assert data["result"]["total"] == 1.0

    assert shoal("run", FAILING, "--n", "4").exit_code == 1
    failed_id = last_run()["id"]
    out = shoal("show", failed_id).stdout
    assert "traceback of" in out and 'raise ValueError(f"odd item {i}' in out
    assert "(none: the run did not succeed)" in out


def test_show_says_when_a_listing_is_cut() -> None:
    assert shoal("run", FLOWS, "--n", "6").exit_code == 0
    run_id = last_run()["id"]
    page = shoal("show", run_id, "--actions", "--limit", "3").stdout
    assert "3 of 7 actions shown; use --offset 3 for more" in page
    last = shoal("show", run_id, "--actions", "--limit", "3", "--offset", "6").stdout
    assert "1 of 7 actions shown (from 7)" in last and "--offset" not in last.split("shown")[-1]
    whole = shoal("show", run_id, "--actions").stdout
    assert " of 7 actions shown" not in whole


def test_show_says_how_many_failures_it_left_out() -> None:
    assert shoal("run", FAILING, "--n", "60").exit_code == 1
    out = shoal("show", last_run()["id"]).stdout
    # 30 odd items and the root failed; the first 20 are listed.
    assert "20 of 31 failed actions shown" in out


@pytest.mark.parametrize("how", ["ctrl-c", "shoal cancel"])
def test_stopping_a_run_does_not_wait_for_sync_threads(how: str) -> None:
    proc = spawn("run", SLEEPER, "--seconds", "600")
    try:
        run_id = wait_for_running(min_actions=20)
        time.sleep(0.5)  # the sync task is in its thread by now
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            assert shoal("cancel", run_id).exit_code == 0
        # The thread sleeps for ten minutes; the command exits long before.
        _out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert proc.returncode == (130 if how == "ctrl-c" else 1), err
    assert "abandoned 1 sync-task thread still running" in err
    assert last_run()["status"] == "cancelled"


# -- packaging ----------------------------------------------------------------------------------

ROOT = Path(__file__).parent.parent


def test_version_and_shell_completion() -> None:
    from importlib.metadata import version

    result = shoal("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"shoal {version('shoal')}"
    assert "--install-completion" in shoal("--help").stdout
    # Typer's completion, as a shell asks for it.
    env = {**os.environ, "_SHOAL_COMPLETE": "complete_bash", "COMP_WORDS": "shoal ru", "COMP_CWORD": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", BOOT], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == {"run", "runs"}


def test_the_wheel_carries_license_metadata_and_the_command(tmp_path: Path) -> None:
    import zipfile

    if importlib.util.find_spec("hatchling") is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("hatchling is needed to build the wheel (pip install hatchling)")
        pytest.skip("hatchling is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("shoal-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        license_text = zf.read(f"{dist_info}/licenses/LICENSE").decode()
    headers = [line.split(": ", 1) for line in metadata.split("\n\n", 1)[0].splitlines() if ": " in line]
    fields: dict[str, list[str]] = {}
    for key, value in headers:
        fields.setdefault(key, []).append(value)
    assert fields["Name"] == ["shoal"]
    assert fields["License-Expression"] == ["Apache-2.0"] and fields["License-File"] == ["LICENSE"]
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    assert fields["Author"]
    classifiers = set(fields["Classifier"])
    assert {"Typing :: Typed", "Framework :: AsyncIO", "Programming Language :: Python :: 3.11"} <= classifiers
    requires = [r.split(";")[0].strip() for r in fields["Requires-Dist"] if "extra ==" not in r]
    assert not any(r.startswith("anyio") for r in requires)  # declared only if imported
    assert {"msgspec", "rich", "typer"} <= {r.split(">")[0].split("=")[0] for r in requires}
    assert "shoal = engine._cli:main" in entry_points
    assert "engine/py.typed" in names and "offload/py.typed" in names


# -- --offload TASK=TARGET ------------------------------------------------------------------

PLACED = str(DATA / "placed.py")


@pytest.mark.parametrize("value", ["where", "where=", "=box", " = ", "where:box"])
@pytest.mark.parametrize("command", ["run", "resume"])
def test_offload_must_be_task_equals_target(command: str, value: str) -> None:
    result = shoal(command, PLACED if command == "run" else "somerun", "--offload", value)
    assert result.exit_code == 2, result.output
    assert "invalid value for --offload: expected TASK=TARGET" in result.stderr
    assert f"got {value!r}" in result.stderr and "Traceback" not in result.output
    assert not Path(".shoal").exists()  # refused before anything ran


def test_offload_of_one_task_to_two_targets_is_refused() -> None:
    result = shoal("run", PLACED, "--offload", "where=box", "--offload", "where=lab")
    assert result.exit_code == 2, result.output
    assert "--offload sends task 'where' to both 'box' and 'lab'; give one" in result.stderr


def test_offload_of_a_task_the_file_lacks_names_the_tasks_there() -> None:
    result = shoal("run", PLACED, "--offload", "wher=box")
    assert result.exit_code == 2, result.output
    assert (
        f"--offload wher=box: {PLACED} has no task 'wher'; did you mean 'where'? "
        f"(tasks there: away, boxed, elsewhere, main, where, which)"
    ) in result.stderr
    assert not Path(".shoal").exists()


def _box_target() -> Path:
    path = Path("shoal.toml")
    path.write_text('[offload.box]\nbackend = "local"\nworkers = 1\n')
    return path.resolve()


@pytest.mark.parametrize("command", ["run", "resume"])
def test_offload_to_a_target_config_lacks_names_the_targets_there(command: str) -> None:
    if command == "resume":
        assert shoal("run", PLACED).exit_code == 0
        args = ["resume", last_run()["id"]]
    else:
        args = ["run", PLACED]
    result = shoal(*args, "--offload", "where=nowhere")
    assert result.exit_code == 2, result.output
    assert (
        "--offload where=nowhere: there is no offload target 'nowhere' (no config file was found, "
        "so no target is defined); define it in a [tool.shoal.offload.nowhere] table of pyproject.toml"
    ) in result.stderr
    config = _box_target()
    result = shoal(*args, "--offload", "where=bx")
    assert result.exit_code == 2, result.output
    assert (
        f"there is no offload target 'bx'; did you mean 'box'? (targets defined in {config}: box); "
        f"define it in a [offload.bx] table there, or give where=local to run the task in this process"
    ) in result.stderr


def test_resume_offload_of_a_task_the_run_lacks_names_the_tasks_there() -> None:
    assert shoal("run", PLACED).exit_code == 0
    result = shoal("resume", last_run()["id"], "--offload", "nope=local")
    assert result.exit_code == 2, result.output
    assert (
        f"--offload nope=local: {Path(PLACED).resolve()} has no task 'nope' "
        f"(tasks there: away, boxed, elsewhere, main, where, which)"
    ) in result.stderr


def test_offload_local_runs_a_task_in_this_process_whatever_its_code_says() -> None:
    _box_target()
    result = shoal_process("run", PLACED, "--boxes", "--offload", "boxed=local", "--json")
    assert result.returncode == 0, result.stderr
    pids = json.loads(result.stdout)
    (driver,) = pids["main"]
    assert pids["boxed"] == [driver]  # offload="box" in its code, undone
    boxed = next(
        r for r in json.loads(shoal("show", last_run()["id"], "--actions", "--json").stdout)["action_records"]
        if r["task"] == "boxed"
    )
    assert [(a["target"], a["backend"]) for a in boxed["attempts"]] == [("local", "in-process")]


def test_offload_sends_a_task_to_a_configured_target() -> None:
    _box_target()
    result = shoal_process("run", PLACED, "--n", "3", "--offload", "where=box", "--json")
    assert result.returncode == 0, result.stderr
    pids = json.loads(result.stdout)
    (driver,) = pids["main"]
    assert driver not in pids["where"] and len(set(pids["where"])) == 1  # workers = 1
    assert pids["which"] == [driver]
    records = json.loads(shoal("show", last_run()["id"], "--actions", "--json").stdout)["action_records"]
    placed = [r["attempts"][-1] for r in records if r["task"] == "where"]
    assert len(placed) == 3 and {(a["target"], a["backend"]) for a in placed} == {("box", "local")}
    assert all(a["where"].endswith(f":{pids['where'][0]}") for a in placed)
    listed = shoal("show", last_run()["id"], "--actions").stdout
    assert f"box {placed[0]['where']}" in listed


def test_resume_offload_places_the_actions_that_run_again() -> None:
    _box_target()
    failed = shoal_process("run", f"{PLACED}:away")
    assert failed.returncode == 1 and "must not run in the process that drives the run" in failed.stderr
    run_id = last_run()["id"]
    resumed = shoal_process("resume", run_id, "--offload", "elsewhere=box", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert isinstance(json.loads(resumed.stdout), int)
    assert last_run()["status"] == "succeeded"


# -- where attempts ran ----------------------------------------------------------------------


def test_show_actions_says_where_each_action_ran() -> None:
    import socket

    assert shoal("run", FLOWS, "--n", "2").exit_code == 0
    run_id = last_run()["id"]
    here = f"{socket.gethostname()}:{os.getpid()}"  # CliRunner runs the command in this process
    listed = shoal("show", run_id, "--actions").stdout
    (header,) = [line for line in listed.splitlines() if " action " in line and " task " in line]
    assert " attempt " in header and " where " in header
    rows = [line for line in listed.splitlines() if "│ square " in line]
    assert len(rows) == 2 and all(f"local {here}" in row for row in rows), listed
    data = json.loads(shoal("show", run_id, "--actions", "--json").stdout)
    for record in data["action_records"]:
        (attempt,) = record["attempts"]
        assert attempt == {
            "attempt": 1, "state": "succeeded", "target": "local", "backend": "in-process", "where": here,
            "started_at": record["started"], "finished_at": record["finished"], "ranks": [],
        }


def test_where_names_the_last_attempt_and_counts_them() -> None:
    from datetime import UTC, datetime

    from engine._cli._render import actions_table, where_text

    def at(ts: float) -> datetime:
        return datetime.fromtimestamp(ts, UTC)

    lost = engine.RecordedAttempt(1, "lost", "box", "local", "h1:100", at(1.0), at(2.0))
    again = engine.RecordedAttempt(1, "succeeded", "box", "local", "h1:101", at(2.5), at(3.0))
    rec = engine.RecordedAction(
        "r", "k1", None, "train", None, "succeeded", "action", 1, 1, at(1.0), at(3.0), None, 4, "msgpack",
        None, (lost, again), False, None,
    )
    assert where_text(rec) == "box h1:101 (2 attempts)"
    earlier = engine.RecordedAttempt(1, "failed", "local", "in-process", "", at(1.0), at(2.0))  # an earlier process of the run
    assert where_text(msgspec.structs.replace(rec, attempts=(earlier,))) == "local"
    assert where_text(msgspec.structs.replace(rec, attempts=())) == ""
    console = Console(width=200, file=io.StringIO())
    console.print(actions_table([rec]))
    assert "box h1:101 (2 attempts)" in console.file.getvalue()  # type: ignore[attr-defined]


def test_with_overrides_a_tasks_options_for_one_run() -> None:
    failed = shoal("run", OVERRIDES, "--n", "2", "--json")
    assert failed.exit_code == 1  # no retries in code: each item fails once
    for mark in Path.cwd().glob("tries-*"):
        mark.unlink()
    result = shoal("run", OVERRIDES, "--n", "2", "--with", "flaky.retries=2", "--with", "flaky.timeout=30", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == 0 + 1
    run = engine.get_run(last_run()["id"])
    leaves = list(run.actions(task="flaky"))
    assert [a.attempt for a in leaves] == [3, 3] and all(a.state == "succeeded" for a in leaves)
