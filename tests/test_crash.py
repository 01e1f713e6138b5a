"""The journal checked like a database: SIGKILL, racing resumes, load and a full disk.

The flow (``data/crash/flow.py``) runs in real child processes with its
journal in the test's folder.  Every execution of an action body or a trace
leaves a line in a side file; after each SIGKILL the journal is read with
``sqlite3`` and every later execution is checked against what the journal
had already recorded as succeeded: that must never run again.

Then: two resumes of one interrupted run started at once (one runs it, the
other is refused); hundreds of concurrent runs on a fresh engine (one
journal for all); and a journal that runs out of room, as a file-size
limit and as a full 2 MiB tmpfs (the run fails saying so, the journal stays
intact, and it resumes once there is room).  The long versions are marked
``slow``: ``python -m pytest -m slow tests/test_crash.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

import engine

if TYPE_CHECKING:
    from collections.abc import Iterator

DATA = Path(__file__).parent / "data" / "crash"
FLOW = DATA / "flow.py"
SHARDS, WIDTH = 40, 50

#: Resume ``argv[1]`` through the API; exit 0 succeeded, 1 failed, 2 refused (an EngineError).
#: With ``argv[2]``, wait for that file first (a start line for racing resumes).
RESUME = """\
import os, sys, time
import engine
if len(sys.argv) > 2:
    open(sys.argv[2] + f".ready-{os.getpid()}", "w").close()
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.001)
try:
    run = engine.resume(sys.argv[1])
except engine.EngineError as exc:
    print("REFUSED", type(exc).__name__, str(exc).replace(chr(10), " "), flush=True)
    sys.exit(2)
if run.status == "succeeded":
    print("RESULT", run.id, run.status, run.result, run.attempt, flush=True)
    sys.exit(0)
print("RESULT", run.id, run.status, f"{type(run.error).__name__}: {run.error}", flush=True)
sys.exit(1)
"""
#: ``shoal`` itself (the console script's entry point), run by this interpreter.
CLI = "import sys; sys.argv[0] = 'shoal'; from engine._cli import main; main()"


def _load_flow() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("crash_flow", FLOW)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPECTED: int = _load_flow().expected(SHARDS, WIDTH)
#: Lines every complete run writes, whatever the cache does: 2,000 leaves and as
#: many lookups, 3 lines per shard, 4 bulky outputs, main, and each of the 25
#: inputs of ``square`` at least once.
MIN_LINES = 2 * SHARDS * WIDTH + 3 * SHARDS + SHARDS // 10 + 1 + 25


# -- what ran, and what the journal says -------------------------------------------


def _lines(log: Path, start: int = 0) -> list[dict[str, Any]]:
    """The executions recorded in ``log`` from byte ``start`` on."""
    if not log.exists():
        return []
    with log.open("rb") as fh:
        fh.seek(start)
        data = fh.read()
    return [json.loads(line) for line in data.splitlines()]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


@dataclass(frozen=True)
class Recorded:
    """What the journal held as succeeded at one moment, read with sqlite3."""

    run_id: str | None
    status: str | None
    #: Keys of succeeded actions.
    actions: frozenset[str]
    #: (action key, trace name) of succeeded trace calls.
    traces: frozenset[tuple[str, str]]
    #: Keys of the cross-run cache.
    cache: frozenset[str]
    integrity: str
    #: How many distinct succeeded actions and traces, by task or trace name.
    by_task: dict[str, int]


NOTHING = Recorded(None, None, frozenset(), frozenset(), frozenset(), "ok", {})


def _recorded(db_path: Path) -> Recorded:
    db = sqlite3.connect(db_path, timeout=5)
    try:
        integrity = str(db.execute("PRAGMA integrity_check").fetchone()[0])
        runs = db.execute("SELECT id, status FROM runs").fetchall()
        assert len(runs) <= 1, f"one flow, one run: {runs}"
        run_id, status = runs[0] if runs else (None, None)
        actions = db.execute(
            "SELECT DISTINCT key, task FROM actions WHERE kind='action' AND state='succeeded'"
        ).fetchall()
        traces = db.execute(
            "SELECT DISTINCT parent, task FROM actions WHERE kind='trace' AND state='succeeded'"
        ).fetchall()
        cache = db.execute("SELECT key FROM cache").fetchall()
    finally:
        db.close()
    return Recorded(
        run_id,
        status,
        frozenset(key for key, _ in actions),
        frozenset((parent, task) for parent, task in traces),
        frozenset(key for (key,) in cache),
        integrity,
        dict(Counter(task for _, task in actions) + Counter(task for _, task in traces)),
    )


def _check_ran_after(recorded: Recorded, lines: list[dict[str, Any]], who: str) -> None:
    """Nothing the journal held as succeeded ran in ``lines``, and nothing ran twice in one process."""
    again = [ln for ln in lines if ln["kind"] == "action" and ln["key"] in recorded.actions]
    assert not again, f"{who}: {len(again)} actions recorded as succeeded ran again, e.g. {again[:3]}"
    again = [ln for ln in lines if ln["kind"] == "trace" and (ln["parent"], ln["task"]) in recorded.traces]
    assert not again, f"{who}: {len(again)} traces recorded as succeeded ran again, e.g. {again[:3]}"
    again = [ln for ln in lines if ln.get("cache_key") in recorded.cache]
    assert not again, f"{who}: {len(again)} cached actions ran although their output was cached, e.g. {again[:3]}"
    for pid in {ln["pid"] for ln in lines}:
        mine = [ln["key"] if ln["kind"] == "action" else (ln["parent"], ln["task"]) for ln in lines if ln["pid"] == pid]
        twice = [ident for ident, n in Counter(mine).items() if n > 1]
        assert not twice, f"{who}: process {pid} ran these twice: {twice[:3]}"


# -- child processes -----------------------------------------------------------------


def _env(home: Path, log: Path | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHOAL_", "CRASH_"))}
    env["SHOAL_HOME"] = str(home)
    if log is not None:
        env["CRASH_LOG"] = str(log)
    env.update(extra)
    return env


@dataclass
class Child:
    """A child process; its stdout and stderr go to files, kept for failure messages."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout() + self.err.read_text(errors="replace")


def _start(folder: Path, args: list[str], env: dict[str, str], name: str) -> Child:
    out, err = folder / f"{name}.out", folder / f"{name}.err"
    with out.open("wb") as fh_out, err.open("wb") as fh_err:
        proc = subprocess.Popen([sys.executable, *args], cwd=folder, env=env, stdout=fh_out, stderr=fh_err)
    return Child(name, proc, out, err)


def _reap(child: Child, timeout: float = 120) -> int:
    try:
        return child.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        child.proc.kill()
        child.proc.wait()
        raise AssertionError(f"{child.name} did not finish: {child.output()[-2000:]}") from None


def _kill_at(child: Child, log: Path, start: int, lines: int, delay: float) -> bool:
    """SIGKILL ``child`` once it has written ``lines`` lines to ``log`` past ``start``, ``delay`` s later.

    Returns whether it was killed (False: it had finished by itself).
    """
    offset, seen = start, 0
    deadline = time.monotonic() + 60
    try:
        while seen < lines:
            if child.proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"no progress: {child.output()[-2000:]}"
            end = _size(log)
            if end > offset:
                with log.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read(end - offset)
                # Only whole lines count (a write may be caught half done).
                whole = chunk.rfind(b"\n") + 1
                seen += chunk.count(b"\n", 0, whole)
                offset += whole
            else:
                time.sleep(0.0005)
        if delay:
            time.sleep(delay)
        if child.proc.poll() is not None:
            return False
        os.kill(child.proc.pid, signal.SIGKILL)
        return True
    finally:
        if child.proc.poll() is None and seen < lines:
            os.kill(child.proc.pid, signal.SIGKILL)
        child.proc.wait()


def _resume_args(run_id: str, cli: bool) -> list[str]:
    return ["-c", CLI, "resume", run_id, "--json"] if cli else ["-c", RESUME, run_id]


def _check_finished(child: Child, rc: int, run_id: str, cli: bool) -> None:
    """``child`` (the flow, a resume, or ``shoal resume --json``) ended with the run's right result."""
    assert rc == 0, f"{child.name} exited {rc}: {child.output()[-3000:]}"
    out = child.stdout()
    if cli:
        assert json.loads(out) == EXPECTED, child.output()[-3000:]
    elif child.name == "run":
        assert f"RUN {run_id} succeeded {EXPECTED}" in out, child.output()[-3000:]
    else:
        assert f"RESULT {run_id} succeeded {EXPECTED}" in out, child.output()[-3000:]


# -- 1. SIGKILL at random moments, resume until done ------------------------------


def _crash_and_resume(folder: Path, rng: random.Random, kills: int, cli_first: bool) -> int:
    """Run the flow; SIGKILL it and then its resumes at ``kills`` random moments; resume until done.

    Resumes alternate between ``engine.resume`` and ``shoal resume``, the
    first one through the CLI if ``cli_first``.

    A moment is drawn as "after the Nth execution line, plus up to 3 ms",
    N uniform over (an estimate of) what is left of the work, so kills land
    while actions start, run and wait for their commit, while a resume
    replays, and now and then as the run ends.  Returns how many of the
    kills landed (a resume may finish before its moment comes).
    """
    folder.mkdir()
    home, log = folder / ".shoal", folder / "executions.log"
    db_path = home / "shoal.db"
    env = _env(home, log, CRASH_DELAY="0.002")
    history: list[Recorded] = []
    run_id: str | None = None
    landed = 0
    step = 0
    while True:
        cli = run_id is not None and (step % 2 == 1) == cli_first
        start = _size(log)  # what this child writes comes after this
        if run_id is None:
            child = _start(folder, [str(FLOW), str(SHARDS), str(WIDTH)], env, "run")
        else:
            child = _start(folder, _resume_args(run_id, cli), env, f"resume-{step}")
        if step < kills:
            left = max(1, MIN_LINES - len(history[-1].actions) - len(history[-1].traces)) if history else MIN_LINES
            killed = _kill_at(child, log, start, rng.randint(1, left), rng.uniform(0, 0.003))
            rc = child.proc.returncode
        else:
            killed, rc = False, _reap(child)
        ran = _lines(log, start)
        _check_ran_after(history[-1] if history else NOTHING, ran, f"{child.name} (after {landed} kills)")
        if not killed:
            recorded = _recorded(db_path)
            _check_finished(child, rc, recorded.run_id or "", cli)
            break
        assert rc == -signal.SIGKILL, child.output()[-2000:]
        landed += 1
        recorded = _recorded(db_path)
        assert recorded.integrity == "ok", f"after kill {landed}: {recorded.integrity}"
        # "succeeded": killed after its last record, as it was exiting; a
        # resume must then return the recorded result and run nothing.
        assert recorded.run_id is not None and recorded.status in ("running", "succeeded"), recorded
        if history:
            # A committed success is never lost.
            before = history[-1]
            assert before.actions <= recorded.actions and before.traces <= recorded.traces
            assert before.cache <= recorded.cache
        history.append(recorded)
        run_id = recorded.run_id
        step += 1

    final = _recorded(db_path)
    assert final.integrity == "ok"
    assert final.status == "succeeded"
    assert final.by_task == {
        "main": 1, "shard": SHARDS, "leaf": SHARDS * WIDTH * 4 // 5, "sync_leaf": SHARDS * WIDTH // 5,
        "square": SHARDS * WIDTH, "fold": SHARDS, "bulky": SHARDS // 10,
        "lookup": SHARDS * WIDTH, "stamp": SHARDS,
    }
    # Keys do not depend on the process: whatever ran anywhere is what succeeded.
    everything = _lines(log)
    assert {ln["key"] for ln in everything if ln["kind"] == "action"} <= final.actions
    return landed


@pytest.mark.parametrize("seed", [11, 12])
def test_killed_at_random_moments_then_resumed(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    landed = _crash_and_resume(tmp_path / "flow", rng, kills=2, cli_first=seed % 2 == 0)
    assert landed >= 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_at_twenty_random_moments_then_resumed(tmp_path: Path) -> None:
    rng = random.Random(2026)
    landed = sum(_crash_and_resume(tmp_path / f"flow-{i}", rng, kills=2, cli_first=i % 2 == 0) for i in range(10))
    # The first kill of each flow always lands; most of the resumes' too.
    assert landed >= 15


# -- 2. two resumes of one interrupted run at once ------------------------------------


def _race_two_resumes(folder: Path) -> None:
    folder.mkdir()
    home, log = folder / ".shoal", folder / "executions.log"
    db_path = home / "shoal.db"
    # Slow leaves, so that the resumes overlap whatever their start-up costs;
    # killed late, so that each has much to read before it starts the run.
    env = _env(home, log, CRASH_DELAY="0.02")
    first = _start(folder, [str(FLOW), str(SHARDS), str(WIDTH)], env, "run")
    assert _kill_at(first, log, 0, 2500, 0)
    before = _recorded(db_path)
    assert before.run_id is not None
    run_id = before.run_id
    boundary = _size(log)

    # Both import shoal first and then wait at a start line, so that
    # their resumes begin within a millisecond of each other.
    go = folder / "go"
    racers = [_start(folder, ["-c", RESUME, run_id, str(go)], env, f"resume-{i}") for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        while len(list(folder.glob("go.ready-*"))) < 2:
            assert time.monotonic() < deadline and all(r.proc.poll() is None for r in racers), [
                r.output() for r in racers
            ]
            time.sleep(0.002)
        go.touch()
        codes = [_reap(r) for r in racers]
    finally:
        for r in racers:
            if r.proc.poll() is None:
                os.kill(r.proc.pid, signal.SIGKILL)
                r.proc.wait()
    outputs = [r.output() for r in racers]

    winners = [i for i, rc in enumerate(codes) if rc == 0]
    assert len(winners) == 1, f"exit codes {codes}; outputs: {outputs}"
    winner, loser = racers[winners[0]], racers[1 - winners[0]]
    assert f"RESULT {run_id} succeeded {EXPECTED}" in winner.output()
    # The loser is told, with the run's id, and says so by its exit code.
    assert loser.proc.returncode in (1, 2), loser.output()
    assert run_id in loser.output(), loser.output()
    ran = _lines(log, boundary)
    _check_ran_after(before, ran, "the two resumes")
    assert {ln["pid"] for ln in ran} == {winner.proc.pid}, "only the winner executes anything"
    after = _recorded(db_path)
    assert after.integrity == "ok" and after.status == "succeeded"


def test_two_resumes_at_once_run_it_once(tmp_path: Path) -> None:
    """Two resumes of one interrupted run (a supervisor and a person, two cron jobs) start together.

    Exactly one claims the run and runs it; the other is refused with an
    error naming the run, and a non-zero exit; nothing runs twice.  Twice
    over, on two interrupted runs: without an atomic claim, the second
    resume now and then comes late enough to see the first one's record
    (and is refused for the wrong reason), but seldom twice in a row.
    """
    for attempt in range(2):
        _race_two_resumes(tmp_path / f"race-{attempt}")


# -- 3. thousands of concurrent runs on a fresh engine ---------------------------------


@engine.task
async def _child(run: int, i: int) -> int:
    await asyncio.sleep(0)
    return run * 100 + i


@engine.task
async def _fifty(run: int) -> int:
    return sum(await asyncio.gather(*(_child(run, i) for i in range(50))))


def _journal_handles(path: Path) -> int:
    """Open file handles of this process on the journal's main file (one per connection)."""
    target = os.path.realpath(path)
    return sum(1 for f in psutil.Process().open_files() if os.path.realpath(f.path) == target)


def _journal_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("shoal-journal")}


async def _journal_in_use(eng: engine.Engine, path: Path, threads_before: set[threading.Thread]) -> tuple[int, int]:
    """(connections, threads) the engine holds on its journal, once it has written and read."""
    await eng.runs(limit=1)
    return _journal_handles(path), len(_journal_threads() - threads_before)


async def _concurrent_runs(tmp_path: Path, n: int) -> None:
    # What one journal takes (one connection and its thread today), seen
    # on an engine whose journal was opened by a single run.
    threads_before = _journal_threads()
    async with engine.Engine(store=tmp_path / "one.db") as eng:
        assert (await eng.run(_fifty, 0)).status == "succeeded"
        one = await _journal_in_use(eng, tmp_path / "one.db", threads_before)
    assert one[0] >= 1

    path = tmp_path / "journal.db"
    threads_before = _journal_threads()
    eng = engine.Engine(store=path)
    try:
        runs = await asyncio.gather(*(eng.run(_fifty, r) for r in range(n)))
        failed = Counter(f"{type(r.error).__name__}: {r.error}" for r in runs if r.status != "succeeded")
        assert not failed, f"{sum(failed.values())} of {n} runs failed: {failed.most_common(3)}"
        assert [r.result for r in runs] == [sum(r * 100 + i for i in range(50)) for r in range(n)]
        assert len({r.id for r in runs}) == n
        # The first runs of a fresh engine share one journal: as many
        # connections and threads as one run's journal, not one per run.
        assert await _journal_in_use(eng, path, threads_before) == one
    finally:
        await eng.aclose()
    assert _journal_handles(path) == 0, "the engine left journal connections open"
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT count(*), sum(status='succeeded') FROM runs").fetchone() == (n, n)
        assert db.execute(
            "SELECT count(*) FROM actions WHERE task=? AND state='succeeded'", (_child.name,)
        ).fetchone() == (n * 50,)
    finally:
        db.close()


async def test_two_hundred_concurrent_runs_on_a_fresh_engine(tmp_path: Path) -> None:
    await _concurrent_runs(tmp_path, 200)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_two_thousand_concurrent_runs_on_a_fresh_engine(tmp_path: Path) -> None:
    await _concurrent_runs(tmp_path, 2000)


# -- 4. a full disk --------------------------------------------------------------------


def _failed_for_space(out: str, db_path: Path) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("RUN ")]
    _, run_id, status, error = line.split(" ", 3)
    assert status == "failed", out
    assert error.startswith("JournalError: "), error
    assert str(db_path) in error, error
    assert re.search(r"free .*space", error), error
    return run_id


#: ``python -c CAPPED LIMIT SCRIPT ARGS...``: run SCRIPT as ``__main__`` unable to
#: grow any file past LIMIT bytes.  Set here rather than in a ``preexec_fn``,
#: which is not safe while the test process has threads.
CAPPED = """\
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG), do not kill the process
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_journal_over_the_file_size_limit(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands for a full disk: writes past it fail (EFBIG) like ENOSPC."""
    home = tmp_path / ".shoal"
    db_path = home / "shoal.db"
    env = _env(home, None, CRASH_PAD="2000")
    limit = 400_000  # under the journal's size, over each blob's
    child = _start(tmp_path, ["-c", CAPPED, str(limit), str(FLOW), str(SHARDS), str(WIDTH)], env, "run")
    assert _reap(child) == 1, child.output()
    run_id = _failed_for_space(child.output(), db_path)
    recorded = _recorded(db_path)
    assert recorded.integrity == "ok"
    assert recorded.run_id == run_id and recorded.actions, "what was committed is kept"

    again = _start(tmp_path, _resume_args(run_id, cli=False), env, "resume")
    _check_finished(again, _reap(again), run_id, cli=False)
    assert _recorded(db_path).integrity == "ok"


def _unshare() -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return None
    probe = subprocess.run(
        [unshare, "-m", "--propagation", "private", "true"], capture_output=True, timeout=30
    )
    return unshare if probe.returncode == 0 else None


@pytest.fixture
def unshare() -> Iterator[str]:
    found = _unshare()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("a full-disk test needs root and unshare(1) for a private tmpfs")
        pytest.skip("needs root and unshare(1) to mount a private tmpfs")
    yield found


#: Runs in a private mount namespace: mount a 2 MiB tmpfs on argv[1], run
#: the command after "--" there, then give the tmpfs room (as freeing space
#: would) and run the command after the second "--".  Prints what each
#: printed and how it exited, and where $CRASH_LOG ended after the first,
#: as JSON.  Everything in the namespace is gone when it exits; the files
#: stay in argv[2], copied out after each command.
FULL_DISK = """\
import json, os, shutil, subprocess, sys
mnt, keep = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
cut = rest.index("--", 1)
first, second = rest[1:cut], rest[cut + 1:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", mnt], check=True)
try:
    a = subprocess.run(first, capture_output=True, text=True, timeout=120)
    log_at_full = os.path.getsize(os.environ["CRASH_LOG"])
    shutil.copytree(mnt, keep + "/full", symlinks=True)
    subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
    b = subprocess.run(second, capture_output=True, text=True, timeout=120)
    shutil.copytree(mnt, keep + "/freed", symlinks=True)
finally:
    subprocess.run(["umount", mnt], check=True)
json.dump({
    "full": [a.returncode, a.stdout, a.stderr], "log_at_full": log_at_full,
    "freed": [b.returncode, b.stdout, b.stderr],
}, sys.stdout)
"""


def test_journal_on_a_full_disk(tmp_path: Path, unshare: str) -> None:
    """A 2 MiB tmpfs fills up (ENOSPC); once it has room, the run resumes."""
    mnt, keep = tmp_path / "disk", tmp_path / "kept"
    mnt.mkdir()
    keep.mkdir()
    home, log = mnt / ".shoal", tmp_path / "executions.log"
    db_path = home / "shoal.db"
    # The blobs live elsewhere: this is the journal's disk that fills up.
    env = _env(home, log, CRASH_PAD="2000", SHOAL_BLOB_STORE=str(tmp_path / "blobs"))
    resume_first = (
        "import sqlite3, subprocess, sys\n"
        "db = sqlite3.connect(sys.argv[1]); print('INTEGRITY', db.execute('PRAGMA integrity_check').fetchone()[0])\n"
        "run_id, = db.execute('SELECT id FROM runs').fetchone(); db.close()\n"
        f"sys.exit(subprocess.run([sys.executable, '-c', {RESUME!r}, run_id]).returncode)\n"
    )
    proc = subprocess.run(
        [unshare, "-m", "--propagation", "private", sys.executable, "-c", FULL_DISK, str(mnt), str(keep),
         "--", sys.executable, str(FLOW), str(SHARDS), str(WIDTH),
         "--", sys.executable, "-c", resume_first, str(db_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    rc, out, err = report["full"]
    assert rc == 1, out + err
    run_id = _failed_for_space(out, db_path)
    # The journal as the full disk left it: intact, and what it holds never runs again.
    at_full = _recorded(keep / "full" / ".shoal" / "shoal.db")
    assert at_full.integrity == "ok" and at_full.run_id == run_id and at_full.actions
    assert 0 < report["log_at_full"] < _size(log)

    rc, out, err = report["freed"]
    assert "INTEGRITY ok" in out, out + err
    assert rc == 0 and f"RESULT {run_id} succeeded {EXPECTED}" in out, out + err
    _check_ran_after(at_full, _lines(log, report["log_at_full"]), "the resume once there was room")
    final = _recorded(keep / "freed" / ".shoal" / "shoal.db")
    assert final.integrity == "ok" and final.status == "succeeded"
    assert not mnt.is_mount() and not any(mnt.iterdir()), "the tmpfs was private to the child"


# -- helpers' own guard ----------------------------------------------------------------


def test_flow_script_counts_what_it_runs(tmp_path: Path) -> None:
    """The side file and the journal agree on an uninterrupted run (the yardstick of the tests above)."""
    home, log = tmp_path / ".shoal", tmp_path / "executions.log"
    child = _start(tmp_path, [str(FLOW), "10", "10"], _env(home, log), "run")
    assert _reap(child) == 0, child.output()
    recorded = _recorded(home / "shoal.db")
    ran = _lines(log)
    assert Counter(ln["task"] for ln in ran if ln["kind"] == "trace") == {"lookup": 100, "stamp": 10}
    executed = {ln["key"] for ln in ran if ln["kind"] == "action"}
    # Every action that ran succeeded; the others are cache hits of square.
    assert executed <= recorded.actions
    assert len(recorded.actions - executed) == 100 - sum(1 for ln in ran if ln["task"] == "square")
    assert {ln["cache_key"] for ln in ran if ln["task"] == "square"} <= recorded.cache
    assert f"succeeded {_load_flow().expected(10, 10)}" in child.output()

