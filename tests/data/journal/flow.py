"""A flow for the journal's subprocess tests: run as ``python flow.py N``, or imported.

Every execution of ``leaf`` and of the ``lookup`` trace leaves a marker file
in ``$FLOW_MARKS``, so a test can count executions across processes.
``$FLOW_FSIZE`` (bytes) caps the size of files the process may write, to
simulate a full disk.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import engine

DELAY = float(os.environ.get("FLOW_DELAY", "0.02"))
PAYLOAD = int(os.environ.get("FLOW_PAYLOAD", "0"))
#: Seconds the root sleeps after its children, so a test can kill it there.
TAIL = float(os.environ.get("FLOW_TAIL", "0"))


def mark(kind: str, i: int) -> None:
    (Path(os.environ["FLOW_MARKS"]) / f"{kind}-{i}-{uuid.uuid4().hex}").touch()


@engine.trace
def lookup(i: int) -> int:
    mark("trace", i)
    return i * 10


@engine.task(concurrency=2)
async def leaf(i: int) -> dict[str, int | str]:
    mark("leaf", i)
    extra = lookup(i)
    await asyncio.sleep(DELAY)
    return {"i": i, "value": i * i + extra, "pad": "x" * PAYLOAD}


@engine.task
async def chunk(lo: int, hi: int) -> int:
    results = await asyncio.gather(*(leaf(i) for i in range(lo, hi)))
    return sum(int(r["value"]) for r in results)


@engine.task
async def main(n: int = 20) -> int:
    totals = await asyncio.gather(*(chunk(lo, min(lo + 5, n)) for lo in range(0, n, 5)))
    await asyncio.sleep(TAIL)
    return sum(totals)


def expected(n: int) -> int:
    return sum(i * i + i * 10 for i in range(n))


if __name__ == "__main__":
    limit = os.environ.get("FLOW_FSIZE")
    if limit:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    run = engine.run(main, int(sys.argv[1]))
    error = "" if run.error is None else f"{type(run.error).__name__}: {run.error}"
    sys.stdout.write(f"RUN {run.id} {run.status} {run.result if run.status == 'succeeded' else error}\n")
