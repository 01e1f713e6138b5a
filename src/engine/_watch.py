"""One timer for all the live runs of a journal: cancel requests and running actions.

A journaled run looks, every :data:`CANCEL_POLL` seconds, for a cancel
request from another process (``shoal cancel``: a flag file), and every
:data:`LIVE_EVERY` looks writes the actions it is running now (for
``shoal show`` of a live run).  One task does this for every run of the
journal, rather than a task and a timer per run: an engine serving many
small concurrent runs pays for one wake-up per interval, not for one task
started and cancelled per run.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Protocol

__all__ = ["CANCEL_POLL", "LIVE_EVERY", "RunWatch"]

#: How often a running run looks for a cancel request from another process.
CANCEL_POLL = 0.25
#: The running actions are written every this many looks (1 s).
LIVE_EVERY = 4

class Watched(Protocol):
    def look(self) -> bool:
        """Look for a cancel request (and write the live rows when due); True when done watching."""
        ...


class RunWatch:
    """The runs of one journal that are watched, and the task that looks at them."""

    def __init__(self) -> None:
        # Invariant: ``_runs`` holds every claimed run of this journal that
        # has not finished (in claim order), and ``_task`` is the task
        # looking at them, not None while ``_runs`` is not empty.  The task
        # ends by itself at the first look that finds no run left, so an
        # idle engine has no timer.
        self._runs: dict[Watched, None] = {}
        self._task: asyncio.Task[None] | None = None

    def add(self, run: Watched) -> None:
        self._runs[run] = None
        if self._task is None:
            # In a context of its own: not the first watched run's, which it
            # would otherwise keep alive.
            self._task = asyncio.get_running_loop().create_task(self._watch(), context=contextvars.Context())

    def discard(self, run: Watched) -> None:
        self._runs.pop(run, None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._runs:
                await asyncio.sleep(CANCEL_POLL)
                for run in list(self._runs):
                    try:
                        done = run.look()
                    except Exception as exc:  # one run's failure must not stop the others' looks
                        done = True
                        loop.call_exception_handler(
                            {"message": "looking for a cancel request of a run failed", "exception": exc}
                        )
                    if done:
                        self._runs.pop(run, None)
        finally:
            self._task = None

    def close(self) -> None:
        """Stop looking (the journal closes)."""
        self._runs.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None
