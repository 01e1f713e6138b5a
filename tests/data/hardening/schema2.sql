-- The journal's tables at schema version 2 (actions append-only: a key's
-- latest row is its state; the run's result is its root action's output).
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
