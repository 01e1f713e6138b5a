"""What a run report shows, gathered from the journal in one pass over the run's actions.

The run is read in pages (``Journal.action_pages``: keyset paging, no
sort), and nothing per action is kept beyond what the report draws:

- up to :data:`ITEMS_MAX` actions, each action itself (a box on the
  timeline, with its attempts and where they ran);
- above that, per lane, :data:`BINS` time bins holding how many of the
  lane's actions were running on average in the bin, and how many failed,
  were retried or started in it.  A million actions then weigh what a
  thousand do, in memory and in the file.

Durations are kept per task (8 bytes each, in an ``array``) for exact
percentiles: 8 MB for a million actions, against the hundreds of bytes an
``ActionRecord`` costs.
"""

from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._codec import MSGPACK, decode_value
from .._errors import EngineError

if TYPE_CHECKING:
    from .._journal import Journal
    from .._records import ActionRecord, RunSummary

__all__ = ["BINS", "ITEMS_MAX", "LOG_LINES", "Collected", "TaskStats", "collect"]

#: Most actions drawn one by one; a larger run is drawn in bins.
ITEMS_MAX = 5_000
#: Time bins per lane when binned.
BINS = 400
#: Most log lines the report carries (the rest: ``shoal logs``).
LOG_LINES = 5_000
#: Longest log line kept, in characters.
LOG_LINE_CHARS = 2_000
#: Most failed actions listed with their tracebacks.
FAILED_MAX = 50
#: Most distinct places (target, where) listed per lane when binned.
PLACES_MAX = 20
#: Most lanes drawn; the actions of further (group, task) pairs share one more lane.
LANES_MAX = 100
OTHER_LANE = "(other tasks)"
#: Records read per journal page.
PAGE = 20_000

#: State codes of the timeline's data (kept short: a code per action).
STATE_CODES = {"succeeded": 0, "failed": 1, "cancelled": 2, "running": 3, "pending": 4}


@dataclass
class TaskStats:
    """Per-task figures: counts by state, retries, cache hits and durations."""

    task: str
    count: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    running: int = 0
    cached: int = 0
    replayed: int = 0
    retries: int = 0
    durations: array[float] = field(default_factory=lambda: array("d"))

    def spread(self) -> tuple[float, float, float] | None:
        """(p50, p95, max) of the durations in seconds, nearest rank; None without any."""
        if not self.durations:
            return None
        ordered = sorted(self.durations)
        n = len(ordered)
        return ordered[max(1, math.ceil(0.50 * n)) - 1], ordered[max(1, math.ceil(0.95 * n)) - 1], ordered[-1]


@dataclass
class Lane:
    """One row of the timeline: the actions of one task in one group."""

    task: str
    group: str | None
    #: Binned mode: per bin, running-seconds / bin width (mean concurrency).
    busy: list[float] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    places: dict[str, int] = field(default_factory=dict)


@dataclass
class Collected:
    """Everything the HTML needs, decoded and bounded in size."""

    summary: RunSummary
    root_file: str | None = None
    args: Any = None
    args_note: str | None = None
    result: Any = None
    has_result: bool = False
    result_note: str | None = None
    #: Seconds since the epoch the timeline starts at, and its length.
    t0: float = 0.0
    span: float = 0.0
    binned: bool = False
    lanes: list[Lane] = field(default_factory=list)
    #: Items mode: [lane, start, end, state code, attempt, cached, key index, attempts].
    items: list[list[Any]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    tasks: dict[str, TaskStats] = field(default_factory=dict)
    failed: list[ActionRecord] = field(default_factory=list)
    failed_total: int = 0
    #: Action key -> [time, stream, text] lines.
    logs: dict[str, list[list[Any]]] = field(default_factory=dict)
    logs_total: int = 0
    logs_cut: bool = False
    actions: int = 0
    unplaced: int = 0


async def collect(journal: Journal, run_id: str, *, now: float | None = None) -> Collected:
    """Read run ``run_id`` for its report (``RunNotFound`` if the journal has no such run)."""
    summary = await journal.run_details(run_id, actions=False, offset=0, limit=0)
    out = Collected(summary)
    await _values(journal, run_id, out)
    end = summary.finished if summary.finished is not None else (now if now is not None else time.time())
    out.t0 = summary.started
    out.span = max(end - summary.started, 1e-6)
    out.binned = summary.actions > ITEMS_MAX
    lanes: dict[tuple[str | None, str], int] = {}
    after = 0
    while True:
        after, page = await journal.action_pages(run_id, after=after, limit=PAGE)
        if not page:
            break
        for rec in page:
            if rec.kind == "action":
                _add(out, lanes, rec)
    for rec in await journal.running_actions(run_id):  # a live run's, from its latest snapshot
        _add(out, lanes, rec)
    if out.binned:
        for lane in out.lanes:
            lane.busy = [round(b, 3) for b in lane.busy]
    out.failed = await journal.failed_actions(run_id, limit=FAILED_MAX)
    out.failed_total = sum(stats.failed for stats in out.tasks.values())
    await _logs(journal, run_id, out)
    return out


def _add(out: Collected, lanes: dict[tuple[str | None, str], int], rec: ActionRecord) -> None:
    out.actions += 1
    stats = out.tasks.get(rec.task)
    if stats is None:
        stats = out.tasks[rec.task] = TaskStats(rec.task)
    stats.count += 1
    state = rec.state
    if state == "succeeded":
        stats.succeeded += 1
    elif state == "failed":
        stats.failed += 1
    elif state == "cancelled":
        stats.cancelled += 1
    else:
        stats.running += 1
    if rec.cached:
        stats.cached += 1
    stats.retries += max(0, rec.attempt - 1)
    if rec.started is not None and rec.finished is not None:
        stats.durations.append(rec.finished - rec.started)
    index = lanes.get((rec.group, rec.task))
    if index is None:
        name: tuple[str | None, str] = (rec.group, rec.task)
        if len(out.lanes) >= LANES_MAX:
            # Past LANES_MAX lanes the rest share one, so the page stays small whatever the run.
            name = (None, OTHER_LANE)
            index = lanes.get(name)
        if index is None:
            index = lanes[name] = len(out.lanes)
            lane = Lane(name[1], name[0])
            if out.binned:
                lane.busy = [0.0] * BINS
                lane.started, lane.failed, lane.retried = [0] * BINS, [0] * BINS, [0] * BINS
            out.lanes.append(lane)
        lanes[(rec.group, rec.task)] = index
    lane = out.lanes[index]
    if rec.started is None:
        out.unplaced += 1  # never started (cancelled while waiting): counted, not drawn
        return
    start = rec.started - out.t0
    end = (rec.finished if rec.finished is not None else out.t0 + out.span) - out.t0
    if not out.binned:
        attempts = [
            [a.attempt, a.state, a.target, a.backend, a.where, _rel(a.started_at, out.t0), _rel(a.finished_at, out.t0)]
            for a in rec.attempts
        ]
        out.keys.append(rec.key)
        out.items.append(
            [index, round(start, 6), round(end, 6), STATE_CODES.get(state, 4), rec.attempt, int(rec.cached),
             len(out.keys) - 1, attempts]
        )
        return
    width = out.span / BINS
    first = min(BINS - 1, max(0, int(start / width)))
    last = min(BINS - 1, max(0, int(end / width)))
    lane.started[first] += 1
    if state == "failed":
        lane.failed[last] += 1
    if rec.attempt > 1:
        lane.retried[last] += 1
    if first == last:
        lane.busy[first] += (end - start) / width
    else:
        lane.busy[first] += ((first + 1) * width - start) / width
        for b in range(first + 1, last):
            lane.busy[b] += 1.0
        lane.busy[last] += (end - last * width) / width
    for a in rec.attempts:
        place = f"{a.target} ({a.backend}) {a.where}".rstrip()
        if place in lane.places or len(lane.places) < PLACES_MAX:
            lane.places[place] = lane.places.get(place, 0) + 1


def _rel(ts: float | None, t0: float) -> float | None:
    return None if ts is None else round(ts - t0, 6)


async def _values(journal: Journal, run_id: str, out: Collected) -> None:
    """The run's arguments and result, decoded; pickled ones are described, never unpickled."""
    record, output, output_kind = await journal.load_run(run_id)
    out.root_file = record.root_file
    if record.args_kind == MSGPACK:
        values, named = decode_value(record.args_kind, record.args)
        out.args = {"args": list(values), "kwargs": dict(named)}
    else:
        out.args_note = f"({record.args_kind}-encoded; not shown)"
    if output_kind is None:
        out.result_note = "(none: the run did not succeed)" if record.status != "succeeded" else None
    elif output_kind in (MSGPACK, "blob-msgpack"):
        try:
            out.result = await journal.decode(output_kind, output, Any)
            out.has_result = True
        except EngineError as exc:  # a blob store that lost it, or cannot be reached
            out.result_note = f"(in the blob store, unreadable: {exc})"
    else:
        out.result_note = f"({output_kind}-encoded; not shown)"


async def _logs(journal: Journal, run_id: str, out: Collected) -> None:
    rows = await journal.logs(run_id, limit=LOG_LINES + 1)
    out.logs_cut = len(rows) > LOG_LINES
    for key, at, stream, text, rank in rows[:LOG_LINES]:
        if rank is not None:
            text = f"[rank {rank}] {text}"
        if len(text) > LOG_LINE_CHARS:
            text = text[:LOG_LINE_CHARS] + f"... ({len(text) - LOG_LINE_CHARS} more characters)"
        out.logs.setdefault(key, []).append([round(at - out.t0, 6), stream, text])
    out.logs_total = min(len(rows), LOG_LINES)
