"""A run: one execution of a root task and every action under it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import _lifecycle as lifecycle
from ._action import NOT_RECORDED, Action, Done, call_remembered
from ._codec import INLINE_KINDS, decode_value, digest_bytes
from ._context import group_var, task_of
from ._errors import BlobError, EngineError, JournalCorrupt, RunFailed
from ._events import TaskCounts

if TYPE_CHECKING:
    from collections.abc import Coroutine, Mapping, Sequence

    from ._backend import Handle
    from ._capture import OutputCapture
    from ._engine import Engine
    from ._placement import Remote
    from ._run_journal import RunJournal
    from ._task import Task

__all__ = ["Run", "trace_key"]

Status = Literal["running", "succeeded", "failed", "cancelled"]


class Run:
    """One execution of a root task, with every action it started.

    Returned by :func:`engine.run`, :func:`engine.arun`, :meth:`Engine.run`
    (finished) and :meth:`Engine.submit` (still running; ``await run.wait()``).
    ``status`` is one of ``"running"``, ``"succeeded"``, ``"failed"``,
    ``"cancelled"``; ``result`` gives the root task's result or raises
    :class:`RunFailed` chained to the task's exception; ``stats`` counts the
    actions by state and ``counters`` by task.
    """

    def __init__(
        self,
        engine: Engine,
        task: Task[Any, Any],
        values: Sequence[Any],
        named: Mapping[str, Any],
        *,
        run_id: str,
        tags: Sequence[str] = (),
        attempt: int = 1,
        journal: RunJournal | None = None,
        replay: dict[str, Any] | None = None,
        use_cache: bool = True,
    ) -> None:
        self.id = run_id
        self.engine = engine
        self.task = task
        self.tags = tuple(tags)
        self.attempt = attempt
        self.status: Status = "running"
        self.error: BaseException | None = None
        self.started_at = datetime.now(UTC)
        #: When this attempt started (a resumed run's ``started_at`` is its first's).
        self.attempt_started_at = self.started_at
        self.finished_at: datetime | None = None
        #: How many actions are in each state: per task name, and per
        #: (group label, task name) for calls made inside an ``engine.group``.
        self.counters: dict[str | tuple[str, str], TaskCounts] = {}
        #: Labels of the ``engine.group`` blocks entered in this run.
        self.groups: set[str] = set()
        # Invariant: ``live`` holds every asyncio task currently running an
        # action of this run (an action awaited inline shares its parent's
        # task).  When the root finishes, whatever is still in it was spawned
        # and abandoned, and is cancelled: no action outlives its run.
        self.live: set[asyncio.Task[Any]] = set()
        #: Set once the root has finished: an action that starts after that
        #: (spawned and abandoned) is cancelled before it runs.
        self.closing = False
        self.journal = journal
        # Invariant: for a journaled run, ``running`` holds the actions in
        # the running state now (their code runs, here or on a target),
        # written to the journal every second or so for 'shoal show' (see
        # engine._watch); None for a run with no journal.
        self.running: dict[Action, None] | None = {} if journal is not None else None
        # Invariant: ``keyed`` is ``journal is not None or _remembering > 0``,
        # where ``_remembering`` counts this run's actions with retries whose
        # attempts are running (they remember their calls by key): whether a
        # call must compute its key, read with one attribute on the hot path.
        self.keyed = journal is not None
        self._remembering = 0
        # Outputs of actions that succeeded in an earlier attempt of this
        # run, by key; None when this attempt is not a resume.
        self.replay = replay
        self.use_cache = use_cache
        self.thread_id = threading.get_ident()
        self.loop = asyncio.get_running_loop()
        self._values = values
        self._named = named
        # Placement (see ``_placement``): whether the engine's offload map
        # may send any task elsewhere; ``places`` caches each task's
        # resolution for this run; ``remote`` holds the tasks that run
        # elsewhere (None while there are none, one read on the action path).
        self.offloading = bool(engine.offload)
        self.places: dict[Task[Any, Any], Remote | None] = {}
        self.remote: dict[Task[Any, Any], Remote] | None = None
        # Invariant: ``_remote_traces`` holds, for each offloaded action with
        # attempts in flight, the traces its attempts recorded (key ->
        # encoded result), sent with its next attempt; dropped when the
        # action is done.  ``replay_traces`` lists a resumed run's recorded
        # trace keys by the action they belong to.
        self._remote_traces: dict[str, dict[str, tuple[str, bytes]]] = {}
        self.replay_traces: dict[str, list[str]] | None = None
        #: A resumed run's offloaded attempts that were submitted and never
        #: seen to end, by action key (see ``Remote``): each is re-attached
        #: once, by the first attempt of its action.
        self.in_flight: dict[str, Handle] = {}
        # The code bundle of each project folder sent by this run (its digest), built once.
        self._bundles: dict[Any, asyncio.Task[str]] = {}
        self._result: Any = None
        self._main: asyncio.Task[None] | None = None
        self._done = asyncio.Event()

    # -- public ------------------------------------------------------------

    @property
    def result(self) -> Any:
        """The root task's result; raises :class:`RunFailed` if the run did not succeed."""
        if self.status == "succeeded":
            return self._result
        if self.status == "running":
            raise EngineError(f"run {self.id} is still running; await run.wait() first")
        if self.status == "cancelled":
            raise RunFailed(
                f"run {self.id} was cancelled; resume it with engine.resume({self.id!r})",
                run_id=self.id,
            )
        error = self.error
        raise RunFailed(
            f"run {self.id} failed: {type(error).__qualname__}: {error}"
            + (f"; after fixing it, resume with engine.resume({self.id!r})" if self.journal else ""),
            run_id=self.id,
        ) from error

    @property
    def stats(self) -> dict[str, int]:
        """Actions of this run by state, summed over tasks.

        ``parallel_map`` items are not actions (the journal has no record of
        them): they are counted in their own ``counters`` only.
        """
        total: dict[str, int] = {}
        for counts in self.counters.values():
            if counts.unit != "actions":
                continue
            for state, n in counts.as_dict().items():
                total[state] = total.get(state, 0) + n
        return total or TaskCounts("").as_dict()

    def counters_for(
        self, name: str, group: str | None = None, kind: type[TaskCounts] = TaskCounts, ranks: int = 1
    ) -> TaskCounts:
        """The counters of ``name`` (a task, or another unit of work such as a parallel_map) in ``group``.

        ``kind`` makes them when ``name`` has none yet (a subclass counts
        something other than actions, see ``TaskCounts.unit``); ``ranks``
        is a gang task's ``nodes``.
        """
        key = name if group is None else (group, name)
        counts = self.counters.get(key)
        if counts is None:
            counts = self.counters[key] = kind(name, group)
            counts.ranks = ranks
        return counts

    def cancel(self) -> None:
        """Cancel the run: every action still running is cancelled and recorded so."""
        if self._main is not None and not self._main.done():
            self._main.cancel()

    def interrupted(self, exc: KeyboardInterrupt | SystemExit) -> asyncio.CancelledError:
        """An action raised ``exc``: cancel the run, and keep ``exc`` for whoever waits for it.

        The run ends cancelled with ``error`` set to ``exc``, which
        :meth:`Engine.run` (so ``engine.run``/``arun``) raises again.  An
        action awaited inline unwinds to the root by itself; one in another
        asyncio task (``gather``) cancels the root, so that the interrupt is
        not taken for a failure of that one child.
        """
        if self.error is None:
            self.error = exc
        if not self.closing and task_of(self.loop) is not self._main:
            self.cancel()
        return asyncio.CancelledError(f"run {self.id} interrupted by {type(exc).__name__}")

    async def wait(self) -> Run:
        """Wait until the run has finished (whatever its status); return it."""
        await self._done.wait()
        return self

    def mark_done(self) -> None:
        """For a run restored from the journal that needs no executing."""
        self._done.set()

    def __await__(self) -> Any:
        return self.wait().__await__()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __repr__(self) -> str:
        return f"<Run {self.id} {self.task.name} {self.status}>"

    # -- actions -----------------------------------------------------------

    def call(self, task: Task[Any, Any], parent: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Coroutine[Any, Any, Any]:
        """Create the action for one call of ``task`` under ``parent``."""
        if self.engine.overrides:
            task = self.engine.overridden(task)
        values, named = task.signature.bind(args, kwargs)
        if task.placed or self.offloading:
            self.placement(task)
        # Progress counts a call under the group it is made in; the journal
        # labels the action with the group it starts in (see engine.group).
        # The two differ only for a coroutine made outside a group and
        # awaited inside it.
        group = group_var.get()
        counts = self.counters.get(task.name if group is None else (group, task.name))
        if counts is None:
            counts = self.counters_for(task.name, group, ranks=task.nodes)
        key = ""
        if self.keyed:
            memo = parent.memo
            if self.journal is not None or memo is not None:
                # The key is fixed now, at call time, so that it follows the order
                # of the calls and not the order in which the actions get to run.
                key = self._key(task.name, parent, values, named)
                if memo is not None:
                    return call_remembered(self, task, parent, key, values, named, counts, memo)
                if self.replay is not None:
                    found = self.replay.get(key)
                    if found is not None and found[0] in INLINE_KINDS:
                        return self._replay_now(task, parent, key, found, counts)
        lifecycle.called(counts)
        return task._execute(self, task, parent, key, values, named, counts)

    def placement(self, task: Task[Any, Any]) -> Remote | None:
        """Where this run's actions of ``task`` run (resolved once per run; see ``_placement``)."""
        try:
            return self.places[task]
        except KeyError:
            pass
        place = self.engine.placement(task)
        if place is None:
            self.engine.check_resources(task)
        else:
            if self.remote is None:
                self.remote = {}
            self.remote[task] = place
            if place.root is not None:
                # Packed now, while the target opens (connects, starts its
                # workers), rather than after: the first attempt waits for both.
                self._packing(place.root)
        self.places[task] = place
        return place

    async def bundle(self, root: Any) -> str:
        """The digest of the code bundle of the project folder ``root``, packed once per run."""
        return await asyncio.shield(self._packing(root))

    def _packing(self, root: Any) -> asyncio.Task[str]:
        building = self._bundles.get(root)
        if building is None:
            building = self._bundles[root] = self.loop.create_task(self._build_bundle(root))
        return building

    async def _build_bundle(self, root: Any) -> str:
        from ._registry import bundler

        engine = self.engine
        exclude = [*engine.config.bundle_exclude, *_home_pattern(engine.home, root)]
        bundle = await bundler().abuild_bundle(root, exclude=exclude, dest=engine.home / "bundles")
        engine.bundles[bundle.digest] = bundle.path
        if self.journal is not None:
            self.journal.bundled(bundle.digest, bundle.size, bundle.files)
        return str(bundle.digest)

    def recorded_traces(self, action: Action) -> dict[str, tuple[str, bytes]]:
        """The traces an offloaded action recorded before, to send with its next attempt."""
        found = self._remote_traces.get(action.key)
        traces = dict(found) if found else {}
        if self.replay_traces is not None and self.replay is not None:
            for key in self.replay_traces.get(action.key, ()):
                recorded = self.replay.get(key)
                if recorded is not None:
                    traces.setdefault(key, recorded)
        return traces

    def remote_traced(self, action: Action, key: str, name: str, kind: str, data: bytes) -> None:
        """A trace call inside an offloaded attempt succeeded: journal it, remember it."""
        self._remote_traces.setdefault(action.key, {})[key] = (kind, data)
        if self.journal is not None:
            self.journal.traced_encoded(action, key, name, kind, data)

    def forget_traces(self, action: Action) -> None:
        self._remote_traces.pop(action.key, None)

    def remembering(self, delta: int) -> None:
        """An action with retries starts (``1``) or ends (``-1``) its attempts (see ``keyed``)."""
        self._remembering += delta
        self.keyed = self.journal is not None or self._remembering > 0

    def _replay_now(
        self, task: Task[Any, Any], parent: Action, key: str, found: tuple[str, bytes], counts: TaskCounts
    ) -> Done:
        """A call that succeeded in an earlier attempt: its recorded output, at once.

        No coroutine, no asyncio task, no scheduling: what comes back is an
        already finished awaitable, which is what makes replay cheap.
        (Outputs kept in the blob store are fetched by :func:`~engine._action.execute`.)
        """
        value = task.signature.decode_output(*found)
        if self.engine.wanted:
            lifecycle.replayed(self, counts, lambda: Action(self, task, parent, group_var.get(), key), pending=False)
        else:  # nobody listens for events: no action to make
            lifecycle.replayed(self, counts, None, pending=False)
        done = Done(loop=self.loop)
        done.set_result(value)
        return done

    def call_from_thread(self, task: Task[Any, Any], parent: Action, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A call made from a sync task's worker thread: run it on the loop, wait here."""
        group = group_var.get()  # the thread's group: the child starts in it

        async def call() -> Any:
            group_var.set(group)
            return await self.call(task, parent, args, kwargs)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result()

    def _key(self, name: str, parent: Action | None, values: Sequence[Any], named: Mapping[str, Any]) -> str:
        inputs = digest_bytes(name, values, named if type(named) is dict else dict(named))
        if parent is None:
            occurrence = 0
            parent_key = ""
        else:
            table = parent.occurrences
            if table is None:
                table = parent.occurrences = {}
            occurrence = table.get(inputs, 0)
            table[inputs] = occurrence + 1
            parent_key = parent.key
        return _chain(parent_key, inputs, occurrence)

    def trace_key(self, action: Action, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The key of one trace call inside ``action`` (see :func:`engine.trace`)."""
        table = action.occurrences
        if table is None:
            table = action.occurrences = {}
        return trace_key(action.key, table, name, args, kwargs)

    def replay_value(self, key: str, type: Any = Any) -> Any:
        """The recorded output of a trace call (traces are always stored inline)."""
        assert self.replay is not None
        kind, data = self.replay[key]
        return decode_value(kind, data, type)

    async def replayed(self, action: Action, found: tuple[str, bytes], counts: TaskCounts) -> Any:
        """The recorded output of a call that succeeded before, or ``NOT_RECORDED``.

        An output kept in the blob store that can no longer be read (the
        blob was deleted, damaged or replaced) counts as never recorded:
        the action runs again, with a warning, rather than the run being
        impossible to resume.
        """
        kind, data = found
        if kind.startswith("blob-"):
            assert self.journal is not None
            try:
                value = await self.journal.journal.decode(
                    kind, data, action.task.signature.returns(),
                    what=f"the recorded output of action {action.key} of task {action.task.name!r}",
                )
            except (BlobError, JournalCorrupt) as exc:
                import warnings

                assert self.replay is not None
                self.replay.pop(action.key, None)
                warnings.warn(
                    f"action {action.key} of task {action.task.name!r} runs again: its recorded "
                    f"output cannot be read ({exc})",
                    stacklevel=2,
                )
                return NOT_RECORDED
        else:
            value = action.task.signature.decode_output(kind, data)
        lifecycle.replayed(self, counts, action, pending=True)
        return value

    async def cached(self, action: Action, value: Any, counts: TaskCounts) -> Any:
        assert self.journal is not None  # the cache lives in the journal
        lifecycle.cached(action, counts)
        upload = self.journal.succeeded(action, value, counts, cached=True)
        if upload is not None:
            await upload
        return value

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._main = self.loop.create_task(self._drive(), name=f"shoal-run-{self.id}")

    async def _drive(self) -> None:
        counts = self.counters_for(self.task.name, ranks=self.task.nodes)
        lifecycle.called(counts)
        capture: OutputCapture | None = None
        try:
            key = ""
            if self.task.placed or self.offloading:
                self.placement(self.task)
            if self.journal is not None:
                from ._capture import OutputCapture

                key = self._key(self.task.name, None, self._values, self._named)
                await self.journal.started(self)
                capture = OutputCapture(self)
                capture.start()
            # The root belongs to no group, whatever the caller's context.
            group_var.set(None)
            self._result = await self.task._execute(self, self.task, None, key, self._values, self._named, counts)
            self.status = "succeeded"
        except asyncio.CancelledError:
            self.status = "cancelled"
        except BaseException as exc:
            self.status = "failed"
            self.error = exc
        finally:
            # The root may never have started (its first record could not
            # be written, or the run was cancelled before it ran).
            lifecycle.abandoned(counts, self.status)
            await self._cancel_leftovers()
            await self._drop_bundles()
            self._settle_never_started()
            if capture is not None:
                await capture.stop()
            self.finished_at = datetime.now(UTC)
            try:
                if self.journal is not None:
                    await self.journal.finished(self)
            except Exception as exc:
                # The run's outcome could not be made durable (disk full, a
                # damaged file): report that rather than a success nobody
                # could resume or find again.
                if self.status == "succeeded":
                    self.status = "failed"
                    self.error = exc
            finally:
                self._done.set()
                self.engine.run_finished(self)

    def _settle_never_started(self) -> None:
        """Count as cancelled the calls still pending once the run is over.

        They were made and never awaited (a forgotten ``await``): none can
        run any more (a call that starts after its run ended is cancelled
        before it runs, and then not counted again), and a finished run
        must not show actions pending forever.
        """
        for counts in self.counters.values():
            if counts.pending > 0:
                lifecycle.abandoned(counts)

    async def _drop_bundles(self) -> None:
        """Bundles still being packed when the run ends are not needed any more.

        Their outcome is taken here either way, so that a failure nobody
        waited for (the run was cancelled meanwhile) is not reported as a
        task exception never retrieved.
        """
        building = [b for b in self._bundles.values() if not b.done()]
        for b in building:
            b.cancel()
        await asyncio.gather(*self._bundles.values(), return_exceptions=True)

    async def _cancel_leftovers(self) -> None:
        self.closing = True
        me = asyncio.current_task()
        # Cancelling an action can start others (its except/finally code may
        # call tasks), so repeat until nothing of this run is left running.
        while leftovers := [t for t in self.live if t is not me and not t.done()]:
            for t in leftovers:
                t.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)


def _chain(parent_key: str, inputs: bytes, occurrence: int) -> str:
    """An action key: the parent's key, the digest of (task name, inputs), the occurrence."""
    return hashlib.blake2b(
        parent_key.encode() + inputs + occurrence.to_bytes(8, "little"), digest_size=12
    ).hexdigest()


def _home_pattern(home: Path, root: Path) -> list[str]:
    """A pattern that keeps the engine's home (journal, blobs) out of a bundle of ``root``."""
    try:
        inside = Path(os.path.abspath(home)).relative_to(os.path.abspath(root))
    except ValueError:
        return []
    return [f"/{inside.as_posix()}/"]


def trace_key(
    parent_key: str, occurrences: dict[bytes, int], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """The key of a trace call named ``name`` inside the action keyed ``parent_key``.

    ``occurrences`` counts the calls made so far in the action's attempt,
    by inputs; it is updated.  Workers of offloaded attempts derive keys
    with this same function, so a trace recorded remotely is found again
    locally and the other way round.
    """
    inputs = digest_bytes("trace", name, args, kwargs)
    occurrence = occurrences.get(inputs, 0)
    occurrences[inputs] = occurrence + 1
    return _chain(parent_key, inputs, occurrence)


def new_run_id() -> str:
    """A unique, time-ordered run id: UTC time to the second, then 64 random bits.

    64 bits make a collision among even a million runs started in one
    second unlikely (about 3 in 100,000); the journal refuses a duplicate
    id anyway (see ``Journal._claim``), so a collision fails one start
    instead of merging two runs.
    """
    stamp = time.strftime("%y%m%d%H%M%S", time.gmtime())
    import secrets

    return f"{stamp}-{secrets.token_hex(8)}"
