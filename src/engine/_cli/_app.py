"""The ``shoal`` command: run, runs, show, logs, resume, cancel.

Exit codes: 0 when the run succeeded (or the query worked), 1 when the run
failed or was cancelled (or the engine failed), 2 for a usage error (bad
file, task, option or value, unknown run id), 130 when Ctrl-C stopped the
run.  Progress, failures and summaries go to stderr; results and ``--json``
documents go to stdout, so that ``shoal run flow.py --json > out.json``
gives clean JSON.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import msgspec
import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .._engine import Engine
from .._errors import ConfigError, EngineError, ImportFailed, InputError, RunNotFound
from . import _render as render
from ._params import HelpRequested, UsageProblem, parse_task_args, pick_task, task_options
from ._session import Outcome, resume_with_progress, run_with_progress

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._journal import Journal
    from .._task import Task

__all__ = ["build_app", "main"]

T = TypeVar("T")

#: Exit code after Ctrl-C, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED = 130

StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="Journal: a SQLite file, or 'memory' (default: .shoal/shoal.db here, or under $SHOAL_HOME).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ResultJsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
MaxConcurrencyOption = Annotated[
    int | None, typer.Option("--max-concurrency", min=1, help="Most actions running at once.")
]

RUN_HELP = """Run a task from a Python file: shoal run FILE[:TASK] [--PARAM VALUE ...].

The task is TASK, or else the only task in the file, or else the one named
'main'.  Its parameters are options (see 'shoal run FILE --help'): numbers
and text as given, bools as --flag/--no-flag, lists by repeating the option
or as a JSON array, structured values as JSON.  A task parameter named like
one of the options below is given after '--'.  Exits 0 when the run
succeeded, 1 when it failed, 130 after Ctrl-C (the run can be resumed).
"""

USAGE = {
    "run": "FILE[:TASK] [--PARAM VALUE ...] [OPTIONS]",
    "resume": "RUN [OPTIONS]",
    "show": "RUN [OPTIONS]",
    "logs": "RUN [ACTION] [OPTIONS]",
    "cancel": "RUN [OPTIONS]",
}

RUN_EPILOG = (
    "Run options: --tag TEXT (repeatable), --max-concurrency N, --store PATH|memory, "
    "--json (print the result as JSON); see 'shoal run --help'."
)


def _stderr() -> Console:
    # Messages are not wrapped at 80 columns when stderr is a pipe: a log
    # or a test reads them whole.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:
        # A pipe or a file has no width: do not squeeze tables into 80 columns.
        console.width = max(console.width, 160)
    return console


def usage_error(message: str, command: str) -> NoReturn:
    """Say what is wrong with the command line, and exit with code 2 (as click does)."""
    console = _stderr()
    console.print(f"Usage: shoal {command} {USAGE.get(command, '[OPTIONS]')}", markup=False, soft_wrap=True)
    console.print(f"Try 'shoal {command} --help' for help.", markup=False)
    console.print(f"\n[red]Error:[/red] {render.escape_markup(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _query(command: str, store: str | None, what: Callable[[Engine], Awaitable[T]]) -> T:
    """Run one journal query; engine errors become usage errors or exit code 1."""

    async def go() -> T:
        async with Engine(store) as eng:
            return await what(eng)

    try:
        return asyncio.run(go())
    except (RunNotFound, ConfigError) as exc:
        usage_error(str(exc), command)
    except EngineError as exc:
        if "keeps no journal" in str(exc):
            usage_error(str(exc), command)
        _stderr().print(f"[red]error:[/red] {render.escape_markup(str(exc))}")
        raise typer.Exit(1) from None


def _journal_path(store: str | None) -> Path | None:
    """The journal file a command would read, or None for the memory store."""
    if store == "memory":
        return None
    return Path(Engine(store).store)


async def _open(eng: Engine, run_id: str | None = None) -> Journal:
    """The engine's journal, without creating one where none exists."""
    path = _journal_path(eng.store if eng.durable else "memory")
    if path is not None and not path.exists():
        if run_id is not None:
            raise RunNotFound(
                f"no run {run_id!r}: there is no journal at {path} yet; list runs with 'shoal runs' "
                f"(or pass --store)"
            )
        raise _NoJournal(str(path))
    return await eng.journal()


class _NoJournal(Exception):
    """No journal file yet: nothing was ever run with this store."""


def _finish(outcome: Outcome, console: Console, store: str | None) -> None:
    """Exit with the code of ``outcome``, after saying how to resume when that makes sense."""
    run = outcome.run
    resume = f"shoal resume {run.id}" + (f" --store {store}" if store else "") if run else ""
    if outcome.interrupted:
        if run is not None and outcome.durable:
            console.print(f"interrupted; resume the run with: {resume}")
        else:
            console.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED)
    assert run is not None
    if run.status == "succeeded":
        return
    if run.status == "failed" and run.error is not None:
        error = run.error
        text = f"{type(error).__qualname__}: {error}".strip().splitlines()
        console.print(f"[red]error:[/red] {render.escape_markup(text[0] if text else '')}")
    if outcome.durable:
        lead = "after fixing it, resume" if run.status == "failed" else "resume"
        console.print(f"{lead} the run with: {resume}")
    raise typer.Exit(1)


def _print_result(result: Any, as_json: bool) -> None:
    if as_json:
        try:
            typer.echo(msgspec.json.encode(result).decode())
        except (TypeError, msgspec.EncodeError):
            typer.echo(msgspec.json.encode(repr(result)).decode())
        return
    if result is None:
        return
    typer.echo(result if isinstance(result, str) else repr(result))


def task_help(target: str, task: Task[Any, Any]) -> RenderableType:
    """``shoal run FILE --help``: the task's options, from its signature."""
    table = Table(box=None, padding=(0, 2), show_header=False)
    for opt in task_options(task):
        table.add_row(opt.usage, render.escape_markup(opt.help))
    table.add_row("--help", "Show this message and exit.")
    parts: list[RenderableType] = [Text(f"Usage: shoal run {target} [OPTIONS]\n", style="bold")]
    doc = (task.fn.__doc__ or "").strip()
    if doc:
        parts.append(Text(doc + "\n"))
    parts += [Text(f"Options of task {task.name!r}:"), table, Text("\n" + RUN_EPILOG)]
    return Group(*parts)


def build_app() -> typer.Typer:
    """The ``shoal`` Typer application (built on demand: no module-level state)."""
    app = typer.Typer(
        name="shoal",
        help="shoal: run, inspect, resume and cancel workflow runs.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.command(
        "run",
        help=RUN_HELP,
        add_help_option=False,
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def run_cmd(
        ctx: typer.Context,
        target: Annotated[str | None, typer.Argument(metavar="FILE[:TASK]", show_default=False)] = None,
        tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag the run (repeatable).")] = None,
        max_concurrency: MaxConcurrencyOption = None,
        store: StoreOption = None,
        as_json: ResultJsonOption = False,
    ) -> None:
        argv = list(ctx.args)
        if target is None or target.startswith("-"):
            if target in ("--help", "-h") or "--help" in argv:
                typer.echo(ctx.get_help())
                raise typer.Exit(0)
            usage_error("missing argument FILE[:TASK] (the Python file that defines the task)", "run")
        try:
            task = pick_task(target)
            parsed = parse_task_args(task, argv)
        except HelpRequested:
            _stdout().print(task_help(target, task))
            raise typer.Exit(0) from None
        except UsageProblem as exc:
            usage_error(str(exc), "run")
        console = _stderr()
        try:
            outcome = asyncio.run(
                run_with_progress(
                    task, parsed.args, parsed.kwargs, tags=tag or (), store=store,
                    max_concurrency=max_concurrency, console=console, live=console.is_terminal,
                )
            )
        except (InputError, ConfigError, ImportFailed) as exc:
            usage_error(str(exc), "run")
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except EngineError as exc:
            console.print(f"[red]error:[/red] {render.escape_markup(str(exc))}")
            raise typer.Exit(1) from None
        _finish(outcome, console, store)
        assert outcome.run is not None
        _print_result(outcome.run.result, as_json)

    @app.command("resume")
    def resume_cmd(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
        max_concurrency: MaxConcurrencyOption = None,
        store: StoreOption = None,
        as_json: ResultJsonOption = False,
    ) -> None:
        """Continue a failed, cancelled or interrupted run where it stopped (with progress).

        Actions that succeeded before return their recorded outputs without
        running.  Exits like 'shoal run': 0 succeeded, 1 failed, 130 Ctrl-C.
        """
        console = _stderr()
        if store != "memory":
            path = _journal_path(store)
            if path is not None and not path.exists():
                usage_error(
                    f"no run {run_id!r}: there is no journal at {path} yet; list runs with 'shoal runs'",
                    "resume",
                )
        try:
            outcome = asyncio.run(
                resume_with_progress(
                    run_id, store=store, max_concurrency=max_concurrency, console=console,
                    live=console.is_terminal,
                )
            )
        except (RunNotFound, InputError, ConfigError, ImportFailed) as exc:
            usage_error(str(exc), "resume")
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except EngineError as exc:
            if "keeps no journal" in str(exc):
                usage_error(str(exc), "resume")
            console.print(f"[red]error:[/red] {render.escape_markup(str(exc))}")
            raise typer.Exit(1) from None
        run = outcome.run
        if run is not None and outcome.already_done:
            console.print(f"run {run.id} had already succeeded; nothing to do")
        _finish(outcome, console, store)
        assert run is not None
        _print_result(run.result, as_json)

    @app.command("runs")
    def runs_cmd(
        status: Annotated[
            str | None,
            typer.Option("--status", help="Only runs with this status (running, succeeded, failed, cancelled)."),
        ] = None,
        tag: Annotated[str | None, typer.Option("--tag", help="Only runs with this tag.")] = None,
        limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many runs.")] = 20,
        store: StoreOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """List recent runs, latest first."""
        if status is not None and status not in ("running", "succeeded", "failed", "cancelled"):
            usage_error(
                f"invalid value for --status: expected one of running, succeeded, failed, "
                f"cancelled, got {status!r}",
                "runs",
            )

        async def query(eng: Engine) -> list[Any]:
            try:
                await _open(eng)
            except _NoJournal:
                return []
            return await eng.runs(status=status, tag=tag, limit=limit)

        runs = _query("runs", store, query)
        if as_json:
            typer.echo(render.json_text([render.run_json(r) for r in runs]))
        elif not runs:
            _stderr().print("no runs recorded yet" + (" that match" if status or tag else ""))
        else:
            _stdout().print(render.runs_table(runs))

    @app.command("show")
    def show_cmd(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
        actions: Annotated[bool, typer.Option("--actions", help="Also list the run's actions.")] = False,
        offset: Annotated[int, typer.Option("--offset", min=0, help="First action listed.")] = 0,
        limit: Annotated[int, typer.Option("--limit", min=1, help="Most actions listed.")] = 100,
        store: StoreOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Show one run: summary, tasks by group with counts, failed actions and their errors."""

        async def query(eng: Engine) -> tuple[Any, Any]:
            journal = await _open(eng, run_id)
            summary = await eng.get_run(run_id, actions=actions, offset=offset, limit=limit)
            failed = await journal.failed_actions(run_id, limit=20)
            return summary, failed

        summary, failed = _query("show", store, query)
        if as_json:
            typer.echo(render.json_text(render.run_json(summary, failed, actions=actions)))
        else:
            _stdout().print(render.show(summary, failed, actions=actions))

    @app.command("logs")
    def logs_cmd(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
        action: Annotated[
            str | None, typer.Argument(metavar="[ACTION]", help="Only this action (its id, or a prefix of it).")
        ] = None,
        store: StoreOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Print what the run's actions printed (stdout, stderr) or logged, in order."""

        async def query(eng: Engine) -> list[tuple[str, float, str, str]]:
            journal = await _open(eng, run_id)
            await journal.load_run(run_id)  # RunNotFound for an unknown id
            rows = await journal.logs(run_id)
            if action is not None:
                rows = [r for r in rows if r[0].startswith(action)]
            return rows

        rows = _query("logs", store, query)
        if as_json:
            typer.echo(render.json_text(render.logs_json(rows)))
            return
        if not rows:
            what = f"action {action} of run {run_id}" if action else f"run {run_id}"
            _stderr().print(f"no output recorded for {what}")
            return
        show_action = action is None
        for key, _at, stream, text in rows:
            prefix = f"{key} " if show_action else ""
            mark = "" if stream == "stdout" else f"[{stream}] "
            typer.echo(f"{prefix}{mark}{text}")

    @app.command("cancel")
    def cancel_cmd(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
        wait: Annotated[
            bool, typer.Option("--wait/--no-wait", help="Wait until the run has stopped (up to --timeout).")
        ] = False,
        timeout: Annotated[float, typer.Option("--timeout", min=0, help="Seconds --wait waits at most.")] = 30.0,
        store: StoreOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Ask the process running RUN to cancel it (it checks about twice a second).

        The run's actions are cancelled and recorded so; resume it later
        with 'shoal resume RUN'.  A run that has already finished is left
        as it is.
        """

        async def query(eng: Engine) -> tuple[str, str]:
            journal = await _open(eng, run_id)
            before = await journal.request_cancel(run_id)
            status = before
            if before == "running" and wait:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timeout
                while status == "running" and loop.time() < deadline:
                    await asyncio.sleep(0.1)
                    status = (await eng.get_run(run_id)).status
            return before, status

        before, status = _query("cancel", store, query)
        if as_json:
            typer.echo(render.json_text({"run": run_id, "was": before, "status": status}))
        elif before == "abandoned":
            _stderr().print(
                f"the process that ran {run_id} is gone; recorded the run as cancelled "
                f"(resume it with 'shoal resume {run_id}')"
            )
        elif before != "running":
            _stderr().print(f"run {run_id} is {before}; nothing to cancel")
        elif status == "running" and wait:
            _stderr().print(f"cancel requested for run {run_id}, but it is still running after {timeout:g}s")
            raise typer.Exit(1)
        elif wait:
            _stderr().print(f"run {run_id} is {status}")
        else:
            _stderr().print(f"cancel requested for run {run_id}; it stops within a second")

    return app


def main() -> None:
    """Entry point of the ``shoal`` console script."""
    build_app()(prog_name="shoal")


