"""Rows written many to one SQL statement, so that the journal thread rarely lets go of the GIL.

``executemany`` runs one ``sqlite3_step`` per row, and the sqlite3 module
releases the GIL around each step.  While the event loop is busy (a
fan-out of a hundred thousand actions), the journal thread then waits up
to a switch interval (5 ms) to take the GIL back after every row: the
batch's CPU work was a quarter of its wall time.  A multi-row ``INSERT``
binds many rows (in C, holding the GIL) and steps once for all of them:
100,000 rows written beside a busy thread took 1.1 s instead of 3.8-5.7 s.
"""

from __future__ import annotations

import itertools
import sqlite3
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["insert_rows"]

#: Host parameters per statement at most, below the connection's own limit
#: (SQLite's default is 999 before 3.32 and 32766 since; builds raise it).
MAX_PARAMETERS = 250_000
#: Rows per statement at most: a journal batch (8,192 records) in one step.
MAX_ROWS = 8192


def insert_rows(db: sqlite3.Connection, verb: str, table: str, width: int, rows: Sequence[Sequence[Any]]) -> None:
    """``verb INTO table VALUES (...), (...), ...`` for ``rows`` of ``width`` columns each.

    ``verb`` is ``INSERT`` or ``INSERT OR REPLACE``.  Rows go in order, as
    many to a statement as the connection's parameter limit allows; the
    statement for a full chunk is the same text each time, so the sqlite3
    module's statement cache prepares it once.
    """
    if not rows:
        return
    limit = min(db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), MAX_PARAMETERS)
    per = max(1, min(len(rows), limit // width, MAX_ROWS))
    one = "(" + ",".join("?" * width) + ")"
    head = f"{verb} INTO {table} VALUES "
    full = head + ",".join([one] * per)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        sql = full if len(chunk) == per else head + ",".join([one] * len(chunk))
        db.execute(sql, tuple(itertools.chain.from_iterable(chunk)))
