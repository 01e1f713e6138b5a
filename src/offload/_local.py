"""``offload.Local``: warm worker processes on this machine, speaking the offload protocol over pipes."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

from engine import ConfigError, OffloadError
from engine.extend import (
    PROTOCOL,
    VERSION,
    BackendContext,
    BundleData,
    Cluster,
    Done,
    Frames,
    Handle,
    Hello,
    Log,
    NeedBundle,
    Outcome,
    Payload,
    Shutdown,
    Start,
    StreamBroken,
    SubmitFailed,
    Trace,
    WorkerLost,
    detect_gpus,
    usable_cpus,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping
    from types import TracebackType

    from engine.extend import AttemptHooks, Gang

    from ._gang import GangAttempt

__all__ = ["Local", "WorkerClient", "WorkerOwner"]

#: Seconds a new worker has to say hello (a cold interpreter on a busy machine).
START_TIMEOUT: Final = 60.0
#: Seconds ``aclose`` waits for workers to exit after Shutdown before killing them.
SHUTDOWN_GRACE: Final = 2.0
#: How much of a dead worker's stderr an error quotes.
TAIL_BYTES: Final = 2000

_log = logging.getLogger("offload.local")


class Local:
    """Run offloaded attempts in warm worker processes on this machine.

    ``workers`` processes (``python -m offload.worker`` under ``python``,
    default this interpreter) are started on first use and each serves
    many attempts, ``concurrency`` at a time (async tasks share a worker's
    loop; sync ones get a thread each), so ``workers x concurrency``
    attempts run at once.  A worker's environment is this process's, plus
    ``env``, plus ``SHOAL_BLOB_STORE`` naming the engine's blob store (so
    ``File``/``Dir`` made inside an attempt land there) and a private
    ``SHOAL_HOME``.  Its stderr is kept in a log file under the engine's
    home, quoted when a worker dies at start.

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

    Cancellation: a cancelled or timed-out attempt always takes its worker
    with it: the worker's whole process group is killed (SIGKILL), so that
    nothing the attempt started (threads, child processes) keeps running.
    Other attempts that shared that worker (``concurrency > 1``) fail with
    ``WorkerLost`` and are retried on a fresh worker.

    Gangs (``@engine.task(nodes=N, offload=...)``): each attempt starts N
    fresh worker processes of its own, beside the ``workers`` (which serve
    single attempts only), one rank each, all on 127.0.0.1 with rank 0
    listening on a free port there; a rank asking for GPUs gets its own
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
        await asyncio.gather(
            *(w.stop(SHUTDOWN_GRACE, "offload.Local was closed") for w in workers),
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
        return self.workers * self.concurrency

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

        starting = [asyncio.ensure_future(self._start()) for _ in range(gang.nodes)]
        try:
            workers = list(await asyncio.gather(*starting))
        except BaseException:
            # Every rank or none: the workers that did start go again.
            for task in starting:
                task.cancel()
            started = [t.result() for t in starting if t.done() and not t.cancelled() and t.exception() is None]
            await asyncio.gather(*(w.kill("its gang could not start") for w in started))
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

        async def release() -> None:
            await asyncio.gather(*(w.stop(SHUTDOWN_GRACE, "its gang ended") for w in workers))

        attempt = GangAttempt(handle, gang, workers, stop_ranks, release)
        self._gangs[handle.id] = attempt
        await attempt.start(payload, clusters, hooks, rank_env)
        return handle

    async def reattach(self, handle: Handle) -> Handle | None:
        # Workers die with the engine that started them: nothing to find again.
        return None

    def _gpus(self) -> int:
        """The GPUs the workers will see, before any has said hello."""
        if "CUDA_VISIBLE_DEVICES" in self.env:
            return len([d for d in self.env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")])
        return detect_gpus()

    # -- workers ---------------------------------------------------------------

    async def _pick(self) -> _Worker:
        """A live worker with a free slot: an idle one, else a new one, else the first to free up."""
        ticket: int | None = None
        generation = self._generation
        while True:
            if generation != self._generation:
                raise _closed()
            best: _Worker | None = None
            for worker in self._workers:
                if len(worker.in_flight) < self.concurrency and (
                    best is None or len(worker.in_flight) < len(best.in_flight)
                ):
                    best = worker
            if best is not None:
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
        stderr = await asyncio.to_thread(open, log_path, "wb")  # handed to the child, closed below
        try:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "offload.worker", "--cache", str(cache),
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
        self._wake(everyone=True)


async def outcome_of(
    attempts: dict[str, _Attempt],
    handle: Handle,
    backend: str,
    discard: Callable[[Any, str], Awaitable[None]],
) -> tuple[_Attempt, Outcome]:
    """Wait for a submitted attempt's outcome (``wait`` of the worker backends).

    Shielded: a wait cancelled by the engine's timeout leaves the outcome
    for ``cancel()`` to deal with.  An attempt the worker itself timed out
    takes its worker with it, as a cancel would (``discard``).
    """
    attempt = attempts.get(handle.id)
    if attempt is None:
        raise OffloadError(
            f"{backend} has no attempt {handle.id} (it finished, was cancelled, or ran "
            f"under another backend object): submit it again"
        )
    try:
        outcome = await asyncio.shield(attempt.future)
    finally:
        if attempt.future.done():
            attempts.pop(handle.id, None)
    if not outcome.ok and outcome.error is not None and outcome.error.type == "engine.ActionTimeout":
        await discard(attempt.worker, f"attempt {handle.id} ran past its timeout")
    return attempt, outcome


async def cancel_attempt(
    attempts: dict[str, _Attempt], handle: Handle, discard: Callable[[Any, str], Awaitable[None]]
) -> None:
    """Cancel a submitted attempt: its worker, and the worker's process group, go with it."""
    attempt = attempts.pop(handle.id, None)
    if attempt is None:
        return
    attempt.future.cancel()
    await discard(attempt.worker, f"attempt {handle.id} was cancelled")


def message_host(message: Any) -> str:
    return message.hostname if isinstance(message, Hello) else "?"


def check_hello(message: Any, peer: str, host: str, python: str, where: str) -> Hello:
    """A worker's first message, if it is a hello from this very shoal (else a clear error)."""
    if not isinstance(message, Hello):
        raise SubmitFailed(
            f"{peer} began with a {type(message).__name__} message instead of its hello: it "
            f"is not a shoal worker"
        )
    if message.shoal != VERSION or message.protocol != PROTOCOL:
        raise OffloadError(
            f"the worker on {host} ({message.executable or python}) runs shoal {message.shoal} "
            f"(protocol {message.protocol}) and this engine runs shoal {VERSION} (protocol "
            f"{PROTOCOL}); install shoal=={VERSION} {where}"
        )
    return message


class _Attempt:
    def __init__(self, n: int, payload: Payload, hooks: AttemptHooks, handle: Handle, worker: WorkerClient) -> None:
        self.n = n
        self.payload = payload
        self.hooks = hooks
        self.handle = handle
        self.worker = worker
        self.future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()


class WorkerOwner(Protocol):
    """What a :class:`WorkerClient` asks of the backend that started it."""

    _context: BackendContext | None

    def _wake(self, *, everyone: bool = False) -> None: ...

    def _forget(self, worker: Any) -> None: ...


class WorkerClient(abc.ABC):
    """The engine's side of one worker connection, whatever carries it (pipes, an SSH channel).

    It reads the worker's frames (Done, Log, Trace, NeedBundle) until the
    stream ends, then fails what the worker still ran with ``lost_as``
    (``WorkerLost``; the SSH backend makes it ``HostLost`` when the
    connection went).  How the process is ended and reaped is the
    transport's: subclasses give :meth:`terminate`, :meth:`exited` and
    :meth:`stderr_tail`.
    """

    #: The error in-flight attempts fail with when the stream ends.
    lost_as: type[OffloadError] = WorkerLost
    #: What the lost attempt's message says happens next.
    retry_note = "the attempt is retried on a new worker"

    def __init__(self, owner: WorkerOwner, frames: Frames, hello: Hello, pid: int, what: str) -> None:
        self.owner = owner
        self.frames = frames
        self.hello = hello
        self.pid = pid
        #: The worker in messages ("the local worker process 123 (python3)").
        self.what = what
        self.serial = itertools.count(1)
        # Invariant: ``in_flight`` holds the attempts sent to this worker
        # and not answered with Done, by their id on this worker.
        self.in_flight: dict[int, _Attempt] = {}
        self.reader: asyncio.Task[None] | None = None
        #: Why the engine killed this worker, if it did.
        self.killed: str | None = None
        self._bundle_tasks: set[asyncio.Task[None]] = set()

    # -- what the transport gives ------------------------------------------------

    @abc.abstractmethod
    async def terminate(self) -> None:
        """SIGKILL the worker's process group."""

    @abc.abstractmethod
    async def exited(self, within: float | None) -> str | None:
        """Wait up to ``within`` seconds for the process to end; how it ended, or None if it still runs."""

    def stderr_tail(self) -> str:
        """The end of the worker's stderr, to quote in an error ('' when it wrote nothing)."""
        return ""

    # -- the protocol ------------------------------------------------------------

    async def read(self) -> None:
        """Take the worker's frames until its stream ends; then fail what it still ran."""
        broken: str | None = None
        try:
            while True:
                message = await self.frames.recv()
                if message is None:
                    break
                self._take(message)
        except StreamBroken as exc:
            broken = str(exc)
        except (ConnectionError, OffloadError) as exc:
            broken = f"its stream failed: {exc}"
        except Exception as exc:  # a transport's own error (an SSH channel that closed)
            broken = f"its stream failed: {type(exc).__name__}: {exc}"
        await self.lost(broken)

    def _take(self, message: Any) -> None:
        if isinstance(message, Log | Trace):
            attempt = self.in_flight.get(message.id)
            if attempt is None:
                return
            try:
                if isinstance(message, Log):
                    attempt.hooks.log(message.stream, message.text)
                else:
                    attempt.hooks.trace(message.key, message.name, message.kind, message.data)
            except Exception:
                # The engine's hooks failing must not take the worker down.
                _log.exception("%s: reporting a %s of attempt %s failed", self.what, type(message).__name__, attempt.handle.id)
        elif isinstance(message, Done):
            attempt = self.in_flight.pop(message.id, None)
            if attempt is not None and not attempt.future.done():
                attempt.future.set_result(message.outcome)
            self.owner._wake()
        elif isinstance(message, NeedBundle):
            task = asyncio.get_running_loop().create_task(self._send_bundle(message.digest))
            self._bundle_tasks.add(task)
            task.add_done_callback(self._bundle_tasks.discard)

    async def _send_bundle(self, digest: str) -> None:
        context = self.owner._context
        data = b""
        if context is not None and context.bundle_path is not None:
            # An unreadable bundle is sent empty: the worker fails the
            # attempts that need it with a message that names it.
            with contextlib.suppress(OSError):
                data = await asyncio.to_thread(context.bundle_path(digest).read_bytes)
        with contextlib.suppress(ConnectionError):
            await self.frames.send(BundleData(digest, data))

    def fail_all(self, error: Callable[[_Attempt], OffloadError]) -> None:
        """Fail every attempt in flight now with ``error(attempt)`` (the worker is not waited for)."""
        attempts, self.in_flight = self.in_flight, {}
        for attempt in attempts.values():
            if not attempt.future.done():
                attempt.future.set_exception(error(attempt))
                # Retrieved by wait(); mark it so that an unawaited one is not reported.
                attempt.future.exception()

    async def lost(self, broken: str | None) -> None:
        """The worker's stream ended: reap it and its group, fail its attempts with ``lost_as``."""
        self.owner._forget(self)
        status = await self.exited(SHUTDOWN_GRACE)
        await self.terminate()
        if status is None:
            status = await self.exited(None)
        with contextlib.suppress(Exception):
            await self.frames.aclose()
        attempts, self.in_flight = self.in_flight, {}
        if not attempts:
            return
        tail = "" if self.killed else self.stderr_tail()
        how = self.killed or broken or f"it exited with {status or 'an unknown status'}"
        for attempt in attempts.values():
            if attempt.future.done():
                continue
            p = attempt.payload
            attempt.future.set_exception(
                self.lost_as(
                    f"{self.what} running attempt {p.attempt} of action {p.key} of task {p.task!r} "
                    f"was lost: {how}; {self.retry_note}{tail}"
                )
            )
            # Retrieved by wait(); mark it so that an unawaited one is not reported.
            attempt.future.exception()

    async def kill(self, why: str) -> None:
        """SIGKILL the worker's process group and wait until the reader has failed its attempts."""
        if self.killed is None:
            self.killed = f"the engine killed it because {why}"
        await self.terminate()
        if self.reader is not None:
            await asyncio.shield(self.reader)

    async def stop(self, grace: float, why: str) -> None:
        """Shutdown, up to ``grace`` seconds for it to exit, then SIGKILL of its group."""
        self.killed = self.killed or why
        with contextlib.suppress(ConnectionError):
            await self.frames.send(Shutdown())
        with contextlib.suppress(Exception):
            await self.frames.aclose()
        await self.exited(grace)
        await self.terminate()
        if self.reader is not None:
            await asyncio.shield(self.reader)


class _Worker(WorkerClient):
    """One local worker process, over its pipes."""

    def __init__(
        self, backend: Local, proc: asyncio.subprocess.Process, frames: Frames, hello: Hello, log: Path
    ) -> None:
        super().__init__(backend, frames, hello, proc.pid, f"the local worker process {proc.pid} ({backend.python})")
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
