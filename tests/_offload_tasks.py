"""Tasks that the offload tests send to worker processes (importable by name there)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import engine
import offload


class Unlucky(Exception):
    """A task's own exception, defined where workers can import it."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, code)
        self.code = code

    def __str__(self) -> str:
        return f"{self.args[0]} (code {self.code})"


@engine.task(offload="box")
async def where(x: int) -> tuple[int, int]:
    return x * 2, os.getpid()


@engine.task(offload="box")
def sync_where(x: int) -> tuple[int, int]:
    return x + 1, os.getpid()


@engine.task(offload="box")
def unlucky(code: int) -> int:
    raise Unlucky("no luck", code)


@engine.task(offload="box")
def chatty(n: int) -> int:
    print(f"printed {n}")  # noqa: T201
    print(f"to stderr {n}", file=sys.stderr)  # noqa: T201
    logging.getLogger("chatty").warning("logged %d", n)
    return n


@engine.task(offload="box", timeout=1)
def sleeper(pidfile: str) -> None:
    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(30)


@engine.task(offload="box")
def hangs(pidfile: str) -> None:
    # A child process of the attempt: killed with the attempt's process group.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(pidfile).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(60)


@engine.task(offload="box")
def dies_once(marker: str) -> int:
    """Sleeps (to be killed) the first time; returns how many times it ran."""
    with open(marker, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    runs = len(Path(marker).read_text().split())
    if runs == 1:
        time.sleep(60)
    return runs


@engine.task(offload="box", retries=2)
def fails_twice(marker: str) -> int:
    with open(marker, "a") as fh:
        fh.write("x")
    runs = len(Path(marker).read_text())
    if runs <= 2:
        raise ValueError(f"attempt {runs} fails")
    return runs


@engine.task(offload="box")
async def shout(f: engine.File) -> engine.File:
    data = await f.read_bytes()
    return await engine.File.from_bytes(data.upper(), name="loud.txt")


@engine.task(offload="box", resources=engine.Resources(cpu=100_000))
async def greedy() -> int:
    return 1


@engine.task
async def fan(n: int) -> list[int]:
    return [value for value, _ in await asyncio.gather(*(where(i) for i in range(n)))]



#: A backend object given to a task directly (no target name), shared by engines in turn.
ANONYMOUS = offload.Local(workers=1)


@engine.task(offload=ANONYMOUS)
async def anonymous(x: int) -> int:
    return x + 100
