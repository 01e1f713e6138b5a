"""What the journal thread is handed: records, run claims, failures, logs, and commits.

The loop appends these to the journal's queue (see ``_journal``); the
journal thread writes them, in order, one batch per transaction.  Each
kind here carries what the writer needs and no more, and the expensive
part of a failure (formatting its traceback) is left to the writer.
"""

from __future__ import annotations

import asyncio
import traceback
from types import CodeType
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec.structs import astuple

from ._records import ActionRecord, ErrorInfo, RunRecord

if TYPE_CHECKING:
    from ._journal import Settle

__all__ = [
    "ACTION_COLUMNS",
    "ERROR_COLUMN",
    "ERROR_ENCODER",
    "STACKS_KEPT",
    "AttemptRow",
    "BundleRow",
    "Claim",
    "Commit",
    "Failure",
    "LiveRows",
    "LogRow",
    "LogRows",
    "Stacks",
    "action_row",
    "describe",
    "run_values",
    "runs_of",
    "split_settles",
]


class Commit(asyncio.Future[None]):
    """The commit of one batch of records, awaited by every action in it.

    One future for the whole batch, not one per action: a fan-out of
    100,000 actions waiting for their records keeps 100,000 fewer objects
    alive for the garbage collector to walk.  Cancelling one waiting action
    must not cancel the commit that the others wait for, so ``cancel()`` is
    refused here; the waiting action is still cancelled, at its next step,
    which comes when the commit is done (a few milliseconds).
    """

    __slots__ = ()

    def cancel(self, msg: Any = None) -> bool:
        return False


class Claim:
    """A run's first record of an attempt: written only if the run may start here.

    ``previous`` is None for a new run (its id must not exist yet), else the
    attempt number the resume read (it must still be the recorded one, and
    the recorded owner must be gone).  ``outcome`` is resolved on the loop
    with None or the error that refused the claim.
    """

    __slots__ = ("outcome", "previous", "record", "refused")

    def __init__(self, record: RunRecord, previous: int | None, outcome: asyncio.Future[None]) -> None:
        self.record = record
        self.previous = previous
        self.outcome = outcome
        #: Set on the journal thread: why the claim was refused, if it was.
        self.refused: Exception | None = None


class Failure:
    """An action that failed or was cancelled; its error is described on the journal thread.

    Formatting a traceback takes a fraction of a millisecond, long enough
    to stall the loop when thousands of actions fail at once, so the loop
    only hands the exception over.  An exception that propagates unchanged
    through several actions is described once, by the first (the deepest):
    the others refer to it by key (:attr:`ErrorInfo.origin`).
    """

    __slots__ = ("error", "origin", "record")

    def __init__(self, record: ActionRecord, error: BaseException | None, origin: str | None) -> None:
        self.record = record
        self.error = error
        self.origin = origin


class AttemptRow:
    """Where one submission of an offloaded attempt ran, and how it stands (the ``attempts`` table)."""

    __slots__ = ("row",)

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row


class BundleRow:
    """The code bundle a run sent to its offload targets (the ``run_bundles`` table)."""

    __slots__ = ("row",)

    def __init__(self, row: tuple[str, str, int, int, float]) -> None:
        self.row = row


class LiveRows:
    """The actions a run is running now, replacing the ones written before (``live_actions``)."""

    __slots__ = ("rows", "run_id")

    def __init__(self, run_id: str, rows: list[tuple[Any, ...]]) -> None:
        self.run_id = run_id
        self.rows = rows


#: One captured line: run id, action label, time, stream, text, and the
#: rank of the gang that wrote it (None: not a gang's).
LogRow = tuple[str, str, float, str, str, int | None]


class LogRows:
    """Captured output of a run's actions, written with the next batch."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[LogRow]) -> None:
        self.rows = rows


#: Formatted stacks kept by :func:`describe`, at most this many.
STACKS_KEPT = 512


#: Stacks formatted by :func:`describe`: by where each frame was (its code
#: object's id and instruction, in turn), the code objects and the text.
Stacks = dict[tuple[int, ...], tuple[tuple[CodeType, ...], str]]


def describe(exc: BaseException, origin: str | None = None, stacks: Stacks | None = None) -> ErrorInfo:
    """An exception as an :class:`ErrorInfo`; with ``origin``, without its traceback text.

    ``stacks`` keeps formatted stacks by where they ran (code object and
    instruction of each frame): a fan-out whose children fail the same
    way formats one stack, not thousands (formatting one costs tens
    to hundreds of microseconds, walking it a few).  Exceptions with a
    cause, a context or notes, groups and syntax errors are formatted
    whole, by :mod:`traceback`.
    """
    cls = type(exc)
    module = cls.__module__
    name = cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    plain = True
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not break the journal
        message = f"<{cls.__qualname__} whose str() raised>"
        plain = False
    if origin is not None:
        return ErrorInfo(name, message, "", origin)
    tb = exc.__traceback__
    simple = (
        plain
        and stacks is not None
        and tb is not None
        and exc.__cause__ is None
        and (exc.__context__ is None or exc.__suppress_context__)
        and not getattr(exc, "__notes__", None)
        # Formatted with more than their own line: a syntax error shows
        # the offending text, a group its members.
        and not isinstance(exc, (SyntaxError, BaseExceptionGroup))
        and isinstance(module, str)
    )
    if not simple:
        return ErrorInfo(name, message, "".join(traceback.format_exception(exc)))
    assert stacks is not None
    # Each frame's code object by id (hashing one hashes its constants and
    # names each time, a microsecond a frame) and its last instruction,
    # which gives its line (reading tb_lineno works the line out anew).
    # The entry holds the code objects, so no id in its key can be reused
    # by another code object while it is kept.
    where = []
    walk = tb
    while walk is not None:
        where.append(id(walk.tb_frame.f_code))
        where.append(walk.tb_lasti)
        walk = walk.tb_next
    key = tuple(where)
    found = stacks.get(key)
    if found is None:
        if len(stacks) >= STACKS_KEPT:
            stacks.clear()
        codes = []
        walk = tb
        while walk is not None:
            codes.append(walk.tb_frame.f_code)
            walk = walk.tb_next
        text = "Traceback (most recent call last):\n" + "".join(traceback.extract_tb(tb).format())
        found = stacks[key] = (tuple(codes), text)
    stack = found[1]
    # The exception's own line as traceback.format_exception_only writes
    # it for such an exception (which costs ten times as much: it builds a
    # TracebackException first).
    return ErrorInfo(name, message, f"{stack}{name}: {message}\n" if message else f"{stack}{name}\n")


#: Encodes an error's ErrorInfo for its column.
ERROR_ENCODER = msgspec.msgpack.Encoder()


def split_settles(settles: list[Settle], records: list[Any], count: int) -> tuple[list[Settle], list[Settle]]:
    """The settles of the first ``count`` successes, and the rest.

    Invariant relied on: a settle is appended with, and only with, an
    action's success record (an :class:`ActionRecord` of kind "action" in
    state "succeeded"), in the same order as the records.
    """
    return settles[:count], settles[count:]


#: Columns of the ``actions`` table: the fields of ActionRecord before ``attempts``.
ACTION_COLUMNS = 16
#: Where ``error`` is among them (encoded there by :data:`ERROR_ENCODER`).
ERROR_COLUMN = 12


def action_row(rec: ActionRecord, error: ErrorInfo | None) -> tuple[Any, ...]:
    """The columns of a failure's record, its error (None in ``rec``) being ``error``.

    From ``astuple`` (in C) and two slices: cheaper than reading sixteen
    fields, or a copy of the record, for each of thousands of failures.
    """
    row = astuple(rec)
    encoded = None if error is None else ERROR_ENCODER.encode(error)
    return (*row[:ERROR_COLUMN], encoded, *row[ERROR_COLUMN + 1 : ACTION_COLUMNS])


def run_values(run: RunRecord) -> tuple[Any, ...]:
    """A run record as the values of :data:`RUN_COLUMNS`."""
    return (
        run.id, run.task, run.root, run.root_file, run.args, run.args_kind, run.status,
        run.attempt, run.started, run.finished, msgspec.json.encode(run.tags).decode(),
        None if run.error is None else ERROR_ENCODER.encode(run.error), run.pid, run.host,
        run.pid_start, run.attempt_started,
    )


def runs_of(records: list[Any]) -> set[str]:
    """The runs that records of a batch belong to (read only when a batch failed)."""
    found: set[str] = set()
    for rec in records:
        if isinstance(rec, ActionRecord):
            found.add(rec.run_id)
        elif isinstance(rec, Failure):
            found.add(rec.record.run_id)
        elif isinstance(rec, LogRows | AttemptRow):
            found.update(row[0] for row in (rec.rows if isinstance(rec, LogRows) else [rec.row]))
        elif isinstance(rec, RunRecord):
            found.add(rec.id)
        elif isinstance(rec, Claim):
            found.add(rec.record.id)
    return found
