"""Recorded runs read back as Python values: ``engine.get_run``, ``engine.runs``, ``engine.latest_run``.

The journal keeps a run's arguments and its actions' outputs encoded
(msgpack or signed pickle, inline or in the blob store) with Unix
timestamps.  This module turns them into what a user wants in a notebook:
a :class:`RecordedRun` whose ``args`` and ``result`` are decoded (with the
root task's annotations when that task can be imported, fetched from the
blob store when kept there), times as timezone-aware :class:`datetime`
values, and ``actions(...)`` / ``logs()`` that read further records on
demand.

Reading further needs the journal: a record remembers the engine that read
it and uses it while that engine is open on the running loop, and otherwise
opens an engine like it (same journal, config and blob store) for the call.
So the sync forms (``run.actions()``, ``run.logs()``) work after
``engine.get_run`` has closed its engine, each call on a short loop of its
own, and the async forms (``aactions``, ``alogs``) are what they call.

``load_code=False`` reads a run without running any of its code: the root
task is not imported and pickled values are not unpickled (each says so in
``note``).  ``shoal show`` reads runs that way.
"""

# No `from __future__ import annotations`: msgspec reads these field
# annotations as objects (the classes' __module__ is set to "engine").
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from ._codec import decode_value
from ._errors import EngineError
from ._records import ActionRecord, AttemptInfo, ErrorInfo, RunRecord, RunSummary, TaskSummary

if TYPE_CHECKING:
    from ._engine import Engine
    from ._journal import Journal
    from ._task import Task

__all__ = ["LogLine", "RecordedAction", "RecordedAttempt", "RecordedRun", "read_run", "read_runs"]

R = TypeVar("R")
T = TypeVar("T")

#: Action records read from the journal per query while iterating ``actions()``.
PAGE = 1000


class _Pages:
    """Which page to read next, when paging through ``limit`` records from ``offset`` (None: all)."""

    __slots__ = ("done", "limit", "offset", "size", "taken")

    def __init__(self, limit: int | None, offset: int) -> None:
        self.limit = limit
        self.offset = offset
        self.taken = 0
        self.size = 0
        self.done = False

    def next(self) -> tuple[int, int] | None:
        """(size, offset) of the next page, or None when there is no more to read."""
        if self.done or (self.limit is not None and self.taken >= self.limit):
            return None
        self.size = PAGE if self.limit is None else min(PAGE, self.limit - self.taken)
        return self.size, self.offset + self.taken

    def took(self, n: int) -> None:
        """The page read gave ``n`` records (fewer than asked: the last one)."""
        self.taken += n
        self.done = n < self.size


def when(ts: float | None) -> datetime | None:
    """A journal timestamp as an aware UTC datetime (the client's one type for times)."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


class RecordedAttempt(msgspec.Struct, frozen=True):
    """Where one attempt of an action ran (see :class:`engine.AttemptInfo`), with datetimes.

    ``target`` is the offload target's name (``"local"``: the run's own
    process), ``backend`` its kind, ``where`` the host and pid or the Batch
    job id; ``state="lost"`` marks an attempt lost to an infrastructure
    failure, followed by another with the same ``attempt`` number.
    """

    attempt: int
    state: str
    target: str
    backend: str
    where: str
    started_at: datetime | None
    finished_at: datetime | None
    #: For a gang: where each rank ran, by rank (empty for a single attempt).
    ranks: tuple[str, ...] = ()

    @classmethod
    def of(cls, info: AttemptInfo) -> "RecordedAttempt":
        return cls(
            info.attempt, info.state, info.target, info.backend, info.where,
            when(info.started_at), when(info.finished_at), info.ranks,
        )


class LogLine(msgspec.Struct, frozen=True):
    """One line an action printed (``stream`` "stdout" or "stderr") or logged ("log").

    ``rank`` is the rank of a gang (``nodes=N``) that wrote it; None for
    an action that is not a gang.
    """

    action: str
    task: str | None
    at: datetime
    stream: str
    text: str
    rank: int | None = None


class RecordedAction(msgspec.Struct, frozen=True, dict=True):
    """One action of a recorded run (or a trace call, ``kind="trace"``), decoded.

    ``inputs`` are the call's arguments by parameter name where the journal
    has them: for the root action (the run's arguments); other actions'
    inputs are not recorded (only their digest, inside ``key``), so theirs
    is None.  ``output`` is the decoded result of a succeeded action (typed
    by its task's return annotation when the task is found in the root
    task's module), ``error`` the exception of a failed one (type, message,
    traceback).  ``note`` says why a value is missing or untyped.
    """

    run_id: str
    key: str
    parent: str | None
    task: str
    group: str | None
    state: str
    kind: str
    attempt: int
    run_attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    inputs: dict[str, object] | None
    output: object
    output_kind: str | None
    error: ErrorInfo | None
    attempts: tuple[RecordedAttempt, ...]
    cached: bool
    cache_key: str | None
    note: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # The fields alone: the engine it was read through stays behind.
        return (type(self), _fields(self))

    @property
    def duration(self) -> float | None:
        """Seconds from start to end of its last attempt (None while it runs)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    def logs(self) -> list[LogLine]:
        """What this action printed or logged, in order (blocking; see :meth:`alogs`)."""
        return _blocking(self.alogs(), "logs", "alogs")

    async def alogs(self) -> list[LogLine]:
        """Like :meth:`logs`, inside a running event loop."""
        async with _reader(self).open() as eng:
            journal = await eng.journal()
            rows = await journal.logs(self.run_id, self.key)
        return [LogLine(a, self.task, datetime.fromtimestamp(at, UTC), s, t, r) for a, at, s, t, r in rows]


class RecordedRun(msgspec.Struct, Generic[R], frozen=True, dict=True):
    """A run as the journal recorded it, with its arguments and result decoded.

    ``status`` is "succeeded", "failed", "cancelled" or "running" (a
    "running" run whose process is gone reads as "failed", with an
    ``error`` that says how to resume it).  ``args`` maps the root task's
    parameter names to the values it was called with; when the root task
    cannot be imported (or ``load_code=False``), positional values are
    under their position (``"0"``, ``"1"``, ...) and ``note`` says why.
    ``result`` is the root task's return value (None unless succeeded),
    decoded with its return annotation when the task can be imported.
    Times are aware UTC datetimes.  ``stats`` counts actions by state (the keys of a live ``Run.stats`` that the journal knows),
    ``tasks`` by task and group.  ``action_records`` holds the page asked
    for with ``get_run(..., actions=True)``; ``actions(...)`` reads any
    page, filtered.  ``msgspec.to_builtins`` and ``msgspec.json.encode``
    work on it.
    """

    id: str
    task: str
    root: str
    status: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    attempt_started_at: datetime | None
    tags: tuple[str, ...]
    error: ErrorInfo | None
    args: dict[str, object]
    result: R | None
    stats: dict[str, int]
    tasks: tuple[TaskSummary, ...]
    action_count: int
    action_records: tuple[RecordedAction, ...] = ()
    bundle: str | None = None
    bundle_size: int | None = None
    #: The journal it was read from.
    store: str = ""
    note: str | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # The fields alone: the engine it was read through stays behind.
        return (RecordedRun, _fields(self))

    @property
    def duration(self) -> float | None:
        """Seconds from the first attempt's start to the end (resumes included)."""
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def attempt_duration(self) -> float | None:
        """Seconds the latest attempt took, up to its final commit."""
        if self.finished_at is None:
            return None
        start = self.attempt_started_at or self.started_at
        return (self.finished_at - start).total_seconds()

    def actions(
        self,
        *,
        task: str | None = None,
        state: str | None = None,
        group: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        key: str | None = None,
    ) -> Iterator[RecordedAction]:
        """The run's actions in start order, optionally of one task, state or group (blocking).

        ``key``: only the actions whose key starts with it (``shoal logs
        RUN ACTION`` takes a prefix).  Read a page at a time as the
        iterator advances; ``limit=None`` gives them all.  Inside a running
        event loop use :meth:`aactions`.
        """
        _no_loop("actions", "aactions")
        pages = _Pages(limit, offset)
        while (span := pages.next()) is not None:
            reading = self._page(task=task, state=state, group=group, key=key, limit=span[0], offset=span[1])
            page = _blocking(reading, "actions", "aactions")
            yield from page
            pages.took(len(page))

    async def aactions(
        self,
        *,
        task: str | None = None,
        state: str | None = None,
        group: str | None = None,
        limit: int | None = None,
        offset: int = 0,
        key: str | None = None,
    ) -> AsyncIterator[RecordedAction]:
        """Like :meth:`actions`, inside a running event loop (``async for``)."""
        pages = _Pages(limit, offset)
        while (span := pages.next()) is not None:
            page = await self._page(task=task, state=state, group=group, key=key, limit=span[0], offset=span[1])
            for rec in page:
                yield rec
            pages.took(len(page))

    async def _page(
        self, *, task: str | None, state: str | None, group: str | None, key: str | None, limit: int, offset: int
    ) -> list[RecordedAction]:
        reader = _reader(self)
        async with reader.open() as eng:
            journal = await eng.journal()
            records = await journal.action_page(
                self.id, task=task, state=state, group=group, key=key, limit=limit, offset=offset
            )
            return await _decoded(eng, journal, records, reader.context)

    def logs(self) -> list[LogLine]:
        """What the run's actions printed or logged, in order (blocking; see :meth:`alogs`)."""
        return _blocking(self.alogs(), "logs", "alogs")

    async def alogs(self) -> list[LogLine]:
        """Like :meth:`logs`, inside a running event loop."""
        async with _reader(self).open() as eng:
            journal = await eng.journal()
            rows = await journal.logs(self.id)
            tasks = await journal.action_tasks(self.id, logged=True)
        return [LogLine(a, tasks.get(a), datetime.fromtimestamp(at, UTC), s, t, r) for a, at, s, t, r in rows]


# -- reading ------------------------------------------------------------------------


class _Context:
    """What decoding a run's values needs: its tasks (for types), its arguments, ``load_code``."""

    __slots__ = ("args", "load_code", "note", "root", "tasks")

    def __init__(self, record: RunRecord | None, load_code: bool) -> None:
        self.load_code = load_code
        self.root: Task[Any, Any] | None = None
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.note: str | None = None
        self.args: dict[str, object] = {}
        if record is None:  # a record that was pickled and is read further: no types
            self.note = "read from a copy of a record: values are plain decoded data"
            return
        if not load_code:
            self.note = "read with load_code=False: the root task was not imported, values are plain data"
            return
        from ._loader import load_root

        try:
            self.root = load_root(record.root, record.root_file)
        except Exception as exc:  # any failure to import user code leaves the values untyped
            self.note = (
                f"the root task {record.root} cannot be imported ({exc}); args, result and outputs "
                f"are plain decoded values (msgpack data, not the annotated types)"
            )
            return
        from ._task import Task as TaskType

        module = sys.modules.get(self.root.fn.__module__)
        for value in vars(module).values() if module is not None else ():
            if isinstance(value, TaskType):
                self.tasks.setdefault(value.name, value)
        self.tasks[self.root.name] = self.root


class _Reader:
    """How a record reads more of its journal: through its engine if usable here, else one like it."""

    __slots__ = ("context", "engine", "store")

    def __init__(self, engine: "Engine | None", context: _Context, store: str = "") -> None:
        self.engine = engine
        self.context = context
        self.store = store if engine is None else engine.store

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator["Engine"]:
        from ._engine import Engine

        eng = self.engine
        if eng is None:
            async with Engine(self.store or None) as fresh:
                yield fresh
            return
        if eng.usable_here():
            yield eng
            return
        async with Engine(eng.store, config=eng.config, home=eng.home, blob_store=eng.blob_spec) as fresh:
            yield fresh


def _reader(record: RecordedRun[Any] | RecordedAction) -> _Reader:
    # Set (never a field, so never encoded nor pickled) when the record was
    # read; a copy (unpickled) reads its journal by path.
    reader: _Reader | None = vars(record).get("_reader")
    if reader is None:
        store = record.store if isinstance(record, RecordedRun) else ""
        reader = _Reader(None, _Context(None, True), store)
    return reader


def _fields(record: msgspec.Struct) -> tuple[Any, ...]:
    return msgspec.structs.astuple(record)


def _no_loop(name: str, async_name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise EngineError(
        f"{name}() blocks, and an event loop is running in this thread; use "
        f"'await ....{async_name}()' (or 'async for ... in ....{async_name}()') instead"
    )


def _blocking(coro: Coroutine[Any, Any, T], name: str, async_name: str) -> T:
    try:
        _no_loop(name, async_name)
    except EngineError:
        coro.close()
        raise
    return asyncio.run(coro)


async def _value(
    eng: "Engine", journal: "Journal", kind: str | None, data: bytes | None, task: "Task[Any, Any] | None",
    what: str, load_code: bool,
) -> tuple[object, str | None]:
    """A recorded value decoded (and a note when it could not be, or only untyped)."""
    if kind is None or data is None:
        return None, None
    base = kind[5:] if kind.startswith("blob-") else kind
    if base == "pickle" and not load_code:
        return None, f"{what} is pickled and was not unpickled (load_code=False)"
    try:
        if kind.startswith("blob-"):
            data = await eng.blob_store.get_bytes(data.decode())
        if base == "pickle":
            data = journal.signer.open(data, what)
        if task is not None:
            return task.signature.decode_output(base, data), None
        return decode_value(base, data), None
    except EngineError as exc:
        return None, f"{what} could not be read: {exc}"
    except Exception as exc:  # unpickling runs arbitrary code: any failure is the value's
        return None, f"{what} could not be decoded: {type(exc).__name__}: {exc}"


def _named_args(values: list[Any], named: dict[str, Any], root: "Task[Any, Any] | None") -> dict[str, object]:
    """The root call's arguments by parameter name (by position when the signature is unknown)."""
    if root is None:
        return {**{str(i): v for i, v in enumerate(values)}, **named}
    sig = root.signature
    sig.params  # resolves the signature  # noqa: B018
    positional = sig._positional
    out: dict[str, object] = {p.name: v for p, v in zip(positional, values, strict=False)}
    if len(values) > len(positional) and sig._var_positional is not None:
        out[sig._var_positional.name] = list(values[len(positional):])
    out.update(named)
    return out


async def _decoded(
    eng: "Engine", journal: "Journal", records: list[ActionRecord] | tuple[ActionRecord, ...], context: _Context
) -> list[RecordedAction]:
    reader = _Reader(eng, context)

    async def one(rec: ActionRecord) -> RecordedAction:
        task = context.tasks.get(rec.task) if rec.kind == "action" else None
        output, note = await _value(
            eng, journal, rec.output_kind, rec.output, task,
            f"the output of action {rec.key} ({rec.task})", context.load_code,
        )
        if note is None and output is not None and task is None and context.note is not None:
            note = context.note
        inputs = context.args if rec.parent is None and rec.kind == "action" else None
        found = RecordedAction(
            rec.run_id, rec.key, rec.parent, rec.task, rec.group, rec.state, rec.kind, rec.attempt,
            rec.run_attempt, when(rec.started), when(rec.finished), inputs, output, rec.output_kind,
            rec.error, tuple(RecordedAttempt.of(a) for a in rec.attempts), rec.cached, rec.cache_key, note,
        )
        msgspec.structs.force_setattr(found, "_reader", reader)
        return found

    blobbed = [rec for rec in records if rec.output_kind is not None and rec.output_kind.startswith("blob-")]
    fetched = dict(zip(map(id, blobbed), await asyncio.gather(*(one(r) for r in blobbed)), strict=True))
    return [fetched[id(rec)] if id(rec) in fetched else await one(rec) for rec in records]


async def read_run(
    eng: "Engine", run_id: str, *, actions: bool = False, offset: int = 0, limit: int = 1000, load_code: bool = True
) -> RecordedRun[object]:
    """One recorded run, decoded (see :class:`RecordedRun`)."""
    journal = await eng.journal()
    summary = await journal.run_details(run_id, actions=actions, offset=offset, limit=limit)
    return await _build(eng, journal, summary, load_code)


async def read_runs(
    eng: "Engine",
    *,
    task: str | None = None,
    status: str | None = None,
    tag: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
    load_code: bool = True,
) -> list[RecordedRun[object]]:
    """Recorded runs, latest first, filtered (see :func:`engine.runs`)."""
    journal = await eng.journal()
    listed = await journal.list_runs(
        task=task, status=status, tag=tag, since=None if since is None else since.timestamp(), limit=limit
    )
    found = []
    for summary in listed:
        details = await journal.run_details(summary.id, actions=False, offset=0, limit=0)
        found.append(await _build(eng, journal, details, load_code))
    return found


async def _build(eng: "Engine", journal: "Journal", summary: RunSummary, load_code: bool) -> RecordedRun[object]:
    record, output, output_kind = await journal.load_run(summary.id)
    context = _Context(record, load_code)
    note = context.note
    args: dict[str, object] = {}
    decoded, args_note = await _value(
        eng, journal, record.args_kind, record.args, None, f"the arguments of run {record.id}", load_code
    )
    if isinstance(decoded, list | tuple) and len(decoded) == 2:
        values, named = decoded
        args = _named_args(list(values), dict(named), context.root)
    context.args = args
    result: object = None
    if summary.status == "succeeded":
        result, result_note = await _value(
            eng, journal, output_kind, output, context.root, f"the result of run {record.id}", load_code
        )
        note = result_note or note
    note = args_note or note
    # The keys of a live Run's ``stats``; nothing recorded is pending or committing.
    stats = {"pending": 0, "running": 0, "committing": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "cached": 0}
    for t in summary.tasks:
        stats["succeeded"] += t.succeeded
        stats["failed"] += t.failed
        stats["cancelled"] += t.cancelled
        stats["running"] += t.running
        stats["cached"] += t.cached
    page = await _decoded(eng, journal, summary.action_records, context)
    run: RecordedRun[object] = RecordedRun(
        summary.id, summary.task, summary.root, summary.status, summary.attempt, datetime.fromtimestamp(summary.started, UTC),
        when(summary.finished), when(summary.attempt_started), summary.tags, summary.error, args, result, stats,
        summary.tasks, summary.actions, tuple(page), summary.bundle, summary.bundle_size, eng.store, note,
    )
    msgspec.structs.force_setattr(run, "_reader", _Reader(eng, context))
    return run
