"""Traces: cheap in-process checkpoints of helper calls inside a task."""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, ParamSpec, TypeVar

from ._context import action_var

if typing.TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["trace"]

P = ParamSpec("P")
R = TypeVar("R")


def trace(fn: Callable[P, R]) -> Callable[P, R]:
    """Journal each call's result; on resume, return it without running the function.

    For sync or async helpers called inside a task (an unreliable API call,
    an expensive lookup).  A trace is not an action: no scheduling, no
    retry, no timeout.  Its key is (action, trace name, input digest,
    occurrence), so a resumed action finds the results of the calls it made
    before in the same order.  A call that raised is not recorded and runs
    again on resume.  Outside a run, or in a run that is not journaled, the
    function is simply called.
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        returns = typing.get_type_hints(fn).get("return", Any)
    except Exception:
        returns = Any

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def traced_async(*args: Any, **kwargs: Any) -> Any:
            action = action_var.get()
            if action is None or action.run.journal is None:
                return await fn(*args, **kwargs)
            run = action.run
            key = run.trace_key(action, name, args, kwargs)
            if run.replay is not None and key in run.replay:
                return run.replay_value(key, returns)
            result = await fn(*args, **kwargs)
            run.journal.traced(action, key, name, result)  # type: ignore[union-attr]
            return result

        return traced_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        action = action_var.get()
        if action is None or action.run.journal is None:
            return fn(*args, **kwargs)
        run = action.run
        key = run.trace_key(action, name, args, kwargs)
        if run.replay is not None and key in run.replay:
            return run.replay_value(key, returns)
        result = fn(*args, **kwargs)
        run.journal.traced(action, key, name, result)  # type: ignore[union-attr]
        return result

    return traced
