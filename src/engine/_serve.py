"""The worker's side of the protocol: run what an engine sends, over any transport.

:func:`serve` speaks the protocol of :mod:`engine._wire` over one
:class:`~engine._frames.Frames` (pipes to ``offload.Local``, an SSH
channel, the socket of a ``parallel_map`` worker): it says hello, then
runs every ``Start`` it is sent and answers each with exactly one
``Done``, and every ``Chunk`` with exactly one ``ChunkDone`` or
``ChunkFailed``, in order.  It is the one serving loop of every worker
process shoal starts: ``python -m offload.worker`` (see
:mod:`offload.worker`) runs it over the process's original stdin and
stdout, and each process of the engine's ``parallel_map`` pool over its
socket pair (see :mod:`engine._pool`).

How a chunk runs (see :mod:`engine._serve_chunks`): in the loop's thread,
one at a time, in the order received, with the loop looking away so that
the function sees no running event loop, as in a plain process.

How an attempt runs:

- Its function is imported by reference (``load_function``), from the
  code bundle when the payload names one (asked for with ``NeedBundle``
  when it is not in the cache yet, then put first on ``sys.path``).  A task
  runs its plain function: task calls inside it are plain calls.
- Async functions run as tasks of this loop, several at once; sync ones
  in a thread each, carrying the attempt's context.  A loop given a
  ``concurrency`` runs at most that many at once: the engine may send more
  (it pipelines, so that the worker never waits a round trip for its next
  attempt), and those wait here in the order they came.  A queued attempt
  can be taken back (``Withdraw``) or cancelled without disturbing the
  running ones.
- What it prints (``sys.stdout``, ``sys.stderr``) and logs (``logging``)
  is attributed to it through a ContextVar and streamed back as ``Log``
  frames every :data:`FLUSH_EVERY` seconds; trace results go back as
  ``Trace`` frames as they finish, and traces recorded before (the
  payload's ``traces``) are returned without running.
- ``timeout`` is enforced here too, :data:`TIMEOUT_GRACE` seconds after
  the engine's own deadline, so that it holds if the engine has gone, and
  counted from when the Start arrived (time queued here counts): an async
  attempt is cancelled; a sync one cannot be stopped, so the worker
  reports the timeout and then exits (status :data:`EXIT_STUCK`); one whose
  time ran out while it was queued is reported without running.
- ``env`` is set in ``os.environ`` around the attempt.  The environment is
  the process's, not the attempt's: while several attempts run at once,
  all their variables are set, and they are restored when the last one
  ends.  Backends start workers with the target's ``env`` already in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import os
import pickle
import platform
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, TextIO, cast

from ._cluster import cluster_var
from ._codec import decode_value, encode_value
from ._engine import detect_gpus, usable_cpus
from ._entries import describe
from ._errors import ActionTimeout, ImportFailed, OffloadError
from ._loader import load_function
from ._records import ErrorInfo
from ._run import trace_key
from ._serve_chunks import ChunkRunner
from ._task import Task
from ._trace import MISSING, trace_sink_var
from ._version import VERSION
from ._wire import (
    BundleData,
    Cancel,
    Chunk,
    Done,
    FindPort,
    FunctionRef,
    Hello,
    Log,
    Message,
    NeedBundle,
    Outcome,
    Payload,
    PortFound,
    Shutdown,
    Start,
    Trace,
    Withdraw,
    Withdrawn,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

__all__ = ["EXIT_STUCK", "FLUSH_EVERY", "TIMEOUT_GRACE", "BundleCache", "Channel", "WorkerLoop", "serve"]

#: Seconds between two batches of an attempt's output sent back.
FLUSH_EVERY: Final = 0.1
#: Seconds past an attempt's timeout before the worker itself gives up on it:
#: the engine enforces the timeout exactly, and is left to win that race.
TIMEOUT_GRACE: Final = 0.5
#: Exit status of a worker that gave up on a sync attempt it could not stop.
EXIT_STUCK: Final = 3

#: The attempt whose code is running in this context (its prints and logs are its own).
attempt_var: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "shoal.worker_attempt", default=None
)


class Channel(Protocol):
    """What the serving loop needs of its transport: :class:`~engine._frames.Frames` is one.

    Messages are those of :mod:`engine._wire`; ``post`` may be called from
    any thread; ``each`` hands over every message from the engine, in
    order, until the handler returns False or the stream ends.
    """

    async def send(self, message: Any) -> None: ...

    def post(self, message: Any) -> None: ...

    async def drain(self) -> None: ...

    async def each(self, handle: Callable[[Message], bool]) -> None: ...

    async def aclose(self) -> None: ...


class BundleCache(Protocol):
    """Where a worker finds code bundles by digest, and unpacks the ones it is sent.

    ``offload`` provides it (bundles are its business); a worker without
    one (the ``parallel_map`` pool's) refuses attempts that name a bundle.
    """

    def cached(self, digest: str) -> Path | None:
        """The folder of bundle ``digest`` if it was unpacked before."""
        ...

    def unpack(self, data: bytes, digest: str) -> Path:
        """Check ``data`` against ``digest``, unpack it, and return its folder (blocking)."""
        ...


async def serve(
    frames: Channel, bundles: BundleCache | None = None, *, capture: bool = True, concurrency: int | None = None
) -> int:
    """Serve attempts and chunks over ``frames`` until ``Shutdown`` or the end of the stream.

    ``capture``: send what attempts print and log back to the engine (the
    offload workers); without it, prints go to the process's own streams
    (the ``parallel_map`` pool's workers share their parent's terminal).
    ``concurrency``: how many attempts run at once (None: every one sent);
    the others wait in order.  Returns how many attempts were still running
    then (abandoned: nobody is left to take their results).
    """
    return await WorkerLoop(frames, bundles, capture=capture, concurrency=concurrency).serve()


class _Attempt:
    """One attempt running in this worker."""

    def __init__(self, id: int, payload: Payload) -> None:
        self.id = id
        self.payload = payload
        #: When its Start arrived (monotonic): its timeout counts from here.
        self.received = time.monotonic()
        #: The task running the attempt (set once it runs).
        self.task: asyncio.Task[None] | None = None
        #: Whether the function is sync (runs in a thread; cannot be cancelled).
        self.sync = False
        #: Whether the engine cancelled it (Cancel), rather than the worker shutting down.
        self.cancelled = False
        #: Whether its task has begun to run.
        self.running = False
        # Invariant: ``_chunks`` holds output written by the attempt and not
        # yet sent, in order, consecutive writes to one stream merged.
        # Written from the attempt's threads as well as the loop.
        self._lock = threading.Lock()
        self._chunks: list[list[Any]] = []

    def write(self, stream: str, text: str) -> None:
        with self._lock:
            chunks = self._chunks
            if chunks and chunks[-1][0] == stream:
                chunks[-1][1] += text
            else:
                chunks.append([stream, text, time.time()])

    def take(self) -> list[list[Any]]:
        with self._lock:
            chunks, self._chunks = self._chunks, []
        return chunks


class _Sink:
    """The trace sink of one attempt (see :class:`engine.extend.TraceSink`)."""

    def __init__(self, attempt: _Attempt, frames: Channel) -> None:
        self.attempt = attempt
        self.frames = frames
        # Calls made so far in this attempt, by inputs: the same keys the engine derives.
        self.occurrences: dict[bytes, int] = {}

    def key(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        return trace_key(self.attempt.payload.key, self.occurrences, name, args, kwargs)

    def recorded(self, key: str, returns: Any) -> Any:
        found = self.attempt.payload.traces.get(key)
        if found is None:
            return MISSING
        kind, data = found
        return decode_value(kind, data, returns)

    def record(self, key: str, name: str, result: Any) -> None:
        kind, data = encode_value(result, what=f"result of trace {name!r}")
        self.frames.post(Trace(self.attempt.id, key, name, kind, data))


class WorkerLoop:
    """The state of one serving worker: the attempts in flight, the bundles being fetched, the map functions."""

    def __init__(
        self,
        frames: Channel,
        bundles: BundleCache | None = None,
        *,
        capture: bool = True,
        concurrency: int | None = None,
    ) -> None:
        self.frames = frames
        self.bundle_cache = bundles
        self.capture = capture
        self.concurrency = concurrency
        self.chunks = ChunkRunner()
        self.where = f"{socket.gethostname()}:{os.getpid()}"
        # Invariant: ``attempts`` holds every attempt started and not yet
        # answered with its Done, by id; at most ``concurrency`` of them.
        self.attempts: dict[int, _Attempt] = {}
        # Invariant: ``queued`` holds the attempts received and not started,
        # oldest first; it is empty unless ``attempts`` is full (the oldest
        # starts as soon as one running ends).
        self.queued: dict[int, _Attempt] = {}
        # Set once serving ends: nothing queued starts any more.
        self._closing = False
        # Invariant: ``bundles`` holds a future for each bundle asked for
        # with NeedBundle whose data has not arrived; every attempt needing
        # that bundle waits on the same one.
        self.bundles: dict[str, asyncio.Future[bytes]] = {}
        # The environment as it was before the attempts running now set
        # theirs: restored when the last one ends.
        self._saved_env: dict[str, str | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Functions imported so far, by reference and bundle folder (a task,
        # its plain function, whether that is async): imported once per worker.
        self._functions: dict[tuple[FunctionRef, Path | None], tuple[Task[Any, Any] | None, Callable[..., Any], bool]] = {}
        # Bundle folders found or unpacked so far, by digest.
        self._roots: dict[str, Path] = {}

    async def serve(self) -> int:
        flusher: asyncio.Task[None] | None = None
        try:
            await self.frames.send(
                Hello(
                    python=platform.python_version(),
                    shoal=VERSION,
                    cpus=usable_cpus(),
                    gpus=detect_gpus(),
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    executable=sys.executable,
                )
            )
            if self.capture:
                flusher = asyncio.create_task(self._flush_loop(), name="shoal-worker-logs")
            with _capturing(self) if self.capture else contextlib.nullcontext():
                await self.frames.each(self.handle)
            return len(self.attempts)
        except ConnectionError:
            # The engine went away (before the hello, or while a reply was
            # being sent, or it reset the stream): nobody is left to tell.
            return len(self.attempts)
        finally:
            self._closing = True
            self.queued.clear()
            background = list(self._tasks)
            if flusher is not None:
                flusher.cancel()
                background.append(flusher)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.frames.aclose()

    def handle(self, message: Message) -> bool:
        """Act on one message from the engine; False once it says to stop.

        Synchronous, so that a transport can hand messages over as they
        arrive (see :class:`~engine._frames.SocketFrames`).
        """
        if isinstance(message, Chunk):
            # Run here, not as a task: chunks are answered in the order they
            # came, one at a time.  The reply is queued without waiting for
            # the engine to read it: the pool queues only a few chunks on a
            # worker, so only a few replies can wait in the buffer.
            self.frames.post(self.chunks.run(message))
        elif isinstance(message, Start):
            self._start(message.id, message.payload)
        elif isinstance(message, Cancel):
            self.cancel(message.id)
        elif isinstance(message, Withdraw):
            self.withdraw(message.id)
        elif isinstance(message, FindPort):
            # For a gang's rank 0 on this host: free on every address now.
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind(("", 0))
                self.frames.post(PortFound(sock.getsockname()[1]))
        elif isinstance(message, BundleData):
            waiter = self.bundles.pop(message.digest, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message.data)
        elif isinstance(message, Shutdown):
            return False
        return True

    def _start(self, id: int, payload: Payload) -> None:
        attempt = _Attempt(id, payload)
        if self.concurrency is not None and len(self.attempts) >= self.concurrency:
            self.queued[id] = attempt
        else:
            self._launch(attempt)

    def _launch(self, attempt: _Attempt) -> None:
        self.attempts[attempt.id] = attempt
        task = attempt.task = asyncio.create_task(self._run(attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _next(self) -> None:
        """Start the oldest queued attempts while there is room (an attempt just ended)."""
        queued = self.queued
        while queued and not self._closing and (self.concurrency is None or len(self.attempts) < self.concurrency):
            first = next(iter(queued))
            self._launch(queued.pop(first))

    # -- one attempt ---------------------------------------------------------

    async def _run(self, attempt: _Attempt) -> None:
        id, payload = attempt.id, attempt.payload
        attempt.running = True
        attempt_var.set(attempt)
        started = time.time()
        if payload.cluster is not None:
            # One rank of a gang: a worker of its own (the backend starts a
            # fresh one per rank), so the variables stay its own.
            cluster_var.set(payload.cluster)
            self._set_env({**payload.env, **payload.cluster.env()})
        elif payload.env:
            self._set_env(payload.env)
        try:
            outcome = await self._attempt(attempt, started)
        except asyncio.CancelledError:
            if not attempt.cancelled:
                raise  # the worker is shutting down under it: nobody waits for a Done
            outcome = self._cancelled(attempt, started)
        finally:
            self.attempts.pop(id, None)
            if not self.attempts and self._saved_env:
                self._restore_env()
            self._next()
        self._send_logs(attempt)
        with contextlib.suppress(ConnectionError):
            await self.frames.send(Done(id, outcome))

    def cancel(self, id: int) -> None:
        """The engine cancels attempt ``id``.

        A queued one is dropped (answered with its Done at once), a running
        async one is cancelled; a sync one cannot be.
        """
        queued = self.queued.pop(id, None)
        if queued is not None:
            self.frames.post(Done(id, self._cancelled(queued, time.time())))
            return
        attempt = self.attempts.get(id)
        if attempt is None or attempt.task is None or attempt.sync:
            return
        attempt.cancelled = True
        attempt.task.cancel()
        if not attempt.running:
            # Cancelled before its task took a step: the task will not run
            # at all, so its Done is sent from here.
            del self.attempts[id]
            self.frames.post(Done(id, self._cancelled(attempt, time.time())))
            self._next()

    def withdraw(self, id: int) -> None:
        """The engine takes back attempt ``id``: dropped if it is still queued (no Done follows)."""
        dropped = self.queued.pop(id, None) is not None
        self.frames.post(Withdrawn(id, dropped))

    async def _attempt(self, attempt: _Attempt, started: float) -> Outcome:
        payload = attempt.payload
        deadline = None if payload.timeout is None else attempt.received + payload.timeout + TIMEOUT_GRACE
        if deadline is not None and deadline <= time.monotonic():
            return self._timed_out(attempt, started, queued=True)
        try:
            fn, is_async, args, kwargs = await self._prepare(payload)
        except Exception as exc:
            return self._failed(exc, started, "system")
        trace_sink_var.set(_Sink(attempt, self.frames))
        attempt.sync = not is_async
        limit = None if deadline is None else deadline - time.monotonic()
        if limit is not None and limit <= 0:
            return self._timed_out(attempt, started, queued=True)
        try:
            if is_async:
                # Run in this task itself (no task per call): cancelling the
                # attempt cancels this task.
                if limit is None:
                    result = await fn(*args, **kwargs)
                else:
                    scope = asyncio.timeout(limit)
                    try:
                        async with scope:
                            result = await fn(*args, **kwargs)
                    except TimeoutError:
                        if not scope.expired():
                            raise  # the task's own TimeoutError
                        return self._timed_out(attempt, started)
            else:
                call = _in_thread(fn, args, kwargs, payload.task)
                if limit is None:
                    result = await call
                else:
                    done, _ = await asyncio.wait({call}, timeout=limit)
                    if not done:
                        await self._give_up(attempt, self._timed_out(attempt, started))
                    result = call.result()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            return self._failed(exc, started, "user")
        try:
            kind, data = encode_value(result, what=f"output of task {payload.task!r}")
        except Exception as error:
            return self._failed(error, started, "user")
        return Outcome(
            ok=True, value_kind=kind, value=data, started_at=started, finished_at=time.time(), where=self.where
        )

    def _cancelled(self, attempt: _Attempt, started: float) -> Outcome:
        payload = attempt.payload
        return Outcome(
            ok=False,
            error=ErrorInfo(
                "asyncio.CancelledError",
                f"attempt {payload.attempt} of action {payload.key} was cancelled by the engine",
            ),
            started_at=started,
            finished_at=time.time(),
            where=self.where,
            error_kind="system",
        )

    def _timed_out(self, attempt: _Attempt, started: float, *, queued: bool = False) -> Outcome:
        payload = attempt.payload
        if queued:
            how = "; it was still waiting in the worker's queue and did not run"
        elif attempt.sync:
            how = "; it is sync code that cannot be stopped, so the worker exits"
        else:
            how = "; it was cancelled there"
        error = ActionTimeout(
            f"task {payload.task!r} (action {payload.key}, attempt {payload.attempt}) ran past its "
            f"timeout of {payload.timeout:g}s on worker {self.where}{how}: raise timeout= or make it faster"
        )
        return self._failed(error, started, "user")

    async def _give_up(self, attempt: _Attempt, outcome: Outcome) -> NoReturn:
        """Report a sync attempt past its timeout, then exit: nothing can stop its thread.

        The process goes with it so that the attempt stops using the machine.
        """
        self.attempts.pop(attempt.id, None)
        self._send_logs(attempt)
        with contextlib.suppress(ConnectionError):
            await self.frames.send(Done(attempt.id, outcome))
            await self.frames.aclose()
        _flush_std()
        os._exit(EXIT_STUCK)

    def _failed(self, exc: BaseException, started: float, kind: str) -> Outcome:
        blob: bytes | None
        try:
            blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(blob)  # many exceptions pickle but cannot be rebuilt
        except Exception:
            blob = None
        return Outcome(
            ok=False,
            error=describe(exc),
            error_pickle=blob,
            started_at=started,
            finished_at=time.time(),
            where=self.where,
            error_kind=kind,
        )

    async def _prepare(
        self, payload: Payload
    ) -> tuple[Callable[..., Any], bool, tuple[Any, ...], dict[str, Any]]:
        """The function to call, whether it is async, and its arguments.

        A failure here is the worker's, not the task's.
        """
        root: Path | None = None
        if payload.bundle is not None:
            root = self._roots.get(payload.bundle)
            if root is None:
                root = await self._bundle(payload.bundle)
                if str(root) not in sys.path:
                    sys.path.insert(0, str(root))
                self._roots[payload.bundle] = root
        found = self._functions.get((payload.fn, root))
        if found is None:
            try:
                obj = load_function(payload.fn, root)
            except ImportFailed as exc:
                raise ImportFailed(
                    f"worker {self.where} cannot run task {payload.task!r} ({payload.fn}): {exc}; "
                    f"a worker imports tasks from the code bundle or from what is installed where "
                    f"it runs: make the same code importable there"
                ) from exc
            fn = obj.fn if isinstance(obj, Task) else obj
            found = self._functions[(payload.fn, root)] = (
                obj if isinstance(obj, Task) else None,
                fn,
                inspect.iscoroutinefunction(fn),
            )
        task, fn, is_async = found
        try:
            values, named = decode_value(payload.args_kind, payload.args)
            if task is not None:
                positional, keywords = task.signature.bind(tuple(values), dict(named))
                return fn, is_async, tuple(positional), dict(keywords)
            return fn, is_async, tuple(values), dict(named)
        except Exception as exc:
            raise OffloadError(
                f"worker {self.where} cannot decode the arguments of task {payload.task!r} "
                f"({payload.fn}): {type(exc).__name__}: {exc}; the worker's code or libraries "
                f"differ from the engine's: install the same versions where it runs"
            ) from exc

    async def _bundle(self, digest: str) -> Path:
        """The folder of code bundle ``digest``, asked for and unpacked when it is not cached."""
        cache = self.bundle_cache
        if cache is None:
            raise OffloadError(
                f"worker {self.where} was sent an attempt that needs code bundle {digest}, and it "
                f"has no bundle cache: offloaded attempts go to `python -m offload.worker`"
            )
        found = cache.cached(digest)
        if found is not None:
            return found
        waiter = self.bundles.get(digest)
        if waiter is None:
            waiter = self.bundles[digest] = asyncio.get_running_loop().create_future()
            await self.frames.send(NeedBundle(digest))
        data = await asyncio.shield(waiter)
        if not data:
            raise OffloadError(
                f"worker {self.where} asked for code bundle {digest} and the engine sent nothing: "
                f"its copy of the bundle is missing; run again"
            )
        # unpack_bundle checks the data against its SHA-256 before anything is written.
        return await asyncio.to_thread(cache.unpack, data, digest)

    # -- environment ---------------------------------------------------------

    def _set_env(self, env: dict[str, str]) -> None:
        for name, value in env.items():
            if name not in self._saved_env:
                self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value

    def _restore_env(self) -> None:
        saved, self._saved_env = self._saved_env, {}
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    # -- output --------------------------------------------------------------

    def owner(self) -> _Attempt | None:
        """The attempt that a write or log record made now belongs to, or None.

        The attempt of the current context; else, while exactly one attempt
        runs, that one (a thread it started, which does not carry its context).
        """
        attempt = attempt_var.get()
        if attempt is None and len(self.attempts) == 1:
            for only in self.attempts.values():
                return only
        return attempt

    def _send_logs(self, attempt: _Attempt) -> None:
        for stream, text, at in attempt.take():
            self.frames.post(Log(attempt.id, stream, text, at))

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            for attempt in list(self.attempts.values()):
                self._send_logs(attempt)
            with contextlib.suppress(ConnectionError):
                await self.frames.drain()


def _in_thread(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> asyncio.Future[Any]:
    """Run a sync call in a thread of its own (carrying this context); its result as a loop future.

    A daemon thread, not the loop's executor: a call that never returns
    must not keep the worker from exiting.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:
            outcome: tuple[Any, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is exiting
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=work, name=f"shoal-attempt {name}", daemon=True).start()
    return future


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# -- capture of prints and logs ------------------------------------------------


class _AttemptStream:
    """``sys.stdout``/``sys.stderr`` of the worker: an attempt's writes go back to the engine.

    Writes made outside any attempt go to the real stream (the worker's
    stderr: its log).
    """

    def __init__(self, real: TextIO, stream: str, loop: WorkerLoop) -> None:
        self.real = real
        self.stream = stream
        self.loop = loop

    def write(self, text: str) -> int:
        attempt = self.loop.owner()
        if attempt is not None:
            attempt.write(self.stream, text)
            return len(text)
        return self.real.write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.real.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _AttemptLogHandler(logging.Handler):
    """A root-logger handler: records logged by an attempt go back to the engine as stream ``log``.

    Records logged outside any attempt are written to stderr as Python's
    last resort would, since this handler stands in the way of it.
    """

    def __init__(self, loop: WorkerLoop) -> None:
        super().__init__()
        self.loop = loop
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            attempt = self.loop.owner()
            if attempt is not None:
                attempt.write("log", self.format(record) + "\n")
            elif record.levelno >= logging.WARNING and sys.__stderr__ is not None:
                sys.__stderr__.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _capturing(loop: WorkerLoop) -> Any:
    saved = sys.stdout, sys.stderr
    handler = _AttemptLogHandler(loop)
    sys.stdout = cast("TextIO", _AttemptStream(sys.stdout, "stdout", loop))
    sys.stderr = cast("TextIO", _AttemptStream(sys.stderr, "stderr", loop))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        sys.stdout, sys.stderr = saved
