"""Actions: one call of a task inside a run, and the code that runs it.

This is the hottest path in shoal: everything here runs once per action,
and a run may have millions of them.  Keep work out of it unless it is
needed by the action at hand (the journal only when the run is journaled,
slots only when a limit is set, events only when someone listens).
"""

from __future__ import annotations

import asyncio
import collections.abc
import time
from typing import TYPE_CHECKING, Any

from ._context import action_var, task_of
from ._errors import ActionTimeout

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._events import TaskCounts
    from ._limits import Slots
    from ._run import Run
    from ._task import Task

__all__ = ["Action", "Done", "execute"]


class Done(asyncio.Future[Any]):
    """An already finished result that can stand wherever a task call's coroutine can.

    ``await`` it, pass it to ``asyncio.gather`` (which takes it as is: no
    task is created) or to ``asyncio.create_task`` (it speaks the coroutine
    protocol, so a task wraps it and finishes at its first step).
    """

    __slots__ = ()

    def send(self, value: Any) -> Any:
        raise StopIteration(self.result())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        raise typ if val is None else val

    def close(self) -> None:
        pass


collections.abc.Coroutine.register(Done)


class Action:
    """One call of a task inside a run.

    ``key`` identifies the call independently of scheduling order: it is
    derived from the parent's key, the task name, the digest of the encoded
    inputs and the occurrence of that (task, digest) pair under the parent.
    A re-executed parent therefore finds the same keys for the same calls,
    which is what resume and replay rely on.  When a run is not journaled
    (``store="memory"``) keys are not needed and not computed; ``id`` is
    then a number unique within the run.
    """

    __slots__ = (
        "attempt",
        "cache_key",
        "group",
        "held",
        "id",
        "key",
        "occurrences",
        "parent",
        "run",
        "started_at",
        "task",
    )

    def __init__(
        self, run: Run, task: Task[Any, Any], parent: Action | None, group: str | None, id: str
    ) -> None:
        self.run = run
        self.task = task
        self.parent = parent
        self.group = group
        self.id = id
        self.key = id
        self.attempt = 1
        self.started_at = 0.0
        self.cache_key: str | None = None
        # Invariant: ``held`` lists the slots this action holds right now and
        # must give back exactly once: on finishing, or earlier when it
        # starts waiting for a child (see ``lend``).
        self.held: list[tuple[Slots, float]] | None = None
        # Invariant: maps the digest of each (task, inputs) called by this
        # action to how many times it was called so far; only kept while
        # the action runs and only when the run is journaled.
        self.occurrences: dict[bytes, int] | None = None

    @property
    def label(self) -> str:
        """The action's id; in a run without a journal, a number unique while it runs."""
        return self.id or f"m{id(self):x}"

    def lend(self) -> None:
        """Give back this action's slots because it now waits for a child.

        A parent that held its slot while awaiting children would deadlock a
        deep fan-out under ``max_concurrency``; so the limits apply to
        actions doing their own work, and a parent that has started children
        runs the rest of its body without a slot.
        """
        held = self.held
        if held is not None:
            self.held = None
            for slots, amount in held:
                slots.release(amount)

    def __repr__(self) -> str:
        return f"<Action {self.task.name} id={self.id} attempt={self.attempt}>"


async def execute(
    run: Run,
    task: Task[Any, Any],
    parent: Action | None,
    group: str | None,
    key: str,
    values: Sequence[Any],
    named: Mapping[str, Any],
    counts: TaskCounts,
) -> Any:
    """Run one action to completion: replay or cache, admission, attempts, record.

    The :class:`Action` object is made here, when the action starts, not
    when the task is called: a fan-out of a million calls then holds a
    million small coroutines, not a million actions, until they get to run
    (fewer live objects also means less work for the garbage collector).
    """
    action = Action(run, task, parent, group, key)
    journal = run.journal
    if journal is not None:
        # Replay and cache exist only for journaled runs.
        if run.replay is not None:
            found = run.replay.get(key)
            if found is not None:
                return await run.replayed(action, found, counts)
        if task.cache_version is not None and run.use_cache:
            hit = await journal.cache_lookup(action, values, named)
            if hit is not None:
                return await run.cached(action, hit.value, counts)

    engine = run.engine
    current = task_of(run.loop)
    live = run.live
    owner = current not in live
    if owner:
        # Tracked before admission: an action still waiting for a slot when
        # its run ends is cancelled with the others.
        live.add(current)  # type: ignore[arg-type]
    if run.closing:
        # Started after its run ended (an abandoned call): never runs.
        counts.pending -= 1
        counts.cancelled += 1
        if owner:
            live.discard(current)
        raise asyncio.CancelledError(f"run {run.id} has ended")
    if parent is not None and parent.held is not None:
        parent.lend()
    if task.admitted or engine.limited:
        try:
            action.held = await engine.admit(task)
        except BaseException as exc:
            counts.pending -= 1
            if owner:
                live.discard(current)
            if isinstance(exc, asyncio.CancelledError):
                counts.cancelled += 1
                run.finished(action, "cancelled", None)
            else:
                counts.failed += 1
                run.finished(action, "failed", exc)
            raise

    token = action_var.set(action)
    counts.pending -= 1
    counts.running += 1
    if journal is not None:
        action.started_at = time.time()
    wanted = engine.wanted
    if wanted and "started" in wanted:
        engine.emit("started", action)
    try:
        if task.plain:
            # No retry, no timeout, async: the common case, without the
            # attempt loop's frame.
            result = await (task.fn(*values, **named) if named else task.fn(*values))
        else:
            result = await _attempts(action, task, values, named, counts)
    except asyncio.CancelledError:
        counts.running -= 1
        counts.cancelled += 1
        run.finished(action, "cancelled", None)
        raise
    except BaseException as exc:
        counts.running -= 1
        counts.failed += 1
        run.finished(action, "failed", exc)
        raise
    finally:
        action_var.reset(token)
        if action.held is not None:
            action.lend()
        if owner:
            live.discard(current)
    if journal is not None:
        # Counted succeeded when its record is committed (see
        # RunJournal.succeeded); only a large output waits here, for its
        # upload to the blob store.
        try:
            upload = journal.succeeded(action, result, counts)
            if upload is not None:
                await upload
        except asyncio.CancelledError:
            counts.running -= 1
            counts.cancelled += 1
            run.finished(action, "cancelled", None)
            raise
        except BaseException as exc:
            counts.running -= 1
            counts.failed += 1
            run.finished(action, "failed", exc)
            raise
        return result
    counts.running -= 1
    counts.succeeded += 1
    wanted = engine.wanted
    if wanted and "succeeded" in wanted:
        engine.emit("succeeded", action)
    return result


async def _attempts(
    action: Action, task: Task[Any, Any], values: Sequence[Any], named: Mapping[str, Any], counts: TaskCounts
) -> Any:
    retry = task.retry
    timeout = task.timeout
    run = action.run
    engine = run.engine
    attempt = 0
    while True:
        attempt += 1
        action.attempt = attempt
        if action.held is None and attempt > 1 and (task.admitted or engine.limited):
            # The previous attempt's thread kept its slots (see below).
            action.held = await engine.admit(task)
        thread: asyncio.Future[Any] | None = None
        try:
            if task.is_async:
                if timeout is None:
                    return await task.fn(*values, **named)
                async with asyncio.timeout(timeout) as scope:
                    return await task.fn(*values, **named)
            thread = engine.run_sync(action, values, named)
            if timeout is None:
                return await thread
            async with asyncio.timeout(timeout) as scope:
                return await asyncio.shield(thread)
        except asyncio.CancelledError:
            if thread is not None:
                _hold_until_done(action, thread)
            raise
        except BaseException as exc:
            error: BaseException = exc
            if timeout is not None and isinstance(exc, TimeoutError) and scope.expired():
                if thread is not None:
                    _hold_until_done(action, thread)
                error = ActionTimeout(
                    f"action {action.label} of task {task.name!r} timed out after {timeout:g} s "
                    f"(attempt {attempt}); raise the task's timeout= or make the work smaller"
                )
                error.__cause__ = None
            if attempt > retry.attempts or not isinstance(error, retry.on):
                if error is exc:
                    raise
                raise error from None
            counts.retries += 1
            run.retrying(action, error)
            await engine.sleep(retry.delay(attempt, engine.rng))


def _hold_until_done(action: Action, thread: asyncio.Future[Any]) -> None:
    """A sync attempt given up on (timeout, cancel) keeps running in its thread.

    Python cannot stop a thread, so the slots it took stay taken until it
    returns: resource accounting keeps telling the truth about the machine.
    """
    held = action.held
    if held is None or thread.done():
        return
    action.held = None

    def release(_: asyncio.Future[Any]) -> None:
        for slots, amount in held:
            slots.release(amount)

    thread.add_done_callback(release)
