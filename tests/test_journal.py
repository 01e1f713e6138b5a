"""The journal: where it lives, what it records, group commit, and bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

import engine
from engine._journal import Journal
from engine._records import SCHEMA_VERSION, ActionRecord, RunRecord
from engine._run_journal import INLINE_LIMIT

FLOW = Path(__file__).parent / "data" / "journal" / "flow.py"


class Boom(Exception):
    pass


class Opaque:
    """Not msgspec-encodable, but picklable."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque) and other.value == self.value

    __hash__ = None  # type: ignore[assignment]


@engine.task
async def leaf(i: int) -> int:
    return i + 1


@engine.task
async def fan(n: int) -> int:
    return sum(await asyncio.gather(*(leaf(i) for i in range(n))))


@engine.task
async def explode(i: int) -> int:
    raise Boom(f"boom {i}")


@engine.task
async def opaque(i: int) -> Opaque:
    return Opaque(i)


@engine.task
async def unencodable() -> object:
    return lambda: None


@engine.task
async def big(n: int) -> bytes:
    return b"z" * n


@engine.task
async def mixed(n: int) -> int:
    async with engine.group("stage-1"):
        total = await fan(n)
    with contextlib.suppress(Boom):
        await explode(7)
    return total


def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- where the journal lives ---------------------------------------------------------


def test_default_journal_in_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_HOME")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    run = engine.run(fan, 3)
    assert run.result == 6
    path = work / ".shoal" / "shoal.db"
    assert path.is_file()
    assert _mode(path.parent) == 0o700
    assert _mode(path) == 0o600
    db = _db(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            str(SCHEMA_VERSION),
        )
        assert db.execute("SELECT id, status FROM runs").fetchall() == [(run.id, "succeeded")]
    finally:
        db.close()
    assert [r.id for r in engine.runs()] == [run.id]


def test_shoal_home_moves_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "elsewhere" / "home"
    monkeypatch.setenv("SHOAL_HOME", str(home))
    run = engine.run(fan, 2)
    assert (home / "shoal.db").is_file()
    assert not (tmp_path / ".shoal" / "shoal.db").exists()
    assert _mode(home) == 0o700
    assert engine.get_run(run.id).status == "succeeded"


async def test_arun_uses_the_default_journal(tmp_path: Path) -> None:
    try:
        run = await engine.arun(fan, 2, tags=["exp-1"])
        assert run.result == 3
    finally:
        await engine._api.default_engine().aclose()
    db = _db(tmp_path / ".shoal" / "shoal.db")
    try:
        assert db.execute("SELECT id, tags FROM runs").fetchall() == [(run.id, '["exp-1"]')]
    finally:
        db.close()


async def test_memory_store_keeps_nothing(tmp_path: Path) -> None:
    async with engine.Engine(store="memory") as eng:
        run = await eng.run(fan, 3)
        assert run.result == 6
        with pytest.raises(engine.EngineError, match="memory"):
            await eng.runs()
        with pytest.raises(engine.EngineError, match="memory"):
            await eng.resume(run.id)
    assert list(tmp_path.iterdir()) == []  # noqa: ASYNC240


async def test_store_path_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "my.journal"
    async with engine.Engine(store=path) as eng:
        run = await eng.run(fan, 2)
    assert path.is_file()
    assert _mode(path) == 0o600
    assert _mode(path.parent) == 0o700
    assert not (tmp_path / ".shoal").exists()
    async with engine.Engine(store=str(path)) as eng:
        assert [r.id for r in await eng.runs()] == [run.id]


# -- group commit ---------------------------------------------------------------------


async def test_one_commit_serves_many_actions(tmp_path: Path) -> None:
    commits: list[str] = []
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        journal = await eng.journal()
        await journal.open_for_writing()
        db = journal._db
        assert db is not None
        # Set on the journal's own thread: from another one, a callback in
        # C (which needs the GIL) and the writer's statements (which hold
        # the connection) could wait for each other.
        loop = asyncio.get_running_loop()
        trace = lambda sql: commits.append(sql) if sql == "COMMIT" else None  # noqa: E731
        await loop.run_in_executor(journal._thread, db.set_trace_callback, trace)
        run = await eng.run(fan, 500)
        assert run.result == sum(range(1, 501))
        await loop.run_in_executor(journal._thread, db.set_trace_callback, None)
        details = await eng.get_run(run.id)
    assert details.action_count == 501
    assert 1 <= len(commits) < 100


async def test_action_succeeds_only_once_committed(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    gate = asyncio.Event()
    returned = asyncio.Event()

    @engine.task(name="gated")
    async def gated() -> int:
        await gate.wait()
        returned.set()
        return 42

    @engine.task(name="gated_root")
    async def root() -> int:
        return await gated()

    async with engine.Engine(store=path) as eng:
        run = await eng.submit(root)
        while run.counters.get("gated") is None or run.counters["gated"].running == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            gate.set()
            await returned.wait()
            loop = asyncio.get_running_loop()
            at_return = loop.time()
            await asyncio.sleep(0.3)
            # The function returned, but its record cannot be committed yet.
            counts = run.counters["gated"]
            assert (counts.running, counts.committing, counts.succeeded) == (0, 1, 0)
            assert not run.done
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        await run.wait()
        waited = loop.time() - at_return
        assert run.result == 42
        assert run.counters["gated"].succeeded == 1
    # The run was not over when its function returned: its commit is part of its time.
    assert run.finished_at is not None
    assert (run.finished_at - run.started_at).total_seconds() >= waited - 0.05


# -- what is recorded ---------------------------------------------------------------


async def test_run_and_actions_are_recorded(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(mixed, 2, tags=["exp-1", "nightly"])
        assert run.result == 3
        journal = await eng.journal()
        record, _, _ = await journal.load_run(run.id)
        details = await eng.run_summary(run.id, actions=True)
    assert isinstance(record, RunRecord)
    assert record.root == f"{__name__}:mixed"
    assert record.task == "mixed"
    assert record.status == "succeeded"
    assert record.tags == ("exp-1", "nightly")
    assert record.finished is not None and record.started <= record.finished
    assert msgspec.msgpack.decode(record.args) == [[2], {}]
    assert record.pid == os.getpid()

    by_task: dict[str, list[ActionRecord]] = {}
    for rec in details.action_records:
        assert isinstance(rec, ActionRecord)
        by_task.setdefault(rec.task, []).append(rec)
    assert sorted(by_task) == ["explode", "fan", "leaf", "mixed"]
    (root,) = by_task["mixed"]
    (fan_rec,) = by_task["fan"]
    assert root.parent is None
    assert fan_rec.parent == root.key
    assert fan_rec.group == "stage-1"
    assert all(r.parent == fan_rec.key and r.group == "stage-1" for r in by_task["leaf"])
    assert sorted(msgspec.msgpack.decode(r.output or b"") for r in by_task["leaf"]) == [1, 2]
    assert all(r.output_kind == "msgpack" and r.state == "succeeded" for r in by_task["leaf"])
    (failed,) = by_task["explode"]
    assert failed.state == "failed"
    assert failed.attempt == 1 and failed.run_attempt == 1
    assert failed.started is not None and failed.finished is not None
    assert failed.error is not None
    assert failed.error.type == f"{__name__}.Boom"
    assert failed.error.message == "boom 7"
    assert "raise Boom" in failed.error.traceback
    assert len({r.key for r in details.action_records}) == 5
    # Records are msgspec Structs: they round-trip as tagged msgpack.
    data = msgspec.msgpack.encode(failed)
    assert msgspec.msgpack.decode(data, type=ActionRecord | RunRecord) == failed


async def test_large_outputs_go_to_the_blob_store(tmp_path: Path) -> None:
    n = INLINE_LIMIT + 1000
    async with engine.Engine(store=tmp_path / ".shoal" / "shoal.db", home=tmp_path / ".shoal") as eng:
        run = await eng.run(big, n)
        assert run.result == b"z" * n
        details = await eng.run_summary(run.id, actions=True)
        (rec,) = details.action_records
        assert rec.output_kind == "blob-msgpack"
        assert rec.output is not None and len(rec.output) < 200
        digest = rec.output.decode()
        assert await eng.blob_store.get_bytes(digest) == msgspec.msgpack.encode(b"z" * n)
        small = await eng.run(big, 10)
        assert (await eng.run_summary(small.id, actions=True)).action_records[0].output_kind == "msgpack"
    blobs = [p for p in (tmp_path / ".shoal" / "blobs").rglob("*") if p.is_file() and p.parent.name != "tmp"]
    assert [p.name for p in blobs] == [digest]


async def test_pickle_fallback_is_marked_and_replayed(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(opaque, 5)
        assert run.result == Opaque(5)
        (rec,) = (await eng.run_summary(run.id, actions=True)).action_records
        assert rec.output_kind == "pickle"
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        again = await eng.resume(run.id)
        assert again.result == Opaque(5)


async def test_unencodable_result_fails_the_action(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(unencodable)
        assert run.status == "failed"
        assert isinstance(run.error, engine.EncodeError)
        assert "unencodable" in str(run.error)
        assert "pickled" in str(run.error)
        with pytest.raises(engine.RunFailed) as info:
            _ = run.result
        assert isinstance(info.value.__cause__, engine.EncodeError)
        (rec,) = (await eng.get_run(run.id, actions=True)).action_records
    assert rec.state == "failed"
    assert rec.error is not None and rec.error.type == "engine.EncodeError"


# -- reading runs back ----------------------------------------------------------------


async def test_runs_latest_first_and_filtered(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        first = await eng.run(fan, 1, tags=["exp-1"])
        second = await eng.run(explode, 1, tags=["exp-2"])
        third = await eng.run(fan, 2, tags=["exp-1", "big"])
        assert [r.id for r in await eng.runs()] == [third.id, second.id, first.id]
        assert [r.id for r in await eng.runs(status="failed")] == [second.id]
        assert [r.id for r in await eng.runs(tag="exp-1")] == [third.id, first.id]
        assert [r.id for r in await eng.runs(tag="exp-1", status="succeeded", limit=1)] == [third.id]
        assert await eng.runs(tag="nope") == []
        (failed,) = await eng.runs(status="failed")
        assert failed.error is not None and failed.error.type == f"{__name__}.Boom"
        assert failed.action_count == 1


async def test_get_run_pages_and_aggregates(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(fan, 250)
        summary = await eng.get_run(run.id)
        assert summary.action_count == 251
        assert summary.action_records == ()
        assert {(t.task, t.succeeded) for t in summary.tasks} == {("fan", 1), ("leaf", 250)}
        keys: list[str] = []
        for offset in range(0, 300, 100):
            page = await eng.get_run(run.id, actions=True, offset=offset, limit=100)
            keys.extend(r.key for r in page.action_records)
        assert len(keys) == len(set(keys)) == 251


def test_sync_runs_and_get_run() -> None:
    run = engine.run(fan, 2, tags=["exp-1"])
    other = engine.run(fan, 1)
    assert [r.id for r in engine.runs()] == [other.id, run.id]
    assert [r.id for r in engine.runs(tag="exp-1")] == [run.id]
    details = engine.get_run(run.id, actions=True)
    assert details.tags == ("exp-1",)
    assert len(details.action_records) == 3
    with pytest.raises(engine.RunNotFound):
        engine.get_run("missing")


# -- bad input --------------------------------------------------------------------------


async def _make_journal(path: Path, runs: int = 3) -> None:
    async with engine.Engine(store=path) as eng:
        for _ in range(runs):
            assert (await eng.run(fan, 200)).status == "succeeded"


async def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    path.write_bytes(os.urandom(8192))
    async with engine.Engine(store=path) as eng:
        with pytest.raises(engine.JournalCorrupt, match=str(path)):
            await eng.run(fan, 1)
        with pytest.raises(engine.JournalCorrupt, match=str(path)):
            await eng.runs()


async def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    await _make_journal(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    async with engine.Engine(store=path) as eng:
        with pytest.raises(engine.JournalCorrupt, match="truncated") as info:
            await eng.runs()
        assert str(path) in str(info.value)
        with pytest.raises(engine.JournalCorrupt):
            await eng.run(fan, 1)
    # Nothing was written to it meanwhile.
    assert path.read_bytes() == data[: len(data) // 2]


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1])
async def test_journal_from_a_newer_schema(tmp_path: Path, version: int) -> None:
    path = tmp_path / "j.db"
    await _make_journal(path, runs=1)
    db = _db(path)
    with db:
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    db.close()
    async with engine.Engine(store=path) as eng:
        with pytest.raises(engine.JournalVersionError, match=f"schema {version}") as info:
            await eng.runs()
    assert str(path) in str(info.value)
    assert "newer" in str(info.value)


async def test_sqlite_file_that_is_not_a_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    db = _db(path)
    with db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.close()
    async with engine.Engine(store=path) as eng:
        with pytest.raises(engine.JournalCorrupt, match="not a shoal journal"):
            await eng.runs()


async def test_journal_busy_when_lock_is_held_too_long(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    await _make_journal(path, runs=1)
    blocker = sqlite3.connect(path, isolation_level=None)
    async with engine.Engine(store=path) as eng:
        journal = Journal(path, blob_store=lambda: eng.blob_store, busy_timeout=0.2)
        await journal.open()
        try:
            blocker.execute("BEGIN EXCLUSIVE")
            record = ActionRecord("r1", "k1", None, "t", "failed", 1, 1, 0.0, 0.0)
            with pytest.raises(engine.JournalBusy, match=str(path)):
                await journal.append(record)
            blocker.execute("COMMIT")
            # Once the lock is free, the journal works again, and nothing was lost.
            await journal.append(record)
            assert blocker.execute("SELECT count(*) FROM actions WHERE run_id='r1'").fetchone() == (1,)
        finally:
            if blocker.in_transaction:
                blocker.execute("COMMIT")
            blocker.close()
            await journal.aclose()


async def test_writer_waits_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    await _make_journal(path, runs=1)
    holder = subprocess.Popen(  # noqa: ASYNC220
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "sys.stdin.readline()\n"
            "db.execute('COMMIT')\n",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "locked"
        async with engine.Engine(store=path) as eng:
            running = asyncio.ensure_future(eng.run(fan, 5))
            await asyncio.sleep(0.3)
            assert not running.done()  # waiting for the lock, not failing
            holder.stdin.write("\n")
            holder.stdin.flush()
            run = await running
            assert run.result == 15
            assert len(await eng.runs()) == 2
    finally:
        holder.stdin.close()
        holder.stdout.close()
        holder.wait(timeout=30)


async def test_run_whose_start_cannot_be_recorded_fails(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    await _make_journal(path, runs=0)
    blocker = sqlite3.connect(path, isolation_level=None)
    eng = engine.Engine(store=path)
    try:
        journal = Journal(path, blob_store=lambda: eng.blob_store, busy_timeout=0.2)
        await journal.open()
        await journal.open_for_writing()
        eng._journal = journal
        blocker.execute("BEGIN EXCLUSIVE")
        run = await eng.submit(fan, 1)
        await asyncio.wait_for(run.wait(), 5)
        assert run.status == "failed"
        assert isinstance(run.error, engine.JournalBusy)
        blocker.execute("COMMIT")
        assert await eng.runs() == []
    finally:
        if blocker.in_transaction:
            blocker.execute("COMMIT")
        blocker.close()
        eng.runs_in_flight.clear()  # a run that never finished would hang aclose
        await eng.aclose()


def test_disk_full_fails_the_run_and_keeps_the_journal(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ)
    env.update(
        SHOAL_HOME=str(tmp_path / ".shoal"),
        FLOW_MARKS=str(marks),
        FLOW_DELAY="0",
        FLOW_PAYLOAD="3000",
        FLOW_FSIZE="150000",
    )
    proc = subprocess.run(
        [sys.executable, str(FLOW), "40"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RUN ")]
    _, run_id, status, error = line.split(" ", 3)
    assert status == "failed"
    assert error.startswith("JournalError") and "could not be written" in error
    # The journal is readable, and the run resumes once there is room.
    env.pop("FLOW_FSIZE")
    code = (
        "import sys, engine\n"
        "print([(r.id, r.status) for r in engine.runs()])\n"
        "r = engine.resume(sys.argv[1])\n"
        "print('RESULT', r.status, r.result, r.stats['replayed'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, run_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert run_id in out.stdout.splitlines()[0]
    expected = sum(i * i + i * 10 for i in range(40))
    assert f"RESULT succeeded {expected}" in out.stdout
    db = _db(tmp_path / ".shoal" / "shoal.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()


async def test_a_run_with_a_record_that_failed_to_commit_does_not_succeed(tmp_path: Path) -> None:
    """A batch that cannot be committed fails the run, even if later batches commit."""
    path = tmp_path / "j.db"
    first_done = asyncio.Event()
    go_on = asyncio.Event()
    locked = asyncio.Event()

    @engine.task
    async def child(i: int) -> int:
        if i == 1:
            await locked.wait()
        return i

    @engine.task
    async def main() -> int:
        a = await child(1)
        first_done.set()
        await go_on.wait()
        return a + await child(2)

    async with engine.Engine(store=path, journal_timeout=0.2) as eng:
        blocker = sqlite3.connect(path, isolation_level=None)
        try:
            run = await eng.submit(main)
            while run.counters.get("main") is None or run.counters["main"].running == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            blocker.execute("BEGIN IMMEDIATE")
            locked.set()
            await first_done.wait()
            await asyncio.sleep(1.0)  # child(1)'s batch gives up on the lock
        finally:
            blocker.execute("COMMIT")
            blocker.close()
        go_on.set()
        await run.wait()
        assert [r.status for r in await eng.runs()] == ["failed"]
    assert run.status == "failed"
    assert isinstance(run.error, engine.JournalBusy)
    assert run.counters["child"].failed == 1


# -- counts of finished runs ------------------------------------------------------------

COUNTED_FAIL = {"on": True}


@engine.task(name="counted_leaf")
async def counted_leaf(i: int) -> int:
    if i == 3 and COUNTED_FAIL["on"]:
        raise ValueError("three")
    return i


@engine.task(name="counted_root")
async def counted_root(n: int) -> int:
    return sum(await asyncio.gather(*(counted_leaf(i) for i in range(n))))


async def test_counts_of_a_finished_run_follow_its_resume(tmp_path: Path) -> None:
    COUNTED_FAIL["on"] = True
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        first = await eng.run(counted_root, 6)
        assert first.status == "failed"
        before = {t.task: (t.succeeded, t.failed, t.cancelled) for t in (await eng.get_run(first.id)).tasks}
        COUNTED_FAIL["on"] = False
        again = await eng.resume(first.id)
        assert again.status == "succeeded"
        record = await eng.get_run(first.id)
        listed = {r.id: r.action_count for r in await eng.runs()}
    assert before["counted_root"] == (0, 1, 0)
    assert before["counted_leaf"][1] == 1  # the failing leaf (its siblings may be cancelled)
    after = {t.task: (t.succeeded, t.failed, t.cancelled) for t in record.tasks}
    # The failed and cancelled rows were superseded by the resume's.
    assert after == {"counted_root": (1, 0, 0), "counted_leaf": (6, 0, 0)}
    assert record.action_count == listed[first.id] == 7
    db = _db(tmp_path / "j.db")
    try:
        stored = db.execute("SELECT task, succeeded FROM run_tasks WHERE run_id=? ORDER BY task", (first.id,)).fetchall()
    finally:
        db.close()
    assert stored == [("counted_leaf", 6), ("counted_root", 1)]


async def test_a_run_of_an_odd_number_of_actions_records_each(tmp_path: Path) -> None:
    async with engine.Engine(store=tmp_path / "j.db") as eng:
        run = await eng.run(fan, 777)
        details = await eng.run_summary(run.id, actions=True, limit=2000)
    assert run.result == sum(range(1, 778))
    leaves = [r for r in details.action_records if r.task == "leaf"]
    assert len(leaves) == 777
    assert sorted(msgspec.msgpack.decode(r.output or b"") for r in leaves) == list(range(1, 778))
