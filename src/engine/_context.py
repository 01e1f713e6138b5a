"""Where the running code is: the current action, its run and engine, its group.

The current action travels in a :class:`~contextvars.ContextVar`, so every
coroutine and every ``asyncio`` task spawned by an action sees it, and code
in two concurrent runs never sees the other's.
"""

from __future__ import annotations

import asyncio
import sys
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._action import Action
    from ._engine import Engine
    from ._run import Run

__all__ = ["current_action", "current_engine", "current_run", "task_of"]

#: The action whose code is running here, or None outside any run.
action_var: ContextVar[Action | None] = ContextVar("shoal.action", default=None)
#: The label of the innermost ``engine.group(...)`` block, or None.
group_var: ContextVar[str | None] = ContextVar("shoal.group", default=None)


#: ``task_of(loop)``: the asyncio task running now on ``loop``.  On 3.11
#: ``asyncio.current_task`` is a Python function over this dict; the action
#: path calls it once per action, so it reads the dict directly.
task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]
if sys.version_info >= (3, 12):
    task_of = asyncio.current_task
else:
    task_of = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


def current_action() -> Action | None:
    """The action running here, or None outside any run."""
    return action_var.get()


def current_run() -> Run | None:
    """The run this code belongs to, or None outside any run."""
    action = action_var.get()
    return None if action is None else action.run


def current_engine() -> Engine:
    """The engine of the current run; outside a run, the default engine of this loop.

    Needs a running event loop when called outside a run.
    """
    action = action_var.get()
    if action is not None:
        return action.run.engine
    from ._api import default_engine

    return default_engine()
