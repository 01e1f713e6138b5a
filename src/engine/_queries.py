"""Reading runs back from the journal: listings, details, failures, logs, replay tables.

Every query runs on the journal's reader connection (see ``_journal``), so
it never waits for a busy run's writes.  A run recorded as ``running``
whose owning process is gone (killed, its machine restarted) is reported
as ``failed`` with an error that says so: the row itself is left as it is
until the run is resumed or cancelled, since reading must not write.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

import msgspec

from ._backend import Handle
from ._errors import JournalError, RunNotFound
from ._owner import owner_alive
from ._records import ActionRecord, AttemptInfo, ErrorInfo, RunRecord, RunSummary, TaskSummary

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from ._signing import Signer

__all__ = ["RUN_COLUMNS", "TASK_COUNTS", "JournalQueries", "current_rows", "utc"]

RUN_COLUMNS = (
    "id, task, root, root_file, args, args_kind, status, attempt, started, finished, "
    "tags, error, pid, host, pid_start, attempt_started"
)
#: The current row of each action of one run (bind the run id as ``:run``).
#:
#: A key's latest row (highest rowid) is its state.  Grouping a million
#: rows by key to find it takes seconds, so the query leans on how rows
#: come to be: a key gets a second row only when it runs again, and it
#: runs again only after a row that did not succeed (a failure, a
#: cancellation, a retried parent's failed child, a resume).  So the
#: current rows are the succeeded rows of keys with no other row, plus the
#: latest row of each of the few keys that have one (found through the
#: ``actions_unsettled`` index).  One exception: an action whose recorded
#: output could not be read back and ran again has two succeeded rows and
#: is counted twice.
CURRENT = (
    "run_id=:run AND kind='action' AND ("
    "(state='succeeded' AND key NOT IN (SELECT key FROM actions WHERE run_id=:run AND state!='succeeded'))"
    " OR rowid IN (SELECT max(rowid) FROM actions WHERE run_id=:run AND key IN "
    "(SELECT key FROM actions WHERE run_id=:run AND state!='succeeded') GROUP BY key))"
)
#: The same when no row of the run failed or was cancelled (the usual case):
#: every row is current, and no key needs looking up.
ALL_SETTLED = "run_id=:run AND kind='action'"


#: A run's current rows counted, per (task, grp): the columns of ``run_tasks``.
TASK_COUNTS = (
    "task, grp, sum(state='succeeded'), sum(state='failed'), sum(state='cancelled'), "
    "sum(state='running'), sum(cached), min(started)"
)


def current_rows(db: sqlite3.Connection, run_id: str) -> str:
    """The condition for the run's current rows: :data:`CURRENT`, or the cheap one if it will do."""
    unsettled = db.execute(
        "SELECT 1 FROM actions WHERE run_id=? AND state!='succeeded' LIMIT 1", (run_id,)
    ).fetchone()
    return ALL_SETTLED if unsettled is None else CURRENT

_error_decoder = msgspec.msgpack.Decoder(ErrorInfo)
_tags_decoder = msgspec.json.Decoder(tuple[str, ...])


class JournalQueries:
    """The read side of :class:`~engine._journal.Journal` (mixed into it)."""

    path: Path

    if TYPE_CHECKING:

        @property
        def signer(self) -> Signer: ...

        async def read(self, fn: Callable[[sqlite3.Connection], Any], missing: Callable[[], Any] | None = None) -> Any: ...
        async def write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any: ...
        def cancel_flag(self, run_id: str) -> Path: ...

    async def load_run(self, run_id: str) -> tuple[RunRecord, Any, str | None]:
        """The run record as written, and its root action's output (bytes, kind) if it succeeded.

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
            return run_record(row), *(out if out is not None else (None, None))

        result: tuple[RunRecord, Any, str | None] = await self.read(go)
        return result

    def _run_row(self, db: sqlite3.Connection, run_id: str) -> tuple[Any, ...]:
        row: tuple[Any, ...] | None = db.execute(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE id=?", (run_id,)
        ).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in journal {self.path}; list runs with 'shoal runs'")
        return row

    async def list_runs(
        self,
        *,
        status: str | None,
        tag: str | None,
        limit: int,
        task: str | None = None,
        since: float | None = None,
    ) -> list[RunSummary]:
        def go(db: sqlite3.Connection) -> list[RunSummary]:
            where: list[str] = []
            params: list[Any] = []
            if task:
                where.append("task=?")
                params.append(task)
            if since is not None:
                where.append("started>=?")
                params.append(since)
            if status:
                # A dead owner's "running" run is reported failed: fetch
                # both and sort them out below.
                where.append("status IN (?, 'running')")
                params.append(status)
            if tag:
                where.append("EXISTS (SELECT 1 FROM json_each(runs.tags) WHERE value=?)")
                params.append(tag)
            sql = (
                f"SELECT {RUN_COLUMNS}, "
                "coalesce((SELECT sum(succeeded + failed + cancelled + running) FROM run_tasks t "
                "WHERE t.run_id=runs.id), "
                "(SELECT count(*) FROM actions WHERE " + CURRENT.replace(":run", "runs.id") + ")) "
                "FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
                + " ORDER BY started DESC LIMIT ?"
            )
            summaries = [summary(run_record(r), r[16]) for r in db.execute(sql, (*params, limit))]
            return [s for s in summaries if status is None or s.status == status]

        result: list[RunSummary] = await self.read(go, list)
        return result

    async def run_details(self, run_id: str, *, actions: bool, offset: int, limit: int) -> RunSummary:
        def go(db: sqlite3.Connection) -> RunSummary:
            row = self._run_row(db, run_id)
            current = current_rows(db, run_id)
            tasks = []
            count = 0
            # A finished run was counted when it ended; a live one is counted now.
            counted = db.execute(
                "SELECT task, grp, succeeded, failed, cancelled, running, cached FROM run_tasks "
                "WHERE run_id=? ORDER BY first",
                (run_id,),
            ).fetchall()
            if not counted or row[6] == "running":
                counted = db.execute(
                    f"SELECT {TASK_COUNTS} FROM actions WHERE {current} GROUP BY task, grp ORDER BY min(started)",
                    {"run": run_id},
                ).fetchall()
            for task, grp, succeeded, failed, cancelled, running, cached, *_ in counted:
                tasks.append(TaskSummary(task, grp, succeeded, failed, cancelled, running, cached))
                count += succeeded + failed + cancelled + running
            records: tuple[ActionRecord, ...] = ()
            attempts = _attempts(db, run_id)
            if actions:
                found = _with_origins(
                    db,
                    run_id,
                    (
                        action_record(r)
                        for r in db.execute(
                            "SELECT * FROM actions WHERE " + current + " "
                            "ORDER BY started, key LIMIT :limit OFFSET :offset",
                            {"run": run_id, "limit": limit, "offset": offset},
                        )
                    ),
                )
                records = _placed(found, attempts, run_record(row))
            if row[6] == "running":
                # Running actions have no action row yet.
                live = _in_flight(db, run_id, attempts)
                if live:
                    count += len(live)
                    tasks = _count_running(tasks, live)
                    if actions and offset == 0:
                        records = (*records, *live[: max(0, limit - len(records))])
            bundle = db.execute(
                "SELECT digest, size FROM run_bundles WHERE run_id=? ORDER BY rowid DESC LIMIT 1", (run_id,)
            ).fetchone()
            return msgspec.structs.replace(
                summary(run_record(row), count),
                tasks=tuple(tasks),
                action_records=records,
                bundle=None if bundle is None else bundle[0],
                bundle_size=None if bundle is None else bundle[1],
            )

        result: RunSummary = await self.read(go)
        return result

    async def action_page(
        self,
        run_id: str,
        *,
        task: str | None = None,
        state: str | None = None,
        group: str | None = None,
        key: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[ActionRecord]:
        """A page of the run's current action records in start order, filtered, with their attempts.

        ``key`` keeps the actions whose key starts with it.
        """

        def go(db: sqlite3.Connection) -> list[ActionRecord]:
            row = self._run_row(db, run_id)
            where = current_rows(db, run_id)
            params: dict[str, Any] = {"run": run_id, "limit": limit, "offset": offset}
            for column, value in (("task", task), ("state", state), ("grp", group)):
                if value is not None:
                    where += f" AND {column}=:{column}"
                    params[column] = value
            if key is not None:
                where += " AND substr(key, 1, :klen)=:key"
                params["key"], params["klen"] = key, len(key)
            found = _with_origins(
                db,
                run_id,
                (
                    action_record(r)
                    for r in db.execute(
                        f"SELECT * FROM actions WHERE {where} ORDER BY started, key LIMIT :limit OFFSET :offset",
                        params,
                    )
                ),
            )
            attempts = _attempts(db, run_id)
            records = list(_placed(found, attempts, run_record(row)))
            if row[6] == "running" and offset == 0 and state in (None, "running"):
                # Running actions have no action row yet.
                live = [
                    r for r in _in_flight(db, run_id, attempts)
                    if (task is None or r.task == task) and (group is None or r.group == group)
                    and (key is None or r.key.startswith(key))
                ]
                records += live[: max(0, limit - len(records))]
            return records

        result: list[ActionRecord] = await self.read(go)
        return result

    async def failed_actions(self, run_id: str, limit: int = 20) -> list[ActionRecord]:
        def go(db: sqlite3.Connection) -> list[ActionRecord]:
            if current_rows(db, run_id) is ALL_SETTLED:
                return []  # nothing failed
            rows = db.execute(
                "SELECT * FROM actions WHERE " + CURRENT + " AND state='failed' ORDER BY finished LIMIT :limit",
                {"run": run_id, "limit": limit},
            )
            return _with_origins(db, run_id, (action_record(r) for r in rows))

        result: list[ActionRecord] = await self.read(go)
        return result

    async def action_pages(self, run_id: str, *, after: int = 0, limit: int = 10_000) -> tuple[int, tuple[ActionRecord, ...]]:
        """A page of the run's current action records in journal order, without outputs or tracebacks.

        For readers that walk a whole run (the HTML report): keyset paging
        on ``rowid`` (pass the returned rowid back as ``after``) costs the
        same for the last page as for the first, where ``run_details``
        sorts the whole run for every page.  Records carry their attempts
        and the error's type and message (tracebacks: ``failed_actions``).
        Returns ``(last rowid, records)``; no records means the end.
        """

        def go(db: sqlite3.Connection) -> tuple[int, tuple[ActionRecord, ...]]:
            run = run_record(self._run_row(db, run_id))
            rows = db.execute(
                "SELECT rowid, run_id, key, parent, task, state, attempt, run_attempt, started, finished, grp, "
                "NULL, NULL, error, kind, cache_key, cached FROM actions WHERE " + current_rows(db, run_id)
                + " AND rowid > :after ORDER BY rowid LIMIT :limit",
                {"run": run_id, "after": after, "limit": limit},
            ).fetchall()
            if not rows:
                return after, ()
            records = [action_record(r[1:]) for r in rows]
            attempts: dict[str, tuple[str, list[AttemptInfo]]] = {}
            if db.execute("SELECT 1 FROM attempts WHERE run_id=? LIMIT 1", (run_id,)).fetchone():
                keys = [rec.key for rec in records]
                for start in range(0, len(keys), 500):  # SQLite's bound on host parameters
                    chunk = keys[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    for row in db.execute(
                        f"SELECT {_ATTEMPT_COLUMNS} FROM attempts "
                        "WHERE rowid IN (SELECT max(rowid) FROM attempts WHERE run_id=? AND key IN "
                        f"({marks}) GROUP BY key, handle) ORDER BY rowid",
                        (run_id, *chunk),
                    ):
                        entry = attempts.setdefault(row[0], (row[-2], []))
                        entry[1].append(_attempt_info(row))
            return rows[-1][0], _placed(records, attempts, run)

        result: tuple[int, tuple[ActionRecord, ...]] = await self.read(go)
        return result

    async def running_actions(self, run_id: str) -> list[ActionRecord]:
        """The actions a live run is running now, which ``action_pages`` cannot see (no record yet)."""

        def go(db: sqlite3.Connection) -> list[ActionRecord]:
            if run_record(self._run_row(db, run_id)).status != "running":
                return []
            return _in_flight(db, run_id, _attempts(db, run_id))

        result: list[ActionRecord] = await self.read(go)
        return result

    async def request_cancel(self, run_id: str) -> str:
        """Ask the process running ``run_id`` to cancel it; returns the run's status.

        A run recorded as running by a process that no longer exists
        (killed, crashed, its pid now someone else's) is marked cancelled
        at once, and ``"abandoned"`` is returned: nobody is left to notice
        the request.
        """
        record = run_record(await self.read(lambda db: self._run_row(db, run_id)))
        if record.status != "running":
            return str(record.status)
        if owner_alive(record.host, record.pid, record.pid_start) is False:

            def abandon(db: sqlite3.Connection) -> int:
                return db.execute(
                    "UPDATE runs SET status='cancelled', finished=? WHERE id=? AND status='running' "
                    "AND attempt=?",
                    (time.time(), run_id, record.attempt),
                ).rowcount

            if await self.write(abandon):
                return "abandoned"
            return await self.request_cancel(run_id)  # resumed meanwhile: ask the new owner
        flag = self.cancel_flag(run_id)
        try:
            flag.parent.mkdir(mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except OSError as exc:
            raise JournalError(f"cannot ask run {run_id} to cancel: {flag}: {exc.strerror}") from None
        return "running"

    async def logs(
        self, run_id: str, action: str | None = None, *, limit: int | None = None
    ) -> list[tuple[str, float, str, str, int | None]]:
        """(action, time, stream, text, rank) of what the run's actions printed or logged, in order; at most ``limit``.

        ``rank`` is the gang rank that wrote the line (None: not a gang's).
        """

        def go(db: sqlite3.Connection) -> list[tuple[str, float, str, str, int | None]]:
            bound = -1 if limit is None else limit  # SQLite: a negative LIMIT is none
            if action is None:
                cur = db.execute(
                    "SELECT action, at, stream, text, rank FROM logs WHERE run_id=? ORDER BY at LIMIT ?",
                    (run_id, bound),
                )
            else:
                cur = db.execute(
                    "SELECT action, at, stream, text, rank FROM logs WHERE run_id=? AND action=? ORDER BY at LIMIT ?",
                    (run_id, action, bound),
                )
            return [(a, at, s, t, r) for a, at, s, t, r in cur]

        result: list[tuple[str, float, str, str, int | None]] = await self.read(go, list)
        return result

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

        result: dict[str, str] = await self.read(go)
        return result

    async def replay_table(self, run_id: str) -> Replay:
        """What a resume of the run finds recorded (see :class:`Replay`).

        Pickled values are checked here, once, and given without their
        signature; one that does not verify is left out (its action runs
        again) with a warning, never unpickled.
        """
        signer = self.signer

        def go(db: sqlite3.Connection) -> tuple[Replay, list[str]]:
            replay = Replay()
            table = replay.outputs
            traces = replay.traces
            refused: list[str] = []
            # The parent is fetched for traces only: a column of None (and
            # no string made per row) for the actions, most of a big run.
            for key, kind, output, parent in db.execute(
                "SELECT key, output_kind, output, CASE kind WHEN 'trace' THEN parent END "
                "FROM actions WHERE run_id=? AND state='succeeded'",
                (run_id,),
            ):
                if kind == "pickle":
                    try:
                        output = signer.open(output, f"the recorded output of action {key}")
                    except JournalError as exc:
                        refused.append(str(exc))
                        continue
                table[key] = (kind, output)
                if parent is not None:
                    traces.setdefault(parent, []).append(key)
            for key, backend, handle, place in db.execute(
                "SELECT key, backend, handle, place FROM attempts WHERE rowid IN (SELECT max(rowid) "
                "FROM attempts WHERE run_id=? GROUP BY key, handle) AND state='running'",
                (run_id,),
            ):
                if key not in table:
                    replay.in_flight[key] = Handle(backend, handle, place)
            return replay, refused

        found: tuple[Replay, list[str]] = await self.read(go, lambda: (Replay(), []))
        replay, refused = found
        if refused:
            import warnings

            warnings.warn(
                f"{len(refused)} recorded output(s) of run {run_id} will run again: {refused[0]}",
                stacklevel=2,
            )
        return replay


def _with_origins(db: sqlite3.Connection, run_id: str, records: Iterable[ActionRecord]) -> list[ActionRecord]:
    """Fill in the traceback of errors recorded once elsewhere (``ErrorInfo.origin``)."""
    out = []
    for rec in records:
        error = rec.error
        if error is not None and error.origin is not None and not error.traceback:
            row = db.execute(
                "SELECT error FROM actions WHERE run_id=? AND key=? AND state!='succeeded' AND error IS NOT NULL "
                "ORDER BY rowid DESC LIMIT 1",
                (run_id, error.origin),
            ).fetchone()
            if row is not None:
                found = _error_decoder.decode(row[0])
                rec = msgspec.structs.replace(rec, error=msgspec.structs.replace(error, traceback=found.traceback))
        out.append(rec)
    return out


def utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


_ATTEMPT_COLUMNS = "key, attempt, state, target, backend, place, started, finished, task, ranks"
#: Latest row of each submission (handle) of a run's offloaded attempts.
_ATTEMPTS = (
    f"SELECT {_ATTEMPT_COLUMNS} FROM attempts "
    "WHERE rowid IN (SELECT max(rowid) FROM attempts WHERE run_id=? GROUP BY key, handle) ORDER BY rowid"
)


def _attempt_info(row: tuple[Any, ...]) -> AttemptInfo:
    """An attempts row (:data:`_ATTEMPT_COLUMNS`) as the public record."""
    _, attempt, state, target, backend, place, started, finished, _, ranks = row
    placed = () if not ranks else tuple(msgspec.json.decode(ranks, type=list[str]))
    return AttemptInfo(attempt, state, target, backend, place, started, finished, placed)


def _attempts(db: sqlite3.Connection, run_id: str) -> dict[str, tuple[str, list[AttemptInfo]]]:
    """key -> (task, where each of its offloaded attempts ran, in order)."""
    found: dict[str, tuple[str, list[AttemptInfo]]] = {}
    for row in db.execute(_ATTEMPTS, (run_id,)):
        entry = found.get(row[0])
        if entry is None:
            entry = found[row[0]] = (row[-2], [])
        entry[1].append(_attempt_info(row))
    return found


def _placed(
    records: Iterable[ActionRecord], attempts: dict[str, tuple[str, list[AttemptInfo]]], run: RunRecord
) -> tuple[ActionRecord, ...]:
    """The records with their attempts: recorded ones, or the run's own process for local actions."""
    here = f"{run.host}:{run.pid}" if run.host and run.pid else ""
    placed = []
    for rec in records:
        if rec.kind != "action":
            placed.append(rec)
            continue
        entry = attempts.get(rec.key)
        if entry is None:
            where = here if rec.run_attempt == run.attempt else ""
            tried = [AttemptInfo(rec.attempt, rec.state, "local", "in-process", where, rec.started, rec.finished)]
        else:
            tried = entry[1]
        placed.append(msgspec.structs.replace(rec, attempts=tuple(tried)))
    return tuple(placed)


def _in_flight(
    db: sqlite3.Connection, run_id: str, attempts: dict[str, tuple[str, list[AttemptInfo]]]
) -> list[ActionRecord]:
    """The actions a live run is running now, which have no record yet.

    From the run's last snapshot of its running actions (``live_actions``),
    and from offloaded attempts submitted and not ended (recorded at once,
    so seen before the next snapshot).
    """
    live: dict[str, ActionRecord] = {}
    for key, parent, task, attempt, started, grp in db.execute(
        "SELECT key, parent, task, attempt, started, grp FROM live_actions WHERE run_id=?", (run_id,)
    ):
        entry = attempts.get(key)
        live[key] = ActionRecord(
            run_id, key, parent, task, "running", attempt, 0, started, None, grp,
            attempts=() if entry is None else tuple(entry[1]),
        )
    for key, (name, tried) in attempts.items():
        last = tried[-1]
        if key not in live and last.state == "running":
            live[key] = ActionRecord(
                run_id, key, None, name, "running", last.attempt, 0, last.started_at, None,
                attempts=tuple(tried),
            )
    if not live:
        return []
    keys = list(live)
    recorded: set[str] = set()
    for i in range(0, len(keys), 500):
        part = keys[i : i + 500]
        recorded.update(
            key for (key,) in db.execute(
                f"SELECT DISTINCT key FROM actions WHERE run_id=? AND key IN ({','.join('?' * len(part))})",
                (run_id, *part),
            )
        )
    return [rec for key, rec in live.items() if key not in recorded]


def _count_running(tasks: list[TaskSummary], live: list[ActionRecord]) -> list[TaskSummary]:
    """The per-task counts with the running actions (which have no rows yet) added."""
    by_task: dict[tuple[str, str | None], int] = {}
    for rec in live:
        by_task[rec.task, rec.group] = by_task.get((rec.task, rec.group), 0) + 1
    counted = []
    for summary_ in tasks:
        extra = by_task.pop((summary_.task, summary_.group), 0)
        counted.append(msgspec.structs.replace(summary_, running=summary_.running + extra) if extra else summary_)
    counted.extend(TaskSummary(task, group, running=n) for (task, group), n in by_task.items())
    return counted


class Replay:
    """What a resumed run finds in the journal.

    ``outputs``: key -> (kind, bytes) of every action and trace that
    succeeded; ``traces``: the keys of the traces recorded inside each
    action, by the action's key (sent with an offloaded attempt); and
    ``in_flight``: the handle of each offloaded attempt that was submitted
    and never seen to end (re-attached, where its backend can, instead of
    submitted again).
    """

    __slots__ = ("in_flight", "outputs", "traces")

    def __init__(self) -> None:
        self.outputs: dict[str, tuple[str, bytes]] = {}
        self.traces: dict[str, list[str]] = {}
        self.in_flight: dict[str, Handle] = {}


def action_record(row: tuple[Any, ...]) -> ActionRecord:
    (run_id, key, parent, task, state, attempt, run_attempt, started, finished, grp, output, output_kind,
     error, kind, cache_key, cached) = row
    return ActionRecord(
        run_id, key, parent, task, state, attempt, run_attempt, started, finished, grp,
        output, output_kind, None if error is None else _error_decoder.decode(error), kind, cache_key,
        bool(cached),
    )


def run_record(row: tuple[Any, ...]) -> RunRecord:
    (id_, task, root, root_file, args, args_kind, status, attempt, started, finished, tags, error,
     pid, host, pid_start, attempt_started) = row[:16]
    return RunRecord(
        id_, task, root, root_file, args, args_kind, status, attempt, started, finished,
        _tags_decoder.decode(tags), None if error is None else _error_decoder.decode(error), pid, host,
        pid_start, attempt_started,
    )


def summary(rec: RunRecord, actions: int) -> RunSummary:
    """A run as listed; a ``running`` run whose owner is gone is reported failed."""
    status, error = rec.status, rec.error
    if status == "running" and owner_alive(rec.host, rec.pid, rec.pid_start) is False:
        status = "failed"
        error = ErrorInfo(
            "Interrupted",
            f"the process that ran it (pid {rec.pid} on {rec.host}) is gone; resume it with "
            f"'shoal resume {rec.id}'",
        )
    return RunSummary(
        rec.id, rec.task, rec.root, status, rec.attempt, rec.started, rec.finished, rec.tags,
        actions, error, attempt_started=rec.attempt_started,
    )
