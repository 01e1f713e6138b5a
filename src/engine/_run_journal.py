"""What one run writes to the journal, and how a recorded run is made ready to resume."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

import msgspec

from . import _lifecycle as lifecycle
from ._codec import digest, encode_value
from ._entries import AttemptRow, BundleRow, Claim, Failure, LiveRows, describe
from ._errors import BlobError, EncodeError, EngineError, JournalError, RunInUse
from ._owner import owner_alive, this_process
from ._queries import utc
from ._records import ActionRecord, ErrorInfo, RunRecord
from ._watch import LIVE_EVERY

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Awaitable, Mapping, Sequence
    from pathlib import Path

    from ._action import Action
    from ._backend import Handle
    from ._engine import Engine
    from ._events import TaskCounts
    from ._journal import Journal, Settle
    from ._run import Run
    from ._task import Task

__all__ = ["RunJournal", "error_info", "prepare_resume"]

#: Outputs larger than this (encoded) go to the blob store, not the journal.
INLINE_LIMIT = 256 * 1024
#: At most this many running actions are written (the longest running first).
LIVE_SHOWN = 1000
#: The attribute an exception carries once its traceback is in the journal:
#: (run id, key of the action whose record holds it).
_ORIGIN = "__shoal_recorded__"


def error_info(exc: BaseException, run_id: str | None = None) -> ErrorInfo:
    """``exc`` described for the journal; by reference if it was recorded already in ``run_id``."""
    origin = getattr(exc, _ORIGIN, None)
    if origin is not None and origin[0] == run_id:
        return describe(exc, origin[1])
    return describe(exc)


async def prepare_resume(
    engine: Engine, journal: Journal, run_id: str, use_cache: bool, task: Task[Any, Any] | None = None
) -> Run:
    """A run of the journal made ready to continue in place (see :meth:`Engine.resume`).

    Nothing is claimed here: the run's first record (see :class:`Claim`)
    checks again, atomically, that nobody else resumed it meanwhile.
    """
    from ._loader import load_root
    from ._run import Run

    record, output, output_kind = await journal.load_run(run_id)
    if task is None:
        task = load_root(record.root, record.root_file)
    elif task.name != record.task:
        raise EngineError(
            f"run {run_id} was a run of task {record.task!r}, not {task.name!r}; "
            f"pass its own root task (or none, to import it again)"
        )
    args = await journal.decode(record.args_kind, record.args, Any, what=f"the arguments of run {run_id}")
    values, named = task.signature.bind(tuple(args[0]), dict(args[1]))
    result: Any = None
    succeeded = record.status == "succeeded" and output_kind is not None
    if succeeded:
        assert output_kind is not None
        try:
            result = await journal.decode(
                output_kind, output, task.signature.returns(), what=f"the result of run {run_id}"
            )
        except (BlobError, JournalError) as exc:
            # Treated as never recorded: the run goes on, and its root runs again.
            warnings.warn(f"run {run_id} runs again: its recorded result cannot be read ({exc})", stacklevel=2)
            succeeded = False
    if record.status == "running":
        if run_id in engine.runs_in_flight:
            raise RunInUse(f"run {run_id} is running in this process already")
        owner = (record.host, record.pid, record.pid_start)
        alive = owner_alive(*owner)
        if alive is None:
            raise RunInUse(
                f"run {run_id} is running on host {record.host} (pid {record.pid}); cancel it "
                f"there ('shoal cancel {run_id}') or wait for it"
            )
        if alive and owner != this_process():
            raise RunInUse(
                f"run {run_id} is still running in process {record.pid}; cancel it first "
                f"('shoal cancel {run_id}') or wait for it"
            )
    replay = None if succeeded else await journal.replay_table(run_id)
    run = Run(
        engine,
        task,
        values,
        named,
        run_id=run_id,
        tags=record.tags,
        attempt=record.attempt + (0 if succeeded else 1),
        journal=RunJournal(journal, previous=record.attempt),
        replay=None if replay is None else replay.outputs,
        use_cache=use_cache,
    )
    if replay is not None:
        run.replay_traces = replay.traces
        run.in_flight = replay.in_flight
    run.started_at = utc(record.started)
    if succeeded:
        run.status = "succeeded"
        run.finished_at = None if record.finished is None else utc(record.finished)
        if record.attempt_started is not None:
            run.attempt_started_at = utc(record.attempt_started)
        run._result = result
        run.mark_done()
    return run


class RunJournal:
    """What one run writes to the journal.

    ``previous`` is the attempt number a resume read from the journal
    (None for a new run): the run's claim checks it is still the recorded one.
    """

    def __init__(self, journal: Journal, *, previous: int | None = None) -> None:
        self.journal = journal
        self.previous = previous
        self.run: Run | None = None
        # Set while the journal's RunWatch looks at this run (see ``look``).
        self._flag: Path | None = None
        self._looks = 0
        self._shown: list[tuple[Any, ...]] = []
        self._root: tuple[str, str | None] = ("", None)
        # Whether the run's claim was committed by ``started``; if not,
        # there is nothing in the journal for ``finished`` to update.
        self._recorded = False
        #: The first commit of this run's records that failed, if any.
        self.error: Exception | None = None
        # Whether a cancel request (a flag file) was seen: only then is
        # there a file to remove at the end.  A request that comes after
        # the run ended is removed by the next resume.
        self._flag_seen = False

    def _sealed(self, kind: str, data: bytes) -> bytes:
        """Pickled bytes signed for storage (see ``_signing``); msgpack as it is."""
        return self.journal.signer.sign(data) if kind == "pickle" else data

    async def started(self, run: Run) -> None:
        """Claim the run for this process (its first record); raises if it may not run here."""
        self.run = run
        self._root = self.journal.root_of(run.task)
        kind, data = encode_value([run._values, run._named], what=f"arguments of run {run.id}")
        self._args = (kind, self._sealed(kind, data))
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.journal.append(Claim(self._run_record(run, "running", None), self.previous, outcome))
        try:
            await asyncio.shield(outcome)
        except asyncio.CancelledError:
            # Cancelled while the claim was being written: if it commits,
            # the run is ours and must be recorded as ended.
            await asyncio.wait([outcome])
            self._recorded = not outcome.cancelled() and outcome.exception() is None
            raise
        self._recorded = True
        flag = self.journal.cancel_flag(run.id)
        if self.previous is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(flag)  # a request for an earlier attempt
        self._flag = flag
        self.journal.watch.add(self)

    def _run_record(self, run: Run, status: Any, finished: float | None) -> RunRecord:
        root, root_file = self._root
        kind, data = self._args
        host, pid, pid_start = this_process()
        return RunRecord(
            id=run.id,
            task=run.task.name,
            root=root,
            root_file=root_file,
            args=data,
            args_kind=kind,  # type: ignore[arg-type]
            status=status,
            attempt=run.attempt,
            started=run.started_at.timestamp(),
            finished=finished,
            tags=run.tags,
            error=None if run.error is None else error_info(run.error, run.id),
            pid=pid,
            host=host,
            pid_start=pid_start,
            attempt_started=run.attempt_started_at.timestamp(),
        )

    async def finished(self, run: Run) -> None:
        if self._flag is not None:
            self.journal.watch.discard(self)
        if not self._recorded:
            return
        from datetime import UTC, datetime

        # The final record goes after every other record of the run, in the
        # same transaction or a later one (one writer, in order), without a
        # commit of its own to wait for first.  If a batch holding some of
        # the run's records failed, the journal thread writes the end as
        # failed (Journal._end), and the failed batch's settles, which reach
        # the loop before this commit does, set ``self.error``: a run with a
        # record missing does not say it succeeded.
        run.finished_at = datetime.now(UTC)
        if self.error is not None and run.status == "succeeded":
            run.status = "failed"
            run.error = self.error
        try:
            await self.journal.append(self._run_record(run, run.status, run.finished_at.timestamp()))
        except JournalError as exc:
            # The journal still says "running", so the run can be resumed.
            # A run whose end is not durable does not report success.
            if run.status == "succeeded":
                run.status = "failed"
                run.error = exc
        if self.error is not None and run.status == "succeeded":
            run.status = "failed"
            run.error = self.error
        # The run took until its records were durable: its duration says so
        # (the journal's own end time is when the end was handed over).
        run.finished_at = datetime.now(UTC)
        if self._flag_seen:
            with contextlib.suppress(OSError):
                os.unlink(self.journal.cancel_flag(run.id))

    def look(self) -> bool:
        """Called by the journal's RunWatch every CANCEL_POLL seconds; True once cancelled.

        One stat per look, on the loop: no journal read, so a busy journal
        cannot delay a cancel request (see Journal.cancel_flag).  Every
        LIVE_EVERY looks, the actions running now are written too (see
        ``live_actions`` in _schema), when they changed.
        """
        run = self.run
        assert run is not None
        # A stat of a local file: cheaper than a hop to a thread.
        assert self._flag is not None
        if os.path.exists(self._flag):
            self._flag_seen = True
            run.cancel()
            return True
        self._looks += 1
        if self._looks % LIVE_EVERY == 0:
            rows = self._live_rows(run)
            if rows != self._shown:
                self._shown = rows
                self.journal.append(LiveRows(run.id, rows))
        return False

    def _live_rows(self, run: Run) -> list[tuple[Any, ...]]:
        """The running actions of ``run``, at most LIVE_SHOWN of them (the longest running)."""
        running = run.running
        if not running:
            return []
        actions = list(running)
        if len(actions) > LIVE_SHOWN:
            actions = sorted(actions, key=lambda a: a.started_at)[:LIVE_SHOWN]
        return [
            (
                run.id, a.key, None if a.parent is None else a.parent.key, a.task.name, a.attempt,
                a.started_at or None, a.group,
            )
            for a in actions
        ]

    def succeeded(
        self, action: Action, result: Any, counts: TaskCounts, *, cached: bool = False
    ) -> Awaitable[None] | None:
        """Record a success, to be counted (``counts``) once it is committed.

        Encoding happens now (an unencodable output raises here).  The
        action does not wait for the commit: its result goes to its caller
        at once, and it moves from ``running`` to ``committing``, and to
        ``succeeded`` (counters, events, the run's success) only when its
        record is committed.  Records are committed in the order they were
        appended, by one writer, so the journal never holds a record without
        the records of the calls it came after: a crash loses a suffix,
        which resume runs again.  An output large enough for the blob store
        is uploaded first, and when the journal is backlogged the record
        waits for room; the awaitable returned then is that wait, and the
        record is appended (and counted) at its end.
        """
        task = action.task
        what = f"output of task {task.name!r} (action {action.key})"
        kind, data = encode_value(result, what=what)
        data = self._sealed(kind, data)
        parent = action.parent
        now = time.time()
        run = action.run
        record = ActionRecord(
            run.id,
            action.key,
            None if parent is None else parent.key,
            task.name,
            "succeeded",
            action.attempt,
            run.attempt,
            action.started_at or now,
            now,
            action.group,
            data,
            kind,  # type: ignore[arg-type]
            None,
            "action",
            action.cache_key,
            cached,
        )
        journal = self.journal
        settle = (counts, self, action if run.engine.wanted else None)
        if len(data) > INLINE_LIMIT or journal.backlogged:
            return self._later(record, settle, counts, action)
        lifecycle.committing(action, counts)
        journal.append(record, settle)
        return None

    async def _later(self, record: ActionRecord, settle: Settle, counts: TaskCounts, action: Action) -> None:
        journal = self.journal
        assert record.output is not None
        if len(record.output) > INLINE_LIMIT:
            assert self.run is not None
            key = await self.run.engine.blob_store.put_bytes(record.output)
            record = msgspec.structs.replace(record, output=key.encode(), output_kind=f"blob-{record.output_kind}")
        await journal.room()
        lifecycle.committing(action, counts)
        journal.append(record, settle)

    def ended(self, action: Action, state: Any, error: BaseException | None) -> None:
        """Record an action that failed or was cancelled (its error described off the loop)."""
        parent = action.parent
        run = action.run
        now = time.time()
        origin: str | None = None
        if error is not None:
            seen = getattr(error, _ORIGIN, None)
            if seen is not None and seen[0] == run.id:
                origin = seen[1]
            else:
                # A try, not contextlib.suppress: this runs for each of
                # thousands of failures, and a context manager costs more
                # than the rest of the record.
                try:  # noqa: SIM105
                    setattr(error, _ORIGIN, (run.id, action.key))
                except (AttributeError, TypeError):
                    pass
        record = ActionRecord(
            run.id,
            action.key,
            None if parent is None else parent.key,
            action.task.name,
            state,
            action.attempt,
            run.attempt,
            action.started_at or None,
            now,
            action.group,
        )
        self.journal.append(Failure(record, error, origin))

    def traced(self, action: Action, key: str, name: str, result: Any) -> None:
        """Record a trace call's result (not waited for: a lost trace just runs again)."""
        try:
            kind, data = encode_value(result, what=f"result of trace {name!r}")
        except EncodeError:
            return
        data = self._sealed(kind, data)
        now = time.time()
        run = action.run
        record = ActionRecord(
            run.id, key, action.key, name, "succeeded", 1, run.attempt, now, now,
            action.group, data, kind, None, "trace",  # type: ignore[arg-type]
        )
        if threading.get_ident() == run.thread_id:
            self.journal.append(record)
        else:
            # A trace called from a sync task's worker thread: the journal's
            # queue belongs to the event loop.
            self.journal._loop.call_soon_threadsafe(self.journal.append, record)

    def traced_encoded(self, action: Action, key: str, name: str, kind: str, data: bytes) -> None:
        """Record a trace result that arrived encoded (from an offloaded attempt's worker)."""
        now = time.time()
        run = action.run
        record = ActionRecord(
            run.id, key, action.key, name, "succeeded", 1, run.attempt, now, now,
            action.group, self._sealed(kind, data), kind, None, "trace",  # type: ignore[arg-type]
        )
        self.journal.append(record)

    def attempt(
        self,
        action: Action,
        target: str,
        handle: Handle,
        state: str,
        started: float,
        finished: float | None,
        error: str | None = None,
    ) -> asyncio.Future[None]:
        """Record where a submission of an offloaded attempt runs, or how it ended.

        The future resolves once the row is committed: a backend whose
        attempts outlive this process is waited for (see ``Remote``).
        """
        run = action.run
        row = (
            run.id, action.key, action.task.name, action.attempt, run.attempt, state, target, handle.backend,
            handle.id, handle.where, started, finished, error,
            msgspec.json.encode(list(handle.ranks)).decode() if handle.ranks else None,
        )
        return self.journal.append(AttemptRow(row))

    def bundled(self, digest: str, size: int, files: int) -> None:
        """Record the code bundle this run sends to its offload targets."""
        assert self.run is not None
        self.journal.append(BundleRow((self.run.id, digest, size, files, time.time())))

    async def cache_lookup(self, action: Action, values: Sequence[Any], named: Mapping[str, Any]) -> Any:
        task = action.task
        key = action.cache_key = digest("cache", task.name, task.cache_version, values, named)

        def go(db: sqlite3.Connection) -> Any:
            return db.execute("SELECT output_kind, output FROM cache WHERE key=?", (key,)).fetchone()

        row = await self.journal.read(go, lambda: None)
        if row is None:
            return None
        try:
            value = await self.journal.decode(
                row[0], row[1], task.signature.returns(), what=f"the cache entry of task {task.name!r}"
            )
        except (BlobError, JournalError) as exc:
            # A damaged or edited entry is a miss: the action runs (and
            # its new record replaces the entry).
            warnings.warn(f"cache entry of task {task.name!r} ignored: {exc}", stacklevel=2)
            return None
        return _Hit(value)


class _Hit:
    """A cache hit (so that a cached ``None`` is not mistaken for a miss)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value
