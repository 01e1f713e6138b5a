"""Traces: cheap in-process checkpoints of helper calls inside a task."""

from __future__ import annotations

import functools
import inspect
import typing
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

from ._action import InFlight
from ._context import action_var

if typing.TYPE_CHECKING:
    from collections.abc import Callable

    from ._action import Action

__all__ = ["TraceSink", "trace", "trace_sink_var"]


class TraceSink(typing.Protocol):
    """Where traces go inside an offloaded attempt (on the worker's side).

    There is no action there (task calls are plain calls), so a worker sets
    :data:`trace_sink_var` for the attempt it runs, and traces ask the sink:
    ``key`` derives the same key the engine would (see ``Run.trace_key``),
    ``recorded`` gives an earlier attempt's result or :data:`MISSING`, and
    ``record`` sends a new result back to be journaled.
    """

    def key(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str: ...

    def recorded(self, key: str, returns: Any) -> Any: ...

    def record(self, key: str, name: str, result: Any) -> None: ...


#: The trace sink of the offloaded attempt running here, or None.
trace_sink_var: ContextVar[TraceSink | None] = ContextVar("shoal.trace_sink", default=None)

P = ParamSpec("P")
R = TypeVar("R")


def trace(fn: Callable[P, R]) -> Callable[P, R]:
    """Journal each call's result; on resume or retry, return it without running the function.

    For sync or async helpers called inside a task (an unreliable API call,
    an expensive lookup).  A trace is not an action: no scheduling, no
    retry, no timeout.  Its key is (action, trace name, input digest,
    occurrence within the action's attempt), so a resumed action, or a
    later attempt of a retried one, finds the results of the calls it made
    before in the same order: a checkpoint.  A call that raised is not
    recorded and runs again.  Outside a run, or in an action that neither
    is journaled nor has retries, the function is simply called.
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
            if action is None:
                sink = trace_sink_var.get()
                if sink is None:
                    return await fn(*args, **kwargs)
                key = sink.key(name, args, kwargs)
                found = sink.recorded(key, returns)
                if found is not MISSING:
                    return found
                result = await fn(*args, **kwargs)
                sink.record(key, name, result)
                return result
            if action.run.journal is None and action.memo is None:
                return await fn(*args, **kwargs)
            key = action.run.trace_key(action, name, args, kwargs)
            found = _recorded(action, key, returns)
            if found is not MISSING:
                return found
            result = await fn(*args, **kwargs)
            _record(action, key, name, result)
            return result

        return traced_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        action = action_var.get()
        if action is None:
            sink = trace_sink_var.get()
            if sink is None:
                return fn(*args, **kwargs)
            key = sink.key(name, args, kwargs)
            found = sink.recorded(key, returns)
            if found is not MISSING:
                return found
            result = fn(*args, **kwargs)
            sink.record(key, name, result)
            return result
        if action.run.journal is None and action.memo is None:
            return fn(*args, **kwargs)
        key = action.run.trace_key(action, name, args, kwargs)
        found = _recorded(action, key, returns)
        if found is not MISSING:
            return found
        result = fn(*args, **kwargs)
        _record(action, key, name, result)
        return result

    return traced


#: Stands for "no recorded result" (a trace may return None).
MISSING: Any = object()


def _recorded(action: Action, key: str, returns: Any) -> Any:
    """The result of an earlier call with this key: this attempt's memo, then the journal's replay."""
    memo = action.memo
    if memo is not None:
        value = memo.get(key, MISSING)
        if value is not MISSING and type(value) is not InFlight:
            return value
    run = action.run
    if run.replay is not None and key in run.replay:
        value = run.replay_value(key, returns)
        if memo is not None:
            memo[key] = value
        return value
    return MISSING


def _record(action: Action, key: str, name: str, result: Any) -> None:
    journal = action.run.journal
    if journal is not None:
        journal.traced(action, key, name, result)
    memo = action.memo
    if memo is not None:
        memo[key] = result
