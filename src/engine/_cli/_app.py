"""The ``shoal`` command: run, runs, show, logs, resume, cancel.

Exit codes: 0 when the run succeeded (or the query worked), 1 when the run
failed or was cancelled (or the engine failed), 2 for a usage error (bad
file, task, option or value, unknown run id, a SHOAL_HOME that cannot be
used), 130 when Ctrl-C stopped the run.  Progress, failures and summaries
go to stderr; results and ``--json`` documents go to stdout, so that
``shoal run flow.py --json > out.json`` gives clean JSON.  What the tasks
themselves print goes to stderr too (and to the journal) whenever stdout is
not a terminal or ``--json`` is given, and a reader that goes away early
(``shoal run flow.py | head``) fails neither the run nor its exit code.

``shoal run --json`` prints the result as JSON when the run succeeded, and
otherwise a document ``{"run": ID, "status": "failed" | "cancelled",
"error": {"type", "message", "traceback"} | null}``.

After Ctrl-C or ``shoal cancel``, the command exits as soon as the run is
recorded as cancelled: a sync task's thread that is still running (Python
cannot stop a thread) is abandoned, and the command says how many were.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import msgspec
import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from .._engine import Engine
from .._errors import (
    ConfigError,
    EngineError,
    ImportFailed,
    InputError,
    RunNotFound,
    UnusableFolder,
)
from .._overrides import parse_with
from . import _render as render
from ._params import (
    HelpRequested,
    UsageProblem,
    check_offload_tasks,
    file_tasks,
    parse_offload,
    parse_task_args,
    pick_task,
    split_target,
    task_options,
)
from ._session import Outcome, resume_with_progress, run_with_progress

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .._client import LogLine, RecordedAction, RecordedRun
    from .._journal import Journal
    from .._task import Task

__all__ = ["build_app", "main"]

T = TypeVar("T")

#: Exit code after Ctrl-C, as a shell reports a process killed by SIGINT.
EXIT_INTERRUPTED = 130
#: The name prefix of the engine's threads for sync tasks (see Engine.run_sync).
SYNC_THREAD_PREFIX = "shoal-sync"
#: Seconds idle sync-task threads get to exit once their engine has closed.
THREAD_GRACE = 0.5

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
WithOption = Annotated[
    list[str] | None,
    typer.Option(
        "--with",
        metavar="TASK.OPTION=VALUE",
        help="Run TASK with another option for this run: retries, timeout, cache, concurrency, resources "
        "(cpu=2,memory=4Gi,gpu=1) or offload, e.g. --with square.retries=3; repeatable.",
        show_default=False,
    ),
]
OffloadOption = Annotated[
    list[str] | None,
    typer.Option(
        "--offload",
        metavar="TASK=TARGET",
        help="Run TASK's actions on TARGET: an offload target named in config (a tool.shoal.offload.NAME "
        "table), or 'local' for this process (undoes an offload= in code); repeatable.",
    ),
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
    "report": "RUN [-o FILE] [OPTIONS]",
}

RUN_EPILOG = (
    "Run options: --tag TEXT (repeatable), --max-concurrency N, --store PATH|memory, "
    "--offload TASK=TARGET (repeatable), --with TASK.OPTION=VALUE (repeatable), --json (print the result "
    "as JSON); see 'shoal run --help'."
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
    except (RunNotFound, ConfigError, UsageProblem, UnusableFolder) as exc:
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
    # Opened first (reading only, nothing is created): it checks the home
    # folder, so a home that cannot be used is reported as such, not as
    # "no runs recorded yet".
    journal = await eng.journal()
    path = journal.path
    if not path.exists():
        if run_id is not None:
            raise RunNotFound(
                f"no run {run_id!r}: there is no journal at {path} yet; list runs with 'shoal runs' "
                f"(or pass --store)"
            )
        raise _NoJournal(str(path))
    return journal


class _NoJournal(Exception):
    """No journal file yet: nothing was ever run with this store."""


def _echo(text: str) -> None:
    """Print ``text`` on stdout; a reader that has gone away (``| head``) is not an error."""
    try:
        typer.echo(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Nobody reads stdout any more.  Point it at /dev/null so that the
        # interpreter's last flush does not fail too (and turn the exit
        # code into 120); the command's own exit code stands.
        # (OSError and ValueError cover a stdout without a file descriptor.)
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())


def _error_json(error: BaseException | None) -> dict[str, str] | None:
    if error is None:
        return None
    import traceback

    return {
        "type": type(error).__qualname__,
        "message": str(error),
        "traceback": "".join(traceback.format_exception(error)),
    }


def _abandoned_threads(grace: float = THREAD_GRACE) -> int:
    """How many sync-task threads are still running now that every engine has closed.

    A closed engine's idle threads exit at once; those left are running a
    sync task that was cancelled or timed out, and Python cannot stop them.
    """
    threads = [t for t in threading.enumerate() if t.name.startswith(SYNC_THREAD_PREFIX)]
    deadline = time.monotonic() + grace
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return sum(t.is_alive() for t in threads)


def _say_abandoned(console: Console) -> None:
    left = _abandoned_threads()
    if left:
        console.print(
            f"abandoned {left} sync-task thread{'s' if left != 1 else ''} still running "
            f"(Python cannot stop a thread); exiting without waiting for "
            f"{'them' if left != 1 else 'it'}"
        )


def _finish(outcome: Outcome, console: Console, store: str | None, *, as_json: bool = False) -> None:
    """Exit with the code of ``outcome``, after saying how to resume when that makes sense."""
    run = outcome.run
    resume = f"shoal resume {run.id}" + (f" --store {store}" if store else "") if run else ""
    if run is not None and run.status != "succeeded":
        _say_abandoned(console)
        if as_json:
            doc = {"run": run.id, "status": run.status, "error": _error_json(run.error)}
            _echo(render.json_text(doc))
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
            _echo(msgspec.json.encode(result).decode())
        except (TypeError, msgspec.EncodeError):
            _echo(msgspec.json.encode(repr(result)).decode())
        return
    if result is None:
        return
    _echo(result if isinstance(result, str) else repr(result))


def _task_output_to_stderr(as_json: bool) -> contextlib.AbstractContextManager[Any]:
    """Send what tasks print to stderr while the run goes, unless stdout is a terminal.

    Stdout then carries the result alone (JSON with ``--json``), whatever the
    tasks print; the journal still records their output as ``stdout``.
    """
    try:
        interactive = sys.stdout.isatty()
    except (AttributeError, ValueError):
        interactive = False
    if interactive and not as_json:
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(sys.stderr)


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


def _version() -> str:
    """The installed distribution's version (what ``pip`` sees)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shoal")
    except PackageNotFoundError:  # pragma: no cover - running from an uninstalled tree
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"shoal {_version()}")
        raise typer.Exit(0)


def build_app() -> typer.Typer:
    """The ``shoal`` Typer application (built on demand: no module-level state).

    Shell completion is Typer's: ``shoal --install-completion`` installs it
    for the current shell, ``--show-completion`` prints the script.
    """
    app = typer.Typer(
        name="shoal",
        help="shoal: run, inspect, resume and cancel workflow runs.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def root(
        version: Annotated[
            bool,
            typer.Option(
                "--version", is_eager=True, callback=_show_version, help="Print shoal's version and exit."
            ),
        ] = False,
    ) -> None:
        """shoal: run, inspect, resume and cancel workflow runs."""

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
        offload: OffloadOption = None,
        with_: WithOption = None,
        as_json: ResultJsonOption = False,
    ) -> None:
        argv = list(ctx.args)
        if target is None or target.startswith("-"):
            if target in ("--help", "-h") or "--help" in argv:
                typer.echo(ctx.get_help())
                raise typer.Exit(0)
            usage_error("missing argument FILE[:TASK] (the Python file that defines the task)", "run")
        try:
            placement = parse_offload(offload)
            task = pick_task(target)
            parsed = parse_task_args(task, argv)
            check_offload_tasks(placement, file_tasks(target), split_target(target)[0])
            overrides = parse_with(with_ or (), file_tasks(target))
        except HelpRequested:
            _stdout().print(task_help(target, task))
            raise typer.Exit(0) from None
        except (UsageProblem, ConfigError) as exc:
            usage_error(str(exc), "run")
        console = _stderr()
        try:
            with _task_output_to_stderr(as_json):
                outcome = asyncio.run(
                    run_with_progress(
                        task, parsed.args, parsed.kwargs, tags=tag or (), store=store,
                        max_concurrency=max_concurrency, offload=placement, overrides=overrides,
                        console=console, live=console.is_terminal,
                    )
                )
        except (InputError, ConfigError, ImportFailed, UnusableFolder) as exc:
            usage_error(str(exc), "run")
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except EngineError as exc:
            console.print(f"[red]error:[/red] {render.escape_markup(str(exc))}")
            raise typer.Exit(1) from None
        _finish(outcome, console, store, as_json=as_json)
        assert outcome.run is not None
        _print_result(outcome.run.result, as_json)

    @app.command("resume")
    def resume_cmd(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
        max_concurrency: MaxConcurrencyOption = None,
        store: StoreOption = None,
        offload: OffloadOption = None,
        as_json: ResultJsonOption = False,
    ) -> None:
        """Continue a failed, cancelled or interrupted run where it stopped (with progress).

        Actions that succeeded before return their recorded outputs without
        running.  '--offload TASK=TARGET' places the actions that run now.
        Exits like 'shoal run': 0 succeeded, 1 failed, 130 Ctrl-C.
        """
        console = _stderr()
        try:
            placement = parse_offload(offload)
        except UsageProblem as exc:
            usage_error(str(exc), "resume")
        if store != "memory":
            path = _journal_path(store)
            if path is not None and not path.exists():
                usage_error(
                    f"no run {run_id!r}: there is no journal at {path} yet; list runs with 'shoal runs'",
                    "resume",
                )
        try:
            with _task_output_to_stderr(as_json):
                outcome = asyncio.run(
                    resume_with_progress(
                        run_id, store=store, max_concurrency=max_concurrency, offload=placement,
                        console=console, live=console.is_terminal,
                    )
                )
        except (RunNotFound, InputError, ConfigError, ImportFailed, UnusableFolder, UsageProblem) as exc:
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
        _finish(outcome, console, store, as_json=as_json)
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

        async def query(eng: Engine) -> list[RecordedRun[object]]:
            try:
                await _open(eng)
            except _NoJournal:
                return []
            return await eng.runs(status=status, tag=tag, limit=limit, load_code=False)

        runs = _query("runs", store, query)
        if as_json:
            _echo(render.json_text([render.run_json(r) for r in runs]))
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
        """Show one run: its arguments and result, tasks by group, failed actions and their tracebacks.

        Long values and tracebacks are cut ('shoal show RUN --json' has them
        whole); '--actions' lists a page of the run's actions (--offset,
        --limit).
        """

        async def query(eng: Engine) -> tuple[RecordedRun[object], list[RecordedAction]]:
            await _open(eng, run_id)
            run = await eng.get_run(run_id, actions=actions, offset=offset, limit=limit, load_code=False)
            failed = [a async for a in run.aactions(state="failed", limit=render.MAX_FAILED)]
            return run, failed

        run, failed = _query("show", store, query)
        if as_json:
            _echo(render.json_text(render.run_json(run, failed, actions=actions, offset=offset)))
        else:
            _stdout().print(render.show(run, failed, actions=actions, offset=offset))

    @app.command("logs")
    def logs_cmd(
        run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
        action: Annotated[
            str | None, typer.Argument(metavar="[ACTION]", help="Only this action (its id, or a prefix of it).")
        ] = None,
        store: StoreOption = None,
        as_json: JsonOption = False,
    ) -> None:
        """Print what the run's actions printed (stdout, stderr) or logged, in order.

        Each line names the action and its task (unless ACTION picks one
        action); an ACTION that matches no action of the run exits 2.
        """

        async def query(eng: Engine) -> list[LogLine]:
            await _open(eng, run_id)
            run = await eng.get_run(run_id, load_code=False)  # RunNotFound for an unknown id
            if action is None:
                return await run.alogs()
            lines = [line for line in await run.alogs() if line.action.startswith(action)]
            if not lines and not [a async for a in run.aactions(key=action, limit=1)]:
                raise UsageProblem(
                    f"run {run_id} has no action {action!r} (nor one whose id starts with it); "
                    f"list its actions with 'shoal show {run_id} --actions'"
                )
            return lines

        lines = _query("logs", store, query)
        if as_json:
            _echo(render.json_text(render.logs_json(lines)))
            return
        rows = [(line.action, line.at, line.stream, line.text, line.rank) for line in lines]
        tasks = {line.action: line.task for line in lines if line.task}
        if not rows:
            what = f"action {action} of run {run_id}" if action else f"run {run_id}"
            _stderr().print(f"no output recorded for {what}")
            return
        # One action asked for, one found: its lines alone, as it printed them.
        show_action = action is None or len({key for key, *_ in rows}) > 1
        out = []
        for key, _at, stream, text, rank in rows:
            task = tasks.get(key)
            prefix = (f"{key} {task}: " if task else f"{key}: ") if show_action else ""
            # A gang's lines say which rank wrote them, in every form.
            mark = ("" if rank is None else f"[rank {rank}] ") + ("" if stream == "stdout" else f"[{stream}] ")
            out.append(f"{prefix}{mark}{text}")
        _echo("\n".join(out))

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
                    status = (await eng.get_run(run_id, load_code=False)).status
            return before, status

        before, status = _query("cancel", store, query)
        if as_json:
            _echo(render.json_text({"run": run_id, "was": before, "status": status}))
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

    from ._report_cmd import report_cmd

    app.command("report")(report_cmd)
    return app


def main() -> None:
    """Entry point of the ``shoal`` console script.

    Exits without joining sync-task threads that are still running once
    the command is done (the run is recorded by then): the interpreter's
    exit would otherwise wait for each to return, which may be never.
    """
    try:
        build_app()(prog_name="shoal")
    except SystemExit as exc:
        if any(t.name.startswith(SYNC_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate()):
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)
        raise


