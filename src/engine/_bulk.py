"""Rows written many to one SQL statement, so that the journal thread rarely lets go of the GIL.

``executemany`` runs one ``sqlite3_step`` per row, and the sqlite3 module
releases the GIL around each step.  While the event loop is busy (a
fan-out of a hundred thousand actions), the journal thread then waits up
to a switch interval (5 ms) to take the GIL back after every row: the
batch's CPU work was a quarter of its wall time.  A multi-row ``INSERT``
binds many rows (in C, holding the GIL) and steps once for all of them:
100,000 rows written beside a busy thread took 1.1 s instead of 3.8-5.7 s.

A statement's text fixes its number of rows, and SQLite compiles a
multi-row ``INSERT`` into code for each of its rows: preparing one costs
about as much as running it.  Batches come in every size, so a statement
sized to its batch was prepared afresh nearly every time, half the CPU of
writing a row.  Rows therefore go in statements of a few fixed sizes
(powers of two up to :data:`MAX_ROWS`), each prepared once per connection
and then taken from the sqlite3 module's statement cache: a batch of 2,000
rows is six steps (1,024, 512, 256, 128, 64 and 16 rows), not one, and costs
half the CPU per row.  A full batch (8,192 records) is still one step.
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
#: Rows per statement at most (a power of two): a journal batch (8,192
#: records) in one step.
MAX_ROWS = 8192


def insert_rows(db: sqlite3.Connection, verb: str, table: str, width: int, rows: Sequence[Sequence[Any]]) -> None:
    """``verb INTO table VALUES (...), (...), ...`` for ``rows`` of ``width`` columns each.

    ``verb`` is ``INSERT`` or ``INSERT OR REPLACE``.  Rows go in order, in
    statements of power-of-two sizes: as many of the largest as fit, then
    one of each smaller size that the rest needs (the binary digits of
    what is left).  So a table has at most fourteen statement texts,
    which the statement cache keeps prepared.
    """
    if not rows:
        return
    limit = min(db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), MAX_PARAMETERS)
    largest = 1 << (max(1, min(limit // width, MAX_ROWS)).bit_length() - 1)
    one = "(" + ",".join("?" * width) + ")"
    head = f"{verb} INTO {table} VALUES "
    start = 0
    left = len(rows)
    while left:
        size = min(largest, 1 << (left.bit_length() - 1))
        chunk = rows[start : start + size]
        db.execute(head + ",".join([one] * size), tuple(itertools.chain.from_iterable(chunk)))
        start += size
        left -= size
