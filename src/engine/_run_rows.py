"""The claims and ends of many runs, each kind written in a few statements per batch.

An embedded service's batch holds the claims and the ends of tens of small
runs.  One statement per run is one step per run, and every step lets go of
the GIL: the journal thread then waits to take it back from the busy event
loop (up to a switch interval, 5 ms), so a batch of 20 runs took several
times its CPU in wall time, and every run waited for it twice.  Here the new
runs' claims are one ``INSERT ... RETURNING`` and the ends one
``UPDATE ... FROM (VALUES ...)``, in statements of power-of-two sizes (few
texts, kept prepared by the sqlite3 module's statement cache).

Both need SQLite 3.35 (``RETURNING``; ``UPDATE FROM`` is 3.33); with an
older library, :data:`MANY_AT_ONCE` is false and the journal writes one
statement per run.  :class:`RunRows` is the part of the journal's writer
that writes runs: claims, ends and the count of a finished run by task.
"""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ._bulk import pieces
from ._entries import ERROR_ENCODER, Claim, describe, run_values
from ._errors import JournalError, RunInUse, RunNotFound
from ._owner import owner_alive
from ._queries import RUN_COLUMNS, TASK_COUNTS, current_rows

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ._records import RunRecord

__all__ = ["MANY_AT_ONCE", "RunRows", "insert_new_runs", "update_ends"]

#: Whether this SQLite can write many runs' claims and ends in one statement.
MANY_AT_ONCE: Final = sqlite3.sqlite_version_info >= (3, 35, 0)
#: Rows per statement at most (a power of two; 16 parameters a claim).
LARGEST = 256


class RunRows:
    """How the journal thread writes runs (mixed into :class:`~engine._journal.Journal`).

    Everything here runs on the journal thread, inside a batch's
    transaction unless said otherwise; the state it keeps is documented
    where the journal creates it.
    """

    path: Path
    _lost: dict[str, Exception]
    _shown: set[str]
    _tallies: list[tuple[str, int]]
    _tallies_since: float

    if TYPE_CHECKING:

        def _writing(self) -> sqlite3.Connection: ...

    def _claim_all(self, db: sqlite3.Connection, runs: list[Any]) -> None:
        """Decide every claim of the batch (``refused`` set on each that may not run)."""
        if not MANY_AT_ONCE:
            for run in runs:
                if type(run) is Claim:
                    run.refused = self._claim(db, run)
            return
        new = [run for run in runs if type(run) is Claim and run.previous is None]
        if new:
            for claim in new:
                self._lost.pop(claim.record.id, None)  # a new run has lost nothing yet
            inserted = insert_new_runs(db, RUN_COLUMNS, [run_values(c.record) for c in new])
            for claim in new:
                run_id = claim.record.id
                if run_id in inserted:
                    inserted.discard(run_id)  # the first claim of an id; a second is refused
                else:
                    claim.refused = self._taken(run_id)
        for run in runs:
            if type(run) is Claim and run.previous is not None:
                run.refused = self._claim(db, run)

    def _taken(self, run_id: str) -> RunInUse:
        return RunInUse(
            f"a run with id {run_id} is already in journal {self.path}; start the run again "
            f"(it gets a new id)"
        )

    def _end_all(self, db: sqlite3.Connection, runs: list[Any]) -> None:
        """Record the end of every run of the batch that ended."""
        ends = [self._ended(db, run) for run in runs if type(run) is not Claim]
        if not ends:
            return
        if MANY_AT_ONCE:
            update_ends(db, ends)
        else:
            for run_id, status, finished, error, attempt in ends:
                db.execute(
                    "UPDATE runs SET status=?, finished=?, error=? WHERE id=? AND attempt=?",
                    (status, finished, error, run_id, attempt),
                )

    def _claim(self, db: sqlite3.Connection, claim: Claim) -> Exception | None:
        """Inside the batch's transaction: record the run as this process's, if it may be."""
        run = claim.record
        self._lost.pop(run.id, None)  # a new attempt of the run has lost nothing yet
        if claim.previous is None:
            cur = db.execute(
                f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({','.join('?' * 16)}) "
                "ON CONFLICT(id) DO NOTHING",
                run_values(run),
            )
            return None if cur.rowcount == 1 else self._taken(run.id)
        found = db.execute(
            "SELECT status, attempt, pid, host, pid_start FROM runs WHERE id=?", (run.id,)
        ).fetchone()
        if found is None:
            return RunNotFound(f"no run {run.id!r} in journal {self.path}; list runs with 'shoal runs'")
        status, attempt, pid, host, pid_start = found
        if attempt != claim.previous:
            return RunInUse(
                f"run {run.id} was resumed by another process meanwhile (pid {pid} on {host}, "
                f"attempt {attempt}); wait for it, or cancel it with 'shoal cancel {run.id}'"
            )
        if status == "running":
            alive = owner_alive(host, pid, pid_start)
            if alive is not False:
                where = f"process {pid}" + ("" if alive else f" on host {host}")
                return RunInUse(
                    f"run {run.id} is still running in {where}; cancel it first "
                    f"('shoal cancel {run.id}') or wait for it"
                )
        db.execute(
            "UPDATE runs SET status='running', attempt=?, finished=NULL, error=NULL, pid=?, host=?, "
            "pid_start=?, attempt_started=?, cancel_requested=0 WHERE id=?",
            (run.attempt, run.pid, run.host, run.pid_start, run.attempt_started, run.id),
        )
        db.execute("DELETE FROM run_tasks WHERE run_id=?", (run.id,))  # counted again at its end
        # What an earlier attempt left (a process that died while running it).
        db.execute("DELETE FROM live_actions WHERE run_id=?", (run.id,))
        return None

    def _ended(self, db: sqlite3.Connection, run: RunRecord) -> tuple[str, str, float | None, bytes | None, int]:
        """The end of this process's attempt of a run, as ``update_ends`` takes it.

        Failed, if some of the run's records were lost.
        """
        lost = self._lost.pop(run.id, None)
        if lost is not None and run.status == "succeeded":
            run = msgspec.structs.replace(run, status="failed", error=describe(lost))
        # Only the runs that wrote some have live rows to remove (a resume's
        # claim removed those of earlier attempts), and no count by task
        # exists for a running attempt (its claim removed the last one; a
        # count is written only for an attempt that ended): a service's
        # small runs end with one statement between them all.
        if run.id in self._shown:
            self._shown.discard(run.id)
            db.execute("DELETE FROM live_actions WHERE run_id=?", (run.id,))
        if not self._tallies:
            self._tallies_since = time.monotonic()
        self._tallies.append((run.id, run.attempt))
        error = None if run.error is None else ERROR_ENCODER.encode(run.error)
        return (run.id, run.status, run.finished, error, run.attempt)

    def _tally(self) -> None:
        """On the journal thread, when idle: count the actions of the runs that ended, by task.

        Counted once, so that reading a finished run back is quick.  Only
        an attempt that is still the run's latest and finished is counted
        (another process may have resumed the run since); a count that fails
        is left out, and readers count for themselves.
        """
        tallies, self._tallies = self._tallies, []
        try:
            db = self._writing()
            db.execute("BEGIN IMMEDIATE")
            try:
                for run_id, attempt in tallies:
                    ended = db.execute(
                        "SELECT 1 FROM runs WHERE id=? AND attempt=? AND status!='running'", (run_id, attempt)
                    ).fetchone()
                    if ended is None:
                        continue
                    db.execute("DELETE FROM run_tasks WHERE run_id=?", (run_id,))
                    db.execute(
                        f"INSERT INTO run_tasks SELECT :run, {TASK_COUNTS} FROM actions WHERE "
                        f"{current_rows(db, run_id)} GROUP BY task, grp",
                        {"run": run_id},
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except (sqlite3.Error, JournalError):
            pass


def insert_new_runs(db: sqlite3.Connection, columns: str, rows: Sequence[tuple[Any, ...]]) -> set[str]:
    """Insert the runs of ``rows`` (``id`` first) whose id is not taken; return the ids inserted.

    An id already in the table, or twice in ``rows``, is inserted once, for
    its first row: the caller refuses the others.
    """
    one = "(" + ",".join("?" * len(rows[0])) + ")"
    inserted: set[str] = set()
    for size, params in pieces(rows, LARGEST):
        sql = (
            f"INSERT INTO runs ({columns}) VALUES " + ",".join([one] * size)
            + " ON CONFLICT(id) DO NOTHING RETURNING id"
        )
        inserted.update(row[0] for row in db.execute(sql, params))
    return inserted


def update_ends(db: sqlite3.Connection, rows: Sequence[tuple[str, str, float | None, bytes | None, int]]) -> None:
    """Record each run's end: ``(id, status, finished, error, attempt)``, for that attempt only."""
    for size, params in pieces(rows, LARGEST):
        db.execute(
            "UPDATE runs SET status=v.column2, finished=v.column3, error=v.column4 FROM (VALUES "
            + ",".join(["(?,?,?,?,?)"] * size)
            + ") AS v WHERE runs.id=v.column1 AND runs.attempt=v.column5",
            params,
        )
