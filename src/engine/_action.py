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
import types
from typing import TYPE_CHECKING, Any

from . import _lifecycle as lifecycle
from ._codec import INLINE_KINDS
from ._context import action_var, group_var, task_of
from ._errors import ActionTimeout, EncodeError
from ._runners import LOOP, THREAD

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Mapping, Sequence

    from ._events import TaskCounts
    from ._limits import Slots
    from ._options import Retry
    from ._placement import Remote
    from ._run import Run
    from ._runners import Runner
    from ._task import Task

#: What ``Run.replayed`` gives for a recorded output that cannot be read
#: back (its blob is gone or damaged): the action runs as if never recorded.
NOT_RECORDED: Any = object()

__all__ = ["NOT_RECORDED", "Action", "Done", "InFlight", "call_remembered", "execute", "named_execute"]


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
        "memo",
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
        # action to how many times it was called so far *in its current
        # attempt* (each attempt starts afresh, so that attempt N derives
        # the same keys as attempt 1); only kept while the action runs, and
        # only when its calls need keys (a journaled run, or ``memo``).
        self.occurrences: dict[bytes, int] | None = None
        # Invariant: for an action whose task has retries, and only while
        # its attempts run, maps the key of every child call and trace call
        # that succeeded in one of its attempts to the value it gave, so
        # that a later attempt gets that value back instead of running the
        # call again (its checkpoints); None for every other action, which
        # keeps what attempts remember bounded to actions that retry.
        self.memo: dict[str, Any] | None = None

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
    Its group is read here too: an action belongs to the ``engine.group``
    block it *starts* in (its first step), as the block's docstring says,
    wherever its coroutine was made.
    """
    action = Action(run, task, parent, group_var.get(), key)
    journal = run.journal
    if journal is not None:
        if journal.journal.backlogged:
            # Backpressure before the work, not after it: an action that
            # waits here holds nothing yet, while one that finished would
            # hold its record until there is room for it.
            await journal.journal.room()
        # Replay and cache exist only for journaled runs.
        if run.replay is not None:
            found = run.replay.get(key)
            if found is not None:
                value = await run.replayed(action, found, counts)
                if value is not NOT_RECORDED:
                    return value
        if task.cache_version is not None and run.use_cache:
            hit = await journal.cache_lookup(action, values, named)
            if hit is not None:
                return await run.cached(action, hit.value, counts)

    engine = run.engine
    remote = run.remote
    place = None if remote is None else remote.get(task)
    current = task_of(run.loop)
    live = run.live
    owner = current not in live
    if owner:
        # Tracked before admission: an action still waiting for a slot when
        # its run ends is cancelled with the others.
        live.add(current)  # type: ignore[arg-type]
    if run.closing:
        # Started after its run ended (an abandoned call): never runs.  Once
        # the run has counted its never-started calls as cancelled
        # (``Run._settle_never_started``), this one is counted already.
        lifecycle.ended_before_start(counts)
        if owner:
            live.discard(current)
        raise asyncio.CancelledError(f"run {run.id} has ended")
    if parent is not None and parent.held is not None:
        parent.lend()
    if task.admitted or engine.limited or place is not None:
        try:
            action.held = await engine.admit(task, place)
        except BaseException as exc:
            if owner:
                live.discard(current)
            if isinstance(exc, asyncio.CancelledError):
                lifecycle.ended(action, counts, "cancelled", None, was="pending")
            else:
                lifecycle.ended(action, counts, "failed", exc, was="pending")
            raise

    token = action_var.set(action)
    if journal is not None:
        action.started_at = time.time()
    lifecycle.started(action, counts)
    try:
        if task.plain and place is None:
            # No retry, no timeout, async, here: the common case, without
            # the attempt loop's frame.
            result = await (task.fn(*values, **named) if named else task.fn(*values))
        else:
            result = await _attempts(action, task, values, named, counts, place)
    except asyncio.CancelledError:
        lifecycle.ended(action, counts, "cancelled", None)
        raise
    except (KeyboardInterrupt, SystemExit) as exc:
        # Not a failure of the task: the program is asked to stop.  The run
        # is cancelled, however this action was awaited, and the exception
        # comes out of engine.run / arun (so sys.exit(3) exits with 3).
        lifecycle.ended(action, counts, "cancelled", None)
        raise run.interrupted(exc) from exc
    except BaseException as exc:
        lifecycle.ended(action, counts, "failed", exc)
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
            lifecycle.ended(action, counts, "cancelled", None)
            raise
        except BaseException as exc:
            # A forgotten await cannot be encoded: checked only then, so
            # that a success costs nothing more.
            error = _unawaited(task, result) if type(result) in _UNAWAITED else exc
            lifecycle.ended(action, counts, "failed", error)
            if error is exc:
                raise
            raise error from None
        return result
    if type(result) in _UNAWAITED:
        error = _unawaited(task, result)
        lifecycle.ended(action, counts, "failed", error)
        raise error
    lifecycle.succeeded(action, counts)
    return result


async def _attempts(
    action: Action,
    task: Task[Any, Any],
    values: Sequence[Any],
    named: Mapping[str, Any],
    counts: TaskCounts,
    place: Remote | None,
) -> Any:
    retry = task.retry
    run = action.run
    remembers = retry.attempts > 0 and place is None
    if remembers:
        action.memo = {}
        run.remembering(1)
    try:
        return await _attempt_loop(action, task, values, named, counts, retry, place)
    finally:
        if remembers:
            action.memo = None
            run.remembering(-1)
        if place is not None:
            run.forget_traces(action)


async def _attempt_loop(
    action: Action,
    task: Task[Any, Any],
    values: Sequence[Any],
    named: Mapping[str, Any],
    counts: TaskCounts,
    retry: Retry,
    place: Remote | None,
) -> Any:
    timeout = task.timeout
    run = action.run
    engine = run.engine
    # Where each attempt runs (see _runners); a remote one is cancelled on
    # its backend when the timeout's cancellation reaches it.
    runner: Runner = place if place is not None else LOOP if task.is_async else THREAD
    attempt = 0
    while True:
        attempt += 1
        action.attempt = attempt
        if attempt > 1:
            # Keys restart with each attempt: attempt N's calls get the keys
            # of attempt 1's, and find what those left in ``memo`` (or, on
            # resume, in the journal).
            action.occurrences = None
            if action.held is None and (task.admitted or engine.limited or place is not None):
                # The previous attempt's thread kept its slots (see _runners).
                action.held = await engine.admit(task, place)
        try:
            if timeout is None:
                return await runner.attempt(action, values, named, counts)
            async with asyncio.timeout(timeout) as scope:
                return await runner.attempt(action, values, named, counts)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise  # never retried, whatever ``on=`` says
        except BaseException as exc:
            error: BaseException = exc
            if timeout is not None and isinstance(exc, TimeoutError) and scope.expired():
                error = ActionTimeout(
                    f"action {action.label} of task {task.name!r} timed out after {timeout:g} s "
                    f"(attempt {attempt}); raise the task's timeout= or make the work smaller"
                )
                error.__cause__ = None
            if attempt > retry.attempts or not isinstance(error, retry.on):
                if error is exc:
                    raise
                raise error from None
            lifecycle.retrying(action, counts, error)
            await engine.sleep(retry.delay(attempt, engine.rng))


_COROUTINE = types.CoroutineType
#: What a task returns when it forgot to await a call (``return sq(3)``).
_UNAWAITED = frozenset((_COROUTINE, Done))


def _unawaited(task: Task[Any, Any], result: Any) -> EncodeError:
    """The error for a task that returned a call instead of awaiting it (``return sq(3)``)."""
    what = "a task call"
    if type(result) is _COROUTINE:
        # An action's coroutine has the task in its (unstarted) frame; a
        # remembered call (``_remember``) wraps one as ``call``.
        chain = [result]
        inner = getattr(result.cr_frame, "f_locals", {}).get("call")
        if type(inner) is _COROUTINE:
            chain.append(inner)
        called = getattr(chain[-1].cr_frame, "f_locals", {}).get("task")
        name = getattr(called, "name", None)
        what = f"a call of task {name!r}" if isinstance(name, str) else f"the coroutine {result.__qualname__}()"
        for coroutine in reversed(chain):
            coroutine.close()  # never to run: no second warning about it
    return EncodeError(
        f"task {task.name!r} returned {what} instead of its result: the call was never "
        f"awaited; await it (return await ...)"
    )


def named_execute(name: str) -> Callable[..., Coroutine[Any, Any, Any]]:
    """:func:`execute` under a task's name, made once per task.

    A call of a task that is never awaited is then reported by Python as
    "coroutine '<task name>' was never awaited", not by this module's
    function name, at no cost per call.
    """
    fn = types.FunctionType(execute.__code__, execute.__globals__, name, None, None)
    fn.__qualname__ = name
    fn.__doc__ = execute.__doc__
    return fn


def call_remembered(
    run: Run,
    task: Task[Any, Any],
    parent: Action,
    key: str,
    values: Sequence[Any],
    named: Mapping[str, Any],
    counts: TaskCounts,
    memo: dict[str, Any],
) -> Coroutine[Any, Any, Any]:
    """A call made by an action that remembers its calls (its task has retries).

    A call that succeeded in an earlier attempt of ``parent`` gives its
    value back at once: it is not run again, not recorded again, and not
    counted again (it was counted succeeded when it first ran; it counts
    as replayed now).  A call that an earlier attempt started and left
    running (a ``gather`` sibling of the failure that ended that attempt)
    is waited for instead of started twice.  Any other call runs as usual,
    and its value is remembered once it succeeds.
    """
    found = memo.get(key, _NOTHING)
    if type(found) is InFlight:
        return _join(run, task, parent, key, values, named, counts, memo, found)
    if found is not _NOTHING:
        done = Done(loop=run.loop)
        done.set_result(found)
        _recalled(run, task, parent, key, counts)
        return done
    replay = run.replay
    if replay is not None:
        recorded = replay.get(key)
        if recorded is not None and recorded[0] in INLINE_KINDS:
            replayed = run._replay_now(task, parent, key, recorded, counts)
            memo[key] = replayed.result()
            return replayed
    return _start_remembered(run, task, parent, key, values, named, counts, memo)


class InFlight:
    """In an action's ``memo``: a call started by an attempt and not finished yet.

    ``future`` gets the call's value when it succeeds, and is cancelled
    when it fails (the entry is then removed: a later call runs again).
    """

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()


#: Stands for "not in memo" (a remembered value may be None).
_NOTHING: Any = object()


def _recalled(run: Run, task: Task[Any, Any], parent: Action, key: str, counts: TaskCounts) -> None:
    lifecycle.recalled(run, counts, lambda: Action(run, task, parent, group_var.get(), key))


def _start_remembered(
    run: Run,
    task: Task[Any, Any],
    parent: Action,
    key: str,
    values: Sequence[Any],
    named: Mapping[str, Any],
    counts: TaskCounts,
    memo: dict[str, Any],
) -> Coroutine[Any, Any, Any]:
    lifecycle.called(counts)
    call = _remember(memo, key, task._execute(run, task, parent, key, values, named, counts))
    call.__qualname__ = task.name  # type: ignore[attr-defined]  # a coroutine object's name
    return call


async def _remember(memo: dict[str, Any], key: str, call: Coroutine[Any, Any, Any]) -> Any:
    # Registered at the call's first step: a call made and never awaited
    # leaves nothing behind for a later attempt to wait for.
    flight = memo[key] = InFlight(asyncio.get_running_loop())
    try:
        value = await call
    except BaseException:
        if memo.get(key) is flight:
            del memo[key]
        flight.future.cancel()
        raise
    memo[key] = value
    flight.future.set_result(value)
    return value


async def _join(
    run: Run,
    task: Task[Any, Any],
    parent: Action,
    key: str,
    values: Sequence[Any],
    named: Mapping[str, Any],
    counts: TaskCounts,
    memo: dict[str, Any],
    flight: InFlight,
) -> Any:
    """Wait for the same call of an earlier attempt; if it does not succeed, run it again."""
    future = flight.future
    try:
        value = await asyncio.shield(future)
    except asyncio.CancelledError:
        if not future.cancelled():
            raise  # this call itself is cancelled, not the one it waits for
        return await _start_remembered(run, task, parent, key, values, named, counts, memo)
    _recalled(run, task, parent, key, counts)
    return value
