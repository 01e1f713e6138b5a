"""Functions for tests/test_parallel_map.py that worker processes import by reference."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

#: How long ``meet`` waits for the others before giving up.
MEET_SECONDS = 10.0


def square(x: int) -> int:
    return x * x


def pid_of(_: object) -> int:
    return os.getpid()


def sleep_then_pid(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def meet(item: tuple[str, int, int]) -> tuple[int, bool]:
    """Wait at a barrier of ``n`` items in ``folder``: (pid, whether all ``n`` were there at once).

    Each item marks its arrival with a file, then waits up to ``MEET_SECONDS``
    for the files of the others.  Items that wait on one another cannot all
    be there at once unless each runs on a worker of its own.
    """
    folder, index, n = item
    here = Path(folder)
    (here / f"{index}.arrived").touch()
    deadline = time.monotonic() + MEET_SECONDS
    while time.monotonic() < deadline:
        if sum(1 for _ in here.glob("*.arrived")) >= n:
            return os.getpid(), True
        time.sleep(0.005)
    return os.getpid(), False


def sleep_then_return(item: tuple[int, float]) -> int:
    index, seconds = item
    time.sleep(seconds)
    return index


def fail_on_seven(x: int) -> int:
    if x == 7:
        raise ValueError(f"seven is not allowed (got {x})")
    return x


class StubbornError(Exception):
    """Pickles, but cannot be unpickled (its __init__ wants two arguments)."""

    def __init__(self, what: str, code: int) -> None:
        super().__init__(f"{what} failed with code {code}")
        self.code = code


def fail_stubbornly(x: int) -> int:
    if x == 3:
        raise StubbornError("item three", 42)
    return x


def kill_self_on_five(x: int) -> int:
    if x == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_on_five(x: int) -> int:
    if x == 5:
        os._exit(3)
    return x


def doubled_by_its_own_event_loop(x: int) -> int:
    """Runs an event loop of its own, as a plain process may: the worker's must not be in the way."""

    async def double() -> int:
        await asyncio.sleep(0)
        return 2 * x

    return asyncio.run(double())
