"""What one run writes to the journal, and how a recorded run is made ready to resume."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import msgspec

from ._codec import decode_value, digest, encode_value
from ._errors import EncodeError, EngineError, JournalError
from ._journal import _alive, _replay_table, _utc
from ._records import ActionRecord, ErrorInfo, RunRecord

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Awaitable, Mapping, Sequence

    from ._action import Action
    from ._events import TaskCounts
    from ._journal import Journal, Settle
    from ._run import Run
    from ._task import Task

__all__ = ["RunJournal", "error_info", "prepare_resume"]

#: Outputs larger than this (encoded) go to the blob store, not the journal.
INLINE_LIMIT = 256 * 1024
#: How often a running run looks for a cancel request from another process.
CANCEL_POLL = 0.5


def error_info(exc: BaseException) -> ErrorInfo:
    cls = type(exc)
    module = cls.__module__
    name = cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not break the journal
        message = f"<{cls.__qualname__} whose str() raised>"
    text = "".join(traceback.format_exception(exc))
    return ErrorInfo(name, message, text)


async def prepare_resume(
    journal: Journal, run_id: str, use_cache: bool, task: Task[Any, Any] | None = None
) -> Run:
    """A run of the journal made ready to continue in place (see :meth:`Engine.resume`)."""
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
    args = decode_value(record.args_kind, record.args)
    values, named = task.signature.bind(tuple(args[0]), dict(args[1]))
    if record.status == "running" and record.pid is not None and record.host == socket.gethostname():
        if record.pid != os.getpid() and _alive(record.pid):
            raise EngineError(
                f"run {run_id} is still running in process {record.pid}; cancel it first "
                f"('shoal cancel {run_id}') or wait for it"
            )
        if record.pid == os.getpid() and run_id in journal.engine.runs_in_flight:
            raise EngineError(f"run {run_id} is running in this process already")
    replay = await journal.read(lambda db: _replay_table(db, run_id))
    run = Run(
        journal.engine,
        task,
        values,
        named,
        run_id=run_id,
        tags=record.tags,
        attempt=record.attempt + (0 if record.status == "succeeded" else 1),
        journal=journal.for_run(),
        replay=replay,
        use_cache=use_cache,
    )
    run.started_at = _utc(record.started)
    if record.status == "succeeded":
        run.status = "succeeded"
        run.finished_at = None if record.finished is None else _utc(record.finished)
        if output_kind is not None:
            run._result = await journal.decode(output_kind, output, task.signature.returns())
        run.mark_done()
    return run


class RunJournal:
    """What one run writes to the journal."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.run: Run | None = None
        self._poller: asyncio.Task[None] | None = None
        self._root: tuple[str, str | None] = ("", None)
        # Whether the run's record was committed by ``started``; if not,
        # there is nothing in the journal for ``finished`` to update.
        self._recorded = False
        #: The first commit of this run's records that failed, if any.
        self.error: Exception | None = None

    async def started(self, run: Run) -> None:
        from ._loader import root_of

        self.run = run
        self._root = root_of(run.task)
        kind, data = encode_value([run._values, run._named], what=f"arguments of run {run.id}")
        self._args = (kind, data)
        await self.journal.append(self._run_record(run, "running", None))
        self._recorded = True
        self._poller = asyncio.get_running_loop().create_task(self._poll_cancel(run))

    def _run_record(self, run: Run, status: Any, finished: float | None) -> RunRecord:
        root, root_file = self._root
        kind, data = self._args
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
            error=None if run.error is None else error_info(run.error),
            pid=os.getpid(),
            host=socket.gethostname(),
        )

    async def finished(self, run: Run) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if not self._recorded:
            return
        assert run.finished_at is not None
        # Every record of the run commits (or fails) before its final one is
        # written: a run with a record missing does not say it succeeded.
        await self.journal.flush()
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

    async def _poll_cancel(self, run: Run) -> None:
        query = "SELECT cancel_requested FROM runs WHERE id=?"
        while True:
            await asyncio.sleep(CANCEL_POLL)
            try:
                row = await self.journal.read(lambda db: db.execute(query, (run.id,)).fetchone())
            except JournalError:
                continue
            if row is not None and row[0]:
                run.cancel()
                return

    async def _encode(self, value: Any, what: str) -> tuple[str, bytes]:
        kind, data = encode_value(value, what=what)
        if len(data) > INLINE_LIMIT:
            key = await self.journal.engine.blob_store.put_bytes(data)
            return f"blob-{kind}", key.encode()
        return kind, data

    def succeeded(
        self, action: Action, result: Any, counts: TaskCounts, *, cached: bool = False
    ) -> Awaitable[None] | None:
        """Record a success, to be counted (``counts``) once it is committed.

        Encoding happens now (an unencodable output raises here).  The
        action does not wait for the commit: its result goes to its caller
        at once, and it counts as succeeded (counters, events, the run's
        success) only when its record is committed.  Records are committed
        in the order they were appended, by one writer, so the journal never
        holds a record without the records of the calls it came after: a
        crash loses a suffix, which resume runs again.  An output large
        enough for the blob store is uploaded first; the awaitable returned
        then is that upload.
        """
        task = action.task
        what = f"output of task {task.name!r} (action {action.key})"
        kind, data = encode_value(result, what=what)
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
        settle = (counts, self, action if self.journal.engine.wanted else None)
        if len(data) > INLINE_LIMIT:
            return self._via_blob(record, settle)
        self.journal.append(record, settle)
        return None

    async def _via_blob(self, record: ActionRecord, settle: Settle) -> None:
        assert record.output is not None
        key = await self.journal.engine.blob_store.put_bytes(record.output)
        self.journal.append(
            msgspec.structs.replace(record, output=key.encode(), output_kind=f"blob-{record.output_kind}"),
            settle,
        )

    def ended(self, action: Action, state: Any, error: BaseException | None) -> None:
        parent = action.parent
        run = action.run
        now = time.time()
        self.journal.append(
            ActionRecord(
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
                None,
                None,
                None if error is None else error_info(error),
            )
        )

    def traced(self, action: Action, key: str, name: str, result: Any) -> None:
        """Record a trace call's result (not waited for: a lost trace just runs again)."""
        try:
            kind, data = encode_value(result, what=f"result of trace {name!r}")
        except EncodeError:
            return
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

    async def cache_lookup(self, action: Action, values: Sequence[Any], named: Mapping[str, Any]) -> Any:
        task = action.task
        key = action.cache_key = digest("cache", task.name, task.cache_version, values, named)

        def go(db: sqlite3.Connection) -> Any:
            return db.execute("SELECT output_kind, output FROM cache WHERE key=?", (key,)).fetchone()

        row = await self.journal.read(go)
        if row is None:
            return None
        value = await self.journal.decode(row[0], row[1], task.signature.returns())
        return _Hit(value)


class _Hit:
    """A cache hit (so that a cached ``None`` is not mistaken for a miss)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value
