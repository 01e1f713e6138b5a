"""The engine's side of one warm worker, whatever carries its frames: shared by ``offload.Local`` and ``offload.SSH``.

A :class:`WorkerClient` reads a worker's frames (Done, Log, Trace,
NeedBundle, Withdrawn) and fails what the worker still held when its
stream ends.  :func:`outcome_of` and :func:`cancel_attempt` are the
``wait`` and ``cancel`` of the worker backends.

Pipelining: a worker started with a concurrency (``offload.Local``'s) may
hold more attempts than it runs, the rest queued in it in the order they
were sent.  An attempt among the first ``concurrency`` of those the engine
has sent and not heard the end of has surely started (the worker starts
them strictly in order); any later one may or may not have.  Cancelling
one that has surely started kills the worker's process group, as for a
worker without a queue; for one that may be queued the engine asks first
(``Withdraw``): dropped from the queue, it never runs and the worker
serves on; found running, the worker is killed after all.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
from typing import TYPE_CHECKING, Any, Final, Protocol

from engine import OffloadError
from engine.extend import (
    PROTOCOL,
    VERSION,
    BackendContext,
    BundleData,
    Done,
    FindPort,
    Frames,
    Handle,
    Hello,
    Log,
    NeedBundle,
    Outcome,
    Payload,
    PortFound,
    Shutdown,
    StreamBroken,
    SubmitFailed,
    Trace,
    Withdraw,
    Withdrawn,
    WorkerLost,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from engine.extend import AttemptHooks

__all__ = [
    "SHUTDOWN_GRACE",
    "START_TIMEOUT",
    "TAIL_BYTES",
    "WITHDRAW_WAIT",
    "WorkerClient",
    "WorkerOwner",
    "cancel_attempt",
    "check_hello",
    "message_host",
    "outcome_of",
]

#: Seconds a new worker has to say hello (a cold interpreter on a busy machine).
START_TIMEOUT: Final = 60.0
#: Seconds ``aclose`` waits for workers to exit after Shutdown before killing them.
SHUTDOWN_GRACE: Final = 2.0
#: How much of a dead worker's stderr an error quotes.
TAIL_BYTES: Final = 2000
#: Seconds a cancel waits for a worker to answer a Withdraw before killing it
#: instead (its loop may be held up by an attempt that blocks it).
WITHDRAW_WAIT: Final = 2.0
#: Weight of the latest attempt in a worker's running mean of attempt times:
#: heavy, so that the mean forgets a worker's first attempt (which imports
#: the task) within a few, and follows a change of task quickly.
MEAN_WEIGHT: Final = 0.5

_log = logging.getLogger("offload.local")


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
    """Cancel a submitted attempt.

    One that has started (or may have) takes its worker, and the worker's
    process group, with it; one still queued in its worker is taken back
    from the queue, and the worker serves on (see the module docstring).
    """
    attempt = attempts.pop(handle.id, None)
    if attempt is None or attempt.future.done():
        return  # it ended meanwhile (its Done came, or its worker went): nothing runs
    worker = attempt.worker
    why = f"attempt {handle.id} was cancelled"
    if not worker.surely_started(attempt.n):
        try:
            await worker.withdraw(attempt.n)
        except asyncio.CancelledError:
            # Given up on while asking: it might still start, so its worker goes.
            if not attempt.future.done():
                worker.spawn(discard(worker, why))
            attempt.future.cancel()
            raise
        if attempt.future.done():
            return  # dropped from the queue, or it ended (or its worker went) meanwhile
    attempt.future.cancel()
    await discard(worker, why)


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

    def __init__(
        self, owner: WorkerOwner, frames: Frames, hello: Hello, pid: int, what: str, concurrency: int | None = None
    ) -> None:
        self.owner = owner
        self.frames = frames
        self.hello = hello
        self.pid = pid
        #: The worker in messages ("the local worker process 123 (python3)").
        self.what = what
        #: How many attempts the worker runs at once, queueing the others
        #: (its ``--concurrency``); None: it starts every attempt it is sent.
        self.concurrency = concurrency
        self.serial = itertools.count(1)
        # Invariant: ``in_flight`` holds the attempts sent to this worker
        # and not answered with Done (nor dropped by a Withdraw), by their
        # id on this worker, in the order they were sent.
        self.in_flight: dict[int, _Attempt] = {}
        # Invariant: ``withdrawing`` holds a future for each Withdraw sent
        # and not answered (nor ended by the worker's loss): True once the
        # attempt was dropped from the worker's queue.
        self.withdrawing: dict[int, asyncio.Future[bool]] = {}
        # Invariant: ``port_waiters`` wait for the PortFound answers of the
        # FindPort messages sent, in the order they were sent.
        self.port_waiters: list[asyncio.Future[int]] = []
        #: Running mean of the seconds its attempts took (None: none ended yet).
        self.mean_seconds: float | None = None
        self.reader: asyncio.Task[None] | None = None
        #: Why the engine killed this worker, if it did.
        self.killed: str | None = None
        self._tasks: set[asyncio.Future[None]] = set()

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
            outcome = message.outcome
            if attempt is not None and not attempt.future.done():
                attempt.future.set_result(outcome)
            if outcome.finished_at >= outcome.started_at > 0:
                took = outcome.finished_at - outcome.started_at
                mean = self.mean_seconds
                self.mean_seconds = took if mean is None else mean + (took - mean) * MEAN_WEIGHT
            self.owner._wake()
        elif isinstance(message, Withdrawn):
            if message.dropped:
                attempt = self.in_flight.pop(message.id, None)
                if attempt is not None:
                    attempt.future.cancel()
                self.owner._wake()
            waiter = self.withdrawing.pop(message.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message.dropped)
        elif isinstance(message, PortFound):
            if self.port_waiters:
                found = self.port_waiters.pop(0)
                if not found.done():
                    found.set_result(message.port)
        elif isinstance(message, NeedBundle):
            self.spawn(self._send_bundle(message.digest))

    async def free_port(self) -> int:
        """A TCP port free on the worker's host now, found by the worker itself (for a gang's rank 0)."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.port_waiters.append(waiter)
        await self.frames.send(FindPort())
        return await waiter

    def spawn(self, work: Awaitable[None]) -> None:
        """Run ``work`` in the background, kept until it ends (a bundle to send, a kill to finish)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def surely_started(self, n: int) -> bool:
        """Whether attempt ``n`` has started on the worker, or starts the moment its Start arrives.

        True for a worker that queues nothing, and for the first
        ``concurrency`` attempts in flight (the worker starts them in the
        order they were sent); a later one may still be queued there.
        """
        if self.concurrency is None:
            return True
        for i, key in enumerate(self.in_flight):
            if i >= self.concurrency:
                return False
            if key == n:
                return True
        return False

    async def withdraw(self, n: int) -> bool:
        """Ask the worker to drop attempt ``n`` from its queue: whether it did.

        False when it had started (or ended), when the worker went, or
        when it did not answer within :data:`WITHDRAW_WAIT` seconds.
        """
        waiter = self.withdrawing.get(n)
        if waiter is None:
            waiter = self.withdrawing[n] = asyncio.get_running_loop().create_future()
            try:
                await self.frames.send(Withdraw(n))
            except ConnectionError:
                return False  # the worker is going: its reader ends the attempt
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), WITHDRAW_WAIT)
        except TimeoutError:
            return False

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
        self._end_withdrawals()

    async def lost(self, broken: str | None) -> None:
        """The worker's stream ended: reap it and its group, fail its attempts with ``lost_as``."""
        self.owner._forget(self)
        status = await self.exited(SHUTDOWN_GRACE)
        await self.terminate()
        if status is None:
            status = await self.exited(None)
        with contextlib.suppress(Exception):
            await self.frames.aclose()
        try:
            self._fail_lost(broken, status)
        finally:
            self._end_withdrawals()
            waiters, self.port_waiters = self.port_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(self.lost_as(f"{self.what} ended before it found a free port"))
                    waiter.exception()

    def _end_withdrawals(self) -> None:
        waiters, self.withdrawing = self.withdrawing, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_result(False)

    def _fail_lost(self, broken: str | None, status: str | None) -> None:
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


