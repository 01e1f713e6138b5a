"""Where an action runs: in this process, or on an offload target.

A run resolves each task's placement once, when the task is first called
in it (:meth:`Run.placement`): the engine's ``offload=`` map (which
``shoal run --offload TASK=TARGET`` fills) wins over the task's own
``offload=``, and the value ``"local"`` there means "in this process".
Tasks that run here need nothing from this module; the action path only
checks ``place is None``.

An offloaded action keeps everything else of an action (key, validation,
replay, cache, admission, the task's retries and timeout, cancellation,
its journal record, events): :func:`~engine._action.execute` runs it as
usual and calls :meth:`Remote.attempt` for each attempt, inside the
task's timeout.  One attempt of the task may take several *submissions*:
an infrastructure failure (``WorkerLost``, ``HostLost``, ``Reclaimed``,
``SubmitFailed``) is retried here, within the target's own ``retries``,
with backoff, without using up the task's retries.

A task with ``nodes=N`` is a *gang* (see :mod:`engine._cluster`): each
attempt is submitted as one ``submit_gang`` of N ranks, retried as a
whole, and its outcome is one outcome (rank 0's value, or the failing
rank's exception with the rank named).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any

from . import _lifecycle as lifecycle
from ._backend import Handle
from ._cluster import Gang
from ._codec import encode_value
from ._context import action_var
from ._errors import (
    EngineError,
    ImportFailed,
    InfrastructureError,
    InputError,
    OffloadError,
    RemoteError,
    RemoteTraceback,
    ResourceError,
)
from ._options import Backoff
from ._wire import Payload

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from ._action import Action
    from ._backend import Backend
    from ._events import TaskCounts
    from ._limits import Slots
    from ._task import Task
    from ._wire import FunctionRef, Outcome

__all__ = ["CANCEL_GRACE", "Remote", "rebuild_error"]

#: Seconds a cancelled attempt waits for its backend to confirm the cancel.
CANCEL_GRACE = 10.0
#: Backoff between infrastructure retries: 0.2 s, 0.4 s, ... up to 30 s.
INFRA_BACKOFF = 0.2
INFRA_MAX_DELAY = 30.0


class Remote:
    """The placement of one task on one offload target, within one engine.

    ``ref`` is how workers import the task's function; ``slots`` bound the
    attempts running on the target at once (its capacity), shared by every
    task sent there.  Made by :meth:`Engine.placement`.
    """

    __slots__ = ("_backoff", "backend", "engine", "gang", "ref", "root", "target", "task")

    def __init__(self, engine: Any, task: Task[Any, Any], target: str, backend: Backend, ref: FunctionRef, root: Any) -> None:
        self.engine = engine
        self.task = task
        #: The target's name (for a backend object given directly: its kind).
        self.target = target
        self.backend = backend
        self.ref = ref
        #: The project folder bundled for the workers (None: nothing to bundle).
        self.root = root
        #: What each attempt asks for when the task is a gang (None: one process).
        self.gang = Gang(task.nodes, task.ranks_per_host) if task.nodes > 1 else None
        self._backoff = Backoff(INFRA_BACKOFF, INFRA_MAX_DELAY)

    def __repr__(self) -> str:
        return f"<Remote {self.task.name} -> {self.target}>"

    async def slots(self) -> Slots:
        """The target's slots, opening its backend first (checks what it can ever run)."""
        slots: Slots = await self.engine.target_slots(self.target, self.backend)
        res = self.task.resources
        cpu, gpu = (0.0, 0) if res is None else (res.cpu, res.gpu)
        if cpu or gpu:
            why = self.backend.unfit(cpu, gpu)
            if why is not None:
                raise ResourceError(
                    f"task {self.task.name!r} asks for cpu={cpu:g}, gpu={gpu}, which no "
                    f"worker of target {self.target!r} can ever give: {why}; lower its Resources "
                    f"or send it to another target"
                )
        gang = self.gang
        if gang is not None:
            why = self.backend.gang_unfit(gang, cpu, gpu)  # type: ignore[attr-defined]
            if why is not None:
                per_host = "" if gang.ranks_per_host is None else f", ranks_per_host={gang.ranks_per_host}"
                raise ResourceError(
                    f"task {self.task.name!r} asks for a gang of nodes={gang.nodes}{per_host}, which "
                    f"target {self.target!r} can never place: {why}; lower nodes= or "
                    f"ranks_per_host=, or send it to a target with more room"
                )
        return slots

    async def attempt(
        self, action: Action, values: Sequence[Any], named: Mapping[str, Any], counts: TaskCounts
    ) -> Any:
        """One attempt of ``action`` on the target: its value, or the task's exception."""
        run = action.run
        task = self.task
        engine = self.engine
        try:
            args_kind, args = encode_value(
                (list(values), dict(named)), what=f"arguments of task {task.name!r} (offloaded)"
            )
        except EngineError as exc:
            raise InputError(str(exc)) from None
        bundle = await run.bundle(self.root) if self.root is not None else None
        res = task.resources
        payload = Payload(
            run_id=run.id,
            key=action.key or action.label,
            attempt=action.attempt,
            task=task.name,
            fn=self.ref,
            args_kind=args_kind,
            args=args,
            timeout=task.timeout,
            cpu=0.0 if res is None else res.cpu,
            memory=(res.memory_bytes or 0) if res is not None else 0,
            gpu=0 if res is None else res.gpu,
            bundle=bundle,
            blob_store=engine.blob_store.uri,
            traces=run.recorded_traces(action),
        )
        hooks = _Hooks(action)
        lost = 0
        while True:
            outcome = await self._submission(action, payload, hooks)
            if isinstance(outcome, InfrastructureError):
                lost += 1
                if lost > self.backend.retries:
                    raise outcome
                lifecycle.retrying(action, counts, outcome)
                await engine.sleep(self._backoff.delay(lost, engine.rng))
                continue
            if outcome.ok:
                return task.signature.decode_output(outcome.value_kind, outcome.value)
            raise rebuild_error(task, outcome)

    async def _submission(self, action: Action, payload: Payload, hooks: _Hooks) -> Outcome | InfrastructureError:
        """Submit once and wait; an infrastructure failure is returned, to be retried."""
        backend = self.backend
        run = action.run
        journal = run.journal
        started = time.time()
        handle = None
        earlier = run.in_flight.pop(action.key, None) if run.in_flight else None
        if earlier is not None and backend.reattachable and earlier.backend == backend.kind:
            # Submitted before this process died: waited for again, not
            # submitted twice (a job that is gone comes back as None).
            handle = await backend.reattach(earlier)
        if handle is None:
            try:
                if self.gang is None:
                    handle = await backend.submit(payload, hooks)
                else:
                    handle = await backend.submit_gang(payload, self.gang, hooks)  # type: ignore[attr-defined]
            except InfrastructureError as exc:
                if journal is not None:
                    # Lost before it had a handle: recorded all the same.
                    lost = Handle(backend.kind, f"not-submitted:{started}", "")
                    journal.attempt(action, self.target, lost, "lost", started, time.time(), str(exc))
                return exc
        try:
            if journal is not None and backend.reattachable:
                # Durable before the wait: a crash from here on finds this
                # attempt again by its handle, never submits twice.  (An
                # attempt that dies with this process, on a worker, is
                # recorded when it ends; meanwhile the run's snapshot of
                # its running actions lists it.)
                await journal.attempt(action, self.target, handle, "running", started, None)
            outcome = await backend.wait(handle)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(asyncio.wait_for(backend.cancel(handle), CANCEL_GRACE))
            if journal is not None:
                journal.attempt(action, self.target, handle, "cancelled", started, time.time())
            raise
        except InfrastructureError as exc:
            if journal is not None:
                journal.attempt(action, self.target, handle, "lost", started, time.time(), str(exc))
            return exc
        except BaseException as exc:
            if journal is not None:
                journal.attempt(action, self.target, handle, "failed", started, time.time(), str(exc))
            raise
        if journal is not None:
            journal.attempt(
                action,
                self.target,
                _placed(handle, outcome),
                "succeeded" if outcome.ok else "failed",
                outcome.started_at or started,
                outcome.finished_at or time.time(),
            )
        return outcome


def _placed(handle: Handle, outcome: Outcome) -> Handle:
    """The handle, with where the worker (or each rank) said it ran when the backend did not know."""
    where = handle.where or outcome.where
    ranks = handle.ranks or tuple(outcome.ranks)
    if where == handle.where and ranks == handle.ranks:
        return handle
    import msgspec

    return msgspec.structs.replace(handle, where=where, ranks=ranks)


def rebuild_error(task: Task[Any, Any], outcome: Outcome) -> BaseException:
    """The exception an attempt ended with, as its own type when possible.

    The original exception is unpickled (workers are this engine's own
    processes, started by it) and given the remote traceback as its cause;
    one that cannot be rebuilt here (its class is not importable in this
    process) becomes :class:`RemoteError` with the remote type, message
    and traceback.  A failure of the worker to import the task or decode
    its arguments is :class:`ImportFailed`.  A gang's failing rank is named
    in a note ("raised on rank R of N (HOST)") and, where the exception
    takes one, a ``rank`` attribute.
    """
    error = _rebuilt(task, outcome)
    if outcome.rank is not None:
        # One rank of a gang failed: say which, where the exception can say it.
        error.add_note(f"raised on rank {outcome.rank} of {task.nodes} ({outcome.where or 'unknown host'})")
        with contextlib.suppress(AttributeError, TypeError):
            if not hasattr(error, "rank"):
                error.rank = outcome.rank  # type: ignore[attr-defined]
    return error


def _rebuilt(task: Task[Any, Any], outcome: Outcome) -> BaseException:
    info = outcome.error
    where = outcome.where or "a worker"
    if info is None:
        return OffloadError(f"an attempt of task {task.name!r} on {where} failed without an error")
    if outcome.error_kind == "system":
        return ImportFailed(info.message if where in info.message else f"on {where}: {info.message}")
    if outcome.error_pickle is not None:
        import pickle

        try:
            exc = pickle.loads(outcome.error_pickle)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback(info.traceback, where=where)
            return exc
    return RemoteError(
        f"task {task.name!r} raised {info.type}: {info.message} (on {where})",
        remote_type=info.type,
        remote_traceback=info.traceback,
    )


class _Hooks:
    """What a worker reports while an attempt runs, delivered as if the action itself ran here.

    Output is written to this process's ``sys.stdout``/``sys.stderr`` with
    the action as the current one, so the journal's capture records it
    under the action (and the CLI's rules for task output apply) exactly
    as for a local action; log records are captured as ``log`` lines.
    Traces are journaled as the action's, and remembered for its later
    attempts.  A gang's ranks each write their output with their rank:
    captured with it (``shoal logs`` shows ``[rank i]``) and shown with
    that prefix.
    """

    __slots__ = ("action",)

    def __init__(self, action: Action) -> None:
        self.action = action

    def log(self, stream: str, text: str, rank: int | None = None) -> None:
        if rank is not None:
            _rank_output(self.action, stream, text, rank)
            return
        token = action_var.set(self.action)
        try:
            if stream == "log":
                _log_line(self.action, text)
            else:
                out = sys.stdout if stream == "stdout" else sys.stderr
                out.write(text)
        finally:
            action_var.reset(token)

    def trace(self, key: str, name: str, kind: str, data: bytes) -> None:
        action = self.action
        action.run.remote_traced(action, key, name, kind, data)


def _capture_of(action: Action) -> Any:
    """The output capture of the action's run, when its output is being saved."""
    hub = getattr(sys.stdout, "hub", None)
    captures = getattr(hub, "captures", None)
    return captures.get(action.run.id) if captures else None


def _rank_output(action: Action, stream: str, text: str, rank: int) -> None:
    """Output of one rank of a gang: captured with its rank, shown with ``[rank i]`` before each line.

    Written under the capture's proxies, so that it is saved once, with
    its rank, not a second time as the action's own output.
    """
    capture = _capture_of(action)
    out = sys.stdout if stream == "stdout" else sys.stderr
    if capture is not None:
        if stream == "log":
            for line in text.splitlines():
                capture.add_line(action.label, "log", line, time.time(), rank)
        else:
            capture.add(action.label, stream, text, rank)
    mark = f"[rank {rank}] "
    shown = "".join(mark + line for line in text.splitlines(keepends=True))
    if stream == "log" and not shown.endswith("\n"):
        shown += "\n"
    real = getattr(out, "real", out)
    with contextlib.suppress(BrokenPipeError):
        real.write(shown)


def _log_line(action: Action, text: str) -> None:
    """A log record from a worker: captured as the action's ``log`` line, and shown on stderr.

    Written to the real stderr, under the capture's proxy, so that it is
    saved once (as ``log``), not a second time as a line of stderr.
    """
    capture = _capture_of(action)
    line = text.rstrip("\n")
    if capture is not None:
        capture.add_line(action.label, "log", line, time.time())
    real = getattr(sys.stderr, "real", sys.stderr)
    with contextlib.suppress(BrokenPipeError):
        real.write(line + "\n")
