"""How one attempt of an action runs: on this loop, in a thread, or on an offload target.

The attempt loop (``_action._attempt_loop``: retries, backoff, timeout,
cancellation) is the same for every action; what differs is only the
runner it awaits, inside the task's timeout::

    await runner.attempt(action, values, named, counts)

- :data:`LOOP`: an async task's coroutine, awaited here;
- :data:`THREAD`: a sync task, in one of the engine's worker threads;
- :class:`~engine._placement.Remote`: an offloaded task, on its target.

A runner turns cancellation (a timeout, a run cancel) into whatever
stopping means where it runs: the coroutine is cancelled; a thread cannot
be stopped, so its slots stay taken until it returns; a remote attempt is
cancelled on its backend.  The plain path (async, no retries, no timeout,
here) does not come through here at all.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._action import Action
    from ._events import TaskCounts

__all__ = ["LOOP", "THREAD", "Runner"]


class Runner(Protocol):
    async def attempt(
        self, action: Action, values: Sequence[Any], named: Mapping[str, Any], counts: TaskCounts
    ) -> Any: ...


class _Loop:
    """An async task's attempt: its coroutine, awaited in the action's own asyncio task."""

    __slots__ = ()

    async def attempt(
        self, action: Action, values: Sequence[Any], named: Mapping[str, Any], counts: TaskCounts
    ) -> Any:
        return await action.task.fn(*values, **named)


class _Thread:
    """A sync task's attempt, in a worker thread (with the action's context)."""

    __slots__ = ()

    async def attempt(
        self, action: Action, values: Sequence[Any], named: Mapping[str, Any], counts: TaskCounts
    ) -> Any:
        thread = action.run.engine.run_sync(action, values, named)
        try:
            # Shielded: giving up on the attempt (timeout, cancel) must not
            # mark the thread's future done while the thread still runs.
            return await asyncio.shield(thread)
        except BaseException:
            if not thread.done():
                _hold_until_done(action, thread)
            raise


def _hold_until_done(action: Action, thread: asyncio.Future[Any]) -> None:
    """A sync attempt given up on (timeout, cancel) keeps running in its thread.

    Python cannot stop a thread, so the slots it took stay taken until it
    returns: resource accounting keeps telling the truth about the machine.
    (The attempt loop takes fresh slots for a next attempt.)
    """
    held = action.held
    if held is None:
        return
    action.held = None

    def release(_: asyncio.Future[Any]) -> None:
        for slots, amount in held:
            slots.release(amount)

    thread.add_done_callback(release)


LOOP: Runner = _Loop()
THREAD: Runner = _Thread()
