"""The task the offload benchmark sends to workers (importable by name there)."""

from __future__ import annotations

from pathlib import Path

import engine


def _count(folder: str) -> int:
    return len(list(Path(folder).glob("rank-*")))


def _put(path: Path, text: str) -> None:
    """Write a file whole at once (a reader polling for it never sees it empty)."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(text)
    part.rename(path)


def echo_plain(x: int) -> int:
    return x


@engine.task(offload="box")
async def echo(x: int) -> int:
    return x


@engine.task(offload="aws")
async def echo_batch(x: int) -> int:
    return x


@engine.task(offload="lab")
async def echo_ssh(x: int) -> int:
    return x


@engine.task(nodes=4, offload="lab")
async def gang_started(folder: str) -> int:
    """Each rank writes when it began running (``folder/rank-R``: the wall clock, shared by every host here)."""
    import time

    me = engine.cluster()
    _put(Path(folder, f"rank-{me.rank}"), repr(time.time()))
    return me.rank


@engine.task(nodes=4, offload="lab")
async def gang_fails(folder: str) -> int:
    """Each rank writes its host and pid; the last raises once all have (writing when), the others sleep."""
    import asyncio
    import os
    import socket
    import time

    me = engine.cluster()
    _put(Path(folder, f"rank-{me.rank}"), f"{socket.gethostname()} {os.getpid()}")
    if me.rank < me.world_size - 1:
        await asyncio.sleep(300)
        return me.rank
    while True:
        if _count(folder) == me.world_size:
            break
        await asyncio.sleep(0.005)
    _put(Path(folder, "failed"), repr(time.time()))
    raise RuntimeError(f"rank {me.rank} gives up")


@engine.task(offload="lab")
async def peek_ssh(f: engine.File) -> int:
    """The size of ``f`` as the host sees it, and its first bytes read there (the whole file is not hashed)."""
    async with f.open() as fh:
        head = await fh.read_range(0, 16)
    assert head
    return fh.size
