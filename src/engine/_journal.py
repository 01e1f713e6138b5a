"""The journal: a run's durable record, in one SQLite file.

Writes are batched and committed on a dedicated thread (group commit): an
action that succeeds appends its record and waits for the commit of the
batch it landed in, so one transaction serves every action that finished
meanwhile, and the event loop never waits for the disk.  An action counts
as succeeded only once its record is committed.

The file is in WAL mode with ``synchronous=FULL``; it and its folder are
created owner-only.  Other processes may read it at any time (``shoal
runs``); a second writer waits for the lock up to ``busy_timeout`` and then
fails with :class:`JournalBusy` rather than corrupting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from msgspec.structs import astuple

from ._codec import decode_value
from ._errors import (
    JournalBusy,
    JournalCorrupt,
    JournalError,
    JournalVersionError,
    RunNotFound,
)
from ._records import SCHEMA_VERSION, ActionRecord, ErrorInfo, RunRecord, RunSummary, TaskSummary

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._action import Action
    from ._engine import Engine
    from ._events import TaskCounts
    from ._run_journal import RunJournal

    #: (counters, run's journal, action or None): a success to count once committed.
    Settle = tuple[TaskCounts, RunJournal, Action | None]

__all__ = ["Commit", "Journal"]

T = TypeVar("T")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, root TEXT NOT NULL, root_file TEXT,
    args BLOB, args_kind TEXT, status TEXT NOT NULL, attempt INTEGER NOT NULL,
    started REAL NOT NULL, finished REAL, tags TEXT NOT NULL DEFAULT '[]',
    error BLOB, pid INTEGER, host TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
CREATE TABLE IF NOT EXISTS actions (
    run_id TEXT NOT NULL, key TEXT NOT NULL, parent TEXT, task TEXT NOT NULL,
    state TEXT NOT NULL, attempt INTEGER NOT NULL, run_attempt INTEGER NOT NULL,
    started REAL, finished REAL, grp TEXT, output BLOB, output_kind TEXT,
    error BLOB, kind TEXT NOT NULL, cache_key TEXT, cached INTEGER NOT NULL DEFAULT 0
);
-- Append-only: a key's latest row (highest rowid) is its current state.  A
-- unique index on (run_id, key) would cost twice as much per insert.
CREATE INDEX IF NOT EXISTS actions_run ON actions (run_id);
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY, task TEXT NOT NULL, output BLOB NOT NULL,
    output_kind TEXT NOT NULL, created REAL NOT NULL, run_id TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (
    run_id TEXT NOT NULL, action TEXT NOT NULL, at REAL NOT NULL,
    stream TEXT NOT NULL, text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS logs_run ON logs (run_id, action);
"""

#: The current row of each action of one run (bind the run id once).
_LATEST = (
    "rowid IN (SELECT max(rowid) FROM actions WHERE run_id=? AND kind='action' GROUP BY key)"
)

_error_encoder = msgspec.msgpack.Encoder()
_error_decoder = msgspec.msgpack.Decoder(ErrorInfo)
_tags_decoder = msgspec.json.Decoder(tuple[str, ...])


class Commit(asyncio.Future[None]):
    """The commit of one batch of records, awaited by every action in it.

    One future for the whole batch, not one per action: a fan-out of
    100,000 actions waiting for their records keeps 100,000 fewer objects
    alive for the garbage collector to walk.  Cancelling one waiting action
    must not cancel the commit that the others wait for, so ``cancel()`` is
    refused here; the waiting action is still cancelled, at its next step,
    which comes when the commit is done (a few milliseconds).
    """

    __slots__ = ()

    def cancel(self, msg: Any = None) -> bool:
        return False


class Journal:
    """One journal file, shared by the runs of an engine."""

    def __init__(self, path: Path, engine: Engine, *, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.engine = engine
        self.busy_timeout = busy_timeout
        # One thread owns the connection: sqlite3 objects stay on it.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="shoal-journal")
        self._db: sqlite3.Connection | None = None
        self._loop = asyncio.get_running_loop()
        # Shared between the event loop (which appends) and the journal
        # thread (which takes batches), under ``_lock``.
        # Invariant: ``_pending`` holds the records not yet taken by the
        # journal thread, ``_settles`` the successes among them still to be
        # counted, and ``_commit`` the future they all wait on (None iff
        # ``_pending`` is empty).  ``_draining`` is True from the moment a
        # drain is handed to the journal thread until that drain finds
        # ``_pending`` empty: while it runs, it takes whatever was appended
        # meanwhile as its next batch without waiting for the loop, so
        # commits overlap with the loop's work (group commit).
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._settles: list[Settle] = []
        self._commit: Commit | None = None
        self._draining = False
        # The newest commit future (resolved last: batches commit in order).
        self._last: Commit | None = None

    # -- thread plumbing -----------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self._loop.run_in_executor(self._thread, self._guard, fn, args)

    def _guard(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return fn(*args)
        except sqlite3.Error as exc:
            raise self._map(exc) from exc

    def _map(self, exc: sqlite3.Error) -> JournalError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return JournalBusy(
                f"journal {self.path} is locked by another process for more than "
                f"{self.busy_timeout:g} s; wait for it to finish or use another store"
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return JournalCorrupt(
                f"journal {self.path} is damaged ({text}); move it aside to start a new one "
                f"(its runs cannot be resumed), or restore it from a backup"
            )
        if "disk is full" in text or "disk I/O" in text:
            return JournalError(
                f"journal {self.path} could not be written: {text}; free some disk space "
                f"and resume the run"
            )
        return JournalError(f"journal {self.path}: {text}")

    # -- open / close ----------------------------------------------------------

    async def open(self) -> None:
        await self._call(self._open)

    def _open(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.path.exists():
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        _check_not_truncated(self.path)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            row = db.execute("SELECT name FROM sqlite_master WHERE name='meta'").fetchone()
            if row is None:
                db.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} INSERT OR IGNORE INTO meta VALUES "
                    f"('schema_version', '{SCHEMA_VERSION}'); COMMIT;"
                )
            version_row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            version = int(version_row[0]) if version_row else 0
        except sqlite3.Error:
            db.close()
            raise
        except ValueError:
            db.close()
            raise JournalCorrupt(f"journal {self.path} has an unreadable schema version") from None
        if version > SCHEMA_VERSION:
            db.close()
            raise JournalVersionError(
                f"journal {self.path} was written by a newer shoal (schema {version}, this one "
                f"reads up to {SCHEMA_VERSION}); upgrade shoal to read it"
            )
        if 1 <= version < SCHEMA_VERSION:
            db.close()
            raise JournalVersionError(
                f"journal {self.path} was written by an older shoal (schema {version}, this one "
                f"reads schema {SCHEMA_VERSION}); move it aside to start a new journal"
            )
        if version < 1:
            db.close()
            raise JournalCorrupt(f"journal {self.path} has no schema version; it is not a shoal journal")
        self._db = db

    async def aclose(self) -> None:
        try:
            await self.flush()
        except JournalError:
            # The failed batch already failed every action waiting on it;
            # closing must still release the file.
            pass
        finally:
            if self._db is not None:
                db, self._db = self._db, None
                await self._loop.run_in_executor(self._thread, db.close)
            self._thread.shutdown(wait=False)

    # -- group commit ------------------------------------------------------------

    def append(self, record: Any, settle: Settle | None = None) -> asyncio.Future[None]:
        """Queue a record for the next commit; the future resolves once it is durable.

        Every record of a batch shares the batch's :class:`Commit` future.
        A caller that does not wait for durability (failure records,
        traces, successes with a ``settle``) may drop it.  ``settle`` is the
        (counters, action) of a success to count once it is committed: the
        action is counted succeeded then, or failed if the commit fails.
        """
        with self._lock:
            self._pending.append(record)
            if settle is not None:
                self._settles.append(settle)
            commit = self._commit
            if commit is None:
                commit = self._commit = self._last = Commit(loop=self._loop)
                # Marked retrieved: a batch of failure records has no waiter.
                commit.add_done_callback(_consume)
            start = not self._draining
            self._draining = True
        if start:
            self._loop.run_in_executor(self._thread, self._drain).add_done_callback(_consume)
        return commit

    async def flush(self) -> None:
        """Wait until everything appended so far is committed (or failed to be)."""
        last = self._last
        if last is not None:
            await asyncio.wait([last])

    def _drain(self) -> None:
        """On the journal thread: commit batches until nothing is pending."""
        while True:
            with self._lock:
                records, settles, commit = self._pending, self._settles, self._commit
                if not records:
                    self._draining = False
                    return
                self._pending, self._settles, self._commit = [], [], None
            error: Exception | None = None
            try:
                self._guard(self._write, (records,))
            except Exception as exc:
                error = exc
            try:
                self._loop.call_soon_threadsafe(self._committed, settles, commit, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _committed(self, settles: list[Settle], commit: Commit | None, error: Exception | None) -> None:
        """On the loop: count a batch's successes and wake whoever waits for it."""
        self._settle(settles, error)
        if commit is not None:
            if error is None:
                commit.set_result(None)
            else:
                commit.set_exception(error)

    def _settle(self, settles: list[Settle], error: Exception | None) -> None:
        """Count the successes of a committed batch (or, if it failed, their failure)."""
        engine = self.engine
        wanted = engine.wanted
        for counts, owner, action in settles:
            counts.running -= 1
            if error is not None:
                # Sticky for the run: it must not report success with a
                # record missing (later batches may still commit).
                owner.error = error
            if error is None:
                counts.succeeded += 1
                if action is not None and "succeeded" in wanted:
                    engine.emit("succeeded", action)
            else:
                counts.failed += 1
                if action is not None and "failed" in wanted:
                    engine.emit("failed", action, error)

    def _write(self, records: list[Any]) -> None:
        db = self._db
        if db is None:
            raise JournalError(f"journal {self.path} is closed")
        actions = []
        runs = []
        caches = []
        for rec in records:
            if type(rec) is ActionRecord:
                # astuple (in C) gives the columns in table order; only an
                # error needs encoding.  This thread holds the GIL while it
                # builds rows, and the event loop wants it back.
                actions.append(astuple(rec) if rec.error is None else _action_row(rec))
                if rec.cache_key is not None and rec.output is not None and not rec.cached:
                    caches.append((rec.cache_key, rec.task, rec.output, rec.output_kind, rec.finished, rec.run_id))
            else:
                runs.append(rec)
        db.execute("BEGIN IMMEDIATE")
        try:
            for run in runs:
                db.execute(
                    "INSERT INTO runs (id, task, root, root_file, args, args_kind, status, attempt, "
                    "started, finished, tags, error, pid, host) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(id) DO UPDATE SET status=excluded.status, attempt=excluded.attempt, "
                    "finished=excluded.finished, error=excluded.error, pid=excluded.pid, host=excluded.host, "
                    "cancel_requested=CASE WHEN excluded.status='running' THEN 0 ELSE cancel_requested END",
                    (
                        run.id, run.task, run.root, run.root_file, run.args, run.args_kind, run.status,
                        run.attempt, run.started, run.finished, msgspec.json.encode(run.tags).decode(),
                        None if run.error is None else _error_encoder.encode(run.error), run.pid, run.host,
                    ),
                )
            if actions:
                db.executemany("INSERT INTO actions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", actions)
            if caches:
                db.executemany("INSERT OR REPLACE INTO cache VALUES (?,?,?,?,?,?)", caches)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def for_run(self) -> RunJournal:
        from ._run_journal import RunJournal

        return RunJournal(self)

    # -- queries ---------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def go() -> T:
            if self._db is None:
                raise JournalError(f"journal {self.path} is closed")
            return fn(self._db)

        return await self._call(go)

    async def load_run(self, run_id: str) -> tuple[RunRecord, Any, str | None]:
        """The run record, and its root action's recorded output (bytes, kind) if it succeeded.

        The output is read from the root action's own record, which is
        committed before the run's final record: a crash between the two
        leaves a run that resumes (replaying its root), never one that
        says it succeeded without its result.
        """

        def go(db: sqlite3.Connection) -> tuple[RunRecord, Any, str | None]:
            row = self._run_row(db, run_id)
            out = db.execute(
                "SELECT output, output_kind FROM actions WHERE run_id=? AND parent IS NULL "
                "AND kind='action' AND state='succeeded' ORDER BY rowid DESC LIMIT 1",
                (run_id,),
            ).fetchone()
            return _run_record(row), *(out if out is not None else (None, None))

        return await self.read(go)

    def _run_row(self, db: sqlite3.Connection, run_id: str) -> tuple[Any, ...]:
        row: tuple[Any, ...] | None = db.execute(
            "SELECT id, task, root, root_file, args, args_kind, status, attempt, started, finished, "
            "tags, error, pid, host FROM runs WHERE id=?",
            (run_id,),
        ).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in journal {self.path}; list runs with 'shoal runs'")
        return row

    async def list_runs(self, *, status: str | None, tag: str | None, limit: int) -> list[RunSummary]:
        def go(db: sqlite3.Connection) -> list[RunSummary]:
            where, params = [], []
            if status:
                where.append("status=?")
                params.append(status)
            if tag:
                where.append("EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE value=?)")
                params.append(tag)
            sql = (
                "SELECT id, task, root, root_file, args, args_kind, status, attempt, started, finished, "
                "tags, error, pid, host, "
                "(SELECT count(DISTINCT key) FROM actions a WHERE a.run_id=runs.id AND a.kind='action') "
                "FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
                + " ORDER BY started DESC LIMIT ?"
            )
            rows = db.execute(sql, (*params, limit)).fetchall()
            return [_summary(_run_record(r), r[14]) for r in rows]

        return await self.read(go)

    async def run_details(self, run_id: str, *, actions: bool, offset: int, limit: int) -> RunSummary:
        def go(db: sqlite3.Connection) -> RunSummary:
            row = self._run_row(db, run_id)
            tasks = []
            count = 0
            for task, grp, succeeded, failed, cancelled, running, cached in db.execute(
                "SELECT task, grp, sum(state='succeeded'), sum(state='failed'), sum(state='cancelled'), "
                "sum(state='running'), sum(cached) FROM actions WHERE " + _LATEST + " "
                "GROUP BY task, grp ORDER BY min(started)",
                (run_id,),
            ):
                tasks.append(TaskSummary(task, grp, succeeded, failed, cancelled, running, cached))
                count += succeeded + failed + cancelled + running
            records: tuple[ActionRecord, ...] = ()
            if actions:
                records = tuple(
                    _action_record(r)
                    for r in db.execute(
                        "SELECT * FROM actions WHERE " + _LATEST + " "
                        "ORDER BY started, key LIMIT ? OFFSET ?",
                        (run_id, limit, offset),
                    )
                )
            return msgspec.structs.replace(
                _summary(_run_record(row), count), tasks=tuple(tasks), action_records=records
            )

        return await self.read(go)

    async def failed_actions(self, run_id: str, limit: int = 20) -> list[ActionRecord]:
        def go(db: sqlite3.Connection) -> list[ActionRecord]:
            return [
                _action_record(r)
                for r in db.execute(
                    "SELECT * FROM actions WHERE " + _LATEST + " AND state='failed' ORDER BY finished LIMIT ?",
                    (run_id, limit),
                )
            ]

        return await self.read(go)

    async def request_cancel(self, run_id: str) -> str:
        """Ask the process running ``run_id`` to cancel it; returns the run's status.

        A run recorded as running by a process of this host that no longer
        exists (killed, crashed) is marked cancelled at once, and
        ``"abandoned"`` is returned: nobody is left to notice the request.
        """

        def go(db: sqlite3.Connection) -> str:
            record = _run_record(self._run_row(db, run_id))
            if record.status != "running":
                return str(record.status)
            if record.host == socket.gethostname() and record.pid is not None and not _alive(record.pid):
                db.execute(
                    "UPDATE runs SET status='cancelled', finished=? WHERE id=? AND status='running'",
                    (time.time(), run_id),
                )
                return "abandoned"
            db.execute("UPDATE runs SET cancel_requested=1 WHERE id=?", (run_id,))
            return "running"

        return await self.read(go)

    async def add_logs(self, rows: list[tuple[str, str, float, str, str]]) -> None:
        def go(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT INTO logs VALUES (?,?,?,?,?)", rows)
            db.execute("COMMIT")

        await self.read(go)

    async def logs(self, run_id: str, action: str | None = None) -> list[tuple[str, float, str, str]]:
        def go(db: sqlite3.Connection) -> list[tuple[str, float, str, str]]:
            if action is None:
                cur = db.execute("SELECT action, at, stream, text FROM logs WHERE run_id=? ORDER BY at", (run_id,))
            else:
                cur = db.execute(
                    "SELECT action, at, stream, text FROM logs WHERE run_id=? AND action=? ORDER BY at",
                    (run_id, action),
                )
            return [(a, at, s, t) for a, at, s, t in cur]

        return await self.read(go)

    async def action_tasks(self, run_id: str, *, prefix: str = "", logged: bool = False) -> dict[str, str]:
        """Key -> task name of the run's recorded actions whose key starts with ``prefix``.

        With ``logged``, only the actions that printed or logged something
        (what ``shoal logs`` needs to name the task beside each line).
        """

        def go(db: sqlite3.Connection) -> dict[str, str]:
            sql = "SELECT DISTINCT key, task FROM actions WHERE run_id=? AND kind='action' AND substr(key, 1, ?)=?"
            params: list[Any] = [run_id, len(prefix), prefix]
            if logged:
                sql += " AND key IN (SELECT action FROM logs WHERE run_id=?)"
                params.append(run_id)
            return {key: task for key, task in db.execute(sql, params)}

        return await self.read(go)

    async def decode(self, kind: str, data: bytes, type: Any) -> Any:
        if kind.startswith("blob-"):
            data = await self.engine.blob_store.get_bytes(data.decode())
            kind = kind[5:]
        return decode_value(kind, data, type)


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _check_not_truncated(path: Path) -> None:
    """Refuse a journal file shorter than its header says (cut by a copy or a full disk).

    SQLite itself notices only when it reads a missing page, maybe in the
    middle of a run.  While a write-ahead log with content exists, pages
    may legitimately be there instead, so the check is skipped.
    """
    try:
        size = path.stat().st_size
        wal = Path(f"{path}-wal")
        if size < 100 or (wal.exists() and wal.stat().st_size > 0):
            return
        with path.open("rb") as fh:
            header = fh.read(100)
    except OSError:
        return
    if not header.startswith(b"SQLite format 3\x00"):
        return
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count in the header is valid only when these two match.
    counter_ok = header[24:28] == header[92:96]
    if counter_ok and pages and size < pages * page_size:
        raise JournalCorrupt(
            f"journal {path} is truncated ({size} bytes, its header says {pages * page_size}); "
            f"move it aside to start a new one (its runs cannot be resumed), or restore it from a backup"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


def _action_row(rec: ActionRecord) -> tuple[Any, ...]:
    return (
        rec.run_id, rec.key, rec.parent, rec.task, rec.state, rec.attempt, rec.run_attempt,
        rec.started, rec.finished, rec.group, rec.output, rec.output_kind,
        None if rec.error is None else _error_encoder.encode(rec.error), rec.kind, rec.cache_key,
        int(rec.cached),
    )


def _action_record(row: tuple[Any, ...]) -> ActionRecord:
    (run_id, key, parent, task, state, attempt, run_attempt, started, finished, grp, output, output_kind,
     error, kind, cache_key, cached) = row
    return ActionRecord(
        run_id, key, parent, task, state, attempt, run_attempt, started, finished, grp,
        output, output_kind, None if error is None else _error_decoder.decode(error), kind, cache_key,
        bool(cached),
    )


def _run_record(row: tuple[Any, ...]) -> RunRecord:
    (id_, task, root, root_file, args, args_kind, status, attempt, started, finished, tags, error,
     pid, host) = row[:14]
    return RunRecord(
        id_, task, root, root_file, args, args_kind, status, attempt, started, finished,
        _tags_decoder.decode(tags), None if error is None else _error_decoder.decode(error), pid, host,
    )


def _summary(rec: RunRecord, actions: int) -> RunSummary:
    return RunSummary(
        rec.id, rec.task, rec.root, rec.status, rec.attempt, rec.started, rec.finished, rec.tags,
        actions, rec.error,
    )


def _replay_table(db: sqlite3.Connection, run_id: str) -> dict[str, Any]:
    """key -> (kind, bytes) of every action and trace that succeeded in the run."""
    return {
        key: (kind, output)
        for key, kind, output in db.execute(
            "SELECT key, output_kind, output FROM actions WHERE run_id=? AND state='succeeded'",
            (run_id,),
        )
    }

