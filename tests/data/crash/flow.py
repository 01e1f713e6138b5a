"""A flow for the crash tests: run as ``python flow.py SHARDS WIDTH``, or imported.

``main`` maps ``shard`` over the shards; each shard maps a leaf over its
items (a sync task for every fifth item, an async one otherwise), folds the
leaves' values in a sync task, stamps the total with an async trace, and
every tenth shard also makes an output big enough for the blob store.
Each leaf calls a sync trace and a cached task.  SHARDS=40, WIDTH=50 makes
4,085 actions and 2,040 trace calls.

Every execution of an action body or a trace appends one JSON line to the
file named by ``$CRASH_LOG``: the process id, what ran, and its identity
as the journal knows it (the action's key and cache key; for a trace, its
action's key and its name).  Each line is one ``write`` to a file opened
with ``O_APPEND``, so lines from threads and processes never interleave,
and a line is in the file once the body has started, before anything of
it can be committed.  A test compares these lines with the journal.

``$CRASH_DELAY`` (seconds) is how long each leaf waits, so a test can kill
the process while leaves are in flight; ``$CRASH_PAD`` (characters) pads
each leaf's output, to fill a small disk sooner.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any

import engine

DELAY = float(os.environ.get("CRASH_DELAY", "0"))
PAD = int(os.environ.get("CRASH_PAD", "0"))
#: Characters of the output of ``bulky``: over the journal's inline limit.
BULKY = 300_000


def log(kind: str, name: str) -> None:
    """Append one line saying that ``name`` (an action body, or a trace) runs now."""
    path = os.environ.get("CRASH_LOG")
    if not path:
        return
    action: Any = engine.current_action()
    if kind == "action":
        line = {"pid": os.getpid(), "kind": kind, "task": name, "key": action.key, "cache_key": action.cache_key}
    else:
        line = {"pid": os.getpid(), "kind": kind, "task": name, "parent": action.key}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, json.dumps(line).encode() + b"\n")
    finally:
        os.close(fd)


@engine.trace
def lookup(s: int, i: int) -> int:
    log("trace", "lookup")
    return (s * 31 + i * 7) % 101


@engine.trace
async def stamp(s: int, total: int) -> int:
    log("trace", "stamp")
    return (total * 13 + s) % 1_000_003


@engine.task(cache=True)
async def square(x: int) -> int:
    log("action", "square")
    return x * x


@engine.task
async def leaf(s: int, i: int) -> tuple[int, str]:
    log("action", "leaf")
    value = lookup(s, i) + await square(i % 25) + s
    if DELAY:
        await asyncio.sleep(DELAY)
    return value, "x" * PAD


@engine.task
def sync_leaf(s: int, i: int) -> tuple[int, str]:
    log("action", "sync_leaf")
    # A trace and a task called from a sync task's worker thread.
    value = lookup(s, i) + square(i % 25) + s  # type: ignore[operator]
    if DELAY:
        time.sleep(DELAY)
    return value, "x" * PAD


@engine.task
def fold(s: int, values: list[int]) -> int:
    log("action", "fold")
    return sum(v * (k + 1) for k, v in enumerate(values)) + s


@engine.task
async def bulky(s: int) -> str:
    log("action", "bulky")
    return str(s % 10) * BULKY


def start_leaf(s: int, i: int) -> Any:
    return (sync_leaf if i % 5 == 0 else leaf)(s, i)


@engine.task
async def shard(s: int, width: int) -> int:
    log("action", "shard")
    async with engine.group("leaves"):
        parts = await engine.map(start_leaf, itertools.repeat(s, width), range(width), concurrency=16)
    total: int = await fold(s, [value for value, _ in parts])  # type: ignore[misc]  # a sync task, awaited
    if s % 10 == 0:
        total += len(await bulky(s))
    return await stamp(s, total)


@engine.task
async def main(shards: int = 40, width: int = 50) -> int:
    log("action", "main")
    totals = await engine.map(shard, range(shards), itertools.repeat(width, shards), concurrency=4)
    return sum(totals)


def expected(shards: int, width: int) -> int:
    """What ``main(shards, width)`` returns, computed without shoal."""
    result = 0
    for s in range(shards):
        values = [(s * 31 + i * 7) % 101 + (i % 25) ** 2 + s for i in range(width)]
        total = sum(v * (k + 1) for k, v in enumerate(values)) + s
        if s % 10 == 0:
            total += BULKY
        result += (total * 13 + s) % 1_000_003
    return result


if __name__ == "__main__":
    run = engine.run(main, int(sys.argv[1]), int(sys.argv[2]))
    error = "" if run.error is None else f"{type(run.error).__name__}: {run.error}"
    sys.stdout.write(f"RUN {run.id} {run.status} {run.result if run.status == 'succeeded' else error}\n")
    sys.exit(0 if run.status == "succeeded" else 1)
