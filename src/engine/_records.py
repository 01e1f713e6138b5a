"""What the journal records: runs, actions, traces and cache entries.

Records are frozen, tagged msgspec Structs; the SQLite journal stores their
fields as columns (so that they can be queried) and the same Structs are
what the query API returns.
"""

# No `from __future__ import annotations` here: msgspec resolves these
# annotations in the module named by __module__, which is set to "engine".
from typing import Literal

import msgspec

__all__ = ["ActionRecord", "AttemptInfo", "ErrorInfo", "RunRecord", "RunSummary", "TaskSummary"]

from ._schema import SCHEMA_VERSION as SCHEMA_VERSION

State = Literal["pending", "running", "succeeded", "failed", "cancelled"]
#: How an output is stored: inline msgpack or pickle, or in the blob store.
ValueKind = Literal["msgpack", "pickle", "blob-msgpack", "blob-pickle"]


# ``gc=False``: records hold only strings, bytes and numbers (no cycles), and
# a fan-out queues one per action for the next commit; keeping them out of
# the garbage collector's sight keeps its passes short.
class ErrorInfo(msgspec.Struct, frozen=True, gc=False):
    """An exception as text: its type (``module.QualName``), message and traceback."""

    type: str
    message: str
    traceback: str = ""
    #: The key of the action where this exception was first recorded, when
    #: it propagated unchanged from there: the traceback is stored once, in
    #: that action's record, and readers fill it in from there.
    origin: str | None = None


class RunRecord(msgspec.Struct, frozen=True, tag="run"):
    """One run: its root task, arguments, status and times."""

    id: str
    task: str
    #: Import path of the root task: ``module:qualname``.
    root: str
    #: The file that defines the root task, for tasks in scripts (``__main__``).
    root_file: str | None
    args: bytes
    args_kind: ValueKind
    status: State
    attempt: int
    started: float
    finished: float | None = None
    tags: tuple[str, ...] = ()
    error: ErrorInfo | None = None
    pid: int | None = None
    host: str | None = None
    #: The start time of the owning process (see ``_owner``): with ``pid``
    #: and ``host``, tells a live owner from a reused pid.
    pid_start: str | None = None
    #: When this attempt of the run started (``started`` is the first's).
    attempt_started: float | None = None


class AttemptInfo(msgspec.Struct, frozen=True):
    """Where one attempt of an action ran, as ``engine.get_run(..., actions=True)`` gives it.

    ``target`` is the offload target's name (``"local"``: in the run's own
    process), ``backend`` its kind (``"local"``, ``"ssh"``, ``"batch"``;
    ``"in-process"`` for the run's process), ``where`` the host and pid or
    the Batch job id.  An attempt lost to an infrastructure failure (a
    worker or host gone) has ``state="lost"`` and is followed by another
    with the same ``attempt`` number.  For a gang (``nodes=N``), ``ranks``
    lists where each rank ran, by rank (``where`` is rank 0's); empty for
    a single attempt.
    """

    attempt: int
    state: str
    target: str
    backend: str
    where: str
    started_at: float | None
    finished_at: float | None
    ranks: tuple[str, ...] = ()


class ActionRecord(msgspec.Struct, frozen=True, tag="action", gc=False):
    """One action (or trace call, ``kind="trace"``) in its last recorded state."""

    run_id: str
    key: str
    parent: str | None
    task: str
    state: State
    attempt: int
    run_attempt: int
    started: float | None
    finished: float | None
    group: str | None = None
    output: bytes | None = None
    output_kind: ValueKind | None = None
    error: ErrorInfo | None = None
    kind: Literal["action", "trace"] = "action"
    cache_key: str | None = None
    #: Served from the cross-run cache instead of running.
    cached: bool = False
    #: Where each attempt ran (filled in by ``get_run(..., actions=True)``;
    #: not a column of the journal's ``actions`` table).
    attempts: tuple[AttemptInfo, ...] = ()


class TaskSummary(msgspec.Struct, frozen=True):
    """Counts of one task's actions in one run, by state (from the journal)."""

    task: str
    group: str | None
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    cached: int = 0


class RunSummary(msgspec.Struct, frozen=True):
    """A run as listed by :func:`engine.runs` and shown by :func:`engine.get_run`."""

    id: str
    task: str
    root: str
    status: State
    attempt: int
    started: float
    finished: float | None
    tags: tuple[str, ...]
    actions: int
    error: ErrorInfo | None = None
    tasks: tuple[TaskSummary, ...] = ()
    #: A page of the run's actions, when asked for.
    action_records: tuple[ActionRecord, ...] = ()
    #: When the latest attempt started (a resumed run's ``started`` is its first).
    attempt_started: float | None = None
    #: SHA-256 and size in bytes of the code bundle the run sent to offload targets.
    bundle: str | None = None
    bundle_size: int | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from the first attempt's start to the end (resumes included)."""
        return None if self.finished is None else self.finished - self.started

    @property
    def attempt_duration(self) -> float | None:
        """Seconds the latest attempt took, up to its final commit."""
        if self.finished is None:
            return None
        return self.finished - (self.attempt_started if self.attempt_started is not None else self.started)
