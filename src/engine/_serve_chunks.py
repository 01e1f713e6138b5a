"""The worker's side of ``parallel_map``: run a chunk of items through a function.

A :class:`ChunkRunner` belongs to one serving worker (:mod:`engine._serve`)
and answers each :class:`~engine._wire.Chunk` with one
:class:`~engine._wire.ChunkDone` or :class:`~engine._wire.ChunkFailed`.
Items, functions and results are pickled by the caller and stay pickled
bytes inside the frames: they are the user's objects, which msgpack would
not give back with their types.

A chunk runs in the thread of the worker's event loop, blocking it: the
worker has nothing else to do meanwhile (the next chunk waits, already
read, in the stream's buffer), and a thread handoff per chunk would cost
more than the loop does.  While it runs, the loop is hidden, so that the function finds no running event
loop, as in a plain process: ``asyncio.run`` inside a mapped function
works.
"""

from __future__ import annotations

import asyncio
import importlib
import pickle
import sys
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final, Literal

from ._entries import describe
from ._wire import Chunk, ChunkDone, ChunkFailed

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FUNCTION_CACHE_SIZE", "ChunkRunner", "dumps"]

#: How many functions a worker keeps unpickled (most recently used first);
#: the pool mirrors the same LRU per worker to know when to resend one.
FUNCTION_CACHE_SIZE: Final = 8


class ChunkRunner:
    """Runs chunks, keeping the functions of recent ``parallel_map`` calls unpickled."""

    def __init__(self) -> None:
        # Invariant: the last FUNCTION_CACHE_SIZE function ids received,
        # least recently used first, updated in the order chunks arrive: the
        # pool keeps the same LRU of ids per worker and sends a function
        # along only when its id is not in it.
        self.functions: OrderedDict[int, Callable[[Any], Any]] = OrderedDict()

    def run(self, chunk: Chunk) -> ChunkDone | ChunkFailed:
        """The reply to one chunk."""
        functions = self.functions
        if chunk.function:
            try:
                # The caller's import path at the time of the call (a script
                # loaded since the worker started may have added its folder).
                path, fn_bytes = pickle.loads(chunk.function)
                if path != sys.path:
                    sys.path[:] = path
                    importlib.invalidate_caches()
                fn = pickle.loads(fn_bytes)
            except Exception as exc:
                return _failed("function", exc)
            functions[chunk.fn] = fn
            if len(functions) > FUNCTION_CACHE_SIZE:
                functions.popitem(last=False)
        else:
            fn = functions[chunk.fn]
            functions.move_to_end(chunk.fn)
        try:
            items = pickle.loads(chunk.items)
        except Exception as exc:
            return _failed("items", exc)
        results: list[Any] = []
        # Hide the running loop from the function (see the module docstring);
        # inline rather than a context manager: this runs once per chunk.
        loop = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(None)
        start = time.perf_counter()
        try:
            # extend() keeps what map() produced before an exception, so
            # len(results) is the index of the failing item.
            results.extend(map(fn, items))
        except Exception as exc:
            return _failed("call", exc, len(results), time.perf_counter() - start)
        finally:
            asyncio.events._set_running_loop(loop)
        seconds = time.perf_counter() - start
        del items
        try:
            payload = dumps(results)
        except Exception:
            index, error = _first_unpicklable(results)
            return _failed("call", error, index, seconds)
        return ChunkDone(payload, seconds)


def dumps(obj: object) -> bytes:
    """Pickle by reference where possible, else by value (cloudpickle).

    Results whose classes came from the caller's script arrive here as
    classes rebuilt by value; plain pickle cannot name them, cloudpickle can,
    and it maps them back to the caller's own classes.
    """
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle  # type: ignore[import-untyped]

        blob: bytes = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        return blob


def _failed(
    stage: Literal["call", "function", "items"], exc: BaseException, index: int = 0, seconds: float = 0.0
) -> ChunkFailed:
    """Describe ``exc`` for the caller, keeping the exception object if it round-trips."""
    blob: bytes | None
    try:
        blob = dumps(exc)
        pickle.loads(blob)  # many exceptions pickle but cannot be rebuilt
    except Exception:
        blob = None
    return ChunkFailed(
        stage,
        describe(exc),
        index=index,
        seconds=seconds,
        error_pickle=blob,
        missing_module=exc.name if isinstance(exc, ModuleNotFoundError) else None,
    )


def _first_unpicklable(values: list[Any]) -> tuple[int, BaseException]:
    for i, value in enumerate(values):
        try:
            dumps(value)
        except Exception as exc:
            return i, TypeError(f"the result could not be pickled to send it back to the caller: {exc}")
    return 0, TypeError("the results could not be pickled to send them back to the caller")
