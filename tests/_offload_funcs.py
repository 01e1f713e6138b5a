"""Tasks that the offload tests send to real worker processes (imported there by reference)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import msgspec

import engine


class Point(msgspec.Struct, frozen=True):
    x: int
    y: int


@engine.task
async def add(x: int, y: int) -> int:
    return x + y


@engine.task
def norm1(p: Point, *, scale: int = 1) -> int:
    # The argument arrives as a Point (converted against the annotation), not a dict.
    assert isinstance(p, Point), type(p)
    return (abs(p.x) + abs(p.y)) * scale


@engine.task
def whoami() -> int:
    return os.getpid()


def _deep(message: str) -> None:
    raise ValueError(message)


@engine.task
def explode(message: str) -> None:
    _deep(message)


@engine.task
def chatty(n: int) -> int:
    print(f"hello {n} from stdout")  # noqa: T201 - output to capture
    print(f"and {n} to stderr", file=sys.stderr)  # noqa: T201 - output to capture
    logging.getLogger("chatty").warning("careful with %d", n)
    return n


@engine.task
async def print_then_sleep(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - output to capture
    await asyncio.sleep(60)


@engine.task
def write_to_fd1() -> str:
    # Bypasses sys.stdout, as a C library would: must not reach the protocol stream.
    os.write(1, b"\x00\x00\x00\x05garbage written to fd 1\n")
    print("printed too")  # noqa: T201 - output to capture
    return "intact"


@engine.trace
def lookup(x: int, marker: str) -> int:
    with open(marker, "a") as f:
        f.write(f"{x}\n")
    return x * 10


@engine.task
def traced(x: int, marker: str) -> int:
    return lookup(x, marker) + 1


@engine.task
async def sleepy(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds


@engine.task
def sleepy_sync(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@engine.task
def spawn_and_sleep(pidfile: str) -> None:
    child = subprocess.Popen(["sleep", "120"])
    Path(pidfile + ".tmp").write_text(f"{os.getpid()} {child.pid}")
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(120)


@engine.task
async def rendezvous(folder: str, name: str, parties: int) -> int:
    """Wait (up to 20 s) until ``parties`` attempts have arrived: only attempts running at once all return."""
    await asyncio.to_thread(Path(folder, name).touch)
    for _ in range(400):
        if len(os.listdir(folder)) >= parties:
            return os.getpid()
        await asyncio.sleep(0.05)
    raise TimeoutError(f"only {len(os.listdir(folder))} of {parties} attempts arrived")


@engine.task
def getenv(name: str) -> str | None:
    return os.environ.get(name)


@engine.task
async def make_file(text: str) -> engine.File:
    return await engine.File.from_bytes(text.encode(), name="made.txt")


def plain_double(x: int) -> int:
    """Not a task: a plain function is called as it is."""
    return 2 * x


@engine.task
async def own_timeout() -> None:
    raise TimeoutError("the task's own deadline")


@engine.task
def print_from_own_thread() -> None:
    import threading

    # A thread the task starts does not carry the attempt's context.
    thread = threading.Thread(target=lambda: print("from a thread of the task"))  # noqa: T201
    thread.start()
    thread.join()
