"""Running a task, or resuming a run, from the command line: progress, Ctrl-C, outcome.

One event loop per command (``asyncio.run``).  Python's runner turns the
first Ctrl-C into a cancellation of the main coroutine; here that cancels
the run (every action is cancelled and recorded so, see
:meth:`Engine.wait_run`), the journal is closed cleanly, and the outcome
says ``interrupted`` so that the command can print how to resume and exit
with 130.  A second Ctrl-C while that happens aborts at once.  SIGTERM
does what the first Ctrl-C does.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

from .._engine import Engine
from .._signals import SigtermWatch
from ._params import check_offload_targets, check_offload_tasks, module_tasks
from ._progress import Progress

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from rich.console import Console

    from .._run import Run
    from .._task import Task

__all__ = ["Outcome", "resume_with_progress", "run_with_progress"]

class Outcome:
    """How a command's run ended: the run (None if it never started) and whether Ctrl-C stopped it."""

    def __init__(self, run: Run | None, interrupted: bool, durable: bool, *, already_done: bool = False) -> None:
        self.run = run
        self.interrupted = interrupted
        self.durable = durable
        #: The run had finished before (resume of a run that succeeded): nothing ran.
        self.already_done = already_done


async def _follow(
    engine: Engine,
    console: Console,
    live: bool,
    start: Callable[[], Awaitable[Run]],
    finish: Callable[[Run], Awaitable[Any]],
) -> Outcome:
    progress = Progress(engine, console, live=live)
    run: Run | None = None
    display: asyncio.Task[None] | None = None
    interrupted = False
    already_done = False
    try:
        run = await start()
        if run.done:
            already_done = True
            return Outcome(run, False, engine.durable, already_done=True)
        display = asyncio.create_task(progress.follow(run))
        # SIGTERM (a supervisor stopping the command) cancels like Ctrl-C.
        await SigtermWatch().guard(finish(run))
    except asyncio.CancelledError:
        # Ctrl-C: the run is cancelled and recorded by now (wait_run does
        # that before re-raising); finish cleanly instead of unwinding.
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        interrupted = True
    finally:
        if display is not None:
            await display
        progress.close()
    return Outcome(run, interrupted, engine.durable, already_done=already_done)


async def run_with_progress(
    task: Task[Any, Any],
    args: Sequence[Any],
    kwargs: dict[str, Any],
    *,
    tags: Sequence[str],
    store: str | None,
    max_concurrency: int | None,
    offload: Mapping[str, str],
    console: Console,
    live: bool,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Outcome:
    """Run ``task`` with a progress display on ``console`` until it finishes or Ctrl-C.

    ``offload`` is ``--offload``'s ``{TASK: TARGET}``; a target that config
    does not define is a :class:`~engine.ConfigError` before the run starts.
    ``overrides`` is ``--with``'s ``{TASK: {OPTION: VALUE}}``.
    """
    async with Engine(
        store, max_concurrency=max_concurrency, offload=offload or None, overrides=overrides
    ) as eng:
        check_offload_targets(dict(offload), eng.config)
        placed = {name: options["offload"] for name, options in (overrides or {}).items() if "offload" in options}
        check_offload_targets(placed, eng.config, flag="--with {task}.offload={target}")

        async def start() -> Run:
            return await eng.submit(task, *args, tags=tags, **kwargs)

        return await _follow(eng, console, live, start, eng.wait_run)


async def _root_task(eng: Engine, run_id: str, offload: Mapping[str, str]) -> Task[Any, Any]:
    """The root task of ``run_id``, imported again, once every task ``offload`` names is in its file."""
    from .._loader import load_root

    journal = await eng.journal()
    record, _, _ = await journal.load_run(run_id)
    task = load_root(record.root, record.root_file)
    module = sys.modules.get(task.fn.__module__)
    where = record.root_file or task.fn.__module__
    check_offload_tasks(dict(offload), module_tasks(module) if module else [task.name], where)
    return task


async def resume_with_progress(
    run_id: str,
    *,
    store: str | None,
    max_concurrency: int | None,
    offload: Mapping[str, str],
    console: Console,
    live: bool,
) -> Outcome:
    """Resume ``run_id`` with a progress display; a run that already succeeded is returned as is.

    With ``offload``, the run's root task is imported first, so that a task
    its file does not have is refused (:class:`UsageProblem`) before anything runs.
    """
    async with Engine(store, max_concurrency=max_concurrency, offload=offload or None) as eng:
        check_offload_targets(dict(offload), eng.config)
        root = await _root_task(eng, run_id, offload) if offload else None

        async def start() -> Run:
            return await eng.submit_resume(run_id, task=root)

        return await _follow(eng, console, live, start, eng.wait_run)
