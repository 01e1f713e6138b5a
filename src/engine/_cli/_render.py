"""How recorded runs look: rich tables and trees for people, JSON for machines.

Runs are read through the client (:class:`engine.RecordedRun`, with
``load_code=False``: showing a run runs none of its code).  Times are shown
in local time (``2024-05-01 14:03:22``); JSON carries them as Unix
timestamps, as the journal has them, plus ``duration`` in seconds.

``shoal show`` cuts what could be long for a terminal (a value's repr at
:data:`MAX_VALUE` characters, a traceback at its last :data:`TRACEBACK_LINES`
lines, tracebacks for the first :data:`TRACEBACKS_SHOWN` failures) and says
so; ``--json`` has everything whole.  In JSON, ``actions`` is always the
number of the run's actions, and ``action_records`` (only with
``--actions``) the page of their records, each with its ``attempts``: a
list of ``{attempt, state, target, backend, where, ranks, started_at,
finished_at}``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import msgspec
from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

if TYPE_CHECKING:
    from collections.abc import Iterable
    from datetime import datetime

    from .._client import LogLine, RecordedAction, RecordedRun
    from .._records import TaskSummary

__all__ = [
    "actions_table",
    "duration",
    "escape_markup",
    "failed_table",
    "json_text",
    "logs_json",
    "run_json",
    "run_panel",
    "runs_table",
    "stamp",
    "task_tree",
    "where_text",
]

#: Failed actions listed by ``shoal show`` (the first to start, as the client lists them).
MAX_FAILED = 20
#: Failed actions whose traceback ``shoal show`` prints.
TRACEBACKS_SHOWN = 3
#: Lines of a traceback ``shoal show`` prints (its end, where the error is).
TRACEBACK_LINES = 15
#: Characters of an argument's or a result's repr ``shoal show`` prints.
MAX_VALUE = 300

STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "running": "cyan",
    "pending": "dim",
}


def duration(seconds: float | None) -> str:
    """``0.42s``, ``12.3s``, ``4m05s``, ``2h03m``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def stamp(at: datetime | None) -> str:
    """A time as local ``YYYY-MM-DD HH:MM:SS``."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at.timestamp()))


def unix(at: datetime | None) -> float | None:
    return None if at is None else at.timestamp()


def escape_markup(text: str) -> str:
    """``text`` with rich markup characters escaped, for messages built from user data."""
    return escape(text)


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def clip(text: str, limit: int = MAX_VALUE) -> str:
    """``text`` cut at ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


def traceback_tail(text: str, lines: int = TRACEBACK_LINES) -> str:
    """The last ``lines`` lines of a traceback, saying how many came before."""
    all_lines = text.rstrip().splitlines()
    if len(all_lines) <= lines:
        return "\n".join(all_lines)
    cut = len(all_lines) - lines
    return "\n".join([f"... ({cut} earlier line{'s' if cut != 1 else ''})", *all_lines[cut:]])


def call_text(run: RecordedRun[object]) -> str:
    """The run's arguments as a call: positional values, then ``name=value``."""
    if not run.args and run.note and "arguments" in run.note:
        return "(not shown: " + run.note + ")"
    parts = [repr(v) if k.isdigit() else f"{k}={v!r}" for k, v in run.args.items()]
    return clip(", ".join(parts)) if parts else "(none)"


def result_text(run: RecordedRun[object]) -> str | None:
    if run.status != "succeeded":
        return "(none: the run did not succeed)"
    if run.result is None and run.note and "result" in run.note:
        return f"({run.note})"
    return clip(repr(run.result))


# -- runs ----------------------------------------------------------------------------


def runs_table(runs: Iterable[RecordedRun[object]]) -> Table:
    """``shoal runs``: one row per run, latest first."""
    table = Table(header_style="bold", box=box.SIMPLE_HEAD)
    for name in ("id", "task", "status", "actions", "duration", "started", "tags"):
        table.add_column(
            name,
            justify="right" if name in ("actions", "duration") else "left",
            no_wrap=name in ("id", "status", "started"),
        )
    for run in runs:
        table.add_row(
            run.id,
            escape(run.task),
            status_text(run.status),
            f"{run.action_count:,}",
            duration(run.duration),
            stamp(run.started_at),
            escape(", ".join(run.tags)),
        )
    return table


def run_panel(run: RecordedRun[object]) -> RenderableType:
    """The head of ``shoal show``: what, with which arguments, when, how it ended."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("run", run.id)
    grid.add_row("task", f"{escape(run.task)} ({escape(run.root)})")
    grid.add_row("status", status_text(run.status))
    grid.add_row("attempt", str(run.attempt))
    grid.add_row("started", stamp(run.started_at))
    grid.add_row("finished", stamp(run.finished_at))
    if run.attempt > 1 and run.attempt_started_at is not None:
        grid.add_row("duration", f"{duration(run.attempt_duration)} (attempt {run.attempt}; {duration(run.duration)} since the first)")
    else:
        grid.add_row("duration", duration(run.duration))
    grid.add_row("actions", f"{run.action_count:,}")
    if run.tags:
        grid.add_row("tags", escape(", ".join(run.tags)))
    grid.add_row("arguments", Text(call_text(run)))
    result = result_text(run)
    if result is not None:
        grid.add_row("result", Text(result))
    if run.error is not None:
        grid.add_row("error", Text(f"{run.error.type}: {first_line(run.error.message)}", style="red"))
    return grid


def _counts(task: TaskSummary) -> Text:
    text = Text()
    text.append(escape(task.task), style="bold")
    parts: list[tuple[str, str]] = [(f"{task.succeeded:,} succeeded", "green")]
    if task.failed:
        parts.append((f"{task.failed:,} failed", "red"))
    if task.cancelled:
        parts.append((f"{task.cancelled:,} cancelled", "yellow"))
    if task.running:
        parts.append((f"{task.running:,} running", "cyan"))
    if task.cached:
        parts.append((f"{task.cached:,} cached", "dim"))
    text.append("  ")
    for i, (part, style) in enumerate(parts):
        if i:
            text.append(", ")
        text.append(part, style=style)
    return text


def task_tree(run: RecordedRun[object]) -> Tree:
    """The run's tasks under their groups (``engine.group`` labels, nested by ``/``)."""
    tree = Tree(Text.assemble(("run ", "bold"), run.id, " ", status_text(run.status)))
    groups: dict[str, Tree] = {}

    def node(label: str | None) -> Tree:
        if not label:
            return tree
        found = groups.get(label)
        if found is None:
            parent_label, _, name = label.rpartition("/")
            found = groups[label] = node(parent_label or None).add(Text(f"group {name}", style="magenta"))
        return found

    for task in run.tasks:
        node(task.group).add(_counts(task))
    return tree


def failed_table(records: Iterable[RecordedAction]) -> Table:
    """Failed actions: id, task, attempt, group, error type and first line."""
    table = Table(header_style="bold", title="failed actions", title_justify="left")
    for name in ("action", "task", "attempt", "group", "error"):
        table.add_column(name, no_wrap=name == "action", overflow="fold")
    for rec in records:
        error = "" if rec.error is None else f"{rec.error.type}: {first_line(rec.error.message)}"
        table.add_row(rec.key, escape(rec.task), str(rec.attempt), escape(rec.group or ""), Text(error, style="red"))
    return table


def where_text(rec: RecordedAction) -> str:
    """Where an action's last attempt ran, compactly: ``gpu host1:4242``, ``local host0:311``.

    The target's name, then the host and pid or the Batch job id (blank for
    a local action of an earlier process of the run, whose pid is not
    known); ``(3 attempts)`` after it when more than one was recorded
    (attempts lost with a worker or host count too).  A gang's attempt
    names its ranks' places after rank 0's: ``lab 4 ranks: h1:10, h1:11,
    h2:7, h2:8``.
    """
    if not rec.attempts:
        return ""
    last = rec.attempts[-1]
    if last.ranks:
        text = f"{last.target} {len(last.ranks)} ranks: {', '.join(last.ranks)}"
    else:
        text = f"{last.target} {last.where}".strip()
    if len(rec.attempts) > 1:
        text += f" ({len(rec.attempts)} attempts)"
    return text


def actions_table(records: Iterable[RecordedAction]) -> Table:
    """``shoal show --actions``: a page of the run's actions, with where each last ran."""
    table = Table(header_style="bold", title="actions", title_justify="left")
    for name in ("action", "task", "state", "attempt", "where", "group", "duration", "parent"):
        table.add_column(name, no_wrap=name in ("action", "state", "parent"))
    for rec in records:
        took = rec.duration
        state = "cached" if rec.cached else rec.state
        table.add_row(
            rec.key, escape(rec.task), status_text(state), str(rec.attempt), escape(where_text(rec)),
            escape(rec.group or ""), duration(took), (rec.parent or "")[:8],
        )
    return table


def tracebacks(run: RecordedRun[object], records: list[RecordedAction]) -> RenderableType:
    """The tracebacks of the first failed actions, each cut to its last lines."""
    parts: list[RenderableType] = []
    shown = [r for r in records if r.error is not None and r.error.traceback][:TRACEBACKS_SHOWN]
    for rec in shown:
        parts.append(Text(f"traceback of {rec.key} ({rec.task}, attempt {rec.attempt}):", style="bold"))
        parts.append(Text(traceback_tail(rec.error.traceback if rec.error else ""), style="red"))
    rest = len(records) - len(shown)
    if rest > 0 and shown:
        parts.append(Text(f"(tracebacks of the other {rest}: shoal show {run.id} --json)", style="dim"))
    return Group(*parts)


def page_note(what: str, shown: int, total: int, offset: int) -> Text | None:
    """``100 of 250 actions shown (from 1); use --offset 100 for more``, when a listing is cut."""
    if shown >= total and offset == 0:
        return None
    text = f"{shown:,} of {total:,} {what} shown"
    if offset:
        text += f" (from {offset + 1:,})"
    if offset + shown < total:
        text += f"; use --offset {offset + shown} for more"
    return Text(text, style="dim")


def show(run: RecordedRun[object], failed: list[RecordedAction], *, actions: bool, offset: int = 0) -> RenderableType:
    parts: list[RenderableType] = [run_panel(run), Text(), task_tree(run)]
    if failed:
        parts += [Text(), failed_table(failed)]
        total_failed = sum(t.failed for t in run.tasks)
        if total_failed > len(failed):
            parts.append(Text(f"{len(failed):,} of {total_failed:,} failed actions shown (the first started)", style="dim"))
        parts += [Text(), tracebacks(run, failed)]
    if actions:
        parts += [Text(), actions_table(run.action_records)]
        note = page_note("actions", len(run.action_records), run.action_count, offset)
        if note is not None:
            parts.append(note)
    return Group(*parts)


# -- JSON ------------------------------------------------------------------------------


def _attempt_json(a: Any) -> dict[str, Any]:
    return {
        "attempt": a.attempt, "state": a.state, "target": a.target, "backend": a.backend, "where": a.where,
        "started_at": unix(a.started_at), "finished_at": unix(a.finished_at), "ranks": list(a.ranks),
    }


def _action_json(rec: RecordedAction) -> dict[str, Any]:
    # The journal's fields, times as Unix timestamps; outputs are not
    # included (``output_kind`` says how each is stored).
    return {
        "run_id": rec.run_id, "key": rec.key, "parent": rec.parent, "task": rec.task, "state": rec.state,
        "attempt": rec.attempt, "run_attempt": rec.run_attempt, "started": unix(rec.started_at),
        "finished": unix(rec.finished_at), "group": rec.group, "output_kind": rec.output_kind,
        "error": None if rec.error is None else msgspec.to_builtins(rec.error), "kind": rec.kind,
        "cache_key": rec.cache_key, "cached": rec.cached, "attempts": [_attempt_json(a) for a in rec.attempts],
    }


def run_json(
    run: RecordedRun[object],
    failed: list[RecordedAction] | None = None,
    *,
    actions: bool = False,
    offset: int = 0,
) -> dict[str, Any]:
    """A run as JSON: ``actions`` is always the run's number of actions (as in ``shoal runs``)."""
    data: dict[str, Any] = {
        "id": run.id, "task": run.task, "root": run.root, "status": run.status, "attempt": run.attempt,
        "started": unix(run.started_at), "finished": unix(run.finished_at), "tags": list(run.tags),
        "actions": run.action_count, "error": None if run.error is None else msgspec.to_builtins(run.error),
        "attempt_started": unix(run.attempt_started_at), "bundle": run.bundle, "bundle_size": run.bundle_size,
        "duration": run.duration, "attempt_duration": run.attempt_duration,
    }
    if failed is not None:
        data["tasks"] = msgspec.to_builtins(run.tasks)
        data["failed_actions"] = [_action_json(r) for r in failed]
        positional = [v for k, v in run.args.items() if k.isdigit()]
        named = {k: v for k, v in run.args.items() if not k.isdigit()}
        shown = bool(run.args) or not (run.note and "arguments" in run.note)
        data["args"] = _jsonable({"args": positional, "kwargs": named}) if shown else None
        data["result"] = _jsonable(run.result) if run.status == "succeeded" else None
    if actions:
        data["action_records"] = [_action_json(r) for r in run.action_records]
        data["action_offset"] = offset
    return data


def _jsonable(value: Any) -> Any:
    """``value`` if JSON can carry it, else its repr."""
    try:
        msgspec.json.encode(value)
    except (TypeError, msgspec.EncodeError):
        return repr(value)
    return value


def logs_json(lines: Iterable[LogLine]) -> list[dict[str, Any]]:
    return [
        {
            "action": line.action, "task": line.task, "at": line.at.timestamp(), "stream": line.stream,
            "text": line.text, "rank": line.rank,
        }
        for line in lines
    ]


def json_text(value: Any) -> str:
    """Indented JSON (msgspec's encoding, so Structs and datetimes work)."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
