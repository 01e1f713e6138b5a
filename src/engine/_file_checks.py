"""Checks of a journal file before it is used: there at all, not cut short, and a shoal journal of a version this shoal reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import JournalCorrupt, JournalVersionError
from ._schema import SCHEMA_VERSION

if TYPE_CHECKING:
    import sqlite3

__all__ = ["check_not_truncated", "present", "schema_version"]


def present(path: Path) -> bool:
    """Whether ``path`` exists, or cannot be looked at (a file where a folder should be).

    ``Path.exists()`` says False for ``FILE/home`` too: reading would then
    report "no runs yet" for a home that can never hold a journal.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def check_not_truncated(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a journal file shorter than its header says (cut by a copy or a full disk).

    SQLite itself notices only when it reads a missing page, maybe in the
    middle of a run.  While a write-ahead log with content exists, pages
    may legitimately be there instead, so the check is skipped.

    The header is read through SQLite (``page_count`` is the header's size
    when the header is valid), never by opening the file in Python: closing
    any descriptor of the file would drop every POSIX lock this process
    holds on it, and with them the other connections' claim on the WAL
    index, which lets another process reset it under them.
    """
    try:
        size = path.stat().st_size
        wal = Path(f"{path}-wal")
        if wal.exists() and wal.stat().st_size > 0:
            return
    except OSError:
        return
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    if pages and size < pages * page_size:
        raise JournalCorrupt(
            f"journal {path} is truncated ({size} bytes, its header says {pages * page_size}); "
            f"move it aside to start a new one (its runs cannot be resumed), or restore it from a backup"
        )


def schema_version(db: sqlite3.Connection, path: Path) -> int | None:
    """The file's schema version; None for an empty database (nothing in it yet).

    Anything else that is not a shoal journal is refused untouched: shoal
    adds its tables only to an empty file.
    """
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        return None
    row = None
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if row is None or not {"runs", "actions"} <= tables:
        raise JournalCorrupt(
            f"{path} is a SQLite database but not a shoal journal (tables: "
            f"{', '.join(sorted(tables))}); it was left as it is: give shoal a path of its own "
            f"(Engine(store=...), --store, SHOAL_HOME)"
        )
    try:
        version = int(row[0])
    except ValueError:
        raise JournalCorrupt(f"journal {path} has an unreadable schema version {row[0]!r}") from None
    if version > SCHEMA_VERSION:
        raise JournalVersionError(
            f"journal {path} was written by a newer shoal (schema {version}, this one "
            f"reads up to {SCHEMA_VERSION}); upgrade shoal to read it"
        )
    if version < 1:
        raise JournalCorrupt(f"journal {path} has an unreadable schema version {version}")
    return version
