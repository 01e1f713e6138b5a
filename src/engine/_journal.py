"""The journal: a run's durable record, in one SQLite file.

Writes are batched and committed on a dedicated thread (group commit): an
action that succeeds appends its record and goes on, and one transaction
serves every record appended meanwhile, so the event loop never waits for
the disk.  An action counts as succeeded only once its record is committed.
A batch holds at most :data:`MAX_BATCH` records, so that the write lock is
never held for long; and when more than :data:`HIGH_WATER` records wait,
whoever appends waits for the next commit (backpressure: a run's memory
does not grow with its size).

Reads have a connection and a thread of their own, so a query (a cancel
poll, ``shoal show``) never queues behind a backlog of writes: in WAL mode
a reader sees the last commit while the writer works.  The reading side
cannot write (``query_only``) and never creates, converts or migrates
anything but a shoal journal; a file that is not one (another program's SQLite
database) is refused with :class:`JournalCorrupt`, untouched.

The file is in WAL mode with ``synchronous=FULL``; it and its folder are
created owner-only.  Other processes may read it at any time (``shoal
runs``); a second writer waits for the lock up to ``busy_timeout`` and then
fails with :class:`JournalBusy` rather than corrupting anything.

Starting or resuming a run *claims* it: in one write transaction the claim
checks that the run id is new (a start) or that the run's recorded attempt
is still the one the resume read and its owner is gone (a resume), and
records this process as the owner.  Of two processes resuming one run at
once, exactly one wins; the other gets :class:`RunInUse`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from msgspec.structs import astuple

from . import _lifecycle as lifecycle
from ._bulk import insert_rows
from ._codec import decode_value
from ._entries import (
    ACTION_COLUMNS,
    AttemptRow,
    BundleRow,
    Claim,
    Commit,
    Failure,
    LiveRows,
    LogRow,
    LogRows,
    Stacks,
    action_row,
    describe,
    runs_of,
    split_settles,
)
from ._errors import (
    JournalBusy,
    JournalCorrupt,
    JournalError,
    RunNotFound,
    UnusableFolder,
)
from ._file_checks import check_not_truncated, present, schema_version
from ._home import private_dir
from ._queries import JournalQueries
from ._records import ActionRecord, RunRecord
from ._run_rows import RunRows
from ._schema import SCHEMA, SCHEMA_VERSION, migrate
from ._signing import Signer
from ._watch import RunWatch

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._action import Action
    from ._blobs import BlobStore
    from ._events import TaskCounts
    from ._run_journal import RunJournal

    #: (counters, run's journal, action or None): a success to count once committed.
    Settle = tuple[TaskCounts, RunJournal, Action | None]

__all__ = ["Journal"]

T = TypeVar("T")

#: Most records one transaction writes: the write lock is held for a few
#: tens of milliseconds at most, so another process's write (``shoal
#: cancel`` on a dead run, a second engine) gets its turn.
MAX_BATCH = 8192
#: Records waiting to be written beyond which a success waits for room
#: before it is appended, and the backlog it waits for (see ``room``).
HIGH_WATER = 32768
LOW_WATER = HIGH_WATER // 2
#: Seconds the writer lets a stream of records gather (records came while the
#: last batch was written, fewer than GATHER_ENOUGH), unless a flush or a
#: run's claim or end waits (a service's runs wait for those commits; one
#: that comes during the wait ends it, see ``_hurry``): a fan-out went about
#: 35 records to a transaction, and more per transaction cost SQLite a
#: third less CPU each.  A lone record is written at once.  At 2 ms,
#: journaled offloaded actions (whose attempt rows land on random pages of
#: their index: each commit rewrites most of a run's pages of it) took
#: about 15% more CPU on the journal thread than at 6 ms.
GATHER = 0.006
GATHER_ENOUGH = 512
#: Seconds a finished run's count by task may wait for the writer to be idle
#: (see ``Journal._tallies``) before it is written between two batches.
TALLY_WAIT = 1.0



class Journal(JournalQueries, RunRows):
    """One journal file, shared by the runs of an engine.

    ``home`` is the folder whose secret signs pickled values (see
    ``_signing``); when the journal lives in it, it is also checked to be
    private.
    """

    def __init__(
        self,
        path: Path,
        *,
        blob_store: Callable[[], BlobStore],
        busy_timeout: float = 10.0,
        home: Path | None = None,
    ) -> None:
        self.path = path
        # The store large recorded outputs live in, opened on first use by
        # whoever owns it: the journal knows nothing else of its engine.
        self._blob_store = blob_store
        self.busy_timeout = busy_timeout
        self.home = home if home is not None else path.parent
        # One thread owns each connection: sqlite3 objects stay on it.  The
        # writer's connection is opened on the first write, the reader's on
        # the first read (read-only).
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="shoal-journal")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="shoal-journal-read")
        self._db: sqlite3.Connection | None = None
        self._rdb: sqlite3.Connection | None = None
        self._signer: Signer | None = None
        self._flags = Path(f"{path}-cancel")
        self.watch = RunWatch()  # the cancel requests and running actions of live runs
        self._roots: dict[Any, tuple[str, str | None]] = {}
        # Formatted stacks by where they ran (see ``describe``); used only
        # on the journal thread.
        self._stacks: Stacks = {}
        # Invariant (journal thread only): ``_lost`` maps each run that had
        # records in a batch that failed to that batch's error; the run's
        # end, written later, is then recorded as failed (see ``_end``).
        self._lost: dict[str, Exception] = {}
        # Invariant (journal thread only): ``_tallies`` lists the (run id,
        # attempt) of runs whose end is committed and whose actions are not
        # yet counted into ``run_tasks``.  The count is a cache for reading a
        # finished run quickly (readers count the actions themselves while
        # it is missing), so it is written in a transaction of its own once
        # the writer has nothing else to do, not in the end's: a run of a
        # million actions does not wait for its count before it returns.
        self._tallies: list[tuple[str, int]] = []
        self._tallies_since = 0.0  # when the oldest of them was listed (monotonic)
        # Invariant (journal thread only): the runs whose running actions
        # (``live_actions``) this journal wrote and whose end it has not.
        self._shown: set[str] = set()
        self._closed = False
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
        # flush() calls waiting now (the writer does not gather meanwhile).
        self._flushing = 0
        # Whether a run's claim or end is pending (under ``_lock``): its
        # run waits for that commit, so the writer does not gather then.
        self._awaited = False
        # Set when someone starts waiting for a commit (a claim or end is
        # appended, a flush begins): it cuts the writer's gathering short.
        # Cleared by the writer before it looks at what is pending, so a
        # set that comes later is never lost.
        self._hurry = threading.Event()
        # Invariant: ``_writing_now`` counts the records the journal thread
        # has taken and not yet committed (written by that thread only);
        # ``_waiters`` are the futures of appenders waiting for room (see
        # ``room``), each woken once the backlog is down to LOW_WATER or the
        # drain ends.
        self._writing_now = 0
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this journal belongs to (its futures and callbacks live there)."""
        return self._loop

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
        if "unable to open" in text or "readonly" in text:
            return JournalError(
                f"journal {self.path} cannot be opened for writing ({text}); set SHOAL_HOME "
                f"(or Engine(store=...)) to a writable place of your own, or fix its permissions"
            )
        return JournalError(f"journal {self.path}: {text}")

    # -- open / close ----------------------------------------------------------

    async def open(self) -> None:
        """Check the file, if there is one (reading only: nothing is created)."""
        await self._loop.run_in_executor(self._reader, self._guard, self._reading, ())

    async def open_for_writing(self) -> None:
        """Create, or migrate, the file now rather than at the first write."""
        if self._db is None:
            await self._call(self._writing)

    @property
    def signer(self) -> Signer:
        """The home's signer of pickled values (blocking on first use: call it off the loop)."""
        if self._signer is None:
            self._signer = Signer.for_home(self.home)
        return self._signer

    def _check_home(self) -> None:
        if self.path.parent == self.home:
            private_dir(self.home, "shoal home", UnusableFolder)
        elif not self.path.parent.is_dir():
            private_dir(self.path.parent, "journal folder", UnusableFolder)

    def _writing(self) -> sqlite3.Connection:
        """On the journal thread: the writer's connection, opened on first use."""
        db = self._db
        if db is not None:
            return db
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        self._check_home()
        try:
            if not self.path.exists():
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
        except OSError as exc:
            raise JournalError(
                f"journal {self.path} cannot be created: {exc.strerror}; set SHOAL_HOME (or "
                f"Engine(store=...)) to a writable place of your own"
            ) from None
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            check_not_truncated(db, self.path)
            version = schema_version(db, self.path)
            if version is None or version < SCHEMA_VERSION:
                db.execute("BEGIN IMMEDIATE")
                try:
                    # Read again under the write lock: another process may
                    # have created or migrated the file meanwhile.
                    version = schema_version(db, self.path)
                    if version is None:
                        # One statement at a time: executescript would
                        # commit the transaction that holds the lock.
                        code = "\n".join(
                            line for line in SCHEMA.splitlines() if not line.lstrip().startswith("--")
                        )
                        for statement in code.split(";"):
                            if statement.strip():
                                db.execute(statement)
                        db.execute(
                            "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                        )
                    elif version < SCHEMA_VERSION:
                        migrate(db, version, self.signer)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _reading(self) -> sqlite3.Connection | None:
        """On the reader thread: a connection that only reads, or None while there is no file."""
        db = self._rdb
        if db is not None:
            return db
        if self._closed:
            raise JournalError(f"journal {self.path} is closed")
        if self.path.parent == self.home and present(self.home):
            private_dir(self.home, "shoal home", UnusableFolder)
        elif self.path.parent != self.home and present(self.path.parent) and not self.path.parent.is_dir():
            raise UnusableFolder(
                f"journal {self.path} cannot exist: {self.path.parent} is not a folder; "
                f"give a store path in a folder of your own"
            )
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        # Not ``mode=ro``: connections of one process share the file's
        # WAL index, and if a read-only connection opens it first, the
        # writer's commits stay invisible to other processes (and are lost
        # when one of them checkpoints).  ``query_only`` keeps this
        # connection from writing all the same.
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA query_only=1")
            check_not_truncated(db, self.path)
            version = schema_version(db, self.path)
        except BaseException:
            db.close()
            raise
        if version is None:  # an empty database: nothing recorded yet
            db.close()
            return None
        if version < SCHEMA_VERSION:
            # An older journal of ours: the writer migrates it first.
            db.close()
            self._thread.submit(self._guard, self._writing, ()).result()
            return self._reading()
        self._rdb = db
        return db

    async def aclose(self) -> None:
        try:
            await self.flush()
        except JournalError:
            # The failed batch already failed every action waiting on it;
            # closing must still release the file.
            pass
        finally:
            self._closed = True
            self.watch.close()
            if self._db is not None:
                db, self._db = self._db, None
                await self._loop.run_in_executor(self._thread, db.close)
            if self._rdb is not None:
                rdb, self._rdb = self._rdb, None
                await self._loop.run_in_executor(self._reader, rdb.close)
            self._thread.shutdown(wait=False)
            self._reader.shutdown(wait=False)

    # -- group commit ------------------------------------------------------------

    def append(self, record: Any, settle: Settle | None = None) -> asyncio.Future[None]:
        """Queue a record for the next commit; the future resolves once it is durable.

        Every record of a batch shares the batch's :class:`Commit` future.
        A caller that does not wait for durability (failure records,
        traces, successes with a ``settle``) may drop it.  ``settle`` is the
        (counters, action) of a success to count once it is committed: the
        action is counted succeeded then, or failed if the commit fails.
        """
        kind = type(record)
        with self._lock:
            self._pending.append(record)
            if settle is not None:
                self._settles.append(settle)
            elif kind is Claim or kind is RunRecord:
                self._awaited = True
                self._hurry.set()
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

    async def add_logs(self, rows: list[LogRow]) -> None:
        """Write captured output (run id, action, time, stream, text) with the next batch."""
        await self.append(LogRows(rows))

    @property
    def backlogged(self) -> bool:
        """Whether so many records wait that whoever appends should first wait for room.

        Read without the lock: two list and int reads, each atomic; being
        off by a batch in either direction only moves the wait a little.
        """
        return len(self._pending) + self._writing_now > HIGH_WATER

    async def room(self) -> None:
        """Wait until the backlog of records has shrunk (returns at once if it is small)."""
        if not self.backlogged:
            return
        waiter = self._loop.create_future()
        with self._lock:
            if not self._draining:
                return
            self._waiters.append(waiter)
        await waiter

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        """From the journal thread: run ``fn(*args)`` on the loop (unless it is closed)."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)

    def _make_room(self, force: bool = False) -> None:
        """From the journal thread: wake the appenders waiting for room, if there is room now."""
        with self._lock:
            if not self._waiters or (not force and len(self._pending) + self._writing_now > LOW_WATER):
                return
            waiters, self._waiters = self._waiters, []
        self._soon(_wake, waiters)

    async def flush(self) -> None:
        """Wait until everything appended so far is committed (or failed to be)."""
        last = self._last
        if last is not None:
            self._flushing += 1
            self._hurry.set()
            try:
                await asyncio.wait([last])
            finally:
                self._flushing -= 1

    def _drain(self) -> None:
        """On the journal thread: commit batches until nothing is pending.

        Each turn takes everything appended so far (holding the lock only to
        swap the lists) and commits it in transactions of at most
        :data:`MAX_BATCH` records, in order; the turn's shared future is
        resolved after its last one.
        """
        follows = False
        while True:
            if follows and not self._flushing:
                self._hurry.clear()
                with self._lock:
                    few = 0 < len(self._pending) < GATHER_ENOUGH and not self._awaited
                if few and not self._flushing:
                    self._hurry.wait(GATHER)  # a stream of records: let more gather
            follows = True
            with self._lock:
                records, settles, commit = self._pending, self._settles, self._commit
                if not records:
                    self._draining = False
                    self._writing_now = 0
                    waking = bool(self._waiters)
                else:
                    self._pending, self._settles, self._commit = [], [], None
                    self._awaited = False
                    self._writing_now = len(records)
            if not records:
                if waking:
                    self._make_room(force=True)
                if self._tallies:
                    # Draining again afterwards: records appended meanwhile
                    # found ``_draining`` false and queued a new drain, which
                    # the one journal thread runs after this one.
                    self._tally()
                return
            for start in range(0, len(records), MAX_BATCH):
                chunk = records[start : start + MAX_BATCH]
                last = start + MAX_BATCH >= len(records)
                if last:
                    ours = settles
                else:
                    # The settles of this chunk's successes (see split_settles).
                    count = sum(
                        1 for r in chunk if type(r) is ActionRecord and r.kind == "action" and r.state == "succeeded"
                    )
                    ours, settles = split_settles(settles, chunk, count)
                error: Exception | None = None
                claims: list[Claim] = []
                try:
                    self._guard(self._write, (chunk, claims))
                except Exception as exc:
                    error = exc
                    for run_id in runs_of(chunk):
                        self._lost.setdefault(run_id, exc)
                self._writing_now -= len(chunk)
                try:
                    self._loop.call_soon_threadsafe(
                        self._committed, ours, commit if last else None, error, claims
                    )
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
                self._make_room()
            if self._tallies and time.monotonic() - self._tallies_since > TALLY_WAIT:
                self._tally()  # a writer that is never idle still counts its runs

    def _committed(
        self,
        settles: list[Settle],
        commit: Commit | None,
        error: Exception | None,
        claims: list[Claim],
    ) -> None:
        """On the loop: count a batch's successes and wake whoever waits for it."""
        self._settle(settles, error)
        for claim in claims:
            if not claim.outcome.done():
                if error is not None:
                    claim.outcome.set_exception(error)
                elif claim.refused is not None:
                    claim.outcome.set_exception(claim.refused)
                else:
                    claim.outcome.set_result(None)
        if commit is not None:
            if error is None:
                commit.set_result(None)
            else:
                commit.set_exception(error)
    def _settle(self, settles: list[Settle], error: Exception | None) -> None:
        """The successes of a committed batch are durable now (or, if it failed, lost)."""
        for counts, owner, action in settles:
            if error is not None:
                # Sticky for the run: it must not report success with a
                # record missing (later batches may still commit).
                owner.error = error
            run = owner.run
            assert run is not None
            lifecycle.settled(run, counts, action, error)

    def _write(self, records: list[Any], claims: list[Claim]) -> None:
        """Write one batch in one transaction; the claims found in it are put in ``claims``."""
        db = self._writing()
        actions = []
        runs = []
        caches = []
        logs = []
        attempts = []
        bundles = []
        live: dict[str, list[tuple[Any, ...]]] = {}
        for rec in records:
            kind = type(rec)
            if kind is ActionRecord:
                # astuple (in C) gives the columns in table order; only an
                # error needs encoding.  This thread holds the GIL while it
                # builds rows, and the event loop wants it back.
                actions.append(astuple(rec)[:ACTION_COLUMNS])
                if rec.cache_key is not None and rec.output is not None and not rec.cached:
                    caches.append((rec.cache_key, rec.task, rec.output, rec.output_kind, rec.finished, rec.run_id))
            elif kind is Failure:
                info = None if rec.error is None else describe(rec.error, rec.origin, self._stacks)
                actions.append(action_row(rec.record, info))
            elif kind is LogRows:
                logs.extend(rec.rows)
            elif kind is AttemptRow:
                attempts.append(rec.row)
            elif kind is BundleRow:
                bundles.append(rec.row)
            elif kind is LiveRows:
                live[rec.run_id] = rec.rows  # the latest snapshot of each run wins
            else:
                if kind is Claim:
                    # Listed before the transaction starts, so that a
                    # failed batch still answers every claim in it.
                    claims.append(rec)
                runs.append(rec)
        db.execute("BEGIN IMMEDIATE")
        try:
            # Claims first, ends last (a run's actions are written before its end).
            self._claim_all(db, runs)
            if actions:
                insert_rows(db, "INSERT", "actions", ACTION_COLUMNS, actions)
            if caches:
                insert_rows(db, "INSERT OR REPLACE", "cache", 6, caches)
            if logs:
                insert_rows(db, "INSERT", "logs", 6, logs)
            if attempts:
                insert_rows(db, "INSERT", "attempts", 14, attempts)
            if bundles:
                insert_rows(db, "INSERT", "run_bundles", 5, bundles)
            for run_id, rows in live.items():
                db.execute("DELETE FROM live_actions WHERE run_id=?", (run_id,))
                insert_rows(db, "INSERT", "live_actions", 7, rows)
                self._shown.add(run_id)
            self._end_all(db, runs)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def for_run(self) -> RunJournal:
        from ._run_journal import RunJournal

        return RunJournal(self)

    # -- reading -------------------------------------------------------------

    async def read(self, fn: Callable[[sqlite3.Connection], T], missing: Callable[[], T] | None = None) -> T:
        """``fn(db)`` on the reader's connection; ``missing()`` while there is no journal file.

        Without ``missing``, reading a journal that does not exist yet is
        the same as not finding the run: :class:`RunNotFound`.
        """

        def go() -> T:
            db = self._reading()
            if db is None:
                if missing is None:
                    raise RunNotFound(f"no runs recorded yet in journal {self.path}")
                return missing()
            return fn(db)

        return await self._loop.run_in_executor(self._reader, self._guard, go, ())

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(db)`` in a write transaction of its own (for the rare writes outside a run)."""

        def go() -> T:
            db = self._writing()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

        return await self._call(go)

    def cancel_flag(self, run_id: str) -> Path:
        """The file whose existence asks the process running ``run_id`` to cancel it.

        A file, not a row: the running process polls it with one ``stat``,
        and ``shoal cancel`` creates it without waiting for the write lock
        of a journal that a busy run keeps committing to.
        """
        return self._flags / run_id

    def root_of(self, task: Any) -> tuple[str, str | None]:
        """Where ``task`` is found again (see ``_loader.root_of``), worked out once per task.

        It resolves the defining file's path, a few system calls that a
        service starting many small runs would pay on each.
        """
        found = self._roots.get(task)
        if found is None:
            from ._loader import root_of

            found = self._roots[task] = root_of(task)
        return found

    async def decode(self, kind: str, data: bytes, type: Any, what: str = "a recorded value") -> Any:
        """A recorded value: fetched from the blob store if kept there, pickles verified."""
        if kind.startswith("blob-"):
            data = await self._blob_store().get_bytes(data.decode())
            kind = kind[5:]
        if kind == "pickle":
            data = self.signer.open(data, what)
        return decode_value(kind, data, type)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _consume(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()
