"""``parallel_map`` and ``parallel_imap``: a plain function over items, in worker processes.

How a call runs:

* The function is pickled once, when the call is made.  Functions that a
  fresh interpreter can import (module-level functions of importable
  modules) travel by reference; functions of the caller's script (run as
  ``__main__`` or loaded from a file under a name no worker can import),
  lambdas and closures travel by value with cloudpickle.  Anything that
  cannot be pickled raises :class:`~engine.InputError` right away.
* Up to ``workers`` *lanes* run side by side.  A lane takes one of the
  engine's CPU slots, checks out a worker process from the engine's
  :class:`~engine._pool.WorkerPool`, and feeds it chunks of items.  It
  queues a second chunk behind the running one (so the worker does not wait
  for the parent between chunks) only when the running one is measured to
  be short: a chunk queued behind a long one, or behind one of unknown
  cost, is work another worker could have started at once.  So N long
  items on N workers run one per worker, while tiny items keep the worker
  fed.
* Chunk sizes adapt to the measured cost per item (see
  :class:`_ChunkSizer`) unless ``chunksize`` is given.
* Items are taken from the input only as lanes need them, and at most
  ``4 * lanes`` chunks are taken but not yet handed to the consumer, so an
  endless generator is mapped in constant memory.
* The first exception raised in a worker is raised in the caller, with the
  worker's traceback as ``__cause__`` and a note naming the item index;
  the other chunks are abandoned.  A worker that dies raises
  :class:`~engine.WorkerCrashed`.  Cancelling the caller does the same as
  an error: no new chunk starts, and workers busy on this call's chunks are
  killed at once (and replaced later), unless those chunks are expected to
  end within a quarter second, in which case they finish unread and the
  worker stays.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import pickle
import signal
from abc import abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar

from ._context import current_action, current_engine, current_run
from ._errors import ConfigError, InputError, RemoteError, WorkerCrashed
from ._events import TaskCounts
from ._pool import RemoteTraceback, WorkerLost, wait_exit
from ._shipping import Shipping, function_name

if TYPE_CHECKING:
    from ._limits import Slots
    from ._pool import Reply, Worker, WorkerPool

__all__ = ["ParallelIterator", "parallel_imap", "parallel_map"]

T = TypeVar("T")
R = TypeVar("R")

#: Chunks queued on one worker at once: one running, one waiting behind it.
DEPTH: Final = 2
#: A chunk is queued behind the running one only if that one is expected to
#: take at most this long.  Queuing saves one round trip to the parent per
#: chunk (well under a millisecond), which matters only for short chunks;
#: behind a longer one the queued chunk would wait while another worker may
#: be idle, and at the end of the input that wait is the tail of the call.
QUEUE_BEHIND_SECONDS: Final = 0.05
#: Chunks taken from the input and not yet handed to the consumer, per lane.
WINDOW_PER_LANE: Final = 4


class ItemCounts(TaskCounts):
    """The items of the ``parallel_map`` calls of one function in one run, by state.

    Items are not actions: no journal record, no key, no retry.  They show in
    the progress display under ``parallel_map:<function>`` and are summed
    apart from the actions (``Run.stats`` and the run summary count actions
    only), so ``shoal run``'s summary and ``shoal show`` agree on the
    number of actions.
    """

    __slots__ = ()

    unit: ClassVar[str] = "items"


# -- chunk sizes --------------------------------------------------------------------------


class _ChunkSizer:
    """Picks each chunk's size from the measured worker time per item.

    The aim is chunks of about ``TARGET_SECONDS`` of work: long enough that
    the fixed cost of a chunk (a round trip, a few pickles) is noise, short
    enough to spread heavy items over all workers and keep the tail short.
    The first chunks hold one item each (a probe); after that the size is
    ``TARGET_SECONDS / seconds_per_item``, growing at most ``GROWTH`` times
    the largest chunk so far (cheap early items must not commit us to a huge
    chunk), and capped by ``MAX_ITEMS``, by ``MAX_BYTES`` of pickled items,
    and, when the input has a length, by ``remaining / (2 * lanes)`` so the
    last chunks shrink and all lanes finish together.  The estimate decays
    by half at each observation, so it follows items that change in cost.
    """

    TARGET_SECONDS: Final = 0.02
    GROWTH: Final = 8
    MAX_ITEMS: Final = 65_536
    MAX_BYTES: Final = 4 << 20

    def __init__(self, fixed: int | None, total: int | None, lanes: int) -> None:
        self.fixed = fixed
        self.total = total
        self.lanes = lanes
        # Decayed sums of worker seconds and items measured, and of pickled
        # bytes and items sent; both zero until the first observation.
        self._seconds = 0.0
        self._items = 0.0
        self._bytes = 0.0
        self._sent = 0.0
        self._largest = 1

    def next_size(self, taken: int) -> int:
        if self.fixed is not None:
            return self.fixed
        if self._items == 0:
            return 1
        per_item = max(self._seconds / self._items, 1e-9)
        size = min(self.TARGET_SECONDS / per_item, self._largest * self.GROWTH, self.MAX_ITEMS)
        if self._sent:
            size = min(size, self.MAX_BYTES / max(self._bytes / self._sent, 1.0))
        if self.total is not None:
            size = min(size, math.ceil((self.total - taken) / (2 * self.lanes)))
        n = max(1, int(size))
        self._largest = max(self._largest, n)
        return n

    def seconds_for(self, n: int) -> float:
        """Expected worker time for ``n`` items (infinite before any measurement)."""
        return n * self._seconds / self._items if self._items else math.inf

    def sent(self, n: int, nbytes: int) -> None:
        self._bytes = self._bytes * 0.5 + nbytes
        self._sent = self._sent * 0.5 + n

    def observe(self, n: int, seconds: float) -> None:
        self._seconds = self._seconds * 0.5 + seconds
        self._items = self._items * 0.5 + n


# -- one call ------------------------------------------------------------------------------


class _Chunk:
    """Items ``start .. start + n - 1``, kept until their results arrive (they may be resent)."""

    __slots__ = ("blob", "future", "generation", "items", "n", "start")

    def __init__(self, start: int, items: list[Any], blob: bytes, generation: int) -> None:
        self.start = start
        self.n = len(items)
        self.items = items
        self.blob = blob
        self.generation = generation  # of the Shipping rules the blob was made with
        self.future: asyncio.Future[Reply] | None = None

    @property
    def span(self) -> str:
        return (
            f"item {self.start}" if self.n == 1 else f"items {self.start}-{self.start + self.n - 1}"
        )


class _Signal:
    """Wakes every task waiting at the moment :meth:`fire` is called."""

    def __init__(self) -> None:
        self._fut: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        if self._fut is None or self._fut.done():
            self._fut = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._fut)

    def fire(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)


class ParallelIterator(AsyncIterator[R]):
    """What :func:`parallel_imap` returns: an async iterator that can be closed early.

    ``aclose()`` stops the work at once (queued chunks dropped, busy workers
    killed); use ``async with contextlib.aclosing(parallel_imap(...))`` when
    the loop may stop before the end.
    """

    __slots__ = ()

    @abstractmethod
    async def aclose(self) -> None: ...


class _MapCall(ParallelIterator[R], Generic[T, R]):
    """One ``parallel_imap`` call: an async iterator over the results.

    Lanes (tasks) move chunks from the input to workers and results into
    ``_done``; the consumer (``__anext__``) moves them on to ``_ready`` and
    yields them.  ``aclose()`` (or cancelling the consumer) stops the lanes
    and hands their workers back to the pool, which kills those still busy
    on this call's chunks (see ``WorkerPool.abandon``).
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        items: Iterable[T],
        *,
        workers: int | None,
        chunksize: int | None,
        ordered: bool,
        resources: Callable[[], tuple[WorkerPool, Slots]] | None = None,
    ) -> None:
        for label, value in (("workers", workers), ("chunksize", chunksize)):
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ConfigError(
                    f"parallel_map({function_name(fn)}): {label}= takes a whole number >= 1 or None, "
                    f"got {value!r}"
                )
        if not callable(fn):
            raise InputError(f"parallel_map takes a function as its first argument, got {fn!r}")
        self._fn_name = function_name(fn)
        self._shipping = Shipping(fn)
        self._total = len(items) if isinstance(items, Sized) else None
        self._source: Iterator[T] = iter(items)
        self._workers = workers
        self._chunksize = chunksize
        self._ordered = ordered
        self._resources = resources
        self._started = False
        self._closed = False
        self._lanes: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._wake_consumer = _Signal()
        self._wake_lanes = _Signal()
        # Invariant: items [0, _taken) have been taken from _source; _open
        # counts chunks taken whose results are not yet in _ready, and is at
        # most _max_open; _exhausted means _source returned its last item.
        self._taken = 0
        self._open = 0
        self._max_open = WINDOW_PER_LANE
        self._exhausted = False
        # Ordered: results by chunk start, and the start of the next chunk to
        # hand out; unordered: results in completion order.
        self._done: dict[int, list[R]] = {}
        self._done_fifo: deque[list[R]] = deque()
        self._next_out = 0
        self._ready: deque[R] = deque()
        # Items this call has added to the run's counters and not settled.
        self._counters: TaskCounts | None = None
        self._c_pending = 0
        self._c_running = 0

    # -- consumer side -------------------------------------------------------

    def __aiter__(self) -> _MapCall[T, R]:
        return self

    async def __anext__(self) -> R:
        if not self._ready:
            batch = await self.next_batch()
            if batch is None:
                raise StopAsyncIteration
            self._ready.extend(batch)
        return self._ready.popleft()

    async def next_batch(self) -> list[R] | None:
        """The results of the next chunk (in order, if ordered); None when all are out.

        ``parallel_map`` reads whole batches, which saves a coroutine step
        per item.  Raises the call's first error; cancelling the caller here
        stops the call.
        """
        if not self._started:
            self._start()
        while True:
            if self._error is not None or self._closed:
                error, self._error = self._error, None
                await self.aclose()
                if error is not None:
                    raise error
                return None
            batch = self._hand_out()
            if batch is not None:
                return batch
            if self._exhausted and self._open == 0:
                await self.aclose()
                return None
            try:
                await self._wake_consumer.wait()
            except BaseException:
                await asyncio.shield(self.aclose())
                raise

    async def aclose(self) -> None:
        """Stop the call: no new chunks, busy workers killed; results not yet read are dropped."""
        self._closed = True
        lanes = list(self._lanes)
        for lane in lanes:
            lane.cancel()
        if lanes:
            await asyncio.gather(*lanes, return_exceptions=True)
        self._settle_counters()

    def _hand_out(self) -> list[R] | None:
        """Take the next finished chunk's results (in order, if ordered), if there is one."""
        if self._ordered:
            results = self._done.pop(self._next_out, None)
            if results is None:
                return None
            self._next_out += len(results)
        elif self._done_fifo:
            results = self._done_fifo.popleft()
        else:
            return None
        self._open -= 1
        self._wake_lanes.fire()
        return results

    def _start(self) -> None:
        self._started = True
        if self._resources is not None:
            pool, slots = self._resources()
        else:
            engine = current_engine()
            pool, slots = engine.worker_pool(), engine.cpu_slots
        action = current_action()
        if action is not None and action.held is not None:
            # This action now only waits for the map; its slots go to the lanes.
            action.lend()
        run = current_run()
        if run is not None:
            self._counters = run.counters_for(f"parallel_map:{self._fn_name}", kind=ItemCounts)
            if self._total is not None:
                self._count(pending=self._total)
        self._pool = pool
        self._slots = slots
        self._slot = min(1.0, slots.capacity)
        self._fn_id = pool.new_function_id()
        lanes = min(self._workers or pool.max_workers, pool.max_workers)
        if self._total is not None:
            lanes = max(1, min(lanes, self._total))
        self._max_open = WINDOW_PER_LANE * lanes
        self._sizer = _ChunkSizer(self._chunksize, self._total, lanes)
        loop = asyncio.get_running_loop()
        for _ in range(lanes):
            lane = loop.create_task(self._lane())
            self._lanes.add(lane)
            lane.add_done_callback(self._lanes.discard)

    # -- lanes -----------------------------------------------------------------

    def _can_take(self) -> bool:
        return not self._exhausted and not self._closed and self._open < self._max_open

    async def _lane(self) -> None:
        try:
            while True:
                while not self._can_take():
                    if self._exhausted or self._closed:
                        return
                    await self._wake_lanes.wait()
                await self._slots.acquire(self._slot)
                try:
                    worker = await self._pool.checkout()
                    await self._drive(worker)
                finally:
                    self._slots.release(self._slot)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._fail(exc)
        finally:
            self._wake_consumer.fire()

    async def _drive(self, worker: Worker) -> None:
        """Feed chunks to one worker until the window is full, the input ends, or others wait."""
        inflight: deque[_Chunk] = deque()
        try:
            while True:
                while self._may_queue(inflight) and self._can_take() and not self._pool.has_waiters:
                    chunk = self._take()
                    if chunk is None:
                        break
                    await self._submit(worker, chunk)
                    self._pool.chunks_sent += 1
                    self._pool.items_sent += chunk.n
                    self._count(pending=-chunk.n, running=chunk.n)
                    inflight.append(chunk)
                if not inflight:
                    break
                chunk = inflight[0]
                assert chunk.future is not None
                try:
                    reply = await chunk.future
                except ConnectionResetError:
                    raise await self._crashed(worker, chunk) from None
                inflight.popleft()
                if reply.bad_items and self._learn(chunk, reply):
                    # Pickled before we knew some of its classes must go
                    # by value: again, behind what is queued (worker order).
                    chunk.blob = self._shipping.items(chunk.items, chunk.start)
                    chunk.generation = self._shipping.generation
                    await self._submit(worker, chunk)
                    inflight.append(chunk)
                    continue
                self._deliver(chunk, reply, worker)
        except BaseException:
            if inflight:
                # Busy on chunks nobody will read: the pool kills it unless
                # they are about to finish anyway.
                self._pool.abandon(worker, self._sizer.seconds_for(sum(c.n for c in inflight)))
            else:
                self._pool.checkin(worker)
            raise
        self._pool.checkin(worker)

    def _may_queue(self, inflight: deque[_Chunk]) -> bool:
        """Whether one more chunk may go to a worker that has ``inflight`` queued.

        Always to an idle worker; behind a running chunk only when that one is
        measured to end soon.  Before the first result the cost per item is
        unknown (infinite), so each lane's first chunk goes alone: when the
        input holds as many long items as there are workers, the first lane
        must not take a second item that the next lane, a moment behind it,
        would have run at once on its own worker.
        """
        if not inflight:
            return True
        if len(inflight) >= DEPTH:
            return False
        queued = sum(chunk.n for chunk in inflight)
        return self._sizer.seconds_for(queued) <= QUEUE_BEHIND_SECONDS

    async def _submit(self, worker: Worker, chunk: _Chunk) -> None:
        try:
            chunk.future = worker.submit(self._fn_id, self._shipping.function, chunk.blob)
        except WorkerLost:
            raise await self._crashed(worker, chunk) from None
        chunk.blob = b""

    def _learn(self, chunk: _Chunk, reply: Reply) -> bool:
        """Whether a chunk the worker could not unpickle should be pickled again and resent."""
        missing = reply.failure().missing_module
        if missing is not None:
            self._shipping.learn(missing)
        return chunk.generation < self._shipping.generation

    def _take(self) -> _Chunk | None:
        size = self._sizer.next_size(self._taken)
        items = list(itertools.islice(self._source, size))
        if len(items) < size:
            self._exhausted = True
            self._wake_lanes.fire()
        if not items:
            return None
        start = self._taken
        self._taken += len(items)
        self._open += 1
        if self._total is None:
            self._count(pending=len(items))
        blob = self._shipping.items(items, start)
        self._sizer.sent(len(items), len(blob))
        return _Chunk(start, items, blob, self._shipping.generation)

    def _deliver(self, chunk: _Chunk, reply: Reply, worker: Worker) -> None:
        if reply.raised:
            raise self._remote_error(chunk, reply)
        if reply.bad_function:
            worker.forget_function(self._fn_id)
            error = reply.failure().error
            raise InputError(
                f"parallel_map: worker process {reply.pid} could not load the function "
                f"{self._fn_name!r} ({error.type}: {error.message}); define it in a "
                f"module the workers can import, or make sure everything it refers to is "
                f"picklable"
            ) from RemoteTraceback(error.traceback)
        if reply.bad_items:
            error = reply.failure().error
            raise InputError(
                f"parallel_map({self._fn_name}): worker process {reply.pid} could not unpickle "
                f"{chunk.span} ({error.type}: {error.message}); pass plain data or "
                f"objects of classes the workers can import"
            ) from RemoteTraceback(error.traceback)
        results = reply.results()
        chunk.items = []
        self._sizer.observe(chunk.n, reply.seconds)
        self._count(running=-chunk.n, succeeded=chunk.n)
        if self._ordered:
            self._done[chunk.start] = results
        else:
            self._done_fifo.append(results)
        self._wake_consumer.fire()

    def _remote_error(self, chunk: _Chunk, reply: Reply) -> BaseException:
        failure = reply.failure()
        error = failure.error
        index = chunk.start + failure.index
        exc: BaseException | None = None
        if failure.error_pickle is not None:
            try:
                exc = pickle.loads(failure.error_pickle)
            except Exception:
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(
                f"{error.type}: {error.message}",
                remote_type=error.type,
                remote_traceback=error.traceback,
            )
        exc.add_note(
            f"parallel_map: raised by {self._fn_name} on item {index} "
            f"(in worker process {reply.pid}); the traceback above is the worker's"
        )
        exc.__cause__ = RemoteTraceback(error.traceback)
        exc.__suppress_context__ = True
        self._count(running=-1, failed=1)
        return exc

    async def _crashed(self, worker: Worker, chunk: _Chunk) -> WorkerCrashed:
        # The socket closes as the process dies; reaping it takes a moment.
        code = await wait_exit(worker, 2.0)
        if not worker.started:
            how = (
                f"failed to start (exit code {code}); its error output says why (a worker "
                f"needs to import 'engine' from the caller's sys.path)"
            )
        elif code is not None and code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            how = f"was killed by {sig}"
            if -code == signal.SIGKILL:
                how += " (often the out-of-memory killer)"
        elif code is not None:
            how = f"exited with status {code} (os._exit or sys.exit in the function?)"
        else:
            how = "closed its connection"
        return WorkerCrashed(
            f"parallel_map({self._fn_name}): worker process {worker.pid} {how} while running "
            f"{chunk.span}; the remaining items were cancelled and a new worker starts for the "
            f"next call. Run {self._fn_name} on item {chunk.start} in the main process to "
            f"reproduce"
        )

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._closed:
            self._error = exc
        self._closed = True
        current = asyncio.current_task()
        for lane in self._lanes:
            if lane is not current:
                lane.cancel()
        self._wake_consumer.fire()

    # -- progress counters -------------------------------------------------------------

    def _count(
        self, *, pending: int = 0, running: int = 0, succeeded: int = 0, failed: int = 0
    ) -> None:
        counters = self._counters
        if counters is None:
            return
        counters.pending += pending
        counters.running += running
        counters.succeeded += succeeded
        counters.failed += failed
        self._c_pending += pending
        self._c_running += running

    def _settle_counters(self) -> None:
        """Count every item not done as cancelled (the call ended early, or is over)."""
        counters = self._counters
        if counters is None:
            return
        counters.pending -= self._c_pending
        counters.running -= self._c_running
        counters.cancelled += self._c_pending + self._c_running
        self._c_pending = self._c_running = 0


# -- public API --------------------------------------------------------------------------


def parallel_imap(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    chunksize: int | None = None,
    ordered: bool = True,
) -> ParallelIterator[R]:
    """Map ``fn`` over ``items`` in the engine's worker processes, yielding results as they come.

    ``ordered=True`` yields in input order; ``ordered=False`` in the order
    chunks finish.  Items are read from ``items`` only as workers need them,
    with a bounded number of chunks in flight, so an endless generator works
    in constant memory.  ``workers`` caps the worker processes used (default
    and maximum: the engine's CPU count); ``chunksize`` fixes the items per
    chunk (default: adapted to the measured cost per item).

    The function is checked here: one that cannot be pickled raises
    :class:`~engine.InputError` at once.  Work starts at the first
    ``__anext__``.  Close the iterator (``aclose()``, or leave an ``async
    with contextlib.aclosing(...)`` block) to stop early: queued chunks are
    dropped and busy workers killed.  See :func:`parallel_map` for errors.
    """
    return _MapCall(fn, items, workers=workers, chunksize=chunksize, ordered=ordered)


async def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int | None = None,
    chunksize: int | None = None,
) -> list[R]:
    """Run ``fn`` on every item in the engine's worker processes; results in input order.

    The pool belongs to the current run's engine (outside a run, the default
    engine of this loop), is started on first use and reused.  Inside a run
    the items show in progress under ``parallel_map:<function name>``, and
    each busy worker holds one of the engine's CPU slots.

    ``fn`` is any picklable callable: a module-level function, or a function
    of the running script, a lambda or a closure (shipped by value with
    cloudpickle).  One that cannot be pickled raises
    :class:`~engine.InputError` before anything runs.

    Errors: the first exception raised by ``fn`` is raised here (the same
    type when it can be unpickled, else :class:`~engine.RemoteError`), with
    the worker's traceback as ``__cause__`` and a note naming the item
    index; the rest of the work is cancelled.  A worker process that dies
    raises :class:`~engine.WorkerCrashed` naming the items it was running;
    the pool replaces it.  Cancelling the caller kills the busy workers at
    once.
    """
    call: _MapCall[T, R] = _MapCall(fn, items, workers=workers, chunksize=chunksize, ordered=True)
    out: list[R] = []
    try:
        while (batch := await call.next_batch()) is not None:
            out.extend(batch)
    finally:
        await call.aclose()
    return out
