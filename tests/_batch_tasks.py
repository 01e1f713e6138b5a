"""Tasks that the AWS Batch tests send to jobs (which import them from the code bundle)."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import engine


class Unlucky(Exception):
    """A task's own exception type: it must come back as itself."""


@engine.task(offload="aws", retries=0)
def square(x: int) -> int:
    return x * x


@engine.task(offload="aws", retries=0)
async def where() -> dict[str, str]:
    return {k: os.environ.get(k, "") for k in ("AWS_BATCH_JOB_ID", "AWS_BATCH_JOB_ARRAY_INDEX", "HOME")}


@engine.task(offload="aws", retries=0)
def unlucky(n: int) -> int:
    raise Unlucky(f"no luck with {n}")


@engine.task(offload="aws", retries=0)
def chatty(n: int) -> int:
    print(f"hello {n} from a job")  # noqa: T201 - output to capture
    print(f"warning {n} on stderr", file=sys.stderr)  # noqa: T201 - output to capture
    return n


@engine.task(offload="aws", retries=0)
async def slow(seconds: float) -> float:
    print("started", flush=True)  # noqa: T201 - output to capture
    await asyncio.sleep(seconds)
    return seconds


@engine.task(offload="aws", retries=0)
def size_of(data: bytes) -> int:
    return len(data)


@engine.task(offload="aws", retries=0)
def die(code: int) -> None:
    print("about to die", flush=True)  # noqa: T201 - output to capture
    time.sleep(0.5)  # the worker sends output on every 0.1 s: let it reach the job's log
    os._exit(code)


@engine.task(offload="aws", retries=0, timeout=1.5)
async def overdue() -> None:
    await asyncio.sleep(60)
