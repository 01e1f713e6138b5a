"""The journal under load, with reused pids, deep failures, tampering, foreign files and old schemas.

Every check goes through what a user has: ``engine.Engine``, the
module-level functions and the ``shoal`` command in a real child process,
against a real SQLite file.  The file is read directly only to tamper with
it or to look at what was stored.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import psutil
import pytest

import engine
from engine._schema import SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Iterator

DATA = Path(__file__).parent / "data" / "hardening"
FLOWS = str(DATA / "flows.py")
FANOUT = str(Path(__file__).parents[1] / "examples" / "fanout.py")

# The real ``shoal`` command, with Python's own SIGINT handler restored (a
# parent that ignores SIGINT would otherwise pass that on).
BOOT = (
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'shoal'; from engine._cli import main; main()"
)


def shoal(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``shoal ARGS`` in a child process (this process's environment); its output as text."""
    return subprocess.run(
        [sys.executable, "-c", BOOT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _mark(name: str) -> None:
    """Count one execution of ``name`` in a file of the working directory (one line each)."""
    with open(f"ran-{name}", "a") as fh:
        fh.write("x\n")


# Sync helpers for the tasks and async tests: one stat or one small write each.
def exists(path: str | Path) -> bool:
    return os.path.exists(path)


def touch(path: str | Path) -> None:
    Path(path).touch()


def remove(path: str | Path) -> None:
    os.unlink(path)


def ran(name: str, folder: Path | None = None) -> int:
    path = (folder or Path.cwd()) / f"ran-{name}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _unpickled(n: int) -> Noisy:
    touch("unpickled")
    return Noisy(n)


class Noisy:
    """A value msgspec cannot encode (so it is pickled) whose unpickling leaves a file behind."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _unpickled, (self.n,)


class _Payload:
    """What someone who can edit the journal would plant: unpickling it creates a folder."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.path,)


def planted(path: Path) -> bytes:
    return pickle.dumps(_Payload(path), protocol=5)


# -- tasks -------------------------------------------------------------------------


@engine.task
async def _leaf(i: int) -> int:
    _mark("leaf")
    return i * i


@engine.task
async def _squares(n: int) -> int:
    return sum(await asyncio.gather(*(_leaf(i) for i in range(n))))


@engine.task
async def _pause(i: int) -> int:
    await asyncio.sleep(0.005)
    return i


@engine.task
async def _five(run: int) -> int:
    return sum(await asyncio.gather(*(_pause(run + i) for i in range(5))))


@engine.task
async def _noisy(n: int) -> Noisy:
    _mark("noisy")
    return Noisy(n)


@engine.task
async def _flaky(n: int) -> int:
    _mark("flaky")
    if not exists("fixed"):
        raise RuntimeError("not fixed yet")
    return n


@engine.task
async def _tamper_flow(n: int) -> int:
    """A pickled output recorded, then a failure (until a file named "fixed" exists)."""
    value = await _noisy(n)
    return value.n + await _flaky(n)


@engine.task
async def _with_pickled_args(value: Noisy) -> int:
    return await _flaky(value.n)


@engine.task(cache=True)
async def _cached_noisy(n: int) -> Noisy:
    _mark("cached")
    return Noisy(n)


@engine.task
async def _cache_flow(n: int) -> int:
    return (await _cached_noisy(n)).n


@engine.task
async def _descend(depth: int) -> int:
    if depth == 0:
        raise ValueError("the bottom of the chain")
    return await _descend(depth - 1) + 1


@engine.task
async def _wait_for_cancel() -> None:
    await asyncio.sleep(60)


# -- helpers -------------------------------------------------------------------------


def rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(db_path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def execute(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    db = sqlite3.connect(db_path)
    try:
        with db:
            db.execute(sql, params)
    finally:
        db.close()


def private(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


def shoal_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("shoal-journal")}


def journal_handles(path: Path) -> int:
    target = os.path.realpath(path)
    return sum(1 for f in psutil.Process().open_files() if os.path.realpath(f.path) == target)


@contextmanager
def other_process() -> Iterator[int]:
    """A live process of this host that has nothing to do with shoal: its pid."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def own_run(db_path: Path, run_id: str, pid: int, pid_start: str | None) -> None:
    """Record ``run_id`` as running in process ``pid`` of this host, started at ``pid_start``."""
    execute(
        db_path,
        "UPDATE runs SET status='running', finished=NULL, pid=?, host=? WHERE id=?",
        (pid, socket.gethostname(), run_id),
    )
    if "pid_start" in {name for _, name, *_ in rows(db_path, "PRAGMA table_info(runs)")}:
        execute(db_path, "UPDATE runs SET pid_start=? WHERE id=?", (pid_start, run_id))


def file_state(path: Path) -> tuple[bytes, list[str]]:
    """A file's bytes and the names beside it that start with its name (``-wal``, ``-shm``)."""
    return path.read_bytes(), sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


# -- 1. the first runs of a fresh engine share one journal -----------------------------


async def test_two_hundred_first_runs_share_one_journal(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    before = shoal_threads()
    most = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, len(shoal_threads() - before))
            await asyncio.sleep(0.001)

    eng = engine.Engine(store=path)
    sampler = asyncio.create_task(sample())
    try:
        runs = await asyncio.gather(*(eng.run(_five, r * 10) for r in range(200)))
        stop.set()
        await sampler
        assert [r.status for r in runs].count("succeeded") == 200, {r.status: r.error for r in runs}
        assert [r.result for r in runs] == [sum(r * 10 + i for i in range(5)) for r in range(200)]
        # While they ran: the journal's writer and its reader, not one per run.
        assert 1 <= most <= 2, f"{most} journal threads while 200 runs started together"
    finally:
        stop.set()
        await eng.aclose()
    assert journal_handles(path) == 0, "journal connections left open after aclose()"
    deadline = time.monotonic() + 10
    # The executors' threads end on their own once shut down: poll for it.
    while (left := shoal_threads() - before) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    assert not left, f"{len(left)} journal threads still alive after aclose()"
    assert rows(path, "SELECT count(*), sum(status='succeeded') FROM runs") == [(200, 200)]


# -- 3. run ids ------------------------------------------------------------------------


def test_run_ids_are_unique_in_a_burst_and_ordered_by_time() -> None:
    from engine._run import new_run_id

    burst = [new_run_id() for _ in range(20_000)]
    assert len(set(burst)) == len(burst), f"{len(burst) - len(set(burst))} duplicate run ids in a burst"
    time.sleep(1.05)  # ids are ordered to the second: the next second's sort after
    later = [new_run_id() for _ in range(100)]
    assert min(later) > max(burst)


async def test_a_run_id_already_in_the_journal_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.db"
    async with engine.Engine(store=path) as eng:
        first = await eng.run(_squares, 2)
    assert first.status == "succeeded"
    runs_before = rows(path, "SELECT * FROM runs")
    actions_before = rows(path, "SELECT rowid, * FROM actions")

    monkeypatch.setattr("engine._engine.new_run_id", lambda: first.id)
    async with engine.Engine(store=path) as eng:
        second = await eng.run(_squares, 5)
        assert second.id == first.id
        assert second.status == "failed"
        assert isinstance(second.error, engine.RunInUse), repr(second.error)
        assert first.id in str(second.error)
        kept = await eng.get_run(first.id)
    assert (kept.status, kept.task, kept.action_count) == ("succeeded", _squares.name, 3)
    # Nothing of the second run was written, and none of its actions ran.
    assert rows(path, "SELECT * FROM runs") == runs_before
    assert rows(path, "SELECT rowid, * FROM actions") == actions_before
    assert ran("leaf") == 2


@pytest.mark.parametrize("many", [True, False], ids=["statements-per-batch", "statements-per-run"])
async def test_concurrent_runs_share_batches_and_a_duplicate_id_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    # The claims and ends of concurrent runs are written many to one
    # statement (or, on an SQLite before 3.35, one statement each): both
    # must record every run, and refuse the second claim of an id even
    # when both claims are in one batch.
    monkeypatch.setattr("engine._run_rows.MANY_AT_ONCE", many)
    monkeypatch.chdir(tmp_path)
    ids = iter(["241201000000-dup", "241201000000-dup", *(f"241201000000-{i:04d}" for i in range(60))])
    monkeypatch.setattr("engine._engine.new_run_id", lambda: next(ids))
    path = tmp_path / "journal.db"
    async with engine.Engine(store=path) as eng:
        first, second, *others = await asyncio.gather(*(eng.run(_squares, 3) for _ in range(62)))
    assert first.status == "succeeded" and first.result == 5
    assert second.status == "failed"
    assert isinstance(second.error, engine.RunInUse) and first.id in str(second.error)
    assert [run.status for run in others] == ["succeeded"] * 60
    assert ran("leaf") == 3 * 61  # none of the refused run's actions ran
    recorded = dict(rows(path, "SELECT id, status FROM runs"))
    assert recorded == {run.id: "succeeded" for run in [first, *others]}
    assert rows(path, "SELECT count(*) FROM actions")[0][0] == 4 * 61
    async with engine.Engine(store=path) as eng:
        summaries = await eng.get_run(others[-1].id)
    assert (summaries.status, summaries.action_count) == ("succeeded", 4)


# -- 4. a reused pid ------------------------------------------------------------------------


def test_a_run_whose_pid_was_reused_is_gone(tmp_path: Path) -> None:
    db_path = tmp_path / ".shoal" / "shoal.db"
    run = engine.run(_squares, 3)
    assert run.status == "succeeded"
    with other_process() as pid:
        # The process that ran it died; its pid now belongs to another process.
        own_run(db_path, run.id, pid, "another-boot:12345")

        [listed] = [s for s in engine.runs() if s.id == run.id]
        assert listed.status == "failed"
        assert listed.error is not None and "is gone" in listed.error.message

        out = shoal("runs", "--json")
        assert out.returncode == 0, out.stderr
        [row] = [r for r in json.loads(out.stdout) if r["id"] == run.id]
        assert row["status"] == "failed" and "is gone" in row["error"]["message"]

        out = shoal("show", run.id, "--json")
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["status"] == "failed" and "is gone" in shown["error"]["message"]

        out = shoal("cancel", run.id)
        assert out.returncode == 0, out.stderr
        assert "is gone" in out.stderr and "cancelled" in out.stderr
        assert rows(db_path, "SELECT status FROM runs WHERE id=?", (run.id,)) == [("cancelled",)]

        resumed = engine.resume(run.id)
    assert (resumed.status, resumed.result) == ("succeeded", 0 + 1 + 4)
    assert ran("leaf") == 3, "an action recorded as succeeded ran again"


def test_a_run_owned_by_a_live_process_is_not_resumed(tmp_path: Path) -> None:
    from engine._owner import process_start

    db_path = tmp_path / ".shoal" / "shoal.db"
    run = engine.run(_squares, 3)
    with other_process() as pid:
        own_run(db_path, run.id, pid, process_start(pid))
        [listed] = [s for s in engine.runs() if s.id == run.id]
        assert listed.status == "running"
        with pytest.raises(engine.RunInUse, match=f"still running in process {pid}"):
            engine.resume(run.id)
        assert rows(db_path, "SELECT status, pid FROM runs WHERE id=?", (run.id,)) == [("running", pid)]
    assert ran("leaf") == 3


# -- 8. a deep failing chain stores its traceback once ---------------------------------------


async def test_a_deep_failing_chain_stores_the_traceback_once(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    depth = 60
    async with engine.Engine(store=path) as eng:
        run = await eng.run(_descend, depth)
        assert run.status == "failed"
        details = await eng.get_run(run.id, actions=True)
    stored = [
        (key, parent, msgspec.msgpack.decode(error))
        for key, parent, error in rows(
            path, "SELECT key, parent, error FROM actions WHERE run_id=? AND state='failed'", (run.id,)
        )
    ]
    assert len(stored) == depth + 1
    sizes = [len(info["traceback"]) for _, _, info in stored]
    assert sum(sizes) < 3 * max(sizes), f"tracebacks stored: {sum(sizes)} chars, the deepest {max(sizes)}"

    parents = {parent for _, parent, _ in stored}
    [bottom] = [key for key, _, _ in stored if key not in parents]
    failed = [r for r in details.action_records if r.state == "failed"]
    assert len(failed) == depth + 1
    [deepest] = [r for r in failed if r.key == bottom]
    assert deepest.error is not None and deepest.error.origin is None
    full = deepest.error.traceback
    assert "ValueError: the bottom of the chain" in full
    for rec in failed:
        assert rec.error is not None
        if rec.key != bottom:
            assert rec.error.origin == bottom, rec
        assert rec.error.traceback == full, f"{rec.key} gives back another traceback"

    out = shoal("show", run.id, "--store", str(path), "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)["failed_actions"]
    assert shown and all(a["error"]["traceback"] == full for a in shown)
    out = shoal("show", run.id, "--store", str(path))
    assert out.returncode == 0, out.stderr
    assert "ValueError: the bottom of the chain" in out.stdout


# -- 10. tampered pickles are never unpickled ------------------------------------------------


def said(caught: list[warnings.WarningMessage], text: str) -> bool:
    """Whether one of the warnings ``caught`` says ``text``."""
    return any(text in str(w.message) for w in caught)


def _signed_like(original: bytes, payload: bytes) -> bytes:
    """``payload`` behind the signature of ``original``, as someone without the secret could write it."""
    return original[:34] + payload if original[:2] == b"s1" else payload


@pytest.mark.parametrize("keep_signature", [True, False], ids=["behind-old-tag", "bare"])
async def test_a_tampered_output_runs_again_and_is_not_unpickled(tmp_path: Path, keep_signature: bool) -> None:
    path = tmp_path / "journal.db"
    marker = tmp_path / "pwned"
    async with engine.Engine(store=path) as eng:
        run = await eng.run(_tamper_flow, 4)
        assert run.status == "failed"
    [(rowid, original, kind)] = rows(
        path, "SELECT rowid, output, output_kind FROM actions WHERE task=? AND state='succeeded'", (_noisy.name,)
    )
    assert kind == "pickle"
    payload = _signed_like(original, planted(marker)) if keep_signature else planted(marker)
    execute(path, "UPDATE actions SET output=? WHERE rowid=?", (payload, rowid))

    touch("fixed")
    async with engine.Engine(store=path) as eng:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = await eng.resume(run.id)
    assert not exists(marker), "a tampered pickle was unpickled"
    assert said(caught, f"output(s) of run {run.id} will run again")
    assert (resumed.status, resumed.result) == ("succeeded", 8)
    assert ran("noisy") == 2, "the action whose output was tampered with did not run again"
    assert not exists("unpickled")


async def test_tampered_run_arguments_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    marker = tmp_path / "pwned"
    async with engine.Engine(store=path) as eng:
        run = await eng.run(_with_pickled_args, Noisy(3))
        assert run.status == "failed"
    [(original, kind)] = rows(path, "SELECT args, args_kind FROM runs WHERE id=?", (run.id,))
    assert kind == "pickle"
    execute(path, "UPDATE runs SET args=? WHERE id=?", (_signed_like(original, planted(marker)), run.id))

    touch("fixed")
    async with engine.Engine(store=path) as eng:
        try:
            await eng.resume(run.id)
        except Exception as exc:  # looked at below, once the marker is
            error: Exception | None = exc
        else:
            error = None
    assert not exists(marker), "tampered run arguments were unpickled"
    assert isinstance(error, engine.JournalCorrupt), repr(error)
    assert f"arguments of run {run.id}" in str(error)
    assert ran("flaky") == 1


async def test_a_tampered_cache_entry_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    marker = tmp_path / "pwned"
    async with engine.Engine(store=path, cache=True) as eng:
        assert (await eng.run(_cache_flow, 5)).result == 5
        # Untouched, the entry is a hit: the value comes from the cache.
        assert (await eng.run(_cache_flow, 5)).result == 5
    assert ran("cached") == 1
    assert exists("unpickled")
    remove("unpickled")

    [(key, original)] = rows(path, "SELECT key, output FROM cache WHERE task=?", (_cached_noisy.name,))
    execute(path, "UPDATE cache SET output=? WHERE key=?", (_signed_like(original, planted(marker)), key))
    async with engine.Engine(store=path, cache=True) as eng:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = await eng.run(_cache_flow, 5)
    assert not exists(marker), "a tampered cache entry was unpickled"
    assert said(caught, f"cache entry of task {_cached_noisy.name!r} ignored")
    assert (again.status, again.result) == ("succeeded", 5)
    assert ran("cached") == 2
    assert not exists("unpickled")


async def test_a_journal_copied_to_another_home_is_not_unpickled(tmp_path: Path) -> None:
    first, second = private(tmp_path / "first"), private(tmp_path / "second")
    async with engine.Engine(home=first) as eng:
        run = await eng.run(_tamper_flow, 6)
        assert run.status == "failed"
    shutil.copy(first / "shoal.db", second / "shoal.db")

    touch("fixed")
    async with engine.Engine(home=second) as eng:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            resumed = await eng.resume(run.id)
    assert not exists("unpickled"), "a value signed under another home was unpickled"
    assert said(caught, "another SHOAL_HOME")
    assert (resumed.status, resumed.result) == ("succeeded", 12)
    assert ran("noisy") == 2


# -- 12. a SQLite database that is not a journal -----------------------------------------------


def _foreign(path: Path) -> Path:
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("CREATE TABLE birds (name TEXT PRIMARY KEY, seen INTEGER)")
            db.executemany("INSERT INTO birds VALUES (?, ?)", [("wren", 3), ("kite", 1)])
    finally:
        db.close()
    return path


def _journal_mode(path: Path) -> str:
    return str(rows(path, "PRAGMA journal_mode")[0][0])


def test_a_foreign_database_is_refused_untouched(tmp_path: Path) -> None:
    home = private(tmp_path / ".shoal")
    path = _foreign(home / "shoal.db")
    before = file_state(path)
    assert _journal_mode(path) == "delete"

    with pytest.raises(engine.JournalCorrupt, match="not a shoal journal"):
        engine.runs()
    out = shoal("runs", "--store", str(path))
    assert out.returncode == 1, out.stderr
    assert "not a shoal journal" in out.stderr and "Traceback" not in out.stderr

    async def start() -> None:
        async with engine.Engine(store=path) as eng:
            await eng.run(_squares, 2)

    with pytest.raises(engine.JournalCorrupt, match="not a shoal journal"):
        asyncio.run(start())
    assert file_state(path) == before
    assert _journal_mode(path) == "delete"
    assert rows(path, "SELECT name FROM sqlite_master WHERE type='table'") == [("birds",)]
    assert ran("leaf") == 0


@pytest.mark.parametrize("kind", ["zero-bytes", "no-tables"])
async def test_an_empty_database_is_made_a_journal(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "empty.db"
    if kind == "zero-bytes":
        path.touch()
    else:
        _foreign(path)
        execute(path, "DROP TABLE birds")
        assert path.stat().st_size > 0
    async with engine.Engine(store=path) as eng:
        run = await eng.run(_squares, 3)
        assert (run.status, run.result) == ("succeeded", 5)
        assert [s.id for s in await eng.runs()] == [run.id]
    assert rows(path, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]


# -- 13. a SHOAL_HOME that cannot be a folder ---------------------------------------------------


@pytest.mark.parametrize("where", ["is-a-file", "under-a-file"])
def test_a_home_that_cannot_be_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder\n")
    home = blocker if where == "is-a-file" else blocker / "home"
    monkeypatch.setenv("SHOAL_HOME", str(home))

    with pytest.raises(engine.JournalError, match="SHOAL_HOME") as caught:
        engine.run(_squares, 2)
    assert str(home) in str(caught.value)
    with pytest.raises(engine.JournalError, match="SHOAL_HOME") as caught:
        engine.runs()
    assert str(home) in str(caught.value)

    for args in (["run", FLOWS], ["runs"]):
        out = shoal(*args)
        assert out.returncode == 2, (args, out.returncode, out.stdout, out.stderr)
        assert str(home) in out.stderr and "SHOAL_HOME" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr
    assert blocker.read_text() == "not a folder\n"
    assert ran("leaf") == 0


# -- 14. private folders and files ------------------------------------------------------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def test_folders_and_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    home = tmp_path / "home"
    store = tmp_path / "deep" / "er" / "journal.db"
    with umask(0):
        async with engine.Engine(home=home) as eng:
            # A pickled output: the home's secret is made to sign it.
            assert (await eng.run(_tamper_flow, 1)).status == "failed"
        async with engine.Engine(home=home, store=store) as eng:
            run = await eng.submit(_wait_for_cancel)
            await _until_recorded(eng, run.id)
            out = await asyncio.to_thread(shoal, "cancel", run.id, "--store", str(store))
            assert out.returncode == 0, out.stderr
            await asyncio.wait_for(run.wait(), 30)
            assert run.status == "cancelled"
    assert mode(home) == 0o700
    assert mode(tmp_path / "deep") == 0o700
    assert mode(tmp_path / "deep" / "er") == 0o700
    assert mode(Path(f"{store}-cancel")) == 0o700
    assert mode(home / "shoal.db") == 0o600
    assert mode(store) == 0o600
    assert mode(home / "secret") == 0o600


async def _until_recorded(eng: engine.Engine, run_id: str) -> None:
    """Wait until the journal lists ``run_id`` (its claim is committed)."""
    for _ in range(1500):
        if run_id in {s.id for s in await eng.runs()}:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"run {run_id} was never recorded")


@pytest.mark.parametrize("loose", [0o777, 0o770])
def test_a_home_others_can_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loose: int) -> None:
    home = tmp_path / "shared"
    home.mkdir()
    home.chmod(loose)
    monkeypatch.setenv("SHOAL_HOME", str(home))
    with pytest.raises(engine.JournalError, match=f"chmod 700 {home}"):
        engine.run(_squares, 2)
    with pytest.raises(engine.JournalError, match="chmod 700"):
        engine.runs()
    assert list(home.iterdir()) == []
    assert mode(home) == loose
    assert ran("leaf") == 0


# -- 15. older journals are migrated, newer ones refused --------------------------------------


def _old_journal(version: int, source: Path, target: Path) -> None:
    """Write the runs of journal ``source`` into a new file ``target`` as schema ``version`` held them.

    Pickled values lose their signature (they had none then); errors lose
    their reference to where a traceback is kept.  Version 1 kept one row
    per action and the run's result in the run's row.
    """
    db = sqlite3.connect(target)
    src = sqlite3.connect(source)
    try:
        db.executescript((DATA / f"schema{version}.sql").read_text())
        with db:
            db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
            run_cols = "id, task, root, root_file, args, args_kind, status, attempt, started, finished, tags, error, pid, host"
            for run in src.execute(f"SELECT {run_cols} FROM runs"):
                values = list(run)
                if values[5] == "pickle":
                    values[4] = _unsigned(values[4])
                values[11] = _plain_error(values[11])
                if version == 1:
                    out = src.execute(
                        "SELECT output, output_kind FROM actions WHERE run_id=? AND parent IS NULL "
                        "AND state='succeeded' ORDER BY rowid DESC LIMIT 1",
                        (values[0],),
                    ).fetchone() or (None, None)
                    db.execute(f"INSERT INTO runs ({run_cols}, output, output_kind) VALUES ({','.join('?' * 16)})", (*values, *out))
                else:
                    db.execute(f"INSERT INTO runs ({run_cols}) VALUES ({','.join('?' * 14)})", values)
            latest = "WHERE rowid IN (SELECT max(rowid) FROM actions GROUP BY run_id, key)" if version == 1 else ""
            for action in src.execute(f"SELECT * FROM actions {latest} ORDER BY rowid"):
                values = list(action)
                if values[11] == "pickle":
                    values[10] = _unsigned(values[10])
                values[12] = _plain_error(values[12])
                db.execute(f"INSERT INTO actions VALUES ({','.join('?' * 16)})", values)
    finally:
        db.close()
        src.close()


def _unsigned(data: bytes) -> bytes:
    """A pickled value as written before values were signed (``s1`` + 32-byte tag + pickle)."""
    return data[34:] if data[:2] == b"s1" else data


def _plain_error(data: bytes | None) -> bytes | None:
    if data is None:
        return None
    info = msgspec.msgpack.decode(data)
    info.pop("origin", None)
    return msgspec.msgpack.encode(info)


@pytest.mark.parametrize("version", [1, 2])
async def test_an_older_journal_is_migrated_in_place(tmp_path: Path, version: int) -> None:
    # What the runs recorded, written the way that version wrote it.
    scratch = private(tmp_path / "scratch")
    async with engine.Engine(home=scratch) as eng:
        done = await eng.run(_squares, 3)
        failed = await eng.run(_tamper_flow, 7)
    assert (done.status, failed.status) == ("succeeded", "failed")
    home = private(tmp_path / "home")
    _old_journal(version, scratch / "shoal.db", home / "shoal.db")
    assert rows(home / "shoal.db", "SELECT value FROM meta") == [(str(version),)]

    touch("fixed")
    async with engine.Engine(home=home) as eng:
        listed = {s.id: s.status for s in await eng.runs()}
        assert listed == {done.id: "succeeded", failed.id: "failed"}
        shown = await eng.get_run(done.id, actions=True)
        assert (shown.status, shown.action_count) == ("succeeded", 4)
        again = await eng.resume(done.id)
        assert (again.status, again.result) == ("succeeded", 5)
        resumed = await eng.resume(failed.id)
        assert (resumed.status, resumed.result) == ("succeeded", 14)
    # Succeeded actions were replayed, the pickled one included; only the failed one ran again.
    assert (ran("leaf"), ran("noisy"), ran("flaky")) == (3, 1, 2)
    assert rows(home / "shoal.db", "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert rows(home / "shoal.db", "PRAGMA integrity_check") == [("ok",)]


async def test_a_version_3_journal_gains_the_offload_tables(tmp_path: Path) -> None:
    home = private(tmp_path / "home")
    async with engine.Engine(home=home) as eng:
        done = await eng.run(_squares, 3)
    db = sqlite3.connect(home / "shoal.db")
    with db:
        db.execute("DROP TABLE attempts")
        db.execute("DROP TABLE run_bundles")
        db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.close()
    async with engine.Engine(home=home) as eng:
        shown = await eng.get_run(done.id, actions=True)
        assert (shown.status, shown.action_count) == ("succeeded", 4)
        again = await eng.resume(done.id)
        assert (again.status, again.result) == ("succeeded", 5)
    tables = {name for (name,) in rows(home / "shoal.db", "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"attempts", "run_bundles"} <= tables
    assert rows(home / "shoal.db", "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]


async def test_a_version_4_journal_gains_the_gang_columns(tmp_path: Path) -> None:
    home = private(tmp_path / "home")
    async with engine.Engine(home=home) as eng:
        done = await eng.run(_squares, 3)
    db = sqlite3.connect(home / "shoal.db")
    with db:
        db.execute("ALTER TABLE attempts DROP COLUMN ranks")
        db.execute("ALTER TABLE logs DROP COLUMN rank")
        db.execute("INSERT INTO logs VALUES (?, ?, ?, ?, ?)", (done.id, "root", 1.0, "stdout", "said before"))
        db.execute("UPDATE meta SET value='4' WHERE key='schema_version'")
    db.close()
    async with engine.Engine(home=home) as eng:
        shown = await eng.get_run(done.id, actions=True)
        assert (shown.status, shown.action_count) == ("succeeded", 4)
        [line] = await shown.alogs()
        assert (line.text, line.rank) == ("said before", None)
    columns = {name for (_, name, *_) in rows(home / "shoal.db", "PRAGMA table_info(attempts)")}
    assert "ranks" in columns
    assert "rank" in {name for (_, name, *_) in rows(home / "shoal.db", "PRAGMA table_info(logs)")}
    assert rows(home / "shoal.db", "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]


async def test_a_journal_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    async with engine.Engine(store=path) as eng:
        await eng.run(_squares, 1)
    execute(path, "UPDATE meta SET value='99' WHERE key='schema_version'")
    before = file_state(path)
    async with engine.Engine(store=path) as eng:
        with pytest.raises(engine.JournalVersionError, match="newer shoal"):
            await eng.runs()
        with pytest.raises(engine.JournalVersionError, match="newer shoal"):
            await eng.run(_squares, 1)
    assert file_state(path)[0] == before[0]


# -- 5. cancel reaches a busy journaled run ---------------------------------------------------


def test_cancel_reaches_a_busy_journaled_map(tmp_path: Path) -> None:
    # Cancelled as soon as its first records are in: from then on the map
    # keeps the journal's writer busy, and the request must still get through.
    child = subprocess.Popen(
        [sys.executable, "-c", BOOT, "run", FANOUT, "--n", "300000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        run_id = None
        while run_id is None and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.05)
            if (tmp_path / ".shoal" / "shoal.db").exists():
                busy = [s for s in engine.runs(status="running", load_code=False) if s.action_count > 0]
                run_id = busy[0].id if busy else None
        assert run_id is not None, "the run never recorded its first actions"
        out = shoal("cancel", run_id)
        assert out.returncode == 0, out.stderr
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 1, err
    [summary] = [s for s in engine.runs() if s.id == run_id]
    assert summary.status == "cancelled", "the run went on after shoal cancel"


def test_a_store_path_under_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "engine._cli", "runs", "--store", str(tmp_path / "f" / "j.db")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
