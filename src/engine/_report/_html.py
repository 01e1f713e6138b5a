"""The report as one self-contained HTML page: tables written here, the timeline drawn by inline JS.

The tables (summary, per-task statistics, failures) are plain HTML, so
the page says what matters even with scripts off; the script
(``report.js``, inlined with ``report.css``) draws the timeline on a
canvas and shows an action's details and logs when it is clicked.  Data
travels as one JSON document in a ``<script type="application/json">``
element with every ``<`` escaped, so no value from the journal can end
the element or open markup.
"""

from __future__ import annotations

import datetime as dt
import html
from importlib.resources import files
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from ._collect import Collected

__all__ = ["VALUE_CHARS", "render"]

#: Longest argument or result shown, in characters of JSON.
VALUE_CHARS = 4_000
#: Longest traceback shown per failed action.
TRACEBACK_CHARS = 20_000


def render(data: Collected, *, version: str) -> str:
    """The page for ``data``."""
    here = files(__package__)
    css = here.joinpath("report.css").read_text(encoding="utf-8")
    js = here.joinpath("report.js").read_text(encoding="utf-8")
    s = data.summary
    title = f"shoal run {s.id}: {s.task} {s.status}"
    body = "\n".join(
        [
            _header(data),
            _values(data),
            _timeline(data),
            _task_table(data),
            _failures(data),
            '<section id="logs"><h2>Logs</h2><p class="note" id="logs-hint">'
            + html.escape(_logs_hint(data))
            + '</p><pre id="log-view" class="log"></pre></section>',
            f'<footer>Written by shoal {html.escape(version)} on {_when(None)}.</footer>',
        ]
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{css}</style></head>\n<body>\n{body}\n"
        f'<script type="application/json" id="report-data">{_data_json(data)}</script>\n'
        f"<script>{js}</script>\n</body></html>\n"
    )


def _header(data: Collected) -> str:
    s = data.summary
    rows = [
        ("Run", s.id),
        ("Status", s.status),
        ("Root task", s.task),
        ("Import path", s.root + (f" ({data.root_file})" if data.root_file else "")),
        ("Tags", ", ".join(s.tags) if s.tags else "(none)"),
        ("Started", _when(s.started)),
        ("Finished", _when(s.finished) if s.finished is not None else "(not finished)"),
        ("Duration", _seconds(s.duration) if s.duration is not None else "(running)"),
        ("Attempt", str(s.attempt)),
        ("Actions", f"{data.actions:,}"),
    ]
    if s.attempt > 1 and s.attempt_duration is not None:
        rows.insert(8, ("Latest attempt took", _seconds(s.attempt_duration)))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{_cell(k, v)}</td></tr>" for k, v in rows)
    error = ""
    if s.error is not None:
        error = (
            f'<div class="error"><b>{html.escape(s.error.type)}</b>: {html.escape(s.error.message)}'
            + (f"<pre>{html.escape(_cut(s.error.traceback, TRACEBACK_CHARS))}</pre>" if s.error.traceback else "")
            + "</div>"
        )
    return (
        f'<header><h1>Run <code>{html.escape(s.id)}</code> '
        f'<span class="badge {html.escape(s.status)}">{html.escape(s.status)}</span></h1>'
        f'<table class="summary" id="summary">{cells}</table>{error}</header>'
    )


def _cell(key: str, value: str) -> str:
    if key == "Status":
        return f'<span class="badge {html.escape(value)}">{html.escape(value)}</span>'
    return html.escape(value)


def _values(data: Collected) -> str:
    args = html.escape(data.args_note) if data.args_note else f"<pre>{html.escape(_json(data.args))}</pre>"
    if data.has_result:
        result = f"<pre>{html.escape(_json(data.result))}</pre>"
    else:
        result = f'<p class="note">{html.escape(data.result_note or "(none)")}</p>'
    return (
        '<section id="values"><div><h2>Arguments</h2>' + args + "</div>"
        '<div><h2>Result</h2>' + result + "</div></section>"
    )


def _timeline(data: Collected) -> str:
    if data.binned:
        how = (
            f"{data.actions:,} actions in {len(data.lanes)} lanes, drawn in bins: the height of a bar is how "
            "many of the lane's actions ran at once (on average over the bin), the line how many started; red "
            "marks failures, orange retries. Click a bin for its figures."
        )
    else:
        how = (
            "One box per action, one lane per task and group (overlapping actions stacked). Click an action "
            "for its attempts, where each ran, and its logs."
        )
    if data.unplaced:
        how += f" {data.unplaced:,} action(s) never started and are not drawn."
    legend = "".join(
        f'<span class="key"><i class="{c}"></i>{label}</span>'
        for c, label in [
            ("succeeded", "succeeded"),
            ("failed", "failed"),
            ("cancelled", "cancelled"),
            ("running", "running"),
            ("cached", "cached"),
            ("retried", "retried"),
        ]
    )
    return (
        '<section id="timeline-section"><h2>Timeline</h2>'
        f'<p class="note">{html.escape(how)}</p><div class="legend">{legend}</div>'
        '<div id="timeline-wrap"><canvas id="timeline" height="60"></canvas><div id="tip"></div></div>'
        '<div id="detail" class="detail"><p class="note">Nothing selected.</p></div></section>'
    )


def _task_table(data: Collected) -> str:
    head = (
        "<tr><th>Task</th><th>Actions</th><th>Succeeded</th><th>Failed</th><th>Cancelled</th>"
        "<th>Cached</th><th>Retries</th><th>p50</th><th>p95</th><th>Max</th></tr>"
    )
    rows = []
    for stats in sorted(data.tasks.values(), key=lambda t: -t.count):
        spread = stats.spread()
        p50, p95, top = ("-", "-", "-") if spread is None else tuple(_seconds(x) for x in spread)
        rows.append(
            f"<tr><td>{html.escape(stats.task)}</td><td>{stats.count:,}</td><td>{stats.succeeded:,}</td>"
            f"<td>{stats.failed:,}</td><td>{stats.cancelled:,}</td><td>{stats.cached:,}</td>"
            f"<td>{stats.retries:,}</td><td>{p50}</td><td>{p95}</td><td>{top}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="10" class="note">No actions recorded.</td></tr>')
    return (
        '<section><h2>Tasks</h2><table class="grid" id="tasks"><thead>'
        + head + "</thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _failures(data: Collected) -> str:
    if not data.failed:
        return '<section><h2>Failed actions</h2><p class="note" id="no-failures">None.</p></section>'
    rows = []
    for rec in data.failed:
        err = rec.error
        kind, message, tb = (err.type, err.message, err.traceback) if err is not None else ("", "", "")
        rows.append(
            f'<tr class="pick" data-key="{html.escape(rec.key)}"><td><code>{html.escape(rec.key)}</code></td>'
            f"<td>{html.escape(rec.task)}</td><td>{rec.attempt}</td><td><b>{html.escape(kind)}</b>: "
            f"{html.escape(message)}"
            + (f"<details><summary>traceback</summary><pre>{html.escape(_cut(tb, TRACEBACK_CHARS))}</pre></details>" if tb else "")
            + "</td></tr>"
        )
    more = ""
    if data.failed_total > len(data.failed):
        more = (
            f'<p class="note">{data.failed_total - len(data.failed):,} more failed action(s): '
            f"<code>shoal show {html.escape(data.summary.id)} --json</code> lists them.</p>"
        )
    return (
        '<section><h2>Failed actions</h2><table class="grid" id="failures"><thead><tr><th>Action</th>'
        "<th>Task</th><th>Attempts</th><th>Error</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table>" + more + "</section>"
    )


def _logs_hint(data: Collected) -> str:
    if not data.logs:
        return "The run's actions printed and logged nothing."
    hint = f"{data.logs_total:,} line(s) from {len(data.logs):,} action(s). Click an action to see its logs."
    if data.logs_cut:
        hint += f" The report keeps the first {data.logs_total:,}; 'shoal logs {data.summary.id}' has them all."
    return hint


def _data_json(data: Collected) -> str:
    doc = {
        "run": data.summary.id,
        "t0": data.t0,
        "span": data.span,
        "binned": data.binned,
        "lanes": [
            {"task": lane.task, "group": lane.group, **(
                {"busy": lane.busy, "started": lane.started, "failed": lane.failed, "retried": lane.retried,
                 "places": lane.places} if data.binned else {}
            )}
            for lane in data.lanes
        ],
        "items": data.items,
        "keys": data.keys,
        "logs": data.logs,
        "logs_cut": data.logs_cut,
    }
    # Every "<" escaped: nothing inside can close the script element.
    return msgspec.json.encode(doc).decode().replace("<", "\\u003c")


def _json(value: Any) -> str:
    try:
        text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
    except (TypeError, msgspec.EncodeError):
        text = repr(value)
    return _cut(text, VALUE_CHARS)


def _cut(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... ({len(text) - limit:,} more characters; 'shoal show RUN --json' has it whole)"


def _when(ts: float | None) -> str:
    moment = dt.datetime.now(dt.UTC) if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    if value < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"
