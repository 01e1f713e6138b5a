"""The engine: everything configurable, and the state shared by its runs."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, overload

from ._config import Config, load_config
from ._errors import ConfigError, EngineError, InputError, ResourceError
from ._events import EVENT_KINDS, ActionEvent, EventStream
from ._limits import Slots
from ._run import Run, new_run_id
from ._targets import check_offload, check_targets, resolve_target
from ._task import Task

if TYPE_CHECKING:
    import random
    from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
    from concurrent.futures import ThreadPoolExecutor
    from datetime import datetime

    from ._action import Action
    from ._blobs import BlobStore
    from ._client import RecordedRun
    from ._journal import Journal
    from ._placement import Remote
    from ._pool import WorkerPool
    from ._records import RunSummary

__all__ = ["Engine"]

P = ParamSpec("P")
R = TypeVar("R")


#: Threads for sync tasks called from other sync tasks (created as needed).
NESTED_THREADS = 256


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def detect_gpus() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else the NVIDIA driver's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0


class Engine:
    """Runs tasks; owns the journal, the blob store, the process pool and the limits.

    ``store``: ``None`` for the configured journal (default: the SQLite file
    ``.shoal/shoal.db`` in the working directory, or under ``$SHOAL_HOME``),
    ``"memory"`` to keep nothing (for latency-sensitive embedding: no
    journal, no resume, no cache), or a path to a SQLite file.  A memory
    engine keeps ``File``/``Dir``/``DataFrame`` data and downloads in a
    private temporary folder that ``aclose()`` removes (unless a blob store
    is named: ``blob_store=``, config, ``SHOAL_BLOB_STORE``), so it leaves
    nothing on disk; references it made are dangling after that.

    ``max_concurrency``: most actions running their own code at once (None:
    no limit).  An action waiting for its children does not count, so deep
    fan-outs cannot deadlock.  ``cpus``/``gpus``: local resource slots for
    tasks that declare ``Resources`` (default: usable CPUs, detected GPUs).

    ``cache``: whether tasks declared with ``cache=`` look up the cache
    (None: as the config file's ``cache`` says, by default yes).

    ``journal_timeout``: seconds a journal write waits for another process
    holding the file's lock before it fails with :class:`JournalBusy`.

    ``targets``: offload targets by name (backend objects such as
    ``offload.Local()``), found before the config file's
    ``[tool.shoal.offload.NAME]`` tables.  ``offload``: where tasks run, by
    task name, whatever their own ``offload=`` says: a target name or
    object, or ``"local"`` for this process (``shoal run --offload
    TASK=TARGET`` fills it).  A backend is opened when a run first needs it
    and closed by ``aclose()``, after the runs are cancelled and before the
    journal closes.

    ``overrides``: task options by task name, for every call of those
    tasks in this engine's runs, as ``task.override(...)`` gives them:
    ``{"train": {"timeout": 600, "retries": 3}}`` (``shoal run --with
    train.timeout=600`` fills it).  They win over the options in code;
    ``offload`` above wins over them.

    ``sleep`` and ``rng`` drive retry backoff; tests inject them so that
    they never sleep.

    Use as ``async with Engine(...) as eng: run = await eng.run(main, n=10)``.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | None = None,
        *,
        max_concurrency: int | None = None,
        config: Config | str | os.PathLike[str] | None = None,
        blob_store: Any = None,
        cache: bool | None = None,
        cpus: float | None = None,
        gpus: int | None = None,
        home: str | os.PathLike[str] | None = None,
        journal_timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        targets: Mapping[str, Any] | None = None,
        offload: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.config = config if isinstance(config, Config) else load_config(config)
        self.targets = check_targets(targets)
        self.offload = check_offload(offload)
        from ._overrides import check_overrides

        # Options by task name for every call in this engine's runs (``shoal
        # run --with``); ``_overridden`` caches the handle made for each task
        # object, so that each has one placement and one set of slots.
        self.overrides = check_overrides(overrides)
        self._overridden: dict[Task[Any, Any], Task[Any, Any]] = {}
        if max_concurrency is None:
            max_concurrency = self.config.max_concurrency
        if max_concurrency is not None and (
            isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1
        ):
            raise ConfigError(
                f"Engine max_concurrency must be a whole number >= 1 (or None for no limit), "
                f"got {max_concurrency!r}"
            )
        self.max_concurrency = max_concurrency
        self.home = Path(home or self.config.home or os.environ.get("SHOAL_HOME") or Path.cwd() / ".shoal")
        store = store if store is not None else self.config.store
        if store is not None and not isinstance(store, str | os.PathLike):
            raise ConfigError(
                f'Engine store= takes "memory", a path to a SQLite file, or None, got {store!r}'
            )
        self.store = "memory" if store == "memory" else str(Path(store) if store else self.home / "shoal.db")
        if cache is not None and not isinstance(cache, bool):
            raise ConfigError(f"Engine cache= takes True, False or None (the config's), got {cache!r}")
        # Cache lookups: as given here, else as the config file says.
        self.use_cache = self.config.cache if cache is None else cache
        if isinstance(journal_timeout, bool) or not isinstance(journal_timeout, int | float) or journal_timeout < 0:
            raise ConfigError(f"Engine journal_timeout= is seconds >= 0, got {journal_timeout!r}")
        self.journal_timeout = float(journal_timeout)
        self.sleep: Callable[[float], Awaitable[None]] = sleep or asyncio.sleep
        if rng is None:
            import random  # here, not at module level: keeps `import engine` fast

            rng = random.Random()
        self.rng = rng
        self.clock = clock or time.time
        self.cpu_slots = Slots(cpus if cpus is not None else usable_cpus(), "cpu")
        self.gpu_slots = Slots(gpus if gpus is not None else detect_gpus(), "gpu")
        self._max_slots = Slots(max_concurrency, "max_concurrency") if max_concurrency else None
        # Whether any engine-wide limit applies, so the action path can skip
        # admission entirely when none does.
        self.limited = self._max_slots is not None
        self._task_slots: dict[Task[Any, Any], Slots] = {}
        # Invariant: ``subscribers`` are the event streams open now, and
        # ``wanted`` the union of the kinds they asked for; the action path
        # builds an event only when its kind is in ``wanted``.
        self.subscribers: list[EventStream] = []
        self.wanted: frozenset[str] = frozenset()
        self.runs_in_flight: dict[str, Run] = {}
        self._blob_spec = blob_store if blob_store is not None else (
            self.config.blob_store or os.environ.get("SHOAL_BLOB_STORE")
        )
        self._blob_store: BlobStore | None = None
        # A memory engine's blobs and downloads: a private temporary folder made
        # on first use (most memory engines never store a blob), removed by aclose().
        self._scratch: Path | None = None
        self._journal: Journal | None = None
        # Invariant: while the journal is being opened, ``_journal_opening``
        # is the one task doing it, which every caller awaits: concurrent
        # first runs share one journal (one thread, one connection).
        self._journal_opening: asyncio.Task[Journal] | None = None
        self._pool: WorkerPool | None = None
        # Threads for sync tasks: one pool for actions called from the loop,
        # and a larger one for sync tasks called from a sync task's thread,
        # whose callers block a thread each while they wait: sharing one
        # pool, blocked parents could take every thread from their children.
        self._threads: ThreadPoolExecutor | None = None
        self._nested_threads: ThreadPoolExecutor | None = None
        # Invariant: ``_built`` holds the backends made here from config
        # tables, by name (one object per name); ``_opened`` every backend
        # this engine opened (or is opening: the task doing it, awaited by
        # every caller), with its slots; both are closed by ``aclose()``.
        self._built: dict[str, Any] = {}
        self._opened: dict[int, tuple[Any, asyncio.Task[Slots]]] = {}
        #: Code bundles made by this engine's runs: digest -> tar.gz path.
        self.bundles: dict[str, Path] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Cancel runs still in flight, then close the journal, the pool and the blob store."""
        if self._closed:
            return
        self._closed = True
        for run in list(self.runs_in_flight.values()):
            run.cancel()
        for run in list(self.runs_in_flight.values()):
            await run.wait()
        for stream in list(self.subscribers):
            stream.close()
        for threads in (self._threads, self._nested_threads):
            if threads is not None:
                threads.shutdown(wait=False)
        opening = self._journal_opening
        if opening is not None and not opening.done():
            await asyncio.wait([opening])
        try:
            await self._close_backends()
            if self._pool is not None:
                await self._pool.aclose()
        finally:
            try:
                if self._journal is not None:
                    await self._journal.aclose()
            finally:
                try:
                    # Forgotten, so that a later use opens it again (a memory engine's
                    # refuses: its folder is gone).
                    blobs, self._blob_store = self._blob_store, None
                    if blobs is not None:
                        await blobs.aclose()
                finally:
                    if self._scratch is not None:
                        import shutil

                        await asyncio.to_thread(shutil.rmtree, self._scratch, ignore_errors=True)

    async def _close_backends(self) -> None:
        """Close every backend this engine opened, all of them even when one fails."""
        opened, self._opened = self._opened, {}
        errors: list[BaseException] = []
        for backend, opening in opened.values():
            if not opening.done():
                opening.cancel()
            await asyncio.wait([opening])
            try:
                await backend.aclose()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def durable(self) -> bool:
        return self.store != "memory"

    async def journal(self) -> Journal:
        """The engine's journal, opened on first use (not for ``store="memory"``)."""
        if not self.durable:
            raise EngineError(
                'this engine keeps no journal (store="memory"); use a durable store to '
                "list, inspect or resume runs"
            )
        if self._journal is not None:
            return self._journal
        if self._closed:
            raise EngineError("this engine is closed; create a new Engine")
        opening = self._journal_opening
        if opening is None:
            opening = self._journal_opening = asyncio.get_running_loop().create_task(self._open_journal())
        try:
            # Shielded: one caller being cancelled must not cancel the
            # opening that the others wait for.
            return await asyncio.shield(opening)
        finally:
            if opening.done() and self._journal_opening is opening and self._journal is None:
                self._journal_opening = None  # failed: the next caller tries again

    async def _open_journal(self) -> Journal:
        from ._journal import Journal

        journal = Journal(
            Path(self.store), blob_store=lambda: self.blob_store, busy_timeout=self.journal_timeout, home=self.home
        )
        try:
            await journal.open()
        except BaseException:
            await journal.aclose()
            raise
        self._journal = journal
        return journal

    @property
    def blob_store(self) -> BlobStore:
        """The blob store for large outputs and ``File``/``Dir`` data, opened on first use.

        For ``store="memory"`` with no blob store named, a local one in the
        engine's temporary folder, removed by ``aclose()``.
        """
        if self._blob_store is None:
            from ._blobs import open_blob_store

            spec = self._blob_spec or (None if self.durable else self._scratch_dir() / "blobs")
            self._blob_store = open_blob_store(spec, home=self.home)
        return self._blob_store

    @property
    def cache_dir(self) -> Path:
        """Where ``File``/``Dir``/``DataFrame`` downloads are cached.

        ``<home>/cache``; for ``store="memory"``, in the engine's temporary folder.
        """
        return self.home / "cache" if self.durable else self._scratch_dir() / "cache"

    def _scratch_dir(self) -> Path:
        if self._closed:
            raise EngineError(
                'this engine (store="memory") is closed, and its temporary folder for blobs '
                "and downloads was removed with it; use File/Dir data while the engine is "
                "open, or give it a blob_store= that outlives it"
            )
        if self._scratch is None:
            import tempfile

            # mkdtemp makes it 0700 whatever the umask.
            self._scratch = Path(tempfile.mkdtemp(prefix="shoal-memory-"))
        return self._scratch

    def run_sync(self, action: Action, values: Sequence[Any], named: Mapping[str, Any]) -> asyncio.Future[Any]:
        """Start one attempt of a sync task in a worker thread (with the action's context)."""
        from concurrent.futures import ThreadPoolExecutor

        parent = action.parent
        nested = parent is not None and not parent.task.is_async
        if nested:
            if self._nested_threads is None:
                self._nested_threads = ThreadPoolExecutor(NESTED_THREADS, thread_name_prefix="shoal-sync-nested")
            threads = self._nested_threads
        else:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(
                    min(32, usable_cpus() + 4), thread_name_prefix="shoal-sync"
                )
            threads = self._threads
        call = functools.partial(contextvars.copy_context().run, action.task.fn, *values, **named)
        return asyncio.get_running_loop().run_in_executor(threads, call)

    def worker_pool(self) -> WorkerPool:
        """The engine's process pool for ``parallel_map``, started on first use."""
        if self._closed:
            raise EngineError("this engine is closed; create a new Engine")
        if self._pool is None:
            from ._pool import WorkerPool

            self._pool = WorkerPool(max_workers=max(1, int(self.cpu_slots.capacity)))
        return self._pool

    # -- runs --------------------------------------------------------------

    async def submit(
        self,
        task: Task[Any, Any],
        /,
        *args: Any,
        tags: Sequence[str] = (),
        cache: bool | None = None,
        **kwargs: Any,
    ) -> Run:
        """Start a run of ``task`` and return it at once, still running."""
        if self._closed:
            raise EngineError("this engine is closed; create a new Engine")
        _check_root(task, "Engine.submit")
        tags, cache, kwargs = _split_run_options(task, tags, cache, kwargs)
        values, named = task.signature.bind(args, kwargs)
        journal = await self.journal() if self.durable else None
        if journal is not None:
            # Created (or migrated) now, so that a journal that cannot be
            # written fails the submit rather than the run.
            await journal.open_for_writing()
        run = Run(
            self,
            task,
            values,
            named,
            run_id=new_run_id(),
            tags=tags,
            journal=None if journal is None else journal.for_run(),
            use_cache=self.use_cache if cache is None else cache,
        )
        self._start(run)
        return run

    async def run(
        self,
        task: Task[Any, Any],
        /,
        *args: Any,
        tags: Sequence[str] = (),
        cache: bool | None = None,
        **kwargs: Any,
    ) -> Run:
        """Run ``task`` to the end and return the finished :class:`Run`.

        A failure of the task does not raise here: look at ``run.status``, or
        read ``run.result``, which raises :class:`RunFailed`.  Cancelling the
        caller cancels the run (every action, recorded as cancelled).  A
        ``KeyboardInterrupt`` or ``SystemExit`` raised in a task is not a
        failure: the run is recorded cancelled and the exception is raised
        here.
        """
        run = await self.submit(task, *args, tags=tags, cache=cache, **kwargs)
        return await self.wait_run(run)

    async def resume(self, run_id: str, *, task: Task[Any, Any] | None = None) -> Run:
        """Continue a failed, cancelled or interrupted run in place, and wait for it.

        The root task runs again with its recorded arguments; every action
        that succeeded before returns its recorded output without running.
        A run that already succeeded is returned as it is.  The root task is
        imported again from where the run recorded it, unless ``task`` is
        given (a task defined inside a function cannot be imported).
        """
        run = await self.submit_resume(run_id, task=task)
        return run if run.done else await self.wait_run(run)

    async def submit_resume(self, run_id: str, *, task: Task[Any, Any] | None = None) -> Run:
        """Like :meth:`resume`, but return the run at once, still running."""
        if self._closed:
            raise EngineError("this engine is closed; create a new Engine")
        journal = await self.journal()
        await journal.open_for_writing()
        from ._run_journal import prepare_resume

        run = await prepare_resume(self, journal, run_id, self.use_cache, task)
        if not run.done:
            self._start(run)
        return run

    def overridden(self, task: Task[Any, Any]) -> Task[Any, Any]:
        """``task`` with this engine's ``overrides`` for its name applied (itself if there are none)."""
        handle = self._overridden.get(task)
        if handle is None:
            options = self.overrides.get(task.name)
            handle = self._overridden[task] = task if options is None else task.with_options(options)
        return handle

    def _start(self, run: Run) -> None:
        if self.overrides:
            run.task = self.overridden(run.task)
        self.runs_in_flight[run.id] = run
        run.start()

    async def wait_run(self, run: Run) -> Run:
        """Wait for ``run``; cancelled, cancel it; interrupted by a task, raise that interrupt."""
        try:
            # Cancelling this wait cancels only its own waiter on the run's
            # event, not the run: no shield (and no task for it) needed.
            await run.wait()
        except asyncio.CancelledError:
            run.cancel()
            await run.wait()
            raise
        if run.status == "cancelled" and isinstance(run.error, KeyboardInterrupt | SystemExit):
            raise run.error
        return run

    def run_finished(self, run: Run) -> None:
        self.runs_in_flight.pop(run.id, None)

    async def runs(
        self,
        *,
        task: str | Task[Any, Any] | None = None,
        status: str | None = None,
        tag: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
        load_code: bool = True,
    ) -> list[RecordedRun[object]]:
        """Recorded runs, latest first, decoded (see :func:`engine.runs`)."""
        from ._client import read_runs

        name = task.name if isinstance(task, Task) else task
        return await read_runs(
            self, task=name, status=status, tag=tag, since=since, limit=limit, load_code=load_code
        )

    async def get_run(
        self, run_id: str, *, actions: bool = False, offset: int = 0, limit: int = 1000, load_code: bool = True
    ) -> RecordedRun[object]:
        """One recorded run, decoded (see :func:`engine.get_run`); ``actions=True`` fills ``action_records``."""
        from ._client import read_run

        return await read_run(self, run_id, actions=actions, offset=offset, limit=limit, load_code=load_code)

    @overload
    async def latest_run(
        self, task: Task[P, Coroutine[Any, Any, R]], *, status: str | None = "succeeded", load_code: bool = True
    ) -> RecordedRun[R] | None: ...
    @overload
    async def latest_run(
        self, task: Task[P, R], *, status: str | None = "succeeded", load_code: bool = True
    ) -> RecordedRun[R] | None: ...
    @overload
    async def latest_run(
        self, task: str, *, status: str | None = "succeeded", load_code: bool = True
    ) -> RecordedRun[object] | None: ...

    async def latest_run(
        self, task: Task[Any, Any] | str, *, status: str | None = "succeeded", load_code: bool = True
    ) -> RecordedRun[Any] | None:
        """The latest recorded run of ``task`` (a task or its name) with ``status`` (None: any), or None."""
        found = await self.runs(task=task, status=status, limit=1, load_code=load_code)
        return found[0] if found else None

    async def run_summary(
        self, run_id: str, *, actions: bool = False, offset: int = 0, limit: int = 1000
    ) -> RunSummary:
        """The journal's own view of a run: raw records (encoded outputs, Unix timestamps), per-task counts.

        For tools that look at how values are stored; :meth:`get_run` is
        the decoded view.
        """
        journal = await self.journal()
        return await journal.run_details(run_id, actions=actions, offset=offset, limit=limit)

    async def report(self, run_id: str, path: str | os.PathLike[str] | None = None) -> Path:
        """Write run ``run_id``'s report, one self-contained HTML file, and return its path.

        ``path`` defaults to ``shoal-report-RUN.html`` in the working
        folder (a folder puts that name inside it).  The page needs no
        network: a summary (status, root task, arguments, result, times,
        tags), a timeline of the actions by task and group with retries,
        failures and where each attempt ran, per-task statistics (count,
        p50/p95/max duration, retries, cache hits), failed actions with
        tracebacks, and an action's logs on click.  The run is read in
        pages, so a run of a million actions is reported in bounded
        memory; above 5,000 actions the timeline is drawn in time bins.
        Raises :class:`RunNotFound` for an unknown run.
        """
        from ._report import write_report

        journal = await self.journal()
        return await write_report(journal, run_id, path)

    def usable_here(self) -> bool:
        """Whether this engine is open and its journal (if opened) belongs to the running loop."""
        if self._closed:
            return False
        journal = self._journal
        return journal is None or journal.loop is asyncio.get_running_loop()

    @property
    def blob_spec(self) -> Any:
        """The blob store as it was given (a URL, a path, an object, or None for the default)."""
        return self._blob_spec

    # -- admission -----------------------------------------------------------

    def check_resources(self, task: Task[Any, Any]) -> None:
        """Refuse at call time what could never be admitted here (instead of waiting forever).

        Only for tasks that run in this process; an offloaded task's
        resources are checked against its target when the target opens.
        """
        res = task.resources
        if res is None:
            return
        if res.cpu > self.cpu_slots.capacity:
            raise ResourceError(
                f"task {task.name!r} asks for cpu={res.cpu:g} but this engine has "
                f"{self.cpu_slots.capacity:g} CPU slots; lower Resources(cpu=...), raise "
                f"Engine(cpus=...), or offload the task"
            )
        if res.gpu > self.gpu_slots.capacity:
            have = int(self.gpu_slots.capacity)
            raise ResourceError(
                f"task {task.name!r} asks for gpu={res.gpu} but this machine has "
                f"{have} GPU{'s' if have != 1 else ''} available to shoal; offload the task "
                f"to a host with GPUs (offload=...) or set Engine(gpus=...)"
            )

    async def admit(self, task: Task[Any, Any], place: Remote | None = None) -> list[tuple[Slots, float]]:
        """Take the slots one action of ``task`` needs; return what to give back.

        Always in the same order (task, cpu, gpu or offload target, engine),
        so two actions never wait for each other's slots in a cycle.  An
        offloaded action (``place``) takes a slot of its target instead of
        local CPU and GPU slots.
        """
        held: list[tuple[Slots, float]] = []
        try:
            if task.concurrency is not None:
                owner = task.limiter  # override handles share their task's limit
                slots = self._task_slots.get(owner)
                if slots is None:
                    slots = self._task_slots[owner] = Slots(task.concurrency, task.name)
                await slots.acquire(1)
                held.append((slots, 1))
            res = task.resources
            if place is not None:
                target = await place.slots()
                await target.acquire(1)
                held.append((target, 1))
            elif res is not None:
                if res.cpu:
                    await self.cpu_slots.acquire(res.cpu)
                    held.append((self.cpu_slots, res.cpu))
                if res.gpu:
                    await self.gpu_slots.acquire(res.gpu)
                    held.append((self.gpu_slots, res.gpu))
            if self._max_slots is not None:
                await self._max_slots.acquire(1)
                held.append((self._max_slots, 1))
        except BaseException:
            for slots, amount in held:
                slots.release(amount)
            raise
        return held

    # -- offload ------------------------------------------------------------

    def placement(self, task: Task[Any, Any]) -> Remote | None:
        """Where actions of ``task`` run: None for this process, else its :class:`Remote`.

        The engine's ``offload`` map wins over the task's own ``offload=``;
        ``"local"`` there means this process.  A closure, a lambda or a
        function that cannot be imported by name is refused here, when the
        task is first called, before anything is sent.
        """
        target = self.offload.get(task.name, task.offload)
        if target is None or target == "local":
            if task.nodes > 1:
                raise ConfigError(
                    f"task {task.name!r} has nodes={task.nodes} but no offload target: a gang's "
                    f"ranks run on one; give it offload= (offload.Local() runs the ranks as "
                    f"processes on this machine), or --offload {task.name}=TARGET"
                )
            return None
        name, backend = self._target(target, task)
        if task.nodes > 1 and not callable(getattr(backend, "submit_gang", None)):
            raise ConfigError(
                f"task {task.name!r} has nodes={task.nodes}, and offload target {name!r} "
                f"({type(backend).__qualname__}) cannot run gangs; send it to an offload.Local, "
                f"offload.SSH or offload.Batch target"
            )
        from ._placement import Remote
        from ._registry import bundler

        ref, root = bundler().function_ref(task)
        return Remote(self, task, name, backend, ref, root)

    def _target(self, target: Any, task: Task[Any, Any]) -> tuple[str, Any]:
        """(name, backend) of a target given by name or as an object (see ``_targets``)."""
        return resolve_target(target, task, self.targets, self._built, self.config)

    async def target_slots(self, name: str, backend: Any) -> Slots:
        """The slots of an offload target (its capacity), opening its backend on first use."""
        entry = self._opened.get(id(backend))
        if entry is None:
            if self._closed:
                raise EngineError("this engine is closed; create a new Engine")
            opening = asyncio.get_running_loop().create_task(self._open_backend(name, backend))
            entry = self._opened[id(backend)] = (backend, opening)
        opening = entry[1]
        try:
            return await asyncio.shield(opening)
        finally:
            failed = opening.done() and (opening.cancelled() or opening.exception() is not None)
            if failed and self._opened.get(id(backend)) is entry:
                del self._opened[id(backend)]  # the next use tries again

    async def _open_backend(self, name: str, backend: Any) -> Slots:
        from ._backend import BackendContext

        context = BackendContext(
            home=self.home / "offload" / name,
            blob_store=self.blob_store.uri,
            bundle_path=self._bundle_path,
            sleep=self.sleep,
            monotonic=time.monotonic,
        )
        try:
            await backend.open(context)
        except BaseException:
            await backend.aclose()
            raise
        return Slots(backend.capacity(), f"offload target {name!r}")

    def _bundle_path(self, digest: str) -> Path:
        path = self.bundles.get(digest)
        if path is None:
            raise EngineError(f"no code bundle {digest[:12]} was made by this engine")
        return path

    # -- events --------------------------------------------------------------

    def events(self, *, kinds: Iterable[str] | None = None, maxsize: int = 100_000) -> EventStream:
        """Subscribe to action events from now on: ``async for ev in eng.events(): ...``.

        ``kinds`` picks the kinds of event wanted (``{"failed"}``); default all:
        started, retrying, succeeded, failed, cancelled, cached, replayed.
        """
        if isinstance(kinds, str):
            kinds = (kinds,)
        wanted = EVENT_KINDS if kinds is None else frozenset(kinds)
        unknown = wanted - EVENT_KINDS
        if unknown:
            raise ConfigError(
                f"unknown event kind(s) {sorted(unknown)}; kinds are {sorted(EVENT_KINDS)}"
            )
        return EventStream(self.subscribers, wanted, maxsize, self._refresh_wanted)

    def _refresh_wanted(self) -> None:
        self.wanted = frozenset().union(*(s.kinds for s in self.subscribers))

    def emit(self, kind: Any, action: Action, error: BaseException | None = None) -> None:
        event = ActionEvent(
            kind=kind,
            run_id=action.run.id,
            action_id=action.label,
            task=action.task.name,
            attempt=action.attempt,
            at=self.clock(),
            group=action.group,
            error=None if error is None else f"{type(error).__qualname__}: {error}",
        )
        for stream in self.subscribers:
            if kind in stream.kinds:
                stream.put(event)

    def __repr__(self) -> str:
        return f"<engine.Engine store={self.store!r} max_concurrency={self.max_concurrency}>"


def _check_root(task: Any, where: str) -> None:
    if not isinstance(task, Task):
        what = getattr(task, "__qualname__", None) or type(task).__qualname__
        raise InputError(
            f"{where} takes a task, got {what!r} ({type(task).__qualname__}); "
            f"decorate the function with @engine.task"
        )


def _split_run_options(
    task: Task[Any, Any], tags: Any, cache: Any, kwargs: dict[str, Any]
) -> tuple[tuple[str, ...], bool | None, dict[str, Any]]:
    if isinstance(tags, str):
        tags = (tags,)
    try:
        tags = tuple(tags)
    except TypeError:
        raise InputError(f"run tags= takes a list of strings, got {tags!r}") from None
    if not all(isinstance(t, str) and t for t in tags):
        raise InputError(f"run tags= takes a list of non-empty strings, got {list(tags)!r}")
    if cache is not None and not isinstance(cache, bool):
        raise InputError(f"run cache= takes True or False, got {cache!r}")
    return tags, cache, kwargs
