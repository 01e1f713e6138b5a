"""Tasks that the SSH tests send to hosts (imported there from the code bundle, by name)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

import engine


@engine.task(offload="lab")
async def where(x: int) -> tuple[int, int, str]:
    return x * 2, os.getpid(), socket.gethostname()


@engine.task(offload="lab")
async def tiny(i: int) -> tuple[int, int]:
    return i * i, os.getpid()


@engine.task
async def many(n: int) -> list[tuple[int, int]]:
    results: list[tuple[int, int]] = await asyncio.gather(*(tiny(i) for i in range(n)))
    return results


@engine.task(offload="lab")
async def slow(i: int, seconds: float) -> tuple[int, str]:
    await asyncio.sleep(seconds)
    return i + 1, socket.gethostname()


@engine.task
async def spread(n: int, seconds: float) -> list[tuple[int, str]]:
    results: list[tuple[int, str]] = await asyncio.gather(*(slow(i, seconds) for i in range(n)))
    return results


@engine.task(offload="lab")
async def hangs(pidfile: str) -> None:
    # A child in the worker's process group: a cancel must end it too.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(600)")
    await asyncio.to_thread(Path(pidfile).write_text, f"{os.getpid()} {child.pid}\n")
    await asyncio.sleep(600)


@engine.task
async def call_hangs(pidfile: str) -> None:
    await hangs(pidfile)


@engine.task(offload="lab", resources=engine.Resources(gpu=1))
async def on_gpu() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@engine.task
async def call_on_gpu() -> str:
    return await on_gpu()


@engine.task(offload="lab")
async def size_of(f: engine.File) -> int:
    return len(await f.read_bytes())


@engine.task(offload="lab")
async def dies_once(marker: str) -> int:
    # The first attempt writes its pid and waits to be killed; the next one finds the marker.
    path = Path(marker)
    if await asyncio.to_thread(path.exists):
        return 2
    await asyncio.to_thread(path.write_text, f"{os.getpid()}\n")
    await asyncio.sleep(600)
    return 1


@engine.task
async def call_dies_once(marker: str) -> int:
    return await dies_once(marker)


class Unlucky(Exception):
    """A task's own exception, importable on the host and here."""


@engine.task(offload="lab")
async def unlucky(code: int) -> int:
    raise Unlucky(f"no luck {code}")


@engine.task
async def call_unlucky(code: int) -> int:
    return await unlucky(code)


@engine.task(offload="lab")
async def chatty(n: int) -> int:
    print(f"printed {n}")  # noqa: T201 - output to capture
    logging.getLogger("chatty").warning("logged %d", n)
    return n


@engine.task
async def call_chatty(n: int) -> int:
    return await chatty(n)
