"""Progress of a running run: a live rich display, or plain periodic lines.

The display reads the run's per-task counters a few times a second (never
anything per action), so it costs the engine nothing measurable whatever
the number of actions.  Failures are the exception: they are printed as they
happen, from the engine's event stream, with only failure events queued.

On a terminal it is a rich ``Live`` table, one row per task under its
``engine.group`` (pending, running, committing, succeeded, failed,
cancelled, cached, rate, elapsed) above an overall bar.  Elsewhere (a pipe,
a CI log) it prints one line per task every ``plain_every`` seconds,
``[12.3s] shards/square: 4000/10000 done, 0 failed``, and nothing for a
run that ends sooner.  Either way it ends with a one-line summary.

What the figures mean, so that they stay true at a million actions:

- an action counts as *done* as soon as its work is over; *committing*
  shows those of them whose record waits for the journal's next commit
  (they are neither running nor yet durable), and *succeeded* only those
  whose record is durable;
- the total includes the calls an ``engine.map`` over a sized iterable has
  not made yet, so the bar does not grow as the map submits;
- the rate is actions done per second over the last :data:`RATE_WINDOW`
  seconds, whether or not their records have committed; for a task that has
  finished, its average over its elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ._render import duration

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._engine import Engine
    from .._events import ActionEvent, TaskCounts
    from .._run import Run

__all__ = ["Progress"]

#: Seconds between two refreshes of the live display.
LIVE_EVERY = 0.25
#: Seconds between two batches of plain progress lines.
PLAIN_EVERY = 2.0
#: Failures printed one by one; after that only counted (``shoal show`` lists them).
MAX_FAILURES_SHOWN = 20
#: Seconds of history behind the rate column.
RATE_WINDOW = 3.0


class _TaskRate:
    """Recent (time, finished) samples of one task, for its rate and elapsed time."""

    __slots__ = ("finished", "first_seen", "samples", "total")

    def __init__(self, now: float) -> None:
        self.first_seen = now
        self.finished: float | None = None
        self.total = 0
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, counts: TaskCounts) -> None:
        # Finished work, not durable records: a commit that lags behind must
        # not make the rate drop to 0/s while actions keep completing.
        done = self.total = counts.finished
        samples = self.samples
        samples.append((now, done))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW:
            samples.popleft()
        active = counts.pending + counts.running + counts.upcoming
        if active == 0 and self.finished is None:
            self.finished = now
        elif active:
            self.finished = None

    def rate(self) -> float | None:
        """Finished per second; None while too little was seen to tell."""
        if self.finished is not None:
            # Over: its average, rather than a window that has emptied.
            took = self.finished - self.first_seen
            return self.total / took if took > 0 else None
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def elapsed(self, now: float) -> float:
        return (self.finished or now) - self.first_seen


class Progress:
    """Follows one run on ``console`` (see the module docstring).

    Create it before the run starts (it subscribes to failure events at
    once), then ``await progress.follow(run)``; it returns when the run has
    finished and the summary is printed.  ``live`` picks the rich display;
    ``clock`` is injected for tests.
    """

    def __init__(
        self,
        engine: Engine,
        console: Console,
        *,
        live: bool,
        plain_every: float = PLAIN_EVERY,
        live_every: float = LIVE_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.console = console
        self.live = live
        self.interval = live_every if live else plain_every
        self.clock = clock
        # Only failures: the engine then builds no event for the others.
        self.failures = engine.events(kinds={"failed"})
        self.failures_seen = 0
        self._rates: dict[tuple[str | None, str], _TaskRate] = {}
        self._start = clock()
        self._out: Console = console

    def close(self) -> None:
        self.failures.close()

    async def follow(self, run: Run) -> None:
        self._start = self.clock()
        waiter = asyncio.ensure_future(run.wait())
        printer = asyncio.ensure_future(self._print_failures(run))
        try:
            if self.live:
                await self._follow_live(run, waiter)
            else:
                await self._follow_plain(run, waiter)
        finally:
            waiter.cancel()
            self.failures.close()
            # Print the failures still queued before the summary.
            with contextlib.suppress(asyncio.CancelledError):
                await printer
        self.console.print(self.summary(run), highlight=False)

    async def _follow_live(self, run: Run, waiter: asyncio.Future[Any]) -> None:
        with Live(
            self.render(run), console=self.console, auto_refresh=False, transient=False,
            redirect_stdout=True, redirect_stderr=True,
        ) as live:
            self._out = live.console
            try:
                while not waiter.done():
                    await asyncio.wait([waiter], timeout=self.interval)
                    live.update(self.render(run), refresh=True)
            finally:
                self._out = self.console

    async def _follow_plain(self, run: Run, waiter: asyncio.Future[Any]) -> None:
        while True:
            await asyncio.wait([waiter], timeout=self.interval)
            if waiter.done():
                return
            for line in self.plain_lines(run):
                self.console.print(line, highlight=False, markup=False)

    async def _print_failures(self, run: Run) -> None:
        async for event in self.failures:
            if event.run_id != run.id:
                continue
            self.failures_seen += 1
            if self.failures_seen <= MAX_FAILURES_SHOWN:
                self._out.print(failure_line(event), highlight=False)
            elif self.failures_seen == MAX_FAILURES_SHOWN + 1:
                self._out.print(
                    f"[red]... more failures; list them with 'shoal show {run.id}'[/red]",
                    highlight=False,
                )

    # -- rendering -------------------------------------------------------------

    def _sample(self, run: Run, now: float) -> list[tuple[TaskCounts, _TaskRate]]:
        """Every task's counters with its rate, grouped: ungrouped tasks first, then each group."""
        rows = []
        for counts in list(run.counters.values()):
            key = (counts.group, counts.name)
            rate = self._rates.get(key)
            if rate is None:
                rate = self._rates[key] = _TaskRate(now)
            rate.update(now, counts)
            rows.append((counts, rate))
        # Stable: within a group, tasks keep the order they were first called in.
        order: dict[str | None, int] = {None: 0}
        for counts, _ in rows:
            order.setdefault(counts.group, len(order))
        rows.sort(key=lambda row: order[row[0].group])
        return rows

    def render(self, run: Run) -> RenderableType:
        """The live display: a table of tasks under their groups, and an overall bar."""
        now = self.clock()
        table = Table(box=None, padding=(0, 1), header_style="bold")
        table.add_column("task")
        for name in (
            "pending", "running", "committing", "succeeded", "failed", "cancelled", "cached", "rate", "elapsed",
        ):
            table.add_column(name, justify="right")
        total = done = failed = committing = 0
        group: str | None = None
        for counts, rate in self._sample(run, now):
            if counts.unit == "actions":  # parallel_map items have their own row only
                total += counts.total + counts.upcoming
                done += counts.finished
                failed += counts.failed
                committing += counts.committing
            if counts.group != group:
                group = counts.group
                table.add_row(f"[magenta]group {escape(group or '')}[/magenta]")
            pending = counts.pending + counts.upcoming
            table.add_row(
                ("  " if group else "") + escape(_label(counts)),
                f"{pending:,}",
                f"{counts.running:,}",
                f"{counts.committing:,}",
                f"[green]{counts.succeeded:,}[/green]" if counts.succeeded else "0",
                f"[red]{counts.failed:,}[/red]" if counts.failed else "0",
                f"[yellow]{counts.cancelled:,}[/yellow]" if counts.cancelled else "0",
                f"{counts.cached:,}",
                "-" if (per_second := rate.rate()) is None else f"{per_second:,.0f}/s",
                duration(rate.elapsed(now)),
            )
        bar = ProgressBar(total=max(total, 1), completed=done, width=40)
        line = Table.grid(padding=(0, 1))
        line.add_row(
            bar,
            Text(f"{done:,}/{total:,} actions done", style="bold"),
            Text(f"{committing:,} committing", style="dim"),
            Text(f"{failed:,} failed", style="red" if failed else "dim"),
            Text(duration(now - self._start), style="dim"),
        )
        return Group(table, line)

    def plain_lines(self, run: Run) -> list[str]:
        """One line per task: ``[12.3s] shards/square: 4000/10000 done, 0 failed``."""
        now = self.clock()
        stamp = f"[{now - self._start:.1f}s]"
        lines = []
        for counts, _ in self._sample(run, now):
            name = _label(counts) if counts.group is None else f"{counts.group}/{_label(counts)}"
            total = counts.total + counts.upcoming
            waiting = f" ({counts.committing:,} committing)" if counts.committing else ""
            cancelled = f", {counts.cancelled:,} cancelled" if counts.cancelled else ""
            lines.append(
                f"{stamp} {name}: {counts.finished}/{total} done{waiting}, {counts.failed} failed{cancelled}"
            )
        return lines

    def summary(self, run: Run) -> str:
        """The closing line: status, time, and the actions by outcome."""
        stats = run.stats
        # This attempt's own time, up to its final commit; a resumed run
        # also says how long it has taken since its first attempt began.
        finished = run.finished_at or run.attempt_started_at
        took = duration((finished - run.attempt_started_at).total_seconds())
        if run.attempt_started_at != run.started_at:
            took += f" (attempt {run.attempt}; {duration((finished - run.started_at).total_seconds())} since the first)"
        actions = stats["succeeded"] + stats["failed"] + stats["cancelled"]
        parts = [f"{stats['succeeded']:,} succeeded"]
        for key in ("failed", "cancelled", "cached", "replayed", "retries"):
            if stats[key]:
                label = "retry" if key == "retries" and stats[key] == 1 else key
                parts.append(f"{stats[key]:,} {label}")
        counts = f"{actions:,} action{'s' if actions != 1 else ''}: {', '.join(parts)}"
        counts += _items(run)
        colour = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(run.status, "white")
        return f"[{colour}]run {run.id} {run.status}[/{colour}] in {took} ({counts})"


def _label(counts: TaskCounts) -> str:
    """A task's name in the display; a gang's says its ranks (``train (4 ranks)``), counted as one action."""
    return counts.name if counts.ranks == 1 else f"{counts.name} ({counts.ranks} ranks)"


def _items(run: Run) -> str:
    """``; 5 parallel_map items: 5 succeeded``, or nothing (items are not actions)."""
    by_state = {"succeeded": 0, "failed": 0, "cancelled": 0}
    for counts in list(run.counters.values()):
        if counts.unit == "items":
            by_state["succeeded"] += counts.succeeded
            by_state["failed"] += counts.failed
            by_state["cancelled"] += counts.cancelled
    n = sum(by_state.values())
    if not n:
        return ""
    parts = [f"{by_state['succeeded']:,} succeeded"]
    parts += [f"{by_state[k]:,} {k}" for k in ("failed", "cancelled") if by_state[k]]
    return f"; {n:,} parallel_map item{'s' if n != 1 else ''}: {', '.join(parts)}"


def failure_line(event: ActionEvent) -> str:
    """``✗ square 3f2a…: ValueError: bad input`` (the error's first line only)."""
    first = (event.error or "failed").strip().splitlines()[0] if event.error else "failed"
    return f"[red]✗[/red] {escape(event.task)} {event.action_id}: {escape(first)}"
