"""``shoal report RUN [-o FILE]``: write a run's self-contained HTML report (see ``engine._report``)."""

from __future__ import annotations

from pathlib import Path  # noqa: TC003 - Typer reads the annotations at run time
from typing import TYPE_CHECKING, Annotated

import typer

from . import _render as render
from ._app import StoreOption, _echo, _open, _query, _stderr

if TYPE_CHECKING:
    from .._engine import Engine

__all__ = ["report_cmd"]


def report_cmd(
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="The run id (see 'shoal runs').")],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="FILE",
            help="Where to write the page (default: shoal-report-RUN.html here; a folder: that name in it).",
        ),
    ] = None,
    store: StoreOption = None,
) -> None:
    """Write one self-contained HTML file for a run: summary, timeline, task statistics, failures, logs.

    The page needs no network to open.  Prints the file's path on stdout.
    """

    async def query(eng: Engine) -> Path:
        await _open(eng, run_id)  # an unknown run (or no journal at all) exits 2
        return await eng.report(run_id, output)

    path = _query("report", store, query)
    size = path.stat().st_size
    _stderr().print(f"wrote the report of run {render.escape_markup(run_id)} to {render.escape_markup(str(path))} "
                    f"({size / 1024:,.0f} KiB)")
    _echo(str(path))
