"""What the journal keeps of failed actions: each one's own traceback, as Python formats it.

A fan-out of failing children is described on the journal thread, with
stacks shared between children that failed in the same place; these
tests check that what a user reads back is still each exception's own
full traceback, and that the many-row inserts that write such a batch
keep every row, in order.
"""

from __future__ import annotations

import asyncio
import sqlite3
import traceback
from typing import TYPE_CHECKING

import pytest

import engine
from engine._bulk import SMALL, insert_rows

if TYPE_CHECKING:
    from pathlib import Path


class Broken(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


class Quiet(Exception):
    pass


def _raise(kind: int, i: int) -> None:
    if kind == 0:
        raise ValueError(f"child {i} fails")
    if kind == 1:
        raise Quiet()
    if kind == 2:
        raise KeyError(f"key {i}")
    if kind == 3:
        err = ValueError(f"noted {i}")
        err.add_note(f"note of {i}")
        raise err
    if kind == 4:
        try:
            raise OSError(2, "gone", f"file-{i}")
        except OSError as cause:
            raise LookupError(f"caused {i}") from cause
    if kind == 5:
        raise ExceptionGroup(f"group {i}", [ValueError(f"member {i}"), TypeError("other")])
    if kind == 6:
        raise SyntaxError(f"bad {i}", ("f.py", 1, 3, "x = = 1\n", 1, 5))
    if kind == 7:
        raise Broken()
    # Same function, another line: a stack of its own.
    raise ValueError(f"other line {i}")


KINDS = 9


@engine.task
async def failing(i: int) -> int:
    _raise(i % KINDS, i)
    return i


@engine.task
async def gather_failures(n: int) -> dict[int, str]:
    """Each child's exception, formatted here by the traceback module, by child."""
    results = await asyncio.gather(*(failing(i) for i in range(n)), return_exceptions=True)
    return {i: "".join(traceback.format_exception(r)) for i, r in enumerate(results) if isinstance(r, BaseException)}


async def test_each_failed_child_keeps_its_own_full_traceback(tmp_path: Path) -> None:
    n = 5 * KINDS
    async with engine.Engine(store=tmp_path / "journal.db") as eng:
        run = await eng.run(gather_failures, n)
        assert run.status == "succeeded", run.error
        expected: dict[int, str] = run.result
        details = await eng.get_run(run.id, actions=True)
    failed = [r for r in details.action_records if r.task == failing.name]
    assert len(failed) == n == len(expected)
    for rec in failed:
        assert rec.state == "failed" and rec.error is not None
        assert rec.error.origin is None
        assert rec.error.traceback in expected.values(), f"{rec.key}: not as Python writes it:\n{rec.error.traceback}"
    # Each child's own: as many of each text as children that raised it.
    recorded = sorted(r.error.traceback for r in failed if r.error is not None)
    assert recorded == sorted(expected.values()), "some children were given another child's traceback"
    # What show prints comes from the same records.
    first = next(r for r in failed if r.error is not None and r.error.message == "child 0 fails")
    assert first.error is not None and first.error.type == "ValueError"
    assert first.error.traceback.endswith("ValueError: child 0 fails\n")
    assert 'raise ValueError(f"child {i} fails")' in first.error.traceback


def _table(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")


@pytest.mark.parametrize("limit", [None, 3 * 40])
def test_many_row_inserts_keep_every_row_in_order(tmp_path: Path, limit: int | None) -> None:
    db = sqlite3.connect(tmp_path / "rows.db", isolation_level=None)
    try:
        _table(db)
        if limit is not None:
            # 40 rows of 3 columns a statement at most: full chunks, then the rest.
            db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)
        expected: list[tuple[int, str, bytes]] = []
        for size in [1, SMALL - 1, SMALL, SMALL + 1, 39, 40, 41, 100, 257, 1000]:
            rows = [(len(expected) + k, f"row {len(expected) + k}", bytes([k % 256])) for k in range(size)]
            insert_rows(db, "INSERT", "t", 3, rows)
            expected.extend(rows)
        assert db.execute("SELECT a, b, c FROM t ORDER BY rowid").fetchall() == expected
    finally:
        db.close()


def test_batches_of_every_size_share_a_few_statements(tmp_path: Path) -> None:
    # A statement of a new length is prepared anew, which costs as much
    # as writing its rows: batches of 1 to 2,000 rows use few lengths.
    db = sqlite3.connect(tmp_path / "rows.db", isolation_level=None)
    try:
        _table(db)
        lengths: set[int] = set()
        # The callback is given each statement with its values filled in: one "(...)" a row.
        db.set_trace_callback(lambda sql: lengths.add(sql.count("),(") + 1))
        total = 0
        for size in range(1, 2001, 7):
            insert_rows(db, "INSERT", "t", 3, [(k, "x", b"") for k in range(size)])
            total += size
        db.set_trace_callback(None)
        assert db.execute("SELECT count(*) FROM t").fetchone() == (total,)
        powers = {1 << k for k in range(SMALL.bit_length() - 1, 11)}
        assert lengths <= powers | set(range(1, SMALL)), sorted(lengths)
        assert len(lengths) <= len(powers) + SMALL - 1
    finally:
        db.close()
