"""Rows written many to one SQL statement, so that the journal thread rarely lets go of the GIL.

``executemany`` runs one ``sqlite3_step`` per row, and the sqlite3 module
releases the GIL around each step.  While the event loop is busy (a
fan-out of a hundred thousand actions), the journal thread then waits up
to a switch interval (5 ms) to take the GIL back after every row: the
batch's CPU work was a quarter of its wall time.  A multi-row ``INSERT``
binds many rows (in C, holding the GIL) and steps once for all of them:
100,000 rows written beside a busy thread took 1.1 s instead of 3.8-5.7 s.
A batch goes in a few such statements, of lengths that recur (see
:func:`insert_rows`), so that none is prepared more than once.
"""

from __future__ import annotations

import itertools
import sqlite3
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["insert_rows", "pieces"]

#: Host parameters per statement at most, below the connection's own limit
#: (SQLite's default is 999 before 3.32 and 32766 since; builds raise it).
MAX_PARAMETERS = 250_000
#: Rows per statement at most: a journal batch (8,192 records) in one step.
MAX_ROWS = 8192
#: Below this many rows, the rest of a batch goes in one statement of its own
#: length (quick to prepare, and often prepared already).  Each statement is
#: a step that lets go of the GIL, and taking it back from a busy event
#: loop can take a switch interval (5 ms): a batch has few steps this way.
SMALL = 64


def insert_rows(db: sqlite3.Connection, verb: str, table: str, width: int, rows: Sequence[Sequence[Any]]) -> None:
    """``verb INTO table VALUES (...), (...), ...`` for ``rows`` of ``width`` columns each.

    ``verb`` is ``INSERT`` or ``INSERT OR REPLACE``.  Rows go in order, in
    statements of a few lengths only: full chunks (as many rows as the
    connection's parameter limit allows), then powers of two, then one
    statement for fewer than :data:`SMALL` rows.  Each length's text is
    the same every time, so the sqlite3 module's statement cache prepares
    it once: preparing a statement of a new length, as every batch of its
    own size did, cost as much as inserting its rows (1,000-2,000 rows a
    batch: 9-16 us a row against 4-10).  A batch takes a handful of steps this
    way (one per set bit of its size above SMALL), not one per row.
    """
    if not rows:
        return
    limit = min(db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER), MAX_PARAMETERS)
    per = max(1, min(limit // width, MAX_ROWS))
    one = "(" + ",".join("?" * width) + ")"
    head = f"{verb} INTO {table} VALUES "
    for size, params in pieces(rows, per, SMALL):
        db.execute(head + ",".join([one] * size), params)


def pieces(rows: Sequence[Sequence[Any]], largest: int, small: int = 1) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """``rows`` cut for statements of a few lengths: (rows in the piece, their values in order).

    ``largest`` rows while that many are left, then powers of two, and a
    rest of fewer than ``small`` rows in one piece of its own length.
    """
    start = 0
    while start < len(rows):
        left = len(rows) - start
        size = largest if left >= largest else left if left < small else 1 << (left.bit_length() - 1)
        yield size, tuple(itertools.chain.from_iterable(rows[start : start + size]))
        start += size
