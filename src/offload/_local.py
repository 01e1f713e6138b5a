"""``offload.Local``: warm worker processes on this machine, speaking the offload protocol over pipes."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Final

from engine import ConfigError, OffloadError
from engine.extend import (
    VERSION,
    BackendContext,
    Cluster,
    Frames,
    Handle,
    Hello,
    Outcome,
    Payload,
    Start,
    StreamBroken,
    SubmitFailed,
    detect_gpus,
    usable_cpus,
)

# The worker client is shared with offload.SSH, which imports it from here too.
from ._worker_client import (
    SHUTDOWN_GRACE,
    START_TIMEOUT,
    TAIL_BYTES,
    WorkerClient,
    WorkerOwner,
    cancel_attempt,
    check_hello,
    message_host,
    outcome_of,
)
from ._worker_client import _Attempt as _Attempt

if TYPE_CHECKING:
    from collections.abc import Mapping
    from types import TracebackType

    from engine.extend import AttemptHooks, Gang

    from ._gang import GangAttempt

__all__ = [
    "QUEUE",
    "QUEUE_WAIT",
    "SHUTDOWN_GRACE",
    "START_TIMEOUT",
    "TAIL_BYTES",
    "Local",
    "WorkerClient",
    "WorkerOwner",
    "cancel_attempt",
    "check_hello",
    "message_host",
    "outcome_of",
    "room",
]

#: Attempts each worker may hold queued beyond the ``concurrency`` it runs
#: (pipelining: the next ones are there when one ends, with no round trip).
QUEUE: Final = 16
#: About how long (seconds) a queued attempt may be expected to wait behind
#: the ones ahead of it in its worker: a worker whose attempts take longer
#: than this gets no queue, so that a long attempt never holds back others
#: that another worker could run (see ``Local._room``).
QUEUE_WAIT: Final = 0.02


def room(worker: WorkerClient, concurrency: int) -> int:
    """How many more attempts ``worker`` may be sent now: free slots, plus room in its queue.

    The queue is for short attempts: about :data:`QUEUE_WAIT` seconds of
    them per slot (by the worker's running mean), :data:`QUEUE` at most,
    none before one has ended.  Longer ones wait in the engine, for the
    first worker to free a slot, rather than behind a long one there.
    Shared by ``offload.Local`` and SSH.
    """
    queue = 0
    mean = worker.mean_seconds
    budget = QUEUE_WAIT * concurrency
    if mean is not None:
        queue = QUEUE if mean * QUEUE <= budget else int(budget / mean)
    return concurrency + queue - len(worker.in_flight)


class Local:
    """Run offloaded attempts in warm worker processes on this machine.

    ``workers`` processes (``python -m offload.worker`` under ``python``,
    default this interpreter) are started on first use and each serves
    many attempts, ``concurrency`` at a time (async tasks share a worker's
    loop; sync ones get a thread each), so ``workers x concurrency``
    attempts run at once.  Attempts are pipelined: while a worker's
    attempts are short (they take less than :data:`QUEUE_WAIT` seconds on
    average), up to :data:`QUEUE` more wait in it, in order, so that it
    never waits a round trip for its next one; a worker whose attempts
    take longer gets only as many as it runs.  Attempts go to the worker
    holding the fewest, in the order they were submitted.

    A worker's environment is this process's, plus ``env``, plus
    ``SHOAL_BLOB_STORE`` naming the engine's blob store (so ``File``/``Dir``
    made inside an attempt land there) and a private ``SHOAL_HOME``.  Its
    stderr is kept in a log file under the engine's home, quoted when a
    worker dies at start.

    What it is for: isolation of code that crashes the interpreter, leaks
    memory or holds a GPU; another interpreter or environment
    (``python=``, ``env=``); and the worker protocol shared with the SSH
    and Batch backends, on one machine.

    Failures: a worker that dies with attempts in flight (killed, out of
    memory, a crash in C) fails them with ``offload.WorkerLost`` and is
    replaced for the next attempt; the engine retries those within
    ``retries`` without using up the task's own retries.  A worker that
    cannot start fails the submit with ``offload.SubmitFailed`` quoting its
    stderr; an interpreter without shoal, or with another shoal version,
    with ``engine.OffloadError`` before any attempt is sent.

    Cancellation: a cancelled or timed-out attempt that has started takes
    its worker with it: the worker's whole process group is killed
    (SIGKILL), so that nothing the attempt started (threads, child
    processes) keeps running.  Other attempts that the worker held, running
    or queued, fail with ``WorkerLost`` and are retried on a fresh worker.
    One still queued in its worker is taken back from the queue instead,
    and the worker serves on.

    Gangs (``@engine.task(nodes=N, offload=...)``): each attempt takes N
    worker processes of its own that have served nothing, beside the
    ``workers`` (which serve single attempts only), one rank each: spares
    started after the previous gang ended (as many as the largest gang so
    far, so that the next gang starts warm), else fresh ones.  The ranks
    run on 127.0.0.1, rank 0 listening on a free port there; a rank asking for GPUs gets its own
    share of this machine's (``CUDA_VISIBLE_DEVICES``).  The first rank
    that fails or dies kills the others' process groups at once; when the
    gang ends, its processes end too.  ``ranks_per_host`` below N cannot
    be met here (every rank runs on this machine) and is refused.
    """

    kind: ClassVar[str] = "local"
    reattachable: ClassVar[bool] = False

    def __init__(
        self,
        workers: int = 2,
        python: str | os.PathLike[str] = sys.executable,
        env: Mapping[str, str] | None = None,
        retries: int = 3,
        concurrency: int = 1,
    ) -> None:
        self.workers = _count("workers", workers, 1)
        self.retries = _count("retries", retries, 0)
        self.concurrency = _count("concurrency", concurrency, 1)
        if not isinstance(python, str | os.PathLike) or not str(python):
            raise ConfigError(
                f"offload.Local python= takes the path of a Python interpreter that has shoal "
                f"installed, got {python!r}"
            )
        self.python = str(python)
        env = {} if env is None else env
        if not hasattr(env, "items") or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise ConfigError(
                f"offload.Local env= takes a mapping of variable names to string values, got {env!r}"
            )
        self.env: dict[str, str] = dict(env)
        self._context: BackendContext | None = None
        self._own_home: Path | None = None
        self._serial = itertools.count(1)
        # Invariant: ``_workers`` are the live workers, each having said a
        # good hello; ``_starting`` counts workers being started, so
        # ``len(_workers) + _starting <= workers``.
        self._workers: list[_Worker] = []
        self._starting = 0
        # Submitters waiting for a free slot, as a heap by ticket (the order
        # they first asked in), so that they are served first come first
        # served even when they wake and have to wait again.  An attempt that
        # ends wakes the first; a worker that starts or goes wakes all (each
        # looks again).
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._tickets = itertools.count()
        # Invariant: ``_attempts`` holds every submitted attempt whose
        # outcome has not yet been taken by ``wait`` or dropped by ``cancel``.
        self._attempts: dict[str, _Attempt] = {}
        # The figures of the last hello, for ``unfit``.
        self._hello: Hello | None = None
        # Bumped by aclose(): a worker that finishes starting after it is not kept.
        self._generation = 0
        # Invariant: ``_gangs`` holds every gang submitted whose outcome has
        # not been taken by ``wait`` or dropped by ``cancel``; its workers
        # are its own, in no other list.
        self._gangs: dict[str, GangAttempt] = {}
        self._gang_serial = itertools.count(1)
        # Invariant: ``_spares`` are started workers that have served nothing,
        # kept for the ranks of the next gang (none until a gang has run:
        # ``_spares_wanted`` is the size of the largest gang so far); a gang
        # takes them before it starts more, and once it has ended the spares
        # are made up again in the background (``_refill``).
        self._spares: list[_Worker] = []
        self._spares_wanted = 0
        self._refill: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"offload.Local(workers={self.workers}, python={self.python!r}, concurrency={self.concurrency})"

    # -- lifecycle -------------------------------------------------------------

    async def open(self, context: BackendContext) -> None:
        """Prepare (nothing starts until the first submit)."""
        self._context = context

    async def __aenter__(self) -> Local:
        if self._context is None:
            # On its own: a private home, removed by aclose().
            self._own_home = Path(tempfile.mkdtemp(prefix="shoal-local-"))
            await self.open(BackendContext(home=self._own_home))
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop every worker: Shutdown, a short wait, then SIGKILL of each process group."""
        self._generation += 1
        workers, self._workers = self._workers, []
        gangs, self._gangs = list(self._gangs.values()), {}
        spares, self._spares, self._spares_wanted = self._spares, [], 0
        refill, self._refill = self._refill, None
        if refill is not None:
            # Let spares that are starting finish (one start at most): the
            # closed generation has them stopped, and none is left half made.
            with contextlib.suppress(Exception):
                await refill
        await asyncio.gather(
            *(w.stop(SHUTDOWN_GRACE, "offload.Local was closed") for w in [*workers, *spares]),
            *(g.cancel() for g in gangs),
        )
        for attempt in self._attempts.values():
            attempt.future.cancel()
        self._attempts.clear()
        self._wake(everyone=True)
        home, self._own_home = self._own_home, None
        if home is not None:
            self._context = None
            await asyncio.to_thread(shutil.rmtree, home, True)

    # -- the backend protocol ------------------------------------------------

    def capacity(self) -> int:
        """Attempts taken at once: ``workers x (concurrency + QUEUE)``, of which ``workers x concurrency`` run."""
        return self.workers * (self.concurrency + QUEUE)

    def unfit(self, cpu: float, gpu: int) -> str | None:
        hello = self._hello
        cpus = hello.cpus if hello is not None else usable_cpus()
        gpus = hello.gpus if hello is not None else self._gpus()
        if cpu > cpus:
            return f"it asks for {cpu:g} CPUs and the local workers' machine has {cpus}"
        if gpu > gpus:
            return f"it asks for {gpu} GPUs and the local workers' machine has {gpus}"
        return None

    async def submit(self, payload: Payload, hooks: AttemptHooks) -> Handle:
        worker = await self._pick()
        # From here to the send there is no await: the worker's reader sees
        # this attempt if the worker dies (see _Worker.lost).
        n = next(worker.serial)
        handle = Handle("local", f"{worker.pid}:{n}", f"{worker.hello.hostname}:{worker.pid}")
        attempt = _Attempt(n, payload, hooks, handle, worker)
        worker.in_flight[n] = attempt
        self._attempts[handle.id] = attempt
        with contextlib.suppress(ConnectionError):
            # A worker gone meanwhile fails the attempt with WorkerLost, in wait().
            await worker.frames.send(Start(n, payload))
        return handle

    async def wait(self, handle: Handle) -> Outcome:
        gang = self._gangs.get(handle.id)
        if gang is not None:
            try:
                return await gang.wait()
            finally:
                if gang.done():
                    self._gangs.pop(handle.id, None)
        _, outcome = await outcome_of(self._attempts, handle, "offload.Local", self._discard)
        return outcome

    async def cancel(self, handle: Handle) -> None:
        gang = self._gangs.pop(handle.id, None)
        if gang is not None:
            await gang.cancel()
            return
        await cancel_attempt(self._attempts, handle, self._discard)

    # -- gangs -----------------------------------------------------------------

    def gang_unfit(self, gang: Gang, cpu: float, gpu: int) -> str | None:
        if gang.ranks_per_host is not None and gang.ranks_per_host < gang.nodes:
            return (
                f"ranks_per_host={gang.ranks_per_host} cannot be met: offload.Local runs all "
                f"{gang.nodes} ranks on this machine (give SSH hosts, or drop ranks_per_host)"
            )
        gpus = self._hello.gpus if self._hello is not None else self._gpus()
        if gpu and gpu * gang.nodes > gpus:
            return f"{gang.nodes} ranks of {gpu} GPUs each need {gpu * gang.nodes} and this machine has {gpus}"
        return None

    async def submit_gang(self, payload: Payload, gang: Gang, hooks: AttemptHooks) -> Handle:
        """Start ``gang.nodes`` fresh workers, then send each its rank (see the class docstring)."""
        # Imported here: the gang module builds on this one's WorkerClient.
        from ._gang import GangAttempt, free_port, gang_handle

        self._spares_wanted = max(self._spares_wanted, gang.nodes)
        refill = self._refill
        if refill is not None and not refill.done():
            # Spares on their way are ready sooner than workers started now.
            await asyncio.shield(refill)
        ready = [w for w in self._spares if w.reader is not None and not w.reader.done()][: gang.nodes]
        for worker in ready:
            self._spares.remove(worker)
        starting = [asyncio.ensure_future(self._start()) for _ in range(gang.nodes - len(ready))]
        try:
            workers = ready + list(await asyncio.gather(*starting))
        except BaseException:
            # Every rank or none: the workers that did start go again.
            for task in starting:
                task.cancel()
            started = [t.result() for t in starting if t.done() and not t.cancelled() and t.exception() is None]
            await asyncio.gather(*(w.kill("its gang could not start") for w in [*ready, *started]))
            raise
        places = [f"{w.hello.hostname}:{w.pid}" for w in workers]
        handle = gang_handle("local", next(self._gang_serial), places)
        clusters = Cluster.layout(["127.0.0.1"] * gang.nodes, "127.0.0.1", free_port())
        per = payload.gpu
        # A rank asking for GPUs gets its own of this machine's, in rank order.
        rank_env = [
            {"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in range(r * per, (r + 1) * per))} if per else {}
            for r in range(gang.nodes)
        ]

        async def stop_ranks(why: str) -> None:
            await asyncio.gather(*(w.kill(why) for w in workers))
            self._make_spares()

        async def release() -> None:
            await asyncio.gather(*(w.stop(SHUTDOWN_GRACE, "its gang ended") for w in workers))
            self._make_spares()

        attempt = GangAttempt(handle, gang, workers, stop_ranks, release)
        self._gangs[handle.id] = attempt
        await attempt.start(payload, clusters, hooks, rank_env)
        return handle

    async def reattach(self, handle: Handle) -> Handle | None:
        # Workers die with the engine that started them: nothing to find again.
        return None

    def _make_spares(self) -> None:
        """Start, in the background, the spares the next gang will want (after a gang has ended)."""
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._fill_spares(), name="shoal-local-spares")

    async def _fill_spares(self) -> None:
        generation = self._generation
        missing = self._spares_wanted - len(self._spares)
        started = await asyncio.gather(*(self._start() for _ in range(missing)), return_exceptions=True)
        for worker in started:
            if isinstance(worker, BaseException):
                continue  # the next gang starts its workers itself, and says why they fail
            if generation != self._generation:
                await worker.stop(0, "offload.Local was closed")
            else:
                self._spares.append(worker)

    def _gpus(self) -> int:
        """The GPUs the workers will see, before any has said hello."""
        if "CUDA_VISIBLE_DEVICES" in self.env:
            return len([d for d in self.env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")])
        return detect_gpus()

    # -- workers ---------------------------------------------------------------

    def _room(self, worker: WorkerClient) -> int:
        return room(worker, self.concurrency)

    async def _pick(self) -> _Worker:
        """A live worker with room for one more attempt.

        The least loaded with a free slot; else a new worker; else (every
        worker up) the least loaded with room in its queue; else the first
        to make room, waiters served in the order they came.
        """
        ticket: int | None = None
        generation = self._generation
        while True:
            if generation != self._generation:
                raise _closed()
            best: _Worker | None = None
            for worker in self._workers:
                if self._room(worker) > 0 and (best is None or len(worker.in_flight) < len(best.in_flight)):
                    best = worker
            # A free slot first; a place in a queue only once every worker is up.
            if best is not None and (
                len(best.in_flight) < self.concurrency or len(self._workers) + self._starting >= self.workers
            ):
                return best
            if len(self._workers) + self._starting < self.workers:
                self._starting += 1
                try:
                    worker = await self._start()
                finally:
                    self._starting -= 1
                    self._wake(everyone=True)
                if generation != self._generation:
                    await worker.stop(0, "offload.Local was closed")
                    raise _closed()
                self._workers.append(worker)
                return worker
            if ticket is None:
                ticket = next(self._tickets)
            waiter = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (ticket, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, then cancelled: the slot goes to the next in line
                raise

    def _wake(self, *, everyone: bool = False) -> None:
        """Wake the first submitter waiting for a slot (or all of them)."""
        waiters = self._waiters
        while waiters:
            _, waiter = heapq.heappop(waiters)
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return

    async def _start(self) -> _Worker:
        context = self._context
        if context is None:
            raise OffloadError(
                "offload.Local was used before it was opened: use it through an engine, or "
                "`async with offload.Local(...) as backend:`"
            )
        folder = context.home / "offload-local"
        logs = folder / "logs"
        await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
        cache = folder / "cache"
        env = {**os.environ, **self.env, "SHOAL_HOME": str(cache / "home")}
        if context.blob_store is not None:
            env["SHOAL_BLOB_STORE"] = context.blob_store
        log_path = logs / f"worker-{os.getpid()}-{next(self._serial)}.log"
        stderr = await _open_log(log_path)  # handed to the child, closed below
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "offload.worker", "--cache", str(cache),
                    "--concurrency", str(self.concurrency),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=stderr,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise OffloadError(
                    f"offload.Local cannot start its interpreter {self.python}: {exc}; give "
                    f"python= the path of a Python that has shoal installed"
                ) from exc
        finally:
            stderr.close()
        assert proc.stdout is not None and proc.stdin is not None
        frames = Frames(proc.stdout, proc.stdin, f"the local worker {proc.pid} ({self.python})")
        try:
            hello = await self._hello_of(proc, frames, log_path)
        except BaseException:
            await _kill(proc)
            with contextlib.suppress(Exception):
                await frames.aclose()
            raise
        self._hello = hello
        worker = _Worker(self, proc, frames, hello, log_path)
        worker.reader = asyncio.create_task(worker.read(), name=f"shoal-local-worker-{proc.pid}")
        return worker

    async def _hello_of(self, proc: asyncio.subprocess.Process, frames: Frames, log: Path) -> Hello:
        try:
            message = await asyncio.wait_for(frames.recv(), START_TIMEOUT)
        except TimeoutError:
            raise SubmitFailed(
                f"the local worker {proc.pid} ({self.python} -m offload.worker) said nothing for "
                f"{START_TIMEOUT:g}s after it started{_tail(log)}"
            ) from None
        except StreamBroken as exc:
            raise SubmitFailed(f"{exc} instead of its hello{_tail(log)}") from None
        if message is None:
            status = _status(await proc.wait())
            tail = _tail(log)
            if re.search(r"No module named '?offload", tail):
                raise OffloadError(
                    f"the interpreter {self.python} cannot run a shoal worker: shoal is not "
                    f"installed there; install it into that interpreter "
                    f"({self.python} -m pip install shoal=={VERSION}), or give offload.Local "
                    f"python= an interpreter that has it{tail}"
                )
            raise SubmitFailed(
                f"the local worker {proc.pid} ({self.python} -m offload.worker) exited with "
                f"{status} before it said hello{tail or '; it wrote nothing to stderr'}"
            )
        return check_hello(
            message, f"the local worker {proc.pid} ({self.python})", message_host(message),
            self.python, "into that interpreter",
        )

    async def _discard(self, worker: WorkerClient, why: str) -> None:
        """Kill a worker and its process group, failing what else it ran; replaced lazily."""
        await worker.kill(why)
        self._wake(everyone=True)

    def _forget(self, worker: Any) -> None:
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._spares.remove(worker)
        self._wake(everyone=True)


class _Worker(WorkerClient):
    """One local worker process, over its pipes."""

    def __init__(
        self, backend: Local, proc: asyncio.subprocess.Process, frames: Frames, hello: Hello, log: Path
    ) -> None:
        super().__init__(
            backend, frames, hello, proc.pid, f"the local worker process {proc.pid} ({backend.python})",
            concurrency=backend.concurrency,
        )
        self.proc = proc
        self.log = log

    async def terminate(self) -> None:
        _killpg(self.pid)

    async def exited(self, within: float | None) -> str | None:
        try:
            returncode = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            return None
        return _status(returncode)

    def stderr_tail(self) -> str:
        return _tail(self.log)

    async def lost(self, broken: str | None) -> None:
        await super().lost(broken)
        # A worker that wrote nothing to stderr leaves no log file behind
        # (one is made per worker started; cancels start new ones).
        with contextlib.suppress(OSError):
            if self.log.stat().st_size == 0:
                self.log.unlink()


def _closed() -> OffloadError:
    return OffloadError(
        "offload.Local was closed while this attempt waited for a worker; submit it to an "
        "open backend"
    )


def _count(name: str, value: Any, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"offload.Local {name}= takes a whole number >= {least}, got {value!r}")
    return value


def _killpg(pid: int) -> None:
    # The worker leads its own session and process group (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _open_log(path: Path) -> BinaryIO:
    """``open(path, "wb")`` off the loop.

    Cancelled while the thread opens it (the other ranks of a gang whose
    first worker could not start), the file is closed once it is open,
    not left to the garbage collector.
    """
    opening = asyncio.ensure_future(asyncio.to_thread(open, path, "wb"))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


async def _kill(proc: asyncio.subprocess.Process) -> None:
    _killpg(proc.pid)
    await proc.wait()


def _status(returncode: int | None) -> str:
    if returncode is None:
        return "an unknown status"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"{name} (signal {-returncode})"
    return f"exit status {returncode}"


def _tail(log: Path) -> str:
    """The end of a worker's stderr, to quote in an error ('' when it wrote nothing)."""
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - TAIL_BYTES))
            text = f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""
    if not text:
        return ""
    return f"; its stderr ({log}) ends with:\n" + "\n".join("    " + line for line in text.splitlines())
