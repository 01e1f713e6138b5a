"""``shoal report`` and ``Engine.report``: a run as one self-contained HTML page.

The page needs no network: its styles, script and data are inline.  It
shows the run's summary (status, root task, arguments, result, times,
tags), a timeline of its actions with a lane per task and group (retries,
failures and where each attempt ran marked; drawn in bins above
``ITEMS_MAX`` actions, so that a million actions make a small, fast
page), per-task statistics, the failed actions with their tracebacks, and
an action's logs on click.

The run is read from the journal page by page (``_collect``); the page is
written by ``_html``.  Nothing here touches the scheduler.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import EngineError
from ._collect import collect
from ._html import render

if TYPE_CHECKING:
    from .._journal import Journal

__all__ = ["default_path", "write_report"]


def default_path(run_id: str) -> Path:
    """Where a report goes when no path is given: ``shoal-report-RUN.html`` in the working folder."""
    return Path.cwd() / f"shoal-report-{run_id}.html"


async def write_report(journal: Journal, run_id: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Write the report of ``run_id`` to ``path`` (atomically) and return where it went."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        shoal_version = version("shoal")
    except PackageNotFoundError:  # pragma: no cover - an uninstalled tree
        shoal_version = "(not installed)"
    data = await collect(journal, run_id)
    page = render(data, version=shoal_version)
    target = Path(path) if path is not None else default_path(run_id)
    if target.is_dir():
        target = target / default_path(run_id).name
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        partial.write_text(page, encoding="utf-8")
        os.replace(partial, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise EngineError(
            f"cannot write the report of run {run_id} to {target}: {exc.strerror or exc}; "
            f"pick another file with -o/path="
        ) from None
    return target
