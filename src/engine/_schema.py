"""The journal's tables, and the migrations that bring an older journal forward.

``meta.schema_version`` says which version a file holds.  A file of an
older version is migrated in place, in one write transaction, by the
steps below in order (a crash in the middle leaves the old version
intact); a file of a newer version is refused, since this shoal cannot
know what the newer one expects of its rows.

History:
1. actions keyed by (run_id, key), one row each, ``WITHOUT ROWID``; the
   run's result in ``runs.output``.
2. actions append-only (a key's latest row is its state); the run's result
   read from its root action's record.
3. the owner's process start time and the attempt's start time on each run;
   an index of the rows that did not succeed, so that a run's current
   actions are found without sorting the whole run; a finished run's counts
   by task (``run_tasks``); pickled values signed.
4. where each attempt of an offloaded action ran (``attempts``: submitted,
   then how it ended, append-only like ``actions``), the code bundle each
   run sent (``run_bundles``), and the actions a live run is running now
   (``live_actions``, replaced every second while it runs).
5. gangs: where each rank of an attempt ran (``attempts.ranks``, a JSON
   list by rank) and which rank wrote a captured line (``logs.rank``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

    from ._signing import Signer

__all__ = ["SCHEMA", "SCHEMA_VERSION", "migrate"]

SCHEMA_VERSION = 5

#: Tables added by version 4 (also the last part of :data:`SCHEMA`).
ATTEMPTS = """
-- One row when an attempt is submitted (state 'running'), one when it ends;
-- an attempt's latest row (highest rowid) for its handle is its state.
CREATE TABLE IF NOT EXISTS attempts (
    run_id TEXT NOT NULL, key TEXT NOT NULL, task TEXT NOT NULL, attempt INTEGER NOT NULL,
    run_attempt INTEGER NOT NULL, state TEXT NOT NULL, target TEXT NOT NULL,
    backend TEXT NOT NULL, handle TEXT NOT NULL, place TEXT NOT NULL,
    started REAL, finished REAL, error TEXT, ranks TEXT
);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts (run_id, key);
CREATE TABLE IF NOT EXISTS run_bundles (
    run_id TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    files INTEGER NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_bundles_run ON run_bundles (run_id);
-- What a live run is running right now, replaced as a whole every second
-- or so by its process, removed when it ends: so that 'shoal show' of a
-- live run lists its running actions without a record per action start.
CREATE TABLE IF NOT EXISTS live_actions (
    run_id TEXT NOT NULL, key TEXT NOT NULL, parent TEXT, task TEXT NOT NULL,
    attempt INTEGER NOT NULL, started REAL, grp TEXT
);
CREATE INDEX IF NOT EXISTS live_actions_run ON live_actions (run_id);
"""

#: Statements separated by ";" (``--`` comment lines are dropped first).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, task TEXT NOT NULL, root TEXT NOT NULL, root_file TEXT,
    args BLOB, args_kind TEXT, status TEXT NOT NULL, attempt INTEGER NOT NULL,
    started REAL NOT NULL, finished REAL, tags TEXT NOT NULL DEFAULT '[]',
    error BLOB, pid INTEGER, host TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    pid_start TEXT, attempt_started REAL
);
CREATE INDEX IF NOT EXISTS runs_started ON runs (started);
CREATE TABLE IF NOT EXISTS actions (
    run_id TEXT NOT NULL, key TEXT NOT NULL, parent TEXT, task TEXT NOT NULL,
    state TEXT NOT NULL, attempt INTEGER NOT NULL, run_attempt INTEGER NOT NULL,
    started REAL, finished REAL, grp TEXT, output BLOB, output_kind TEXT,
    error BLOB, kind TEXT NOT NULL, cache_key TEXT, cached INTEGER NOT NULL DEFAULT 0
);
-- Append-only: a key's latest row (highest rowid) is its current state.
-- No index on (run_id, key): random keys made every insert three times as
-- dear.  A key has more than one row only after a row that did not
-- succeed (see _queries.CURRENT), and those few rows are indexed.
CREATE INDEX IF NOT EXISTS actions_run ON actions (run_id);
CREATE INDEX IF NOT EXISTS actions_unsettled ON actions (run_id, key) WHERE state != 'succeeded';
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY, task TEXT NOT NULL, output BLOB NOT NULL,
    output_kind TEXT NOT NULL, created REAL NOT NULL, run_id TEXT NOT NULL
) WITHOUT ROWID;
-- A finished run's actions counted by task and group, written with its
-- final record (counting a million rows takes about a second, reading
-- them back here, a millisecond), removed when the run is resumed.
CREATE TABLE IF NOT EXISTS run_tasks (
    run_id TEXT NOT NULL, task TEXT NOT NULL, grp TEXT, succeeded INTEGER NOT NULL,
    failed INTEGER NOT NULL, cancelled INTEGER NOT NULL, running INTEGER NOT NULL,
    cached INTEGER NOT NULL, first REAL
);
CREATE INDEX IF NOT EXISTS run_tasks_run ON run_tasks (run_id);
CREATE TABLE IF NOT EXISTS logs (
    run_id TEXT NOT NULL, action TEXT NOT NULL, at REAL NOT NULL,
    stream TEXT NOT NULL, text TEXT NOT NULL, rank INTEGER
);
CREATE INDEX IF NOT EXISTS logs_run ON logs (run_id, action);
""" + ATTEMPTS



def _v1_to_v2(db: sqlite3.Connection, signer: Signer) -> None:
    # Version 1 kept one row per key with no rowid; rows are copied in the
    # order they finished, which is the order version 2 reads them in.
    db.execute("ALTER TABLE actions RENAME TO actions_v1")
    db.execute(
        "CREATE TABLE actions (run_id TEXT NOT NULL, key TEXT NOT NULL, parent TEXT, "
        "task TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, "
        "run_attempt INTEGER NOT NULL, started REAL, finished REAL, grp TEXT, output BLOB, "
        "output_kind TEXT, error BLOB, kind TEXT NOT NULL, cache_key TEXT, "
        "cached INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO actions SELECT run_id, key, parent, task, state, attempt, run_attempt, "
        "started, finished, grp, output, output_kind, error, kind, cache_key, cached "
        "FROM actions_v1 ORDER BY finished"
    )
    db.execute("DROP TABLE actions_v1")
    db.execute("CREATE INDEX IF NOT EXISTS actions_run ON actions (run_id)")


def _v2_to_v3(db: sqlite3.Connection, signer: Signer) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    for name, kind in (("pid_start", "TEXT"), ("attempt_started", "REAL")):
        if name not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
    db.execute(
        "CREATE INDEX IF NOT EXISTS actions_unsettled ON actions (run_id, key) WHERE state != 'succeeded'"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS run_tasks (run_id TEXT NOT NULL, task TEXT NOT NULL, grp TEXT, "
        "succeeded INTEGER NOT NULL, failed INTEGER NOT NULL, cancelled INTEGER NOT NULL, "
        "running INTEGER NOT NULL, cached INTEGER NOT NULL, first REAL)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS run_tasks_run ON run_tasks (run_id)")
    # Pickled values written before signing existed were trusted then; they
    # are signed now so that they stay readable (and anything edited after
    # this point is caught).
    for table, key, column, kind in (
        ("actions", "rowid", "output", "output_kind"),
        ("runs", "id", "args", "args_kind"),
        ("cache", "key", "output", "output_kind"),
    ):
        rows = db.execute(f"SELECT {key}, {column} FROM {table} WHERE {kind}='pickle'").fetchall()
        db.executemany(
            f"UPDATE {table} SET {column}=? WHERE {key}=?",
            [(signer.sign(value), ident) for ident, value in rows if value is not None],
        )


def _v3_to_v4(db: sqlite3.Connection, signer: Signer) -> None:
    for statement in ATTEMPTS.split(";"):
        lines = [line for line in statement.splitlines() if not line.lstrip().startswith("--")]
        if "".join(lines).strip():
            db.execute("\n".join(lines))


def _v4_to_v5(db: sqlite3.Connection, signer: Signer) -> None:
    # Columns added at the end, NULL for what was written before (single
    # attempts, lines of no rank).  Version 3's step already makes the
    # attempts table of today, with the column.
    for table, name, kind in (("attempts", "ranks", "TEXT"), ("logs", "rank", "INTEGER")):
        if name not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


#: Step ``i`` brings version ``i + 1`` to ``i + 2``.
_STEPS: tuple[Callable[[sqlite3.Connection, Signer], None], ...] = (
    _v1_to_v2, _v2_to_v3, _v3_to_v4, _v4_to_v5,
)
assert len(_STEPS) == SCHEMA_VERSION - 1


def migrate(db: sqlite3.Connection, version: int, signer: Signer) -> None:
    """Bring a journal of ``version`` to :data:`SCHEMA_VERSION` (inside the caller's transaction)."""
    for step in _STEPS[version - 1 :]:
        step(db, signer)
    db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
