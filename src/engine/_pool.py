"""The engine's reusable process pool, the machinery under ``parallel_map``.

A :class:`WorkerPool` owns up to ``max_workers`` worker processes, started
on first use and kept for later calls and later runs, until
:meth:`WorkerPool.aclose`.  Workers are spawned: each is a fresh interpreter
(fork+exec; the parent runs threads, so a bare ``fork`` is unsafe) that
takes the parent's ``sys.path``, imports ``engine`` and waits for work.
Unlike ``multiprocessing``'s spawn it does not import the caller's main
module again, so a script's top-level code runs once, guarded by ``if
__name__ == "__main__":`` or not; functions of the script travel by value
instead (see ``engine._parallel``).  Each worker talks to the parent over
its own socket pair; the parent side is an asyncio transport, so waiting for
results never blocks the event loop and a dead worker shows up at once as a
lost connection.

A worker runs the one serving loop of every shoal worker
(:func:`engine._serve.serve`) over asyncio streams on its socket, and the
two sides speak the worker protocol of :mod:`engine._wire`: the worker
says ``Hello``, the parent sends ``Chunk`` messages (the function, pickled,
only the first time that worker sees its id; the pickled list of items),
and each is answered by one ``ChunkDone`` (the pickled results and the
seconds spent in the function) or ``ChunkFailed`` (an
:class:`~engine._records.ErrorInfo`, the exception itself when it can be
rebuilt, and where it failed).

A worker handles one chunk at a time, in the order received; the parent may
queue a second chunk behind a running one that is expected to end soon, so
the worker does not wait for the parent between short chunks (behind a long
one it does not: another worker may be free; see ``engine._parallel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import pickle
import signal
import socket
import subprocess
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Final

from ._errors import ConfigError, EngineError, RemoteTraceback
from ._frames import StreamBroken, take_frames
from ._serve_chunks import FUNCTION_CACHE_SIZE
from ._wire import (
    Chunk,
    ChunkDone,
    ChunkFailed,
    Hello,
    frame_parts,
)

__all__ = ["FUNCTION_CACHE_SIZE", "RemoteTraceback", "WorkerPool"]

#: Chunks abandoned by their caller are left to finish (rather than the
#: worker killed and restarted) when expected to take at most this long.
DRAIN_SECONDS: Final = 0.25


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply of a worker (process ``pid``) to one chunk."""

    message: ChunkDone | ChunkFailed
    pid: int

    @property
    def seconds(self) -> float:
        return self.message.seconds

    def results(self) -> list[Any]:
        assert isinstance(self.message, ChunkDone)
        out: list[Any] = pickle.loads(self.message.results)
        return out

    def failure(self) -> ChunkFailed:
        assert isinstance(self.message, ChunkFailed)
        return self.message

    def _failed(self, stage: str) -> bool:
        return isinstance(self.message, ChunkFailed) and self.message.stage == stage

    @property
    def raised(self) -> bool:
        return self._failed("call")

    @property
    def bad_function(self) -> bool:
        return self._failed("function")

    @property
    def bad_items(self) -> bool:
        return self._failed("items")


class WorkerLost(Exception):
    """Internal: the connection to a worker closed while chunks were queued on it."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(f"worker process {worker.pid} died")
        self.worker = worker


def _retrieve(fut: asyncio.Future[Reply]) -> None:
    """Mark an abandoned chunk's outcome as seen, so asyncio does not log it."""
    if not fut.cancelled():
        fut.exception()


# -- parent side -----------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """Parent end of one worker's socket: frames replies and resolves waiters in order.

    Invariant: ``waiters[i]`` belongs to the i-th chunk sent and not yet
    answered; the worker answers in the order it received, so each reply
    resolves ``waiters[0]``.  Once ``lost`` is set, ``waiters`` is empty and
    nothing more is sent.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[asyncio.Future[Reply]] = deque()
        self.buffer = bytearray()
        self.hello = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        try:
            messages = take_frames(buf, f"worker process {self.pid}")
        except StreamBroken:
            self._broken()
            return
        for message in messages:
            if isinstance(message, Hello):
                self.hello = True
                continue
            if not isinstance(message, ChunkDone | ChunkFailed) or not self.waiters:
                self._broken()
                return
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(Reply(message, self.pid))

    def _broken(self) -> None:
        """The worker sent what the protocol does not allow here: drop it (it counts as crashed)."""
        self.buffer.clear()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionResetError(f"worker {self.pid} is gone"))
                # Only the oldest chunk's waiter is awaited; the others are
                # abandoned with the worker and must not be logged.
                _retrieve(waiter)


class Worker:
    """One worker process and the parent's end of its socket.

    ``functions`` mirrors the worker's LRU of unpickled functions (ids only),
    updated in the same order as the worker updates its own, so the parent
    knows whether a function has to be sent along with a chunk.
    """

    def __init__(self, process: subprocess.Popen[bytes], connection: _Connection) -> None:
        self.process = process
        self.pid: int = process.pid
        self.connection = connection
        self.functions: OrderedDict[int, None] = OrderedDict()

    @property
    def alive(self) -> bool:
        return not self.connection.lost

    @property
    def started(self) -> bool:
        """Whether the worker has finished starting (it said hello)."""
        return self.connection.hello

    @property
    def queued(self) -> int:
        """Chunks sent to this worker and not answered yet."""
        return len(self.connection.waiters)

    def submit(self, fn_id: int, fn_blob: bytes, items_blob: bytes) -> asyncio.Future[Reply]:
        """Queue one chunk; the future resolves with the worker's reply.

        The future fails with :class:`WorkerLost` if the worker dies first.
        """
        conn = self.connection
        if conn.lost or conn.transport is None:
            raise WorkerLost(self)
        if fn_id in self.functions:
            self.functions.move_to_end(fn_id)
            fn_blob = b""
        else:
            self.functions[fn_id] = None
            if len(self.functions) > FUNCTION_CACHE_SIZE:
                self.functions.popitem(last=False)
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        conn.waiters.append(fut)
        header, body = frame_parts(Chunk(fn_id, items_blob, fn_blob))
        conn.transport.write(header)
        conn.transport.write(body)
        return fut

    def forget_function(self, fn_id: int) -> None:
        """The worker failed to load ``fn_id`` and did not keep it."""
        self.functions.pop(fn_id, None)

    def __repr__(self) -> str:
        return f"<Worker pid={self.pid} queued={self.queued} alive={self.alive}>"


class WorkerPool:
    """A lazily started, reusable pool of worker processes for ``parallel_map``.

    Nothing starts in ``__init__``: the first :meth:`checkout` starts all
    ``max_workers`` processes at once (about a tenth of a second each, in
    parallel).  Workers stay up between calls and runs; one that dies or is
    killed (its chunk was cancelled) is replaced on the next checkout.
    Callers check a worker out, queue chunks on it, and check it back in;
    checkouts are served first come, first served.

    The pool belongs to the event loop it was first used on (its sockets are
    that loop's transports).  Used from a new loop after the old one ended,
    it starts fresh workers; used from two running loops at once, it refuses.

    Worker processes ignore SIGINT (Ctrl-C reaches the whole process group;
    the parent decides what to cancel) and are daemonic, so they never
    outlive the parent.  They exit when their socket closes.
    """

    def __init__(self, max_workers: int) -> None:
        if max_workers < 1:
            raise ConfigError(f"WorkerPool needs max_workers >= 1, got {max_workers}")
        self.max_workers = max_workers
        # Invariant: every worker in _idle is also in _workers, alive, and not
        # checked out; _workers holds every live worker, checked out or not;
        # len(_workers) + _starting <= max_workers.
        self._workers: set[Worker] = set()
        self._idle: deque[Worker] = deque()
        self._starting = 0
        # Checkouts waiting for a worker, oldest first; a done future is a
        # waiter that gave up (cancelled) and is skipped.
        self._waiters: deque[asyncio.Future[Worker]] = deque()
        # Tasks that start workers or wait for killed ones to exit; kept so
        # aclose can wait for them and so they are not garbage collected.
        self._background: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._ids = itertools.count(1)
        #: Chunks and items sent to workers so far (for tests and tuning).
        self.chunks_sent = 0
        self.items_sent = 0

    # -- public ----------------------------------------------------------------

    def pids(self) -> list[int]:
        """Process ids of the live workers, sorted."""
        return sorted(w.pid for w in self._workers)

    def new_function_id(self) -> int:
        """A fresh id under which one call's function is cached in the workers."""
        return next(self._ids)

    @property
    def has_waiters(self) -> bool:
        """Whether some checkout is waiting for a worker (callers should yield theirs)."""
        return any(not w.done() for w in self._waiters)

    async def checkout(self) -> Worker:
        """Take an idle worker, starting workers as needed; wait if all are busy."""
        self._bind_loop()
        while self._idle:
            worker = self._idle.popleft()
            if worker.alive:
                return worker
        self._start_missing()
        fut: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a worker in the same tick we were cancelled: pass it on.
                self.checkin(fut.result())
            raise

    def checkin(self, worker: Worker) -> None:
        """Give back a worker with no chunk queued on it."""
        if not worker.alive or self._closed:
            self.discard(worker)
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(worker)
                return
        self._idle.append(worker)

    def abandon(self, worker: Worker, expected_seconds: float) -> None:
        """Take back a worker whose queued chunks nobody will read.

        If they should be done within ``DRAIN_SECONDS``, let it finish them in
        the background and return to the pool (restarting a worker costs
        more); otherwise kill it now so the CPU is free at once.
        """
        for waiter in worker.connection.waiters:
            waiter.add_done_callback(_retrieve)
        if expected_seconds <= DRAIN_SECONDS and worker.alive and not self._closed:
            self._spawn(self._drain(worker))
        else:
            self.discard(worker)

    async def _drain(self, worker: Worker) -> None:
        pending = list(worker.connection.waiters)
        late = False
        if pending:
            _, unfinished = await asyncio.wait(pending, timeout=2 * DRAIN_SECONDS)
            late = bool(unfinished)
        if late or not worker.alive:
            self.discard(worker)
        else:
            self.checkin(worker)

    def discard(self, worker: Worker) -> None:
        """Kill a worker (busy on a chunk nobody wants, or dead) and replace it later.

        The process is reaped in the background; :meth:`aclose` waits for it.
        """
        if worker in self._workers:
            self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        if worker.process.poll() is None:
            worker.process.kill()
        if worker.connection.transport is not None:
            worker.connection.transport.abort()
        self._spawn(self._reap(worker, grace=0.0))
        if self._waiters and not self._closed:
            self._start_missing()

    async def aclose(self) -> None:
        """Stop every worker: idle ones exit when their socket closes, busy ones are killed.

        Waits until all worker processes have exited.  The pool cannot be
        used afterwards.
        """
        if self._closed:
            return
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(
                    EngineError("the engine's worker pool was closed while waiting for a worker")
                )
        idle = set(self._idle)
        self._idle.clear()
        for worker in list(self._workers):
            self._workers.discard(worker)
            if worker in idle and worker.connection.transport is not None:
                # Closing its socket makes an idle worker exit on its own.
                worker.connection.transport.close()
                self._spawn(self._reap(worker, grace=5.0))
            else:
                self.discard(worker)
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- internals -------------------------------------------------------------

    def _bind_loop(self) -> None:
        if self._closed:
            raise EngineError(
                "parallel_map: the engine's worker pool is closed (the engine was closed); "
                "run parallel_map with an open engine"
            )
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None and self._loop.is_running() and not self._loop.is_closed():
            raise EngineError(
                "parallel_map: this engine's worker pool is in use by another running event "
                "loop; use one engine per event loop"
            )
        # The old loop is gone: its transports are dead; start over.
        for worker in self._workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait()
        self._workers.clear()
        self._idle.clear()
        self._waiters.clear()
        self._background.clear()
        self._starting = 0
        self._loop = loop

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _start_missing(self) -> None:
        missing = self.max_workers - len(self._workers) - self._starting
        if missing <= 0:
            return
        self._starting += missing
        for _ in range(missing):
            self._spawn(self._start_one())

    async def _start_one(self) -> None:
        loop = asyncio.get_running_loop()
        worker: Worker | None = None
        try:
            parent_sock, child_sock = socket.socketpair()
            try:
                # Popen forks and execs: milliseconds, so off the event loop.
                process = await loop.run_in_executor(None, _spawn_worker, child_sock.fileno())
            except BaseException:
                parent_sock.close()
                raise
            finally:
                # The child has its copy; ours must go so that the worker's
                # death closes the socket and we notice it.
                child_sock.close()
            parent_sock.setblocking(False)
            connection = _Connection(process.pid)
            worker = Worker(process, connection)
            try:
                await loop.create_connection(lambda: connection, sock=parent_sock)
            except BaseException:
                parent_sock.close()
                self._spawn(self._reap(worker, grace=0.0))
                raise
        except BaseException as exc:
            self._starting -= 1
            waiters, self._waiters = self._waiters, deque()
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(
                        EngineError(f"parallel_map could not start a worker process: {exc!r}")
                    )
            if not isinstance(exc, Exception):
                raise
            return
        self._starting -= 1
        if self._closed:
            self.discard(worker)
            return
        self._workers.add(worker)
        self.checkin(worker)

    async def _reap(self, worker: Worker, grace: float) -> None:
        """Wait (off the loop) for a worker process to exit; kill it after ``grace`` seconds."""
        await wait_exit(worker, grace)
        if worker.process.poll() is None:
            worker.process.kill()
            await wait_exit(worker, None)


async def wait_exit(worker: Worker, grace: float | None) -> int | None:
    """Wait up to ``grace`` seconds (off the loop) for a worker to exit; its exit code or None."""
    process = worker.process

    def wait() -> int | None:
        try:
            return process.wait(grace)
        except subprocess.TimeoutExpired:
            return None

    return await asyncio.get_running_loop().run_in_executor(None, wait)


# The whole program of a worker process: take the parent's import path (so
# the same modules resolve), then serve chunks on the inherited socket.
_BOOTSTRAP: Final = (
    "import json, sys\n"
    "sys.path[:] = json.loads(sys.argv[2])\n"
    "from engine._pool import _worker_main\n"
    "_worker_main(int(sys.argv[1]))\n"
)


def _spawn_worker(fd: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _BOOTSTRAP, str(fd), json.dumps(sys.path)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
    )


# -- worker side -----------------------------------------------------------------------


def _worker_main(fd: int) -> None:
    """Entry point of a worker process: serve chunks until the parent closes the socket."""
    # Ctrl-C goes to the whole process group; the parent decides what stops.
    # (Set before the loop starts, so asyncio.run installs no handler of its own.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve_socket(socket.socket(fileno=fd)))


async def _serve_socket(sock: socket.socket) -> None:
    from ._frames import SocketFrames
    from ._serve import serve

    frames = await SocketFrames.connect(sock, "the parallel_map caller")
    # Prints of the mapped function go to the inherited stdout/stderr, as in any process.
    await serve(frames, capture=False)
