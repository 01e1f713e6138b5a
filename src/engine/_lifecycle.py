"""The action lifecycle: every state change of an action, in one place.

An action's states, and the only ways between them::

    called ─► pending ─► running ─► succeeded                     (memory store)
                 │          ├─────► committing ─► succeeded       (journaled: counted at commit)
                 │          │                  └► failed          (its commit failed)
                 │          ├─────► failed | cancelled
                 │          └─────► (retrying: stays running)
                 ├─► succeeded, replayed   (recorded before: journal or an earlier attempt)
                 ├─► running, cached ─► committing ─► ...          (a cross-run cache hit)
                 └─► failed | cancelled    (never ran: admission refused, run over)

Each function here is one arrow: it moves the action between the
counters of its task (:class:`~engine._events.TaskCounts`), announces it
(:meth:`Engine.emit`, only when someone listens for that kind), and
records it in the journal where a record is due (failures and
cancellations; successes are recorded by ``RunJournal.succeeded`` and
counted here when their commit lands, :func:`settled`).  No other module
changes a counter or emits an action event.

Invariant (per ``TaskCounts``): ``pending + running + committing`` is the
number of calls made and not yet finished; every call ends in exactly one
of ``succeeded``, ``failed``, ``cancelled``.  ``replayed``, ``cached`` and
``retries`` are tallies on the side, never part of that sum.

These are plain functions, not methods, and take what they change as
arguments: the plain action path calls two of them per action
(:func:`started`, :func:`succeeded`), so they stay small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._action import Action
    from ._events import TaskCounts
    from ._run import Run

__all__ = [
    "abandoned",
    "cached",
    "called",
    "committing",
    "ended",
    "ended_before_start",
    "recalled",
    "replayed",
    "retrying",
    "settled",
    "started",
    "succeeded",
]


def called(counts: TaskCounts) -> None:
    """A task was called: its action is pending until it starts (or is replayed)."""
    counts.pending += 1


def started(action: Action, counts: TaskCounts) -> None:
    """pending -> running: the action has its slots and runs its code."""
    counts.pending -= 1
    counts.running += 1
    run = action.run
    running = run.running
    if running is not None:
        running[action] = None
    engine = run.engine
    wanted = engine.wanted
    if wanted and "started" in wanted:
        engine.emit("started", action)


def succeeded(action: Action, counts: TaskCounts) -> None:
    """running -> succeeded, for a run with no journal (nothing to commit)."""
    counts.running -= 1
    counts.succeeded += 1
    engine = action.run.engine
    wanted = engine.wanted
    if wanted and "succeeded" in wanted:
        engine.emit("succeeded", action)


def committing(action: Action, counts: TaskCounts) -> None:
    """running -> committing: the action's work is done, its record is queued."""
    counts.running -= 1
    counts.committing += 1
    running = action.run.running
    if running is not None:
        running.pop(action, None)


def settled(run: Run, counts: TaskCounts, action: Action | None, error: Exception | None) -> None:
    """committing -> succeeded (its record is durable), or -> failed (the commit failed).

    Called on the loop for each success of a committed batch; ``action`` is
    given only when someone listens for events (see ``RunJournal.succeeded``).
    """
    counts.committing -= 1
    engine = run.engine
    wanted = engine.wanted
    if error is None:
        counts.succeeded += 1
        if action is not None and "succeeded" in wanted:
            engine.emit("succeeded", action)
    else:
        counts.failed += 1
        if action is not None and "failed" in wanted:
            engine.emit("failed", action, error)


def ended(
    action: Action,
    counts: TaskCounts,
    state: Literal["failed", "cancelled"],
    error: BaseException | None,
    *,
    was: Literal["pending", "running"] = "running",
) -> None:
    """pending or running -> failed or cancelled: counted, recorded, announced."""
    run = action.run
    if was == "running":
        counts.running -= 1
        running = run.running
        if running is not None:
            running.pop(action, None)
    else:
        counts.pending -= 1
    if state == "failed":
        counts.failed += 1
    else:
        counts.cancelled += 1
    if run.journal is not None:
        run.journal.ended(action, state, error)
    engine = run.engine
    if state in engine.wanted:
        engine.emit(state, action, error)


def ended_before_start(counts: TaskCounts) -> None:
    """A call that starts after its run ended is cancelled before it runs (and not recorded).

    Once the run has counted its never-started calls as cancelled
    (:func:`abandoned`), such a call is counted already.
    """
    if counts.pending > 0:
        counts.pending -= 1
        counts.cancelled += 1


def abandoned(counts: TaskCounts, status: str | None = None) -> None:
    """At the end of a run: its calls still pending never ran and never will.

    They were made and never awaited (a forgotten ``await``), or, with
    ``status``, the root itself never started (its first record could not
    be written, or the run was cancelled first): counted as that status
    says, so that a finished run shows nothing pending.
    """
    if status is None:
        counts.cancelled += counts.pending
        counts.pending = 0
    elif counts.pending:
        counts.pending -= 1
        counts.cancelled += status == "cancelled"
        counts.failed += status == "failed"


def replayed(run: Run, counts: TaskCounts, action: Callable[[], Action] | Action | None, *, pending: bool) -> None:
    """-> succeeded, replayed: a call whose output was recorded by an earlier attempt.

    ``pending``: whether the call was counted pending first (a replay that
    needed a blob read started as an action); ``action`` is the action, or
    makes one, only when someone listens for ``replayed`` events (None:
    nobody listens for any event).
    """
    if pending:
        counts.pending -= 1
    counts.succeeded += 1
    counts.replayed += 1
    engine = run.engine
    wanted = engine.wanted
    if wanted and "replayed" in wanted and action is not None:
        engine.emit("replayed", action if not callable(action) else action())


def recalled(run: Run, counts: TaskCounts, action: Callable[[], Action]) -> None:
    """A call that succeeded in an earlier attempt of its parent, given back without running.

    Not counted succeeded again (it was when it first ran): a tally of replays only.
    """
    counts.replayed += 1
    engine = run.engine
    wanted = engine.wanted
    if wanted and "replayed" in wanted:
        engine.emit("replayed", action())


def cached(action: Action, counts: TaskCounts) -> None:
    """pending -> running, cached: a cache hit, running until its record is committed."""
    counts.pending -= 1
    counts.running += 1
    counts.cached += 1
    engine = action.run.engine
    if "cached" in engine.wanted:
        engine.emit("cached", action)


def retrying(action: Action, counts: TaskCounts, error: BaseException) -> None:
    """An attempt failed and another follows (the action stays running)."""
    counts.retries += 1
    engine = action.run.engine
    if "retrying" in engine.wanted:
        engine.emit("retrying", action, error)
